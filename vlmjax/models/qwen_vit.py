"""Qwen2.5-VL's and Qwen2-VL's vision tower: images at their own resolution, as patches in static shapes.

An image of h x w patches (`patch_size` pixels a side, `temporal_patch_size` frames deep: a still image is its two
equal frames) is embedded patch by patch (transformers' Conv3d, as one linear map of the flattened patch), turned
by a 2-D RoPE of each patch's row and column, run through pre-norm blocks, and each 2 x 2 block of neighbouring
patches (a merge unit, `merge_size`) is concatenated and projected into the language model (the patch merger).
Qwen2.5-VL's blocks have RMSNorms and gated MLPs; most attend within windows of `window_size` pixels, the blocks at
`fullatt_block_indexes` over the whole image. Qwen2-VL's (`norm="layernorm"`, `gated_mlp=False`) have LayerNorms and
plain MLPs (fc1, activation, fc2), and every block attends over the whole image: its windows only lay the patches
out (`full_attention_only`).

The host lays the patches out (`vlmjax.models.qwen_vl.batch_patches`) so that the program depends only on padded
shapes:

    pixel_values     float[N, 3·T·p·p]  every image's patches, window by window: each window's merge units in
                                         raster order, its 4 patches consecutive, padded with zero patches to the
                                         window's full size L = (window_size / patch_size)², N a multiple of L
    patch_positions  int[N, 2]           each patch's (row, column) in its image (the 2-D RoPE)
    image_ids        int[N]              which image a patch shows; -1 for padding

Window attention is then attention within each of the N / L consecutive blocks of L patches (a reshape, no
gather), full attention within each image (equal `image_ids`, a chunk of queries at a time: `full_attention`), and
padding attends only to padding.
transformers reorders the patches into windows and back; attention is blind to the order under these masks, so the
layout is the window order throughout, and the merged tokens (row n of the output is merge unit n) are read
through the host's index table (`Patches.token_index`).

Here too: `Patches` (the batch's tables, `vlmjax.models.qwen_vl.batch_patches` makes them), `layout` and
`fill_patches` (an image's place in the window layout), and `mrope_positions` (the decoder's M-RoPE positions read
from the tables; `host_mrope_positions` the same of one prompt on the host).
"""

import dataclasses
from typing import Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vlmjax import runtime
from vlmjax.models import activation as activation_lib, blockwise_attention, layers
from vlmjax.models.config import ModelConfig, check_choice, check_divides, check_positive, dtype


# The blocks' and the merger's norm by `QwenViTConfig.norm`: Qwen2.5-VL's RMSNorm, Qwen2-VL's LayerNorm.
NORMS = {"rmsnorm": layers.RMSNorm, "layernorm": layers.LayerNorm}


@dataclasses.dataclass(frozen=True)
class QwenViTConfig(ModelConfig):
  patch_size: int = 14
  temporal_patch_size: int = 2
  merge_size: int = 2  # m: each m x m block of patches becomes one token of the language model
  width: int = 1280
  depth: int = 32
  num_heads: int = 16
  mlp_dim: int = 3420
  out_width: int = 3584  # the merger's output: the language model's width
  window_size: int = 112  # a window's side in pixels
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)  # the blocks that attend over the whole image
  activation: str = "silu"
  norm: str = "rmsnorm"  # a key of NORMS: the blocks' and the merger's ("layernorm", with biases, for Qwen2-VL)
  gated_mlp: bool = True  # act(x W_gate) * (x W_up) W_down; False: act(x W_up) W_down (Qwen2-VL's fc1, fc2)
  norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = True
  remat_policy: str = "none"

  def __post_init__(self):
    where = "vision"
    object.__setattr__(self, "fullatt_block_indexes", tuple(int(i) for i in self.fullatt_block_indexes))
    check_positive(self, where, "patch_size", "temporal_patch_size", "merge_size", "width", "depth", "num_heads",
                   "mlp_dim", "out_width", "window_size")
    check_divides(4 * self.num_heads, self.width, f"{where}.width={self.width} must split into "
                  f"{where}.num_heads={self.num_heads} heads of a multiple of 4 (the 2-D RoPE turns a quarter of "
                  f"each head by the row and a quarter by the column)")
    if self.window_units < 1:
      raise ValueError(f"{where}.window_size={self.window_size} is smaller than one merge unit "
                       f"({self.merge_size} x {self.patch_size} pixels)")
    bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
    if bad:
      raise ValueError(f"{where}.fullatt_block_indexes has {bad}, outside the {self.depth} blocks")
    check_choice(self.activation, tuple(activation_lib.ACTIVATIONS), f"{where}.activation")
    check_choice(self.norm, tuple(NORMS), f"{where}.norm")

  @property
  def patch_dim(self) -> int:
    """The length of a flattened patch: 3 channels x temporal_patch_size frames x patch_size²."""
    return 3 * self.temporal_patch_size * self.patch_size**2

  @property
  def window_units(self) -> int:
    """Merge units along a window's side (transformers' `vit_merger_window_size`)."""
    return self.window_size // self.merge_size // self.patch_size

  @property
  def window_patches(self) -> int:
    """L: the patches of a full window, each window's slots in `pixel_values`."""
    return (self.window_units * self.merge_size) ** 2

  @property
  def full_attention_only(self) -> bool:
    """Whether every block attends over the whole image (Qwen2-VL): then no block attends within windows, and the
    windows only lay the patches out."""
    return set(self.fullatt_block_indexes) == set(range(self.depth))


