"""The batched decode state of the engine's slots and the jitted calls over it (see `engine.py`).

  `prefill`        prompts of one length bucket (their images encoded) into a cache of that length, in one call
  `prefill_chunk`  a piece of a prompt into a slot's pages, attending over the pieces before it there (a long
                   prompt in chunks, or the rest of a prompt whose start is in the prefix cache's pages)
  `insert`         one of the prefilled prompts into a free slot's pages, with its first token and sampling
  `add_pages`      pages appended to slots' page-table rows, as their sequences grow
  `set_allowed`    the tokens each slot may sample next (constrained decoding)
  `generate`       one token for every slot
  `release`        a slot freed: inactive, greedy, unconstrained, its page table all null pages
"""

import functools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vlmjax.infer import generate as generation
from vlmjax.infer.sampling import SamplingParams, sample, token_scores
from vlmjax.models import anyres, paged_cache, qwen_vl
from vlmjax.models.kv_cache import KVCache
from vlmjax.models.qwen_vit import host_mrope_positions
from vlmjax.models.vlm import VLM as VLMModel
from vlmjax.models.vlm import VLMConfig

# Prompt tokens (bucket x prompts) of one batched prefill call: 8 prompts of 128 tokens. Several prompts in one
# call share the reads of the weights (a 16-slot server admits 16 at once after a lull).
PREFILL_BATCH_TOKENS = 1024


