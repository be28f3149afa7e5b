"""Projector: vision-encoder tokens -> the language model's embedding space."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlmjax.models import layers
from vlmjax.models.vit import POSITION_EMBEDDING_INITS

PROJECTORS = ("linear", "mlp2x_gelu")
POSITION_EMBEDDINGS = ("none", "sincos2d")


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
    return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                    kernel_init=layers.param_init(nn.initializers.lecun_normal(), axes),
                    bias_init=layers.param_init(nn.initializers.zeros, (axes[1],)))(x)

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
    table_init = POSITION_EMBEDDING_INITS[self.position_embedding](0, grid)

    def init(*args):
      table = table_init(*args)
      if not self.position_scale:
        return table
      centred = table - table.mean(0)
      return self.position_scale * centred / jnp.sqrt(jnp.mean(centred**2))
    positions = self.param("position_embedding", layers.param_init(init, (None, layers.EMBED)),
                           (grid * grid, self.out_dim), self.param_dtype)
    return y + positions.astype(y.dtype)[None]
