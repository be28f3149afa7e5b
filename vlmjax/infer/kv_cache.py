"""The preallocated KV cache: an explicit pytree passed into the decoder and returned by it."""

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from vlmjax.models.layers import CACHE_BATCH, CACHE_KV_HEADS, CACHE_LENGTH, HEAD_DIM, LAYERS


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer for `batch` rows of up to `max_len` tokens.

  Attributes:
    k: float[L, B, S, K, H] keys (S = max_len slots per row).
    v: float[L, B, S, K, H] values.
    lengths: int32[B], tokens held by each row; row b's next token is written at slot lengths[b]. Slots at or
      past lengths[b] hold nothing valid and are masked out.
  """

  k: jax.Array
  v: jax.Array
  lengths: jax.Array

  @property
  def max_len(self) -> int:
    return self.k.shape[2]

  @property
  def batch_size(self) -> int:
    return self.k.shape[1]

  @classmethod
  def zeros(cls, *, num_layers: int, batch_size: int, max_len: int, num_kv_heads: int, head_dim: int,
            dtype=jnp.float32) -> "KVCache":
    shape = (num_layers, batch_size, max_len, num_kv_heads, head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), lengths=jnp.zeros((batch_size,), jnp.int32))


# Logical axes of the cache arrays, mapped to mesh axes by the same rules table as the parameters.
_KV_AXES = PartitionSpec(LAYERS, CACHE_BATCH, CACHE_LENGTH, CACHE_KV_HEADS, HEAD_DIM)
CACHE_AXES = KVCache(k=_KV_AXES, v=_KV_AXES, lengths=PartitionSpec(CACHE_BATCH))
