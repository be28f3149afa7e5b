"""Fewer visual tokens without retraining: an image's tokens reduced to KEEP before they reach the language model.

    vlmjax.load(path, visual_tokens="visionzip:64")     # or "tome:0.25", "pool:0.25"; KEEP a count or a fraction
    vlmjax.load(path, visual_tokens="fastv:0.25:2")     # FastV: pruned inside the language model from layer 2

Methods, each on an image's projected tokens float[P, D] (the vision tower's attention at the feature layer
decides what is kept):
  visionzip  VisionZip (arXiv 2412.04467): the tokens that receive the most attention are kept as they are
             (from the class token in CLIP towers; the mean over queries in SigLIP towers, which have none), and
             the rest are merged into a few contextual tokens, each the mean of the tokens whose keys are most
             like its own (one contextual token per ~6 kept, VisionZip's 54 + 10 of 64).
  tome       ToMe's bipartite soft matching (arXiv 2210.09461) over the tower's keys, applied to its output:
             tokens split into two alternating sets, each token of the first merged into its most similar
             token of the second (size-weighted means), the most similar pairs first, until KEEP are left.
  pool       average pooling of the patch grid to a KEEP grid (2 x 2 pooling: KEEP = P / 4).
  fastv      FastV (arXiv 2403.06764, `models/fastv.py`): every token reaches the language model, whose layers from
             LAYER on (`fastv:KEEP:LAYER`, LAYER 2 by default, as the paper's K) see only each image's KEEP tokens
             that the prompt's last token attended to most in layer LAYER - 1.
Except FastV, kept tokens take the placeholders' places one after another: the language model sees KEEP
placeholders per image at consecutive positions (as VisionZip and the others feed LLaVA), so the prompt, the KV
cache, batching, chunked prefill and the prefix cache work as with any other token count. The reduction runs after
the projector (a per-token map, so selection commutes with it; the merges average projected tokens instead of the
tower's), which keeps the projector's per-token position embeddings (`image_position_embedding`) of every token
merged. With `image_token_merge`, the units reduced are the merged blocks: attention summed over each block, keys
concatenated.
"""

import dataclasses

import jax
import jax.numpy as jnp

METHODS = ("visionzip", "tome", "pool", "fastv")
FASTV = "fastv"
FASTV_LAYER = 2  # FastV's K: the paper prunes after layer 2 of LLaVA-1.5
CONTEXTUAL_SHARE = 10 / 64  # VisionZip's contextual tokens among those kept (10 of 64 on LLaVA-1.5)


@dataclasses.dataclass(frozen=True)
class Reduction:
  """A parsed `METHOD:KEEP` (FastV's `fastv:KEEP[:LAYER]`): KEEP tokens per image, a count (`64`) or, written with
  a decimal point, a fraction of them (`0.25`, `1.0`); `layer`: FastV's first pruned layer."""

  method: str
  keep: float
  fraction: bool
  layer: int = 0

  @property
  def in_language_model(self) -> bool:
    """Whether the tokens are pruned inside the language model (FastV), not before it."""
    return self.method == FASTV

  def tokens(self, available: int) -> int:
    """How many of `available` tokens are kept."""
    count = max(1, round(self.keep * available)) if self.fraction else int(self.keep)
    if not 1 <= count <= available:
      raise ValueError(f"visual_tokens keeps {count} of an image's {available} tokens: KEEP must leave between 1 "
                       f"and all of them")
    if self.method == "pool":
      side, grid = round(count**0.5), round(available**0.5)
      if side * side != count or grid % side:
        raise ValueError(f"visual_tokens pool:{self.keep} keeps {count} tokens: pooling keeps a square grid whose "
                         f"side divides the image's {grid} x {grid} (e.g. {(grid // 2) ** 2} for 2 x 2 pooling)")
    return count


def parse(spec: str) -> Reduction | None:
  """`METHOD:KEEP` (KEEP a count of tokens per image, or a fraction in (0, 1] written with a decimal point), or
  `fastv:KEEP[:LAYER]`; "" or "none": no reduction."""
  if spec in ("", "none"):
    return None
  parts = spec.split(":")
  fastv = parts[0] == FASTV and len(parts) in (2, 3)
  if not fastv and (len(parts) != 2 or parts[0] not in METHODS):
    raise ValueError(f"visual_tokens={spec!r}: expected METHOD:KEEP with METHOD one of {', '.join(METHODS)} and KEEP "
                     f"a count or a fraction (visionzip:64, tome:0.25), or fastv:KEEP:LAYER")
  layer = FASTV_LAYER if fastv else 0
  if fastv and len(parts) == 3:
    if not parts[2].isdigit() or int(parts[2]) < 1:
      raise ValueError(f"visual_tokens={spec!r}: FastV's LAYER {parts[2]!r} must be a layer number of at least 1 "
                       f"(the layers before it see every token)")
    layer = int(parts[2])
  try:
    keep = float(parts[1])
  except ValueError:
    raise ValueError(f"visual_tokens={spec!r}: KEEP {parts[1]!r} is not a number") from None
  fraction = "." in parts[1]
  if keep <= 0 or (fraction and keep > 1):
    raise ValueError(f"visual_tokens={spec!r}: KEEP must be a positive count or a fraction in (0, 1]")
  return Reduction(parts[0], keep, fraction, layer)


