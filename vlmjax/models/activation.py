"""MLP activations by name, applied in float32 with a backward pass of one elementwise loop.

In bfloat16, JAX differentiates `jax.nn.silu(gate) * up` op by op: XLA's CPU backend computes each bfloat16
elementwise op in float32 between converts, and the chain (sigmoid, its derivative, the products) becomes several
loops over the [B, T, F] hidden activations, each rounding to bfloat16. `activate` computes the activation and the
gating product in float32 and rounds once; its backward pass recomputes them from the saved inputs and returns
both inputs' gradients from one fusion. On the shapes_tiny bench shape ([1792, 384] per device) the SwiGLU's
forward + backward take 0.42 ms against 1.2 ms, and land closer to float32. That is for XLA's CPU backend
(`runtime.cpu_tuned`); elsewhere, and with `VLMJAX_CPU_TUNING=0`, `activate` is the plain expression in the compute
dtype, which JAX differentiates itself.
"""

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from vlmjax import runtime

_F32 = jnp.float32


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


# Activations by the names configs use. "gelu" is exact (erf), "gelu_tanh" the tanh approximation.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
}


def _in_float32(name: str, x: jax.Array, up: jax.Array | None) -> jax.Array:
  hidden = ACTIVATIONS[name](x.astype(_F32))
  return hidden if up is None else hidden * up.astype(_F32)


def activate(name: str, x: jax.Array, up: jax.Array | None = None) -> jax.Array:
  """act(x), or act(x) * up for a gated MLP (SwiGLU, GeGLU); on the CPU computed in float32 and rounded once.

  Args:
    name: a key of `ACTIVATIONS`.
    x: float[..., F], the (gate) projection in the compute dtype.
    up: float[..., F] like x, or None.
  Returns:
    float[..., F] in x's dtype.
  """
  if runtime.cpu_tuned():
    return _activate_cpu(name, x, up)
  hidden = ACTIVATIONS[name](x)
  return hidden if up is None else hidden * up


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _activate_cpu(name: str, x: jax.Array, up: jax.Array | None) -> jax.Array:
  return _in_float32(name, x, up).astype(x.dtype)


def _activate_fwd(name, x, up):
  return _activate_cpu(name, x, up), (x, up)


def _activate_bwd(name, residuals, grad):
  x, up = residuals
  up32 = None if up is None else up.astype(_F32)
  _, vjp = jax.vjp(functools.partial(_in_float32, name), x.astype(_F32), up32)
  grad_x, grad_up = vjp(grad.astype(_F32))
  return grad_x.astype(x.dtype), None if up is None else grad_up.astype(up.dtype)


_activate_cpu.defvjp(_activate_fwd, _activate_bwd)
