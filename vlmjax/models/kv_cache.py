"""The preallocated KV cache: an explicit pytree passed into the decoder and returned by it.

A cache holds keys and values in the compute dtype, or in INT8 (`kv_cache_dtype="int8"`): each token's key (and
value) of each head is stored as int8 with one float32 scale, max|x| / 127 over the head dim, so a token read back
is within half a step (scale / 2) of what was written. The cache then takes (H + 4) bytes per token and head
against 4 H in float32 (2 H in bfloat16); attention reads the int8 values and scales and multiplies them out in the
program. The paged pool (`paged_cache.py`) stores its pages the same way. Our own, not qwix's: qwix quantizes the
operands of matmuls, while a cache is state written a token at a time and read back across steps.
"""

import flax.struct
import jax
import jax.numpy as jnp

KV_CACHE_DTYPES = ("int8",)  # besides the compute dtype (None)


@flax.struct.dataclass
class Int8Buffer:
  """Keys or values in INT8: `values` int8[..., H, ...] with the head dim at axis `head_axis`, and `scales`
  float32 of values' shape without that axis (one per token and head). Used for a layer of the contiguous cache
  ([B, K, H, S], scales [B, K, S]) and for the paged pool ([P, K, H, page_size] or [K, P, page_size, H])."""

  values: jax.Array
  scales: jax.Array
  head_axis: int = flax.struct.field(pytree_node=False, default=2)

  @property
  def shape(self) -> tuple[int, ...]:
    return self.values.shape

  @property
  def dtype(self):
    return self.values.dtype

  @classmethod
  def zeros(cls, shape: tuple[int, ...], head_axis: int) -> "Int8Buffer":
    scale_shape = shape[:head_axis] + shape[head_axis + 1:]
    return cls(jnp.zeros(shape, jnp.int8), jnp.zeros(scale_shape, jnp.float32), head_axis)

  def dequantized(self, dtype) -> jax.Array:
    """The float buffer, values' shape, in `dtype`."""
    return (self.values.astype(jnp.float32) * jnp.expand_dims(self.scales, self.head_axis)).astype(dtype)


def quantize_heads(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """float[..., H] -> (int8[..., H], float32[...]): one scale per vector over the last axis (a token's head)."""
  x = x.astype(jnp.float32)
  scales = jnp.max(jnp.abs(x), axis=-1) / 127.0
  scales = jnp.where(scales == 0, 1.0, scales)
  return jnp.clip(jnp.round(x / scales[..., None]), -127, 127).astype(jnp.int8), scales


def dequantize_heads(values: jax.Array, scales: jax.Array, dtype) -> jax.Array:
  """The inverse of `quantize_heads`: float[..., H] in `dtype`."""
  return (values.astype(jnp.float32) * scales[..., None]).astype(dtype)


def _pad_slots(buffer, num_slots: int):
  """A layer's buffer (float[B, K, H, S] or an Int8Buffer, scales [B, K, S]) with num_slots more slots at the end."""
  return jax.tree.map(lambda a: jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, num_slots)]), buffer)


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer for `batch` rows of up to `max_len` tokens, one buffer per layer.

  One buffer per layer (not one [L, ...] stack) lets a decode step write each layer's new slots in place and
  attend over the buffer as it is; a stack would be sliced (copied) layer by layer on every step. Slots go last,
  the layout the attention matmuls read without a copy (see `layers.Attention`).

  Attributes:
    k: L arrays float[B, K, H, S], each layer's keys (S = max_len slots per row), or L Int8Buffers (int8[B, K, H, S]
      with scales float32[B, K, S]).
    v: L arrays float[B, K, H, S], each layer's values, or L Int8Buffers.
    lengths: int32[B], tokens held by each row; row b's next token is written at slot lengths[b]. Slots at or
      past lengths[b] hold nothing valid and are masked out.
    pruned: int32[B], the image tokens FastV dropped from row b in its later layers (`models/fastv.py`), whose
      buffers hold lengths[b] - pruned[b] tokens; 0 without FastV.
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  lengths: jax.Array
  pruned: jax.Array

  @property
  def num_layers(self) -> int:
    return len(self.k)

  @property
  def max_len(self) -> int:
    return self.k[0].shape[3]

  @property
  def batch_size(self) -> int:
    return self.k[0].shape[0]

  def layers(self) -> tuple[tuple[jax.Array, jax.Array], ...]:
    """Each layer's (k, v), what `layers.Attention` reads and writes."""
    return tuple(zip(self.k, self.v))

  def with_layers(self, layers: tuple[tuple[jax.Array, jax.Array], ...], lengths: jax.Array,
                  pruned: jax.Array) -> "KVCache":
    keys, values = zip(*layers)
    return self.replace(k=keys, v=values, lengths=lengths, pruned=pruned)

  def extend(self, num_slots: int) -> "KVCache":
    """This cache with `num_slots` more (empty) slots per row: a prefill fills a cache of its prompts' length,
    then decoding extends it, so the prefill's attention spans only the prompts."""
    pad = lambda layer: _pad_slots(layer, num_slots)
    return self.replace(k=tuple(map(pad, self.k)), v=tuple(map(pad, self.v)))

  @classmethod
  def zeros(cls, *, num_layers: int, batch_size: int, max_len: int, num_kv_heads: int, head_dim: int,
            dtype=jnp.float32) -> "KVCache":
    """An empty cache; dtype int8: Int8Buffers."""
    shape = (batch_size, num_kv_heads, head_dim, max_len)
    empty = ((lambda: Int8Buffer.zeros(shape, head_axis=2)) if jnp.dtype(dtype) == jnp.int8 else
             (lambda: jnp.zeros(shape, dtype)))
    return cls(k=tuple(empty() for _ in range(num_layers)), v=tuple(empty() for _ in range(num_layers)),
               lengths=jnp.zeros((batch_size,), jnp.int32), pruned=jnp.zeros((batch_size,), jnp.int32))