def reduce(reduction: Reduction, tokens: jax.Array, keys: jax.Array, received: jax.Array) -> jax.Array:
  """tokens float[N, P, D] (N images), keys float[N, P, K] and received float32[N, P] (the tower's, per token)
  -> float[N, KEEP, D]."""
  keep = reduction.tokens(tokens.shape[1])
  if keep == tokens.shape[1]:
    return tokens
  if reduction.method == "visionzip":
    return _visionzip(tokens, keys, received, keep)
  if reduction.method == "tome":
    return _tome(tokens, keys, keep)
  return _pool(tokens, keep)


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  """float32[N, A, B] cosine similarities of a float[N, A, K] and b float[N, B, K]."""
  a, b = (x.astype(jnp.float32) / jnp.linalg.norm(x.astype(jnp.float32), axis=-1, keepdims=True).clip(1e-6)
          for x in (a, b))
  return jnp.einsum("nak,nbk->nab", a, b)


def _visionzip(tokens: jax.Array, keys: jax.Array, received: jax.Array, keep: int) -> jax.Array:
  count = tokens.shape[1]
  contextual = min(max(1, round(keep * CONTEXTUAL_SHARE)), keep - 1) if keep > 1 else 0
  dominant = keep - contextual
  order = jnp.argsort(-received, axis=1)  # [N, P], the most attended first
  kept = jnp.sort(order[:, :dominant], axis=1)  # in the grid's order
  take = lambda x, index: jnp.take_along_axis(x, index[:, :, None], axis=1)
  if not contextual:
    return take(tokens, kept)
  rest = order[:, dominant:]  # [N, R], R = P - dominant, the less attended
  stride = (count - dominant) // contextual
  targets = rest[:, ::stride][:, :contextual]  # [N, C], spread over the rest
  rest_keys, target_keys = take(keys, rest), take(keys, targets)
  nearest = jnp.argmax(_cosine(rest_keys, target_keys), axis=-1)  # [N, R], each rest token's target
  groups = jax.nn.one_hot(nearest, contextual, dtype=jnp.float32)  # [N, R, C]; a target is its own nearest
  merged = jnp.einsum("nrc,nrd->ncd", groups, take(tokens, rest).astype(jnp.float32))
  merged = merged / groups.sum(axis=1)[:, :, None].clip(1.0)
  return jnp.concatenate([take(tokens, kept), merged.astype(tokens.dtype)], axis=1)


def _tome(tokens: jax.Array, keys: jax.Array, keep: int) -> jax.Array:
  sizes = jnp.ones(tokens.shape[:2], jnp.float32)
  x = tokens.astype(jnp.float32)
  while x.shape[1] > keep:  # static shapes: each round merges r pairs, at most half of the tokens
    merges = min(x.shape[1] // 2, x.shape[1] - keep)
    a, key_a, size_a = x[:, ::2], keys[:, ::2], sizes[:, ::2]
    b, key_b, size_b = x[:, 1::2], keys[:, 1::2], sizes[:, 1::2]
    similarity = _cosine(key_a, key_b)  # [N, A, B]
    best, partner = similarity.max(axis=-1), similarity.argmax(axis=-1)  # [N, A]
    order = jnp.argsort(-best, axis=1)
    merged, stays = order[:, :merges], order[:, merges:]
    take = lambda y, index: jnp.take_along_axis(y, index.reshape(*index.shape, *([1] * (y.ndim - 2))), axis=1)
    into = take(partner, merged)  # [N, r], where each merged token goes
    weights = jax.nn.one_hot(into, b.shape[1], dtype=jnp.float32) * take(size_a, merged)[:, :, None]  # [N, r, B]
    b_sizes = size_b + weights.sum(axis=1)
    b = (b * size_b[:, :, None] + jnp.einsum("nrb,nrd->nbd", weights, take(a, merged))) / b_sizes[:, :, None]
    # A merged group's key: the size-weighted mean of its members', as its token's.
    key_b = (key_b.astype(jnp.float32) * size_b[:, :, None]
             + jnp.einsum("nrb,nrk->nbk", weights, take(key_a, merged).astype(jnp.float32))) / b_sizes[:, :, None]
    x = jnp.concatenate([take(a, stays), b], axis=1)
    keys = jnp.concatenate([take(key_a, stays).astype(jnp.float32), key_b], axis=1)
    sizes = jnp.concatenate([take(size_a, stays), b_sizes], axis=1)
  return x.astype(tokens.dtype)


def _pool(tokens: jax.Array, keep: int) -> jax.Array:
  count, length, width = tokens.shape
  grid, side = round(length**0.5), round(keep**0.5)
  window = grid // side
  blocks = tokens.astype(jnp.float32).reshape(count, side, window, side, window, width)
  return blocks.mean(axis=(2, 4)).reshape(count, keep, width).astype(tokens.dtype)
