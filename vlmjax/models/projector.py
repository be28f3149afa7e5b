"""Projector: vision-encoder tokens -> the language model's embedding space."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlmjax.models import layers

PROJECTORS = ("linear", "mlp2x_gelu")


class Projector(nn.Module):
  """'linear' (PaliGemma: one dense layer with bias) or 'mlp2x_gelu' (LLaVA-1.5: dense, exact GELU, dense)."""

  kind: str
  out_dim: int
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
      return self._dense("linear", self.out_dim, (layers.EMBED, layers.MLP), x)
    if self.kind == "mlp2x_gelu":
      hidden = jax.nn.gelu(self._dense("linear_1", self.out_dim, (layers.EMBED, layers.MLP), x), approximate=False)
      return self._dense("linear_2", self.out_dim, (layers.MLP, layers.EMBED), hidden)
    raise ValueError(f"unknown projector {self.kind!r}; choose one of {list(PROJECTORS)}")