def prefill_rows(bucket: int, prompts: int) -> int:
  """The batch of one `prefill` call of `prompts` prompts of a bucket: a power of two (so few batch sizes compile),
  at most PREFILL_BATCH_TOKENS tokens (the most prompts of the bucket one call takes)."""
  return min(1 << (prompts - 1).bit_length(), max(1, PREFILL_BATCH_TOKENS // bucket))


@flax.struct.dataclass
class SlotState:
  """The batched decode state of N slots.

  Attributes:
    cache: the paged KV cache, L layers of float[P, K, H, page_size] key and value pages; page_table
      int32[N, max_pages] (all null pages for a free slot); lengths int32[N] (0 for a free slot).
    tokens: int32[N], each slot's latest token: the input of the next step.
    active: bool[N], the slot holds a request.
    sampling: per-slot SamplingParams (float32[N] / int32[N]); a free slot is greedy.
    keys: key[N], each slot's PRNG key, split once per sampled token.
    prefix_lengths: int32[N], each slot's prompt length (the bidirectional prefix of a prefix-LM model).
    allowed: int32[N, ceil(V / 32)], a bit per token: the tokens each slot may sample next (bit t % 32 of word
      t // 32; all ones for an unconstrained slot).
    position_offsets: int32[N], what a decoded token's position adds to its cache slot: M-RoPE's offset of the
      slot's prompt (`context_positions`), 0 without M-RoPE and for a free slot.
  """

  cache: paged_cache.PagedKVCache
  tokens: jax.Array
  active: jax.Array
  sampling: SamplingParams
  keys: jax.Array
  prefix_lengths: jax.Array
  allowed: jax.Array
  position_offsets: jax.Array


def allowed_words(vocab_size: int) -> int:
  """int32 words of a token bitmask over the vocabulary."""
  return -(-vocab_size // 32)


def _only_allowed(logits: jax.Array, allowed: jax.Array) -> jax.Array:
  """logits float[N, V] with the tokens whose bit in allowed int32[N, W] is 0 at -inf."""
  ids = jnp.arange(logits.shape[-1])
  bits = (allowed[:, ids // 32] >> (ids % 32)) & 1  # [N, V]
  return jnp.where(bits == 1, logits, -jnp.inf)


@flax.struct.dataclass
class Prefix:
  """n prefilled prompts: their cache (int32[n] lengths, L layers of float[n, K, H, T_bucket]), the logits
  float32[n, V] of each one's last token and their position offsets int32[n] (SlotState's)."""

  cache: KVCache
  logits: jax.Array
  position_offsets: jax.Array


def init_state(config: VLMConfig, num_slots: int, max_len: int, num_pages: int, page_size: int,
               kernel: str | None = None, interpret: bool = False) -> SlotState:
  """Every slot free, with a page table for `max_len` tokens each, over a pool of `num_pages` pages (in the
  layout of the paged-attention `kernel` that decode steps call, `paged_cache.KERNELS`; None: gather)."""
  decoder = config.decoder
  cache = paged_cache.PagedKVCache.zeros(num_layers=decoder.depth, num_pages=num_pages, page_size=page_size,
                                   batch_size=num_slots, max_len=max_len, num_kv_heads=decoder.num_kv_heads,
                                   head_dim=decoder.attention_head_dim, dtype=decoder.cache_dtype, kernel=kernel,
                                   interpret=interpret)
  return SlotState(cache=cache, tokens=jnp.zeros((num_slots,), jnp.int32),
                   active=jnp.zeros((num_slots,), bool), sampling=SamplingParams.fill(num_slots),
                   keys=jax.random.split(jax.random.key(0), num_slots),
                   prefix_lengths=jnp.zeros((num_slots,), jnp.int32),
                   allowed=jnp.full((num_slots, allowed_words(decoder.vocab_size)), -1, jnp.int32),
                   position_offsets=jnp.zeros((num_slots,), jnp.int32))


def image_bucket(config: VLMConfig, num_images: int) -> int:
  """The image count a prefill is compiled for: the next power of two. The padding images are encoded and not
  used (a prompt's placeholders take its first images' embeddings), so the programs follow a few image counts.
  With FastV the count itself: its prefill drops each image's tokens past KEEP, every image it holds a prompt's."""
  if num_images == 0 or config.fastv is not None:
    return num_images
  return 1 << (num_images - 1).bit_length()


def _pad_images(config: VLMConfig, pixel_values: np.ndarray) -> np.ndarray:
  """float32[I, H, W, 3] -> float32[image_bucket(I), H, W, 3], zero images after the request's."""
  padding = image_bucket(config, len(pixel_values)) - len(pixel_values)
  return np.concatenate([pixel_values, np.zeros((padding, *pixel_values.shape[1:]), pixel_values.dtype)])


def image_input(config: VLMConfig, images: Sequence, rows: int, bucket: int):
  """The model's pixel input for `rows` prompts right-padded to `bucket` tokens whose first len(images) show
  images[b] (None: every prompt's, when the first has none). A fixed-count model's images[b] are float32[I, H, W,
  3], stacked to [rows, image_bucket(I), H, W, 3] (the rows past len(images) show the first's). A model whose
  images give a token count each lists per image what its image processor makes of it: LLaVA-NeXT's (tiles
  float32[n, S, S, 3], (height, width)), laid out as `anyres.Tiles` (tiles padded to their `anyres.bucket`), or
  Qwen2.5-VL's (patches float32[t·h·w, 3·T·p·p], grid (t, h, w)), as `qwen_vit.Patches` (windows padded to their
  bucket); K = bucket tokens a row (a row's image tokens are among its prompt's), so programs follow the prompt
  bucket, the batch and the tile or window bucket; the rows past len(images) read no image."""
  if images[0] is None:
    return None
  if config.variable_image_tokens:
    rows_images = [list(row or ()) for row in images] + [[]] * (rows - len(images))
    batch = qwen_vl.batch_patches if config.qwen_tower else anyres.batch_tiles
    return jax.tree.map(jnp.asarray, batch(config, rows_images, num_tokens=bucket))
  images = list(images) + [images[0]] * (rows - len(images))
  return jnp.asarray(np.stack([_pad_images(config, pixel_values) for pixel_values in images]), jnp.float32)


def context_positions(config: VLMConfig, context_ids: Sequence[int], pixel_values) -> tuple[np.ndarray, int] | None:
  """M-RoPE's (positions int32[3, T], offset) of a context: a prompt with its images' placeholders, then the
  tokens it generated before a preemption (ordinary tokens, at their cache slot + the offset), its images as
  `Engine.submit` takes them. None for a model without M-RoPE (positions 0..T-1, offset 0). Made on the host, so
  that a piece of the context (chunked prefill, the rest after a prefix-cache hit) takes its positions without
  its images."""
  if not (config.qwen_tower and config.decoder.mrope_section):
    return None
  grids = [grid for _, grid in pixel_values or ()]
  return host_mrope_positions(context_ids, config.image_token_id, grids, config.vision)


def _padded(token_ids: Sequence[int], bucket: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """(input_ids int32[1, bucket], input_mask bool[1, bucket]): the tokens right-padded with pad_id."""
  input_ids = np.full((1, bucket), pad_id, np.int32)
  input_ids[0, :len(token_ids)] = token_ids
  return input_ids, np.arange(bucket)[None, :] < len(token_ids)


def prefill(params, config: VLMConfig, prompts: Sequence[tuple[Sequence[int], np.ndarray | None, int]], bucket: int,
            pad_id: int, rows: int | None = None) -> Prefix:
  """Prompts through the model in one call, each right-padded to `bucket` tokens: `generate.prefill`, compiled
  once per bucket, image bucket and batch. One prompt is (token ids int[T] with image placeholders,
  pixel_values float32[I, H, W, 3] or, for LLaVA-NeXT, a list of (tiles, size) per image (`image_input`), or None,
  prompt length); all have images of the same `image_bucket`. The batch is
  `rows` (default: len(prompts)), filled up with copies of the first prompt. The token ids are the request's prompt
  and the tokens it decoded before a preemption: those come after the prompt length, causal as when they were
  decoded (a prefix-LM model attends bidirectionally over the prompt), a placeholder id among them an ordinary
  token. M-RoPE positions are the prompts' `context_positions`; FastV ranks a prompt's image tokens by its last
  token's attention. Returns a Prefix of `rows` rows, the prompts' first."""
  rows = rows or len(prompts)
  given, prompts = prompts, list(prompts) + [prompts[0]] * (rows - len(prompts))
  padded = [_padded(ids, bucket, pad_id) for ids, _, _ in prompts]
  input_ids = np.concatenate([ids for ids, _ in padded])
  input_mask = np.concatenate([mask for _, mask in padded])
  prompt_lengths = jnp.array([length for _, _, length in prompts], jnp.int32)
  pixels = image_input(config, [pixel_values for _, pixel_values, _ in given], rows, bucket)
  positions, offsets = _positions([context_positions(config, ids, pixel_values) for ids, pixel_values, _ in prompts],
                                  bucket)
  logits, cache = generation.prefill(params, config, input_ids, input_mask, pixels,
                                     prompt_lengths if config.prefix_lm else None,
                                     config.decoder.init_cache(batch_size=rows, max_len=bucket), positions,
                                     image_ends=prompt_lengths, rank_index=prompt_lengths - 1)
  return Prefix(cache=cache, logits=logits, position_offsets=jnp.asarray(offsets))


def _positions(rows: Sequence[tuple[np.ndarray, int] | None], bucket: int) -> tuple[np.ndarray | None, np.ndarray]:
  """(M-RoPE positions int32[3, B, bucket], each row's int32[3, T] right-padded with zeros; offsets int32[B]) of B
  rows of (positions, offset) as `context_positions` gives them; (None, zeros) without M-RoPE."""
  offsets = np.array([0 if row is None else row[1] for row in rows], np.int32)
  if rows[0] is None:
    return None, offsets
  positions = np.zeros((3, len(rows), bucket), np.int32)
  for b, (row_positions, _) in enumerate(rows):
    positions[:, b, :row_positions.shape[1]] = row_positions
  return positions, offsets


def prefill_chunk(params, config: VLMConfig, state: SlotState, token_ids: Sequence[int],
                  pixel_values: np.ndarray | list | None, bucket: int, pad_id: int, pages: np.ndarray,
                  mrope: tuple[np.ndarray, int] | None, start: int, prompt_length: int) -> tuple[SlotState, Prefix]:
  """Tokens `start` onwards of a context whose first `start` tokens are in its pages already: token_ids int[T]
  (right-padded to `bucket`) go through the model at positions start.. (M-RoPE: those of `mrope`, the whole
  context's `context_positions`, from `start` on), attending over the pages before them, into `pages`
  (int32[max_pages], the request's page-table row; the state's page table is left as it is).
  pixel_values: float32[I, H, W, 3] (or, with a token count per image, a list as `image_input` takes it), the
  images whose placeholders are all among these tokens, or None. prompt_length: the request's prompt's; the
  context's tokens past it were decoded before a preemption (a placeholder id among them an ordinary token).
  Causal models only. Returns (the state with the new keys and values in its pool, the Prefix of one row that
  `insert` takes when these tokens end the context: its cache empty (the keys and values are in the pages) with
  length start + T, the logits float32[1, V] of the last token and the context's position offset); compiled once
  per bucket and image bucket."""
  input_ids, input_mask = _padded(token_ids, bucket, pad_id)
  pixels = image_input(config, [pixel_values], 1, bucket)
  piece = None if mrope is None else (mrope[0][:, start:start + len(token_ids)], mrope[1])
  positions, offsets = _positions([piece], bucket)
  return _prefill_chunk(params, config, state, input_ids, input_mask, pixels, jnp.asarray(pages), jnp.int32(start),
                        positions, offsets, jnp.int32(prompt_length))


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("state",))
def _prefill_chunk(params, config: VLMConfig, state: SlotState, input_ids, input_mask, pixel_values,
                   pages: jax.Array, start: jax.Array, positions, offsets,
                   prompt_length: jax.Array) -> tuple[SlotState, Prefix]:
  if positions is None:
    positions = start + jnp.arange(input_ids.shape[1], dtype=jnp.int32)[None]  # [1, T_bucket]
  cache = state.cache.replace(page_table=pages[None], lengths=start[None], pruned=jnp.zeros((1,), jnp.int32))
  count = jnp.sum(input_mask, axis=1, dtype=jnp.int32)  # [1]
  logits, cache = VLMModel(config).apply({"params": params}, input_ids, pixel_values, positions, cache,
                                         input_mask=input_mask, logit_positions=count[:, None] - 1,
                                         image_ends=(prompt_length - start)[None])
  empty = config.decoder.init_cache(batch_size=1, max_len=0)  # nothing for `insert` to copy: it is in the pages
  prefix = Prefix(cache=empty.replace(lengths=start + count), logits=logits[:, 0], position_offsets=offsets)
  return state.replace(cache=state.cache.replace(k=cache.k, v=cache.v)), prefix


@functools.partial(jax.jit, donate_argnames=("state",))
def insert(prefix: Prefix, row: jax.Array, state: SlotState, slot: jax.Array, pages: jax.Array,
           sampling: SamplingParams, key: jax.Array, prefix_length: jax.Array, allowed: jax.Array):
  """Puts row `row` (int32[]) of the prefilled prompts into `slot` (int32[]) whose pages are `pages`
  (int32[max_pages], null-page padded) and samples its first token as `generate.generate` does with the same key,
  among the tokens `allowed` (int32[W] bitmask, as SlotState's). sampling: SamplingParams of one row;
  prefix_length: int32[], the bidirectional prefix of a prefix-LM model (as `prefill`'s). Returns (the new
  state, the first token int32[], its TokenScores of one row)."""
  prefix = jax.tree.map(lambda array: jax.lax.dynamic_slice_in_dim(array, row, 1, axis=0), prefix)  # [1, ...]
  key, sample_key = jax.random.split(key)
  tokens = sample(_only_allowed(prefix.logits, allowed[None]), sampling, sample_key)
  first = tokens[0]
  put = lambda array, value: jax.lax.dynamic_update_index_in_dim(array, value, slot, axis=0)
  # The prompt's T_bucket slots go to the slot's first pages; what lies beyond its length is masked out.
  length = prefix.cache.lengths[0]
  cache = state.cache.write_prompt(prefix.cache, pages)
  return SlotState(
      cache=cache.replace(page_table=put(cache.page_table, pages), lengths=put(cache.lengths, length),
                          pruned=put(cache.pruned, prefix.cache.pruned[0])),
      tokens=put(state.tokens, first),
      active=put(state.active, True), sampling=jax.tree.map(lambda all_, one: put(all_, one[0]), state.sampling,
                                                             sampling),
      keys=put(state.keys, key), prefix_lengths=put(state.prefix_lengths, prefix_length),
      allowed=put(state.allowed, allowed), position_offsets=put(state.position_offsets, prefix.position_offsets[0]),
  ), first, token_scores(prefix.logits, tokens)


@functools.partial(jax.jit, donate_argnames=("state",))
def add_pages(state: SlotState, slots: jax.Array, columns: jax.Array, pages: jax.Array) -> SlotState:
  """Sets page_table[slots[i], columns[i]] = pages[i] (int32[N] each; an entry whose slot is N, past the last
  slot, is padding and changes nothing): the pages a step's growing sequences were given."""
  cache = state.cache
  return state.replace(cache=cache.replace(page_table=cache.page_table.at[slots, columns].set(pages, mode="drop")))


@functools.partial(jax.jit, donate_argnames=("state",))
def set_allowed(state: SlotState, allowed: jax.Array) -> SlotState:
  """The tokens each slot may sample next: allowed int32[N, W] (see SlotState)."""
  return state.replace(allowed=allowed)


@functools.partial(jax.jit, static_argnames=("config", "read_pages"), donate_argnames=("state",))
def generate(params, config: VLMConfig, state: SlotState, read_pages: int | None = None):
  """One decode step for every slot: forward each slot's latest token through its cache and sample the next.
  With `read_pages`, attention gathers only the first read_pages columns of the page table (every slot's
  sequence, this step's token included, must lie within them): the gather and the attention cost follow the
  longest sequence rather than the slots' context. Compiled once per read_pages.
  Each slot samples among its allowed tokens. Returns (the new state, tokens int32[N], their TokenScores); a free
  slot's token means nothing and its cache length stays 0."""
  table = state.cache.page_table
  cache = state.cache.replace(page_table=table[:, :read_pages])
  prefix_lengths = state.prefix_lengths if config.prefix_lm else None
  # A decoded token sits at the same M-RoPE position in all three components, which is RoPE at that position.
  positions = cache.lengths + state.position_offsets  # [N]
  logits, cache = VLMModel(config).apply({"params": params}, state.tokens[:, None], None, positions[:, None],
                                         cache, prefix_lengths=prefix_lengths)
  split = jax.vmap(jax.random.split)(state.keys)  # [N, 2]: per slot, (next key, this step's sample key)
  logits = logits[:, 0]
  tokens = _sample_slots(_only_allowed(logits, state.allowed), state.sampling, split[:, 1])
  cache = cache.replace(page_table=table, lengths=jnp.where(state.active, cache.lengths, 0))
  return state.replace(cache=cache, tokens=tokens, keys=split[:, 0]), tokens, token_scores(logits, tokens)


def _sample_slots(logits: jax.Array, sampling: SamplingParams, keys: jax.Array) -> jax.Array:
  """int32[N] from logits float32[N, V], each slot sampled with its own key exactly as `sample` samples a batch
  of one. The per-slot vmap turns `sample`'s greedy shortcut into a select, so it is taken here, outside."""
  one = lambda logits, params, key: sample(logits[None], jax.tree.map(lambda x: x[None], params), key)[0]
  return jax.lax.cond(jnp.all(sampling.temperature == 0.0), lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32),
                      lambda: jax.vmap(one)(logits, sampling, keys))


@functools.partial(jax.jit, donate_argnames=("state",))
def release(state: SlotState, slot: jax.Array) -> SlotState:
  """Frees `slot` (int32[]): inactive, greedy (so an all-greedy batch keeps its fast path), unconstrained, length 0,
  position offset 0, its page table all null pages (so the steps it still takes write nowhere)."""
  put = lambda array, value: jax.lax.dynamic_update_index_in_dim(array, value, slot, axis=0)
  cache = state.cache
  null_row = jnp.full_like(cache.page_table[0], cache.num_pages)
  cache = cache.replace(lengths=put(cache.lengths, 0), pruned=put(cache.pruned, 0),
                        page_table=put(cache.page_table, null_row))
  sampling = state.sampling.replace(temperature=put(state.sampling.temperature, 0.0))
  return state.replace(active=put(state.active, False), cache=cache, sampling=sampling,
                       allowed=put(state.allowed, jnp.full_like(state.allowed[0], -1)),
                       position_offsets=put(state.position_offsets, 0))
