"""Matmuls in the compute dtype that accumulate in float32, in the forward and the backward pass.

On a CPU, XLA runs a bfloat16 matmul with YNNPACK's bfloat16 kernels only when it asks for a float32 result (on
the AVX512-BF16 development machine: 685 GFLOP/s for a [1792, 128] x [128, 384] product, against 376 in float32).
A bfloat16 x bfloat16 -> bfloat16 dot, what `jnp.einsum` and `nn.Dense` write, is computed as a float32 dot
between converts. Asking for a float32 result fixes the forward pass only: JAX differentiates such a dot by
multiplying the float32 cotangent with the bfloat16 operand, a float32 dot again. `contract` therefore casts its
result back to the compute dtype and writes its own backward pass, which multiplies the cotangent as it arrives
(in the compute dtype): all three matmuls of a layer run in bfloat16 (on the shapes_tiny training step: 0.257 s
against 0.275 s; tools/bench_train.py).

In float32 this is the plain matmul. The custom backward passes are written for XLA's CPU backend and apply only
there (`runtime.cpu_tuned`); elsewhere, and with `VLMJAX_CPU_TUNING=0`, `contract` and `add_bias` are the plain
`dot_general` and sum that JAX differentiates itself, which on a GPU or TPU already run bfloat16 operands with
float32 accumulation.
"""

import functools
import math

import jax
import jax.numpy as jnp

from vlmjax import runtime
from vlmjax.models import quant


def _dot_f32(a: jax.Array, b: jax.Array, a_axes, b_axes) -> jax.Array:
  """`a` and `b` contracted over the given axes, accumulated and returned in float32."""
  return jax.lax.dot_general(a, b, ((tuple(a_axes), tuple(b_axes)), ((), ())), preferred_element_type=jnp.float32)


def contract(x: jax.Array, kernel: jax.Array, axes: int = 1, result_dtype=None) -> jax.Array:
  """x's last `axes` axes contracted with the kernel's first `axes`, in x's dtype (the compute dtype).

  Args:
    x: float[..., C1..Ca], activations in the compute dtype.
    kernel: float[C1..Ca, O...], any float dtype (cast to x's; its gradient comes back in its own dtype, so a
      float32 master weight gets a float32 gradient).
    axes: how many axes are contracted.
    result_dtype: the result's dtype, x's by default. The output head asks for float32: its float32 accumulator
      rounded to bfloat16 keeps 8 bits, so nearby logits tie and greedy decoding's argmax picks among them by index.
  Returns:
    float[..., O...] in `result_dtype`, accumulated in float32.
  A `quant.QuantizedKernel` goes through `quant.contract` (inference only: no gradient).
  """
  result_dtype = result_dtype or x.dtype
  if isinstance(kernel, quant.QuantizedKernel):
    return quant.contract(x, kernel, axes, result_dtype)
  if runtime.cpu_tuned():
    return _contract_cpu(x, kernel, axes, jnp.dtype(result_dtype))
  dimensions = ((tuple(range(x.ndim - axes, x.ndim)), tuple(range(axes))), ((), ()))
  return jax.lax.dot_general(x, kernel.astype(x.dtype), dimensions, preferred_element_type=result_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _contract_cpu(x: jax.Array, kernel: jax.Array, axes: int, result_dtype) -> jax.Array:
  """`contract` with a float32 result cast to `result_dtype`, and the backward pass below."""
  return _dot_f32(x, kernel.astype(x.dtype), range(x.ndim - axes, x.ndim), range(axes)).astype(result_dtype)


def _contract_fwd(x, kernel, axes, result_dtype):
  return _contract_cpu(x, kernel, axes, result_dtype), (x, kernel)


def _contract_bwd(axes, result_dtype, residuals, grad):
  x, kernel = residuals
  grad = grad.astype(x.dtype)  # float[..., O...]: multiplied in the compute dtype, as the forward pass was
  out_axes = kernel.ndim - axes
  grad_x = _dot_f32(grad, kernel.astype(x.dtype), range(grad.ndim - out_axes, grad.ndim), range(axes, kernel.ndim))
  batch_axes = range(x.ndim - axes)
  # For a matmul that contracts the rows (M), XLA's CPU backend first copies its first operand into [C, M] for
  # YNNPACK, and fuses that copy with the ops that produced the operand; with elementwise ops in it the copy is slow
  # (the float32 vision tower's GELU: 0.63 ms against 0.10 for a plain transpose). So in float32 the narrower of x
  # and the cotangent goes first, and when that is the cotangent the kernel-sized product is transposed (the
  # shapes_tiny bench step: 177.0 against 183.9 ms). Not in bfloat16: XLA may fold that transpose into the matmul
  # as a form YNNPACK does not take, and its fallback has no bfloat16 matmul ("Unsupported element type for
  # DotThunk::Execute", on one device).
  narrower_grad = math.prod(grad.shape[grad.ndim - out_axes:]) < math.prod(x.shape[x.ndim - axes:])
  if x.dtype == jnp.float32 and narrower_grad:
    swapped = _dot_f32(grad, x, batch_axes, batch_axes)  # [O..., C...]
    grad_kernel = jnp.transpose(swapped, (*range(out_axes, kernel.ndim), *range(out_axes)))
  else:
    grad_kernel = _dot_f32(x, grad, batch_axes, batch_axes)  # [C..., O...]
  return grad_x.astype(x.dtype), grad_kernel.astype(kernel.dtype)


_contract_cpu.defvjp(_contract_fwd, _contract_bwd)


def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  """y + bias over y's trailing axes, in y's dtype (the compute dtype).

  On the CPU (`runtime.cpu_tuned`) the bias's gradient is summed by a float32 matmul with a vector of ones, which
  XLA gives to YNNPACK: JAX's gradient of the plain sum reduces the compute-dtype cotangent over the batch and
  length axes, which XLA's CPU backend in the training step rewrote into a windowed reduction of a float32 copy
  (the bfloat16 vision tower's MLP bias: 0.82 ms per layer and device for a [512, 512] cotangent).
  """
  return _add_bias_cpu(y, bias) if runtime.cpu_tuned() else y + bias.astype(y.dtype)


@jax.custom_vjp
def _add_bias_cpu(y: jax.Array, bias: jax.Array) -> jax.Array:
  return y + bias.astype(y.dtype)


def _add_bias_fwd(y, bias):
  return _add_bias_cpu(y, bias), bias


def _add_bias_bwd(bias, grad):
  lead = grad.ndim - bias.ndim
  ones = jnp.ones(grad.shape[:lead], grad.dtype)
  grad_bias = _dot_f32(ones, grad, range(lead), range(lead))
  return grad, grad_bias.astype(bias.dtype)


_add_bias_cpu.defvjp(_add_bias_fwd, _add_bias_bwd)
