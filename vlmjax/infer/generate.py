"""Generation: a jitted prefill per prompt-length bucket, then one jitted decode loop over a preallocated cache.

    tokens = generate(params, config, input_ids, input_mask, pixel_values, max_new_tokens=32)

Shapes are static: prompts are right-padded to a length bucket, prefilled into a cache of the bucket's length,
which the decode loop extends to bucket + max_new_tokens slots, so a new prompt in an already-seen bucket
compiles nothing. The decode loop is a `lax.while_loop`
inside jit that stops when every row has produced an end token (or max_new_tokens): no host round-trip per
token. `stream` runs the same step from Python, one token at a time, for callers that print as they go.

Qwen2.5-VL's M-RoPE: the prefill's positions are `qwen_vit.mrope_positions` of the prompts and their images, and a
generated token's position is its cache slot plus its row's offset (the prompt's next position less its length,
transformers' `rope_deltas`), the same in all three components.
"""

import functools
from typing import Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vlmjax.infer.sampling import SamplingParams, sample
from vlmjax.models.kv_cache import KVCache
from vlmjax.models.qwen_vit import Patches, mrope_positions
from vlmjax.models.vlm import VLM, VLMConfig

# Prompt-length buckets: one prefill compilation each. Steps of 1.5x-2x keep the padding (which prefill computes
# and every decode step attends over) under a third of the prompt; 1280 catches a 1024-token text prompt plus an
# image's tokens, which would pad to 1536 (41% more) without it. From 2048 to 4096, the lengths of one large image's
# tokens (a Qwen2.5-VL image of 1280 x 1280 takes 2116), steps of an eighth keep it under 12.5%. An engine compiles
# a program per bucket below its context length at start-up (`Engine.warm_up`), so it takes these.
BUCKETS = (16, 32, 64, 128, 192, 256, 384, 512, 768, 1024, 1280, 1536, 2048, 2304, 2560, 2816, 3072, 3584, 4096,
           6144, 8192, 12288, 16384, 24576, 32768)
# `generate` compiles only the buckets its prompts meet, so from 2048 to 4096 it steps by a sixteenth (padding under
# 6.25%): there a prefill takes seconds on a CPU, and a 1280 x 1280 image's time to first token on the 2-core AMD
# EPYC was 1.55 s in 2176 tokens, 1.60 s in 2304 and 1.73 s in 2560.
GENERATE_BUCKETS = tuple(sorted({*BUCKETS, *range(2048, 4096, 128)}))


def bucket_length(length: int, buckets: Sequence[int] = BUCKETS) -> int:
  """The smallest bucket that holds `length` tokens."""
  for bucket in buckets:
    if length <= bucket:
      return bucket
  raise ValueError(f"a prompt of {length} tokens is longer than the largest bucket ({buckets[-1]})")


@flax.struct.dataclass
class DecodeState:
  """The decode loop's carry.

  Attributes:
    tokens: int32[B, N], generated tokens so far; pad after a row's end token and beyond `step`.
    step: int32[], how many tokens have been written (the next write goes to column `step`).
    done: bool[B], the row has produced an end token.
    cache: the KV cache (prompt bucket + max_new_tokens slots), holding each row's prompt and the tokens
      generated before the last one.
    key: the PRNG key for the next sample.
  """

  tokens: jax.Array
  step: jax.Array
  done: jax.Array
  cache: KVCache
  key: jax.Array

  @property
  def last_tokens(self) -> jax.Array:
    """int32[B], the latest token of each row: the input of the next forward step."""
    return jax.lax.dynamic_index_in_dim(self.tokens, self.step - 1, axis=1, keepdims=False)


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("cache",))
def prefill(params, config: VLMConfig, input_ids, input_mask, pixel_values, prefix_lengths, cache: KVCache,
            positions=None, image_ends=None, rank_index=None):
  """Runs the prompts (images included) through the model into an empty cache.

  Args:
    input_ids: int32[B, T] right-padded prompts with image placeholders; input_mask: bool[B, T].
    pixel_values: float32[B, (I,) H, W, 3] or None; prefix_lengths: int32[B] (prefix-LM) or None.
    positions: int32[3, B, T] M-RoPE positions made on the host (the engine's, `qwen_vit.host_mrope_positions`), or
      None: M-RoPE's from the placeholders and the images' tables, in the model, or else 0..T-1.
    image_ends, rank_index: int32[B] or None, as `VLM.__call__`'s (the engine's prompts followed by tokens they
      generated).
  Returns:
    (logits float32[B, V] of each row's last prompt token, the cache holding the prompts).
  """
  batch, length = input_ids.shape
  if positions is None and not _has_mrope(config, pixel_values):
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  last = jnp.sum(input_mask, axis=1, dtype=jnp.int32) - 1
  logits, cache = VLM(config).apply({"params": params}, input_ids, pixel_values, positions, cache,
                                    input_mask=input_mask, prefix_lengths=prefix_lengths,
                                    logit_positions=last[:, None], image_ends=image_ends, rank_index=rank_index)
  return logits[:, 0], cache


