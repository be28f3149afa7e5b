"""The preallocated KV cache: an explicit pytree passed into the decoder and returned by it."""

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer for `batch` rows of up to `max_len` tokens, one buffer per layer.

  One buffer per layer (not one [L, ...] stack) lets a decode step write each layer's new slots in place and
  attend over the buffer as it is; a stack would be sliced (copied) layer by layer on every step. Slots go last,
  the layout the attention matmuls read without a copy (see `layers.Attention`).

  Attributes:
    k: L arrays float[B, K, H, S], each layer's keys (S = max_len slots per row).
    v: L arrays float[B, K, H, S], each layer's values.
    lengths: int32[B], tokens held by each row; row b's next token is written at slot lengths[b]. Slots at or
      past lengths[b] hold nothing valid and are masked out.
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  lengths: jax.Array

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

  def with_layers(self, layers: tuple[tuple[jax.Array, jax.Array], ...], lengths: jax.Array) -> "KVCache":
    keys, values = zip(*layers)
    return self.replace(k=keys, v=values, lengths=lengths)

  def extend(self, num_slots: int) -> "KVCache":
    """This cache with `num_slots` more (empty) slots per row: a prefill fills a cache of its prompts' length,
    then decoding extends it, so the prefill's attention spans only the prompts."""
    pad = lambda layer: jnp.pad(layer, ((0, 0), (0, 0), (0, 0), (0, num_slots)))
    return self.replace(k=tuple(map(pad, self.k)), v=tuple(map(pad, self.v)))

  @classmethod
  def zeros(cls, *, num_layers: int, batch_size: int, max_len: int, num_kv_heads: int, head_dim: int,
            dtype=jnp.float32) -> "KVCache":
    shape = (batch_size, num_kv_heads, head_dim, max_len)
    return cls(k=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
               v=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
               lengths=jnp.zeros((batch_size,), jnp.int32))
