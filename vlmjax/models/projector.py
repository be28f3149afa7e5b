"""Projector: vision-encoder tokens -> the language model's embedding space."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlmjax.models import layers
from vlmjax.models.vit import POSITION_EMBEDDING_INITS

PROJECTORS = ("linear", "mlp2x_gelu")
POSITION_EMBEDDINGS = ("none", "sincos2d")


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _position_table(kind: str, grid: int, width: int, scale: float) -> jax.Array:
  """float32[grid*grid, width]: the `kind` table, centred over the tokens and scaled to a root mean square of
  `scale` when scale > 0."""
  table = POSITION_EMBEDDING_INITS[kind](0, grid)(None, (grid * grid, width))
  if not scale:
    return table
  centred = table - table.mean(0)
  return scale * centred / jnp.sqrt(jnp.mean(centred**2))


class Projector(nn.Module):
  """'linear' (PaliGemma: one dense layer with bias) or 'mlp2x_gelu' (LLaVA-1.5: dense, exact GELU, dense)."""

  kind: str
  out_dim: int
  # "none" (LLaVA, PaliGemma) or "sincos2d": a learned embedding per token of the square token grid, started
  # at the 2-D sine-cosine table of the token's row and column, added to the output.
  position_embedding: str = "none"
  # 0: the table starts as it is. s > 0: centred over the tokens and scaled to a root mean square of s. On a
  # small grid most of the table's frequencies barely turn over the few rows, so it is nearly the same vector on
  # every token (the shapes model's 4 x 4 grid: variance over the tokens 0.03 per dimension, the features 2.5).
  position_scale: float = 0.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def _dense(self, name: str, features: int, axes: tuple[str, str], x: jax.Array) -> jax.Array:
    return layers.Projection((x.shape[-1], features), axes, fan_in=1, use_bias=True, dtype=self.dtype,
                             param_dtype=self.param_dtype, name=name)(x)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: float[B, P, D_vision] -> float[B, P, D]."""
    if self.kind == "linear":
      y = self._dense("linear", self.out_dim, (layers.EMBED, layers.MLP), x)
    elif self.kind == "mlp2x_gelu":
      hidden = jax.nn.gelu(self._dense("linear_1", self.out_dim, (layers.EMBED, layers.MLP), x), approximate=False)
      y = self._dense("linear_2", self.out_dim, (layers.MLP, layers.EMBED), hidden)
    else:
      raise ValueError(f"unknown projector {self.kind!r}; choose one of {list(PROJECTORS)}")
    if self.position_embedding == "none":
      return y
    grid = int(round(x.shape[1] ** 0.5))

    def init(key, shape, dtype):
      del key
      # Computed by a program of its own and put in as a constant: inside a sharded init, XLA would split the
      # centring's sums over the shards and round differently from a one-device init.
      table = _position_table.lower(self.position_embedding, grid, shape[1], self.position_scale).compile()()
      return table.astype(dtype)
    positions = self.param("position_embedding", layers.param_init(init, (None, layers.EMBED)),
                           (grid * grid, self.out_dim), self.param_dtype)
    return y + positions.astype(y.dtype)[None]