def _has_mrope(config: VLMConfig, pixel_values) -> bool:
  """Whether the prompts' positions are M-RoPE's of their images (else 0..T-1, as for text alone)."""
  return bool(config.decoder.mrope_section) and isinstance(pixel_values, Patches)


@functools.partial(jax.jit, static_argnames=("image_token_id",))
def _mrope_offsets(input_ids, input_mask, patches: Patches, image_token_id: int) -> jax.Array:
  return mrope_positions(input_ids, image_token_id, patches, input_mask)[1]


def position_offsets(config: VLMConfig, prompts: "Prompts", pixel_values) -> jax.Array | None:
  """int32[B]: what each row's generated tokens add to their cache slot for their position (M-RoPE), else None."""
  if not _has_mrope(config, pixel_values):
    return None
  return _mrope_offsets(prompts.input_ids, prompts.input_mask, pixel_values, config.image_token_id)


def _first_token(logits, sampling, key) -> tuple[jax.Array, jax.Array]:
  """(the first token int32[B], sampled from the prefill's logits float32[B, V]; the key for the later samples)."""
  key, sample_key = jax.random.split(key)
  return sample(logits, sampling, sample_key).astype(jnp.int32), key


def _first_state(logits, cache, sampling, key, max_new_tokens, eos_ids, pad_id) -> DecodeState:
  """The first sampled token and the prefill's cache extended by room for the new tokens."""
  first, key = _first_token(logits, sampling, key)
  tokens = jnp.full((logits.shape[0], max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
  return DecodeState(tokens=tokens, step=jnp.array(1, jnp.int32), done=jnp.isin(first, jnp.asarray(eos_ids)),
                     cache=cache.extend(max_new_tokens), key=key)


def _decode_step(params, config: VLMConfig, state: DecodeState, sampling, prefix_lengths, position_offsets, eos_ids,
                 pad_id):
  """One token for every row: forward the last token through the cache, sample, write. position_offsets: int32[B]
  added to the cache slot for the token's position (M-RoPE), or None."""
  cache = state.cache
  positions = cache.lengths if position_offsets is None else cache.lengths + position_offsets
  logits, cache = VLM(config).apply({"params": params}, state.last_tokens[:, None], None, positions[:, None],
                                    cache, prefix_lengths=prefix_lengths)
  key, sample_key = jax.random.split(state.key)
  next_tokens = jnp.where(state.done, pad_id, sample(logits[:, 0], sampling, sample_key))
  tokens = jax.lax.dynamic_update_index_in_dim(state.tokens, next_tokens, state.step, axis=1)
  return DecodeState(tokens=tokens, step=state.step + 1, done=state.done | jnp.isin(next_tokens, jnp.asarray(eos_ids)),
                     cache=cache, key=key)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "eos_ids", "pad_id"))
def decode(params, config: VLMConfig, logits, cache: KVCache, sampling: SamplingParams, key, prefix_lengths,
           position_offsets=None, *, max_new_tokens: int, eos_ids: tuple[int, ...], pad_id: int) -> jax.Array:
  """Samples up to max_new_tokens per row from the prefill's logits, in one `lax.while_loop`. position_offsets:
  `position_offsets` (M-RoPE) or None.

  Returns:
    int32[B, max_new_tokens]: each row's tokens up to and including its end token, then pad_id.
  """
  if max_new_tokens == 1:  # the prefill's logits give it: no decode step, so no cache extended for one
    return _first_token(logits, sampling, key)[0][:, None]
  state = _first_state(logits, cache, sampling, key, max_new_tokens, eos_ids, pad_id)
  state = jax.lax.while_loop(
      lambda s: (s.step < max_new_tokens) & ~jnp.all(s.done),
      lambda s: _decode_step(params, config, s, sampling, prefix_lengths, position_offsets, eos_ids, pad_id), state)
  return state.tokens


_first_state_jit = jax.jit(_first_state, static_argnames=("max_new_tokens", "eos_ids", "pad_id"))
_decode_step_jit = jax.jit(_decode_step, static_argnames=("config", "eos_ids", "pad_id"), donate_argnames=("state",))