@flax.struct.dataclass
class Patches:
  """Images at their own resolution (Qwen2-VL, Qwen2.5-VL), in static shapes (`models/qwen_vit.py`'s layout; made by
  `vlmjax.models.qwen_vl.batch_patches`).

  pixel_values: float32[N, 3·T·p·p] normalized flattened patches, window by window, zero patches as padding.
  patch_positions: int32[N, 2] each patch's (row, column) in its image; image_ids: int32[N], -1 for padding.
  token_index: int32[B, K], row b's k-th image embedding as a row of the tower's merged tokens [N/m², D].
  token_offsets: int32[B, K, 3], that token's (temporal, row, column) in its image's merged grid (M-RoPE).
  token_advance: int32[B, K], at an image's last token the longer side of its merged grid (how far the text after
    it moves on in M-RoPE), 0 elsewhere.
  """

  pixel_values: jax.Array
  patch_positions: jax.Array
  image_ids: jax.Array
  token_index: jax.Array
  token_offsets: jax.Array
  token_advance: jax.Array


def mrope_positions(input_ids: jax.Array, image_token_id: int, patches: Patches,
                    input_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """M-RoPE positions of prompts with their images' placeholders, as transformers' `get_rope_index`.

  Each token moves the position on by one, an image's tokens by nothing but its last by the image's longer side;
  a token sits where the moves before it leave it, plus its (temporal, row, column) offset for an image token.

  Args:
    input_ids: int[B, T] right-padded; input_mask: bool[B, T] (None: every token is real).
  Returns:
    (positions int32[3, B, T]; offsets int32[B], each row's next position less its length: after the prompt, token
    at cache slot s has position s + offset in all three components, transformers' `rope_deltas`).
  """
  is_placeholder = input_ids == image_token_id
  slot = jnp.cumsum(is_placeholder, axis=1) - 1  # [B, T], the image token each placeholder is
  num_tokens = patches.token_index.shape[1]
  is_image = is_placeholder & (slot < num_tokens)
  slot = jnp.clip(slot, 0, num_tokens - 1)
  offsets = jnp.take_along_axis(patches.token_offsets, slot[:, :, None], axis=1)  # [B, T, 3]
  step = jnp.where(is_image, jnp.take_along_axis(patches.token_advance, slot, axis=1), 1)  # [B, T]
  start = jnp.cumsum(step, axis=1) - step
  positions = (start[:, :, None] + jnp.where(is_image[:, :, None], offsets, 0)).transpose(2, 0, 1)  # [3, B, T]
  valid = jnp.ones(input_ids.shape, bool) if input_mask is None else input_mask.astype(bool)
  last = jnp.max(jnp.where(valid[None], positions, 0), axis=(0, 2))  # [B]
  return positions.astype(jnp.int32), (last + 1 - jnp.sum(valid, axis=1)).astype(jnp.int32)


def host_mrope_positions(token_ids: Sequence[int], image_token_id: int, grids: Sequence[tuple[int, int, int]],
                         config: QwenViTConfig) -> tuple[np.ndarray, int]:
  """`mrope_positions` of one prompt on the host, from its images' grids (t, h, w) alone: the serving engine's
  chunks and prefix-cache hits take the positions of a prompt's later tokens without its images' tables.

  The first t·h·w/m² placeholders of each grid, in order, are its image's tokens; placeholders after all of them
  are ordinary tokens (a placeholder id the model generated, prefilled again after a preemption).
  Returns (positions int32[3, T]; the offset: after the prompt, the token at cache slot s has position s + offset).
  """
  token_ids = np.asarray(token_ids)
  layouts = [layout(grid, config.merge_size, config.window_units) for grid in grids]
  image_tokens = np.flatnonzero(token_ids == image_token_id)[:sum(len(each.token_units) for each in layouts)]
  offsets = np.zeros((len(token_ids), 3), np.int64)  # each token's (temporal, row, column) within its image
  step = np.ones(len(token_ids), np.int64)  # how far each token moves the position on
  first = 0
  for each in layouts:
    tokens = image_tokens[first:first + len(each.token_units)]
    offsets[tokens], step[tokens] = each.token_offsets[:len(tokens)], 0
    step[tokens[-1:]] = each.advance  # an image's last token: its merged grid's longer side
    first += len(tokens)
  positions = (np.cumsum(step) - step)[None] + offsets.T  # [3, T]
  return positions.astype(np.int32), int(positions.max()) + 1 - len(token_ids)


@dataclasses.dataclass(frozen=True)
class Layout:
  """One image in the window layout, relative to its first window.

  num_windows: its windows (t · ceil(h/m/s) · ceil(w/m/s)).
  patch_slots: int[t·h·w], the slot of each of its patches (processor order) among its num_windows·L slots.
  patch_positions: int[t·h·w, 2], each patch's (row, column).
  token_units: int[tokens], each token's merge unit (a row of the tower's output) among its num_windows·s² units.
  token_offsets: int[tokens, 3], each token's (temporal, row, column) in the merged grid.
  advance: the merged grid's longer side.
  """

  num_windows: int
  patch_slots: np.ndarray
  patch_positions: np.ndarray
  token_units: np.ndarray
  token_offsets: np.ndarray
  advance: int


def layout(grid: tuple[int, int, int], merge_size: int, window_units: int) -> Layout:
  """The window layout of an image of `grid` (t, h, w) patches."""
  t, h, w = grid
  m, s = merge_size, window_units
  if h % m or w % m:
    raise ValueError(f"a grid of {h} x {w} patches is not whole {m} x {m} merge units")
  rows, cols = h // m, w // m
  windows_down, windows_across = -(-rows // s), -(-cols // s)
  frame, row, col = (axis.ravel() for axis in np.meshgrid(np.arange(t), np.arange(rows), np.arange(cols),
                                                          indexing="ij"))  # each merge unit, raster order
  window = (frame * windows_down + row // s) * windows_across + col // s
  units = window * s * s + (row % s) * s + col % s  # [tokens]
  sub = np.arange(m * m)  # a unit's patches, row by row
  patch_slots = (units[:, None] * m * m + sub).ravel()
  patch_positions = np.stack([(row[:, None] * m + sub // m).ravel(), (col[:, None] * m + sub % m).ravel()], axis=1)
  return Layout(num_windows=t * windows_down * windows_across, patch_slots=patch_slots,
                patch_positions=patch_positions, token_units=units,
                token_offsets=np.stack([frame, row, col], axis=1), advance=max(rows, cols))


def fill_patches(config: QwenViTConfig, rows: Sequence[Sequence[tuple[np.ndarray, Layout]]], num_windows: int,
                 num_tokens: int) -> Patches:
  """The `Patches` of rows of images, each (its patches float32[t·h·w, 3·T·p·p] in the processor's order, its
  `layout`), in num_windows windows and num_tokens image tokens a row (enough for them: see
  `vlmjax.models.qwen_vl.batch_patches`)."""
  vision, window_units = config, config.window_units**2
  num_patches = num_windows * vision.window_patches
  pixel_values = runtime.aligned_zeros((num_patches, vision.patch_dim), np.float32)  # read in place on a CPU
  patch_positions = np.zeros((num_patches, 2), np.int32)
  image_ids = np.full((num_patches,), -1, np.int32)
  token_index = np.zeros((len(rows), num_tokens), np.int32)
  token_offsets = np.zeros((len(rows), num_tokens, 3), np.int32)
  token_advance = np.zeros((len(rows), num_tokens), np.int32)
  first_window, image = 0, 0
  for b, row in enumerate(rows):
    filled = 0
    for patches, image_layout in row:
      slots = first_window * vision.window_patches + image_layout.patch_slots
      pixel_values[slots], patch_positions[slots], image_ids[slots] = patches, image_layout.patch_positions, image
      tokens = slice(filled, filled + len(image_layout.token_units))
      token_index[b, tokens] = first_window * window_units + image_layout.token_units
      token_offsets[b, tokens] = image_layout.token_offsets
      token_advance[b, tokens.stop - 1] = image_layout.advance
      filled, first_window, image = tokens.stop, first_window + image_layout.num_windows, image + 1
  return Patches(pixel_values=pixel_values, patch_positions=patch_positions, image_ids=image_ids,
                 token_index=token_index, token_offsets=token_offsets, token_advance=token_advance)


def segment_attention(query: jax.Array, key: jax.Array, value: jax.Array, query_ids: jax.Array,
                      key_ids: jax.Array) -> jax.Array:
  """Softmax attention of each query over the keys of its own image (equal ids), group by group, heads first.

  query: float[G, heads, C, H]; key, value: float[G, heads, S, H]; query_ids: int[G, C]; key_ids: int[G, S] ->
  float[G, heads, C, H]. Scores and sums in float32; the output is normalized after the value matmul (a [C, H]
  division, not a [C, S] one). Every query sees at least one key (padding, id -1, sees padding), so no row is empty.
  Heads come before positions so that each matmul is a plain batched one: in the [positions, heads] order XLA's CPU
  backend ran the full-attention block of a 1280 x 1280 image several times slower.
  """
  scores = jnp.einsum("ghcd,ghsd->ghcs", query, key, preferred_element_type=jnp.float32) * query.shape[-1]**-0.5
  same = (query_ids[:, :, None] == key_ids[:, None, :])[:, None]  # [G, 1, C, S]
  scores = jnp.where(same, scores, -jnp.inf)
  weights = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))  # [G, heads, C, S]
  out = jnp.einsum("ghcs,ghsd->ghcd", weights.astype(value.dtype), value, preferred_element_type=jnp.float32)
  return (out / jnp.sum(weights, axis=-1, keepdims=True)).astype(query.dtype)


def _heads_first(x: jax.Array, group: int) -> jax.Array:
  """float[N, heads, H] -> float[N / group, heads, group, H]."""
  return x.reshape(-1, group, *x.shape[1:]).transpose(0, 2, 1, 3)


def _positions_first(x: jax.Array) -> jax.Array:
  """float[N / group, heads, group, H] -> float[N, heads, H]."""
  return x.transpose(0, 2, 1, 3).reshape(-1, x.shape[1], x.shape[3])


def windowed_attention(query: jax.Array, key: jax.Array, value: jax.Array, image_ids: jax.Array,
                       window: int) -> jax.Array:
  """Attention within each of the N / window consecutive blocks of patches (the window layout). query, key, value:
  float[N, heads, H]; image_ids: int[N] -> float[N, heads, H]."""
  ids = image_ids.reshape(-1, window)  # [N/L, L]
  query, key, value = (_heads_first(x, window) for x in (query, key, value))  # [N/L, heads, L, H]
  return _positions_first(segment_attention(query, key, value, ids, ids))


# Off the CPU, full attention takes its queries in chunks of up to this many patches (whole windows), each against
# every key: [heads, chunk, N] scores at a time instead of [heads, N, N] (4.3 GB at N = 16384 and 4 heads) and no
# [N, N] mask. (On a 2-core EPYC this took a 9216-patch full-attention block from 6.6 s, jax.nn.dot_product_attention
# over the whole mask, to 1.1 s; `blockwise_attention`, which the CPU takes instead, to 0.57 s.)
FULL_ATTENTION_CHUNK = 256


def full_attention(query: jax.Array, key: jax.Array, value: jax.Array, image_ids: jax.Array,
                   chunk: int) -> jax.Array:
  """Attention over the whole image, each patch over its own image's: query, key, value float[N, heads, H];
  image_ids int[N] -> float[N, heads, H], finite and meaningless at padding (id -1). On the CPU
  (`runtime.cpu_tuned`), over more patches than one block, a block of keys at a time (`blockwise_attention`);
  elsewhere `chunk` queries at a time against all N keys (chunk divides N)."""
  if runtime.cpu_tuned() and query.shape[0] > blockwise_attention.BLOCK:
    # The images' patches first and the padding last (the window layout scatters it through the edge windows), so
    # that the blocks of keys and queries past the patches are skipped, not masked: a 1280 x 1280 image's 8464
    # patches in 9216 slots took 0.56 s instead of 0.61 s on the 2-core AMD EPYC.
    image_ids = jnp.asarray(image_ids)
    order = jnp.argsort(image_ids < 0, stable=True)
    patches = jnp.sum(image_ids >= 0, dtype=jnp.int32)[None]
    ids = image_ids[order][None]
    out = blockwise_attention.attention(query[order][None], key[order][None], value[order][None],
                                        query.shape[-1]**-0.5, query_ids=ids, key_ids=ids, key_lengths=patches,
                                        query_lengths=patches)[0]
    return out[jnp.argsort(order)]
  key, value = (_heads_first(x, x.shape[0]) for x in (key, value))  # [1, heads, N, H]

  def one(chunk_of):
    chunk_query, chunk_ids = chunk_of  # [heads, C, H], [C]
    return segment_attention(chunk_query[None], key, value, chunk_ids[None], image_ids[None])[0]
  return _positions_first(jax.lax.map(one, (_heads_first(query, chunk), image_ids.reshape(-1, chunk))))


def full_attention_chunk(num_patches: int, window: int) -> int:
  """The largest whole number of windows, at most FULL_ATTENTION_CHUNK patches (at least one window), that
  divides num_patches."""
  windows = num_patches // window
  return window * max(d for d in range(1, max(FULL_ATTENTION_CHUNK // window, 1) + 1) if windows % d == 0)


def _norm(cfg: QwenViTConfig, name: str) -> nn.Module:
  """The tower's norm (`cfg.norm`) in its compute and parameter dtypes."""
  return NORMS[cfg.norm](eps=cfg.norm_eps, dtype=dtype(cfg.dtype), param_dtype=dtype(cfg.param_dtype), name=name)


class QwenVisionBlock(nn.Module):
  """x + attention(norm(x)) over windows or the whole image, then x + MLP(norm(x)); biases on every projection, as
  Qwen2.5-VL's vision blocks (RMSNorm, gated MLP) and Qwen2-VL's (LayerNorm, plain MLP)."""

  config: QwenViTConfig

  @nn.compact
  def __call__(self, x, full, sin, cos, image_ids):
    """x: float[1, N, D]; full: bool (a traced one under `nn.scan`), whether this block attends over the whole
    image; sin, cos: float32[N, H/2] the 2-D RoPE; image_ids: int[N]. Returns (float[1, N, D], None)."""
    cfg = self.config
    compute_dtype, param_dtype = dtype(cfg.dtype), dtype(cfg.param_dtype)
    head_dim = cfg.width // cfg.num_heads
    qkv = layers.Projection((cfg.width, 3, cfg.num_heads, head_dim), (layers.EMBED, None, layers.HEADS,
                                                                      layers.HEAD_DIM),
                            fan_in=1, use_bias=True, dtype=compute_dtype, param_dtype=param_dtype,
                            name="qkv")(_norm(cfg, "attention_norm")(x))  # [1, N, 3, heads, H]
    query, key = (layers.rotate(qkv[0, :, i], sin, cos) for i in (0, 1))  # [N, heads, H]
    value = qkv[0, :, 2]
    window = cfg.window_patches
    windowed = lambda *qkv: windowed_attention(*qkv, image_ids, window)
    whole = lambda *qkv: full_attention(*qkv, image_ids, full_attention_chunk(x.shape[1], window))
    if cfg.full_attention_only:  # no block attends within windows: no `lax.cond` to compile both into
      attended = whole(query, key, value)
    elif isinstance(full, bool):
      attended = (whole if full else windowed)(query, key, value)
    else:
      attended = jax.lax.cond(full, whole, windowed, query, key, value)
    x = x + layers.Projection((cfg.num_heads, head_dim, cfg.width), (layers.HEADS, layers.HEAD_DIM, layers.EMBED),
                              fan_in=2, use_bias=True, dtype=compute_dtype, param_dtype=param_dtype,
                              name="out")(attended[None])
    x = x + layers.FeedForward(cfg.mlp_dim, activation=cfg.activation, gated=cfg.gated_mlp, use_bias=True,
                               dtype=compute_dtype, param_dtype=param_dtype, name="mlp")(_norm(cfg, "mlp_norm")(x))
    return nn.with_logical_constraint(x, (layers.ACT_BATCH, layers.ACT_LENGTH, layers.ACT_EMBED)), None


class QwenViT(nn.Module):
  """Patches in the window layout (the module docstring) -> merged tokens float[N/m², out_width]."""

  config: QwenViTConfig

  @nn.compact
  def __call__(self, pixel_values: jax.Array, patch_positions: jax.Array, image_ids: jax.Array) -> jax.Array:
    """pixel_values: float[N, 3·T·p·p]; patch_positions: int[N, 2]; image_ids: int[N] -> float[N/m², out_width],
    row n the merged token of merge unit n (patches 4n..4n+3 for m = 2)."""
    cfg = self.config
    compute_dtype, param_dtype = dtype(cfg.dtype), dtype(cfg.param_dtype)
    num_patches = pixel_values.shape[0]
    if pixel_values.shape[1:] != (cfg.patch_dim,) or num_patches % cfg.window_patches:
      raise ValueError(f"patches float{list(pixel_values.shape)}: expected [N, {cfg.patch_dim}] with N a multiple of "
                       f"the window's {cfg.window_patches} patches (vlmjax.models.qwen_vl.batch_patches)")
    p, frames = cfg.patch_size, cfg.temporal_patch_size
    x = pixel_values.reshape(1, num_patches, 3, frames, p, p).astype(compute_dtype)
    x = layers.Projection((3, frames, p, p, cfg.width), (None, None, None, None, layers.EMBED), fan_in=4,
                          dtype=compute_dtype, param_dtype=param_dtype, name="patches")(x)  # [1, N, D]

    head_dim = cfg.width // cfg.num_heads
    inv_freq = (1.0 / cfg.rope_theta ** (np.arange(0, head_dim // 2, 2) / (head_dim // 2))).astype(np.float32)
    positions = patch_positions.astype(jnp.float32)
    angles = jnp.concatenate([positions[:, :1] * inv_freq, positions[:, 1:] * inv_freq], axis=-1)  # [N, H/2]
    sin, cos = layers.rope_sincos(angles)

    block = layers.maybe_remat(QwenVisionBlock, cfg.remat_policy, cfg.scan_layers)
    full = np.isin(np.arange(cfg.depth), cfg.fullatt_block_indexes)
    if cfg.scan_layers:
      stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(0,) + (nn.broadcast,) * 3, length=cfg.depth,
                      metadata_params={nn.PARTITION_NAME: layers.ENCODER_LAYERS})
      x, _ = stack(cfg, name="layers")(x, jnp.asarray(full), sin, cos, image_ids)
    else:
      for i in range(cfg.depth):
        x, _ = block(cfg, name=f"layers_{i}")(x, bool(full[i]), sin, cos, image_ids)

    # The patch merger: the norm per patch, each merge unit's m² patches side by side, then an exact-GELU MLP.
    x = _norm(cfg, "merger_norm")(x)
    x = x.reshape(num_patches // cfg.merge_size**2, cfg.merge_size**2 * cfg.width)  # [N/m², m²·D]
    dense = lambda name, features, axes, h: layers.Projection(
        (h.shape[-1], features), axes, fan_in=1, use_bias=True, dtype=compute_dtype, param_dtype=param_dtype,
        name=name)(h)
    hidden = jax.nn.gelu(dense("merger_1", x.shape[-1], (layers.EMBED, layers.MLP), x), approximate=False)
    return dense("merger_2", cfg.out_width, (layers.MLP, layers.EMBED), hidden)