@flax.struct.dataclass
class Prompts:
  """A batch of prompts ready for prefill: right-padded to a bucket, with a cache of the bucket's length."""

  input_ids: jax.Array  # int32[B, T_bucket]
  input_mask: jax.Array  # bool[B, T_bucket]
  prefix_lengths: jax.Array | None  # int32[B], prefix-LM only
  cache: KVCache


def prepare(config: VLMConfig, input_ids: np.ndarray, input_mask: np.ndarray | None, max_new_tokens: int,
            pad_id: int, max_len: int | None = None) -> Prompts:
  """Moves each row's tokens to the left (left- or right-padded input both work), pads to a bucket and
  allocates a cache of the bucket's length.

  Args:
    input_ids: int[B, T]; input_mask: bool/int[B, T], 1 for real tokens (None: every token is real).
    max_len: the model's context length; a prompt plus max_new_tokens must fit in it.
  """
  input_ids = np.asarray(input_ids)
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be int[B, T], got shape {input_ids.shape}")
  input_mask = np.ones(input_ids.shape, bool) if input_mask is None else np.asarray(input_mask).astype(bool)
  lengths = input_mask.sum(axis=1)
  if np.any(lengths == 0):
    raise ValueError(f"rows {np.flatnonzero(lengths == 0).tolist()} of input_ids have no tokens")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
  longest = int(lengths.max())
  if max_len is not None and longest + max_new_tokens > max_len:
    raise ValueError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} does not fit the "
                     f"model's context of {max_len} tokens")
  bucket = bucket_length(longest, GENERATE_BUCKETS)
  packed = np.full((input_ids.shape[0], bucket), pad_id, np.int32)
  for row, (ids, mask) in enumerate(zip(input_ids, input_mask)):
    packed[row, :lengths[row]] = ids[mask]
  mask = np.arange(bucket)[None, :] < lengths[:, None]
  cache = config.decoder.init_cache(batch_size=input_ids.shape[0], max_len=bucket)
  prefix = jnp.asarray(lengths, jnp.int32) if config.prefix_lm else None
  return Prompts(input_ids=jnp.asarray(packed), input_mask=jnp.asarray(mask), prefix_lengths=prefix, cache=cache)


def generate(params, config: VLMConfig, input_ids, input_mask, pixel_values, *, max_new_tokens: int,
             eos_ids: Sequence[int], pad_id: int, sampling: SamplingParams | None = None, seed: int = 0,
             max_len: int | None = None) -> np.ndarray:
  """New tokens int32[B, max_new_tokens] for a batch of prompts: each row stops at an end token (kept) and
  is padded with pad_id after it. Greedy unless `sampling` says otherwise."""
  prompts = prepare(config, input_ids, input_mask, max_new_tokens, pad_id, max_len)
  batch = prompts.input_ids.shape[0]
  sampling = sampling or SamplingParams.fill(batch)
  logits, cache = prefill(params, config, prompts.input_ids, prompts.input_mask, pixel_values,
                          prompts.prefix_lengths, prompts.cache)
  tokens = decode(params, config, logits, cache, sampling, jax.random.key(seed), prompts.prefix_lengths,
                  position_offsets(config, prompts, pixel_values), max_new_tokens=max_new_tokens,
                  eos_ids=tuple(eos_ids), pad_id=pad_id)
  return np.asarray(tokens)


def stream(params, config: VLMConfig, input_ids, input_mask, pixel_values, *, max_new_tokens: int,
           eos_ids: Sequence[int], pad_id: int, sampling: SamplingParams | None = None, seed: int = 0,
           max_len: int | None = None) -> Iterator[np.ndarray]:
  """Like `generate`, but yields each step's tokens int32[B] as soon as they exist (one host copy per token,
  which is the point of streaming). Stops when every row has ended."""
  prompts = prepare(config, input_ids, input_mask, max_new_tokens, pad_id, max_len)
  sampling = sampling or SamplingParams.fill(prompts.input_ids.shape[0])
  eos_ids = tuple(eos_ids)
  logits, cache = prefill(params, config, prompts.input_ids, prompts.input_mask, pixel_values,
                          prompts.prefix_lengths, prompts.cache)
  state = _first_state_jit(logits, cache, sampling, jax.random.key(seed), max_new_tokens=max_new_tokens,
                           eos_ids=eos_ids, pad_id=pad_id)
  yield np.asarray(state.tokens[:, 0])
  offsets = position_offsets(config, prompts, pixel_values)
  for step in range(1, max_new_tokens):
    if bool(jnp.all(state.done)):
      return
    state = _decode_step_jit(params, config, state, sampling, prompts.prefix_lengths, offsets, eos_ids, pad_id)
    yield np.asarray(state.tokens[:, step])
