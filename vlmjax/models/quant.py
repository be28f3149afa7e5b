"""Low-bit weights and the matmuls that read them: INT8 per output channel, INT4 in groups, W8A8.

    kernel = quant.quantize_kernel(kernel, fan_in=1, scheme="int8")    # float[D, F] -> QuantizedKernel
    y = quant.contract(x, kernel, fan_in=1)                              # as matmul.contract, reading int8 weights

Schemes (symmetric, no zero point; a scale is max|w| / qmax of the weights it covers):
  int8   weight-only INT8, one scale per output channel; |w - dequantized| <= scale / 2.
  int4   weight-only INT4 in groups of `group_size` (128) inputs per output channel, two weights a byte.
  w8a8   INT8 weights per output channel and INT8 activations with one scale per token (dynamic): one integer
         matmul with int32 accumulation.

The matmul reads the low-bit weights; no float copy of a layer is kept. How, by backend:
- CPU (`runtime.cpu_tuned`): XLA's CPU backend multiplies int8 by int8 into int32 quickly (YNNPACK; a [2, 2048] x
  [2048, 5504] product took 0.82 ms against 5.4 ms in float32 on the 2-core AMD EPYC of README.md) but has no fast
  mixed float x int8 matmul: a float32 dot over the converted weights took 2-4x the float32 dot's time. So every
  scheme runs integer matmuls. Weight-only schemes keep the activations' precision by splitting each token's
  activations, quantized to 16 bits (x ~ s * (256 * hi + lo)), into two int8 limbs and running two int8 matmuls
  (activation error <= s / 2 with s = max|x| / 32639, far below the weights'); W8A8 runs one. Weight-only
  products of more than INTEGER_ROWS rows (prefill) multiply by the dequantized layer instead. A product of one row
  (batch-1 decoding) takes a slow path in XLA's CPU backend (10 ms for that shape), so one row is padded to two.
  INT4 weights are unpacked into an int8 temporary per call (the shifts are vectorized; XLA's own int4 type is
  stored a byte per value on the CPU and converted slowly, 8 ms for that shape).
- GPU, TPU: weight-only schemes multiply the activations by the weights converted to the compute dtype, scaled,
  which XLA fuses into the matmul's operand read; W8A8 runs the int8 x int8 -> int32 matmul those backends have.

Why not qwix (google/qwix, `PtqProvider` + `quantize_params`): its PTQ intercepts `jax.lax.dot_general` inside a
module's call and recognizes a weight by finding the very param array among the module's variables; our layers
reach the dot through `matmul.contract`, a `jax.custom_vjp` on the CPU, inside which the kernel is a new tracer, so
qwix sees an activation. Its weight-only path dequantizes the weight and runs a float dot (fused on TPU and GPU;
the slow path above on the CPU), and its INT4 is XLA's int4 type (a byte per value on the CPU). The rule-over-paths
idea is kept: `vlmjax.infer.quantize` chooses the layers by their parameter paths.
"""

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vlmjax import runtime

SCHEMES = ("int8", "int4", "w8a8")
DEFAULT_GROUP_SIZE = 128
# Weight-only schemes on the CPU run the integer matmuls for up to this many rows (tokens): decoding. More rows (a
# prefill) multiply by the layer dequantized to float32, a temporary whose conversion the rows share. Measured on
# the 2-core AMD EPYC for x [M, 512] times a [512, 1376] kernel: an int8 matmul 2.28 ms against 3.51 ms in float32
# (3.64 dequantized) at M = 256, so two limbs lose; 0.16 against 0.24 ms at M = 16, about even; and for [2, 2048] x
# [2048, 5504], 0.82 against 5.4 ms.
INTEGER_ROWS = 8
_LIMB = 256  # weight-only activations: x / s = 256 * hi + lo, hi and lo int8
_LIMB_MAX = 127 * _LIMB + 127  # the largest |x / s|, so that hi stays within int8


@flax.struct.dataclass
class QuantizedKernel:
  """A linear layer's kernel in low-bit form.

  The kernel float[C1..Ca, O1..Ob] (its first `fan_in` axes contracted with the input) is kept as a matrix of C = C1
  x .. x Ca rows by O = O1 x .. x Ob columns, or, with `rows_out` (an embedding table float[V, D] that a tied output
  head contracts over D), O rows by C columns.

  Attributes:
    values: int8[C, O] (int8, w8a8), or int4 packed int8[G, group_size / 2, O] (group g's first half of inputs in the
      low nibbles, its second half in the high nibbles); [O, C] and int8[O, G, group_size / 2] with rows_out.
    scales: float32[O] per output channel, or bfloat16[G, O] per group ([O, G] with rows_out).
    shape: the float kernel's shape; fan_in: how many of its leading axes are inputs.
    scheme: one of SCHEMES; group_size: inputs per INT4 group (0 for the per-channel schemes).
    rows_out: the matrix is stored outputs first (an embedding table).
  """

  values: jax.Array
  scales: jax.Array
  shape: tuple[int, ...] = flax.struct.field(pytree_node=False)
  fan_in: int = flax.struct.field(pytree_node=False)
  scheme: str = flax.struct.field(pytree_node=False)
  group_size: int = flax.struct.field(pytree_node=False, default=0)
  rows_out: bool = flax.struct.field(pytree_node=False, default=False)

  @property
  def num_inputs(self) -> int:
    return math.prod(self.shape[:self.fan_in])

  @property
  def num_outputs(self) -> int:
    return math.prod(self.shape[self.fan_in:])

  @property
  def nbytes(self) -> int:
    return self.values.nbytes + self.scales.nbytes


def check_scheme(scheme: str, group_size: int = DEFAULT_GROUP_SIZE) -> None:
  """Raises ValueError for an unknown scheme or an INT4 group size that cannot work."""
  if scheme not in SCHEMES:
    raise ValueError(f"unknown quantization scheme {scheme!r}; choose one of {list(SCHEMES)} (or none)")
  if scheme == "int4" and (group_size < 2 or group_size % 2):
    raise ValueError(f"int4 groups must hold an even number of inputs (two weights a byte), got {group_size}")


def quantize_kernel(kernel: jax.Array, fan_in: int, scheme: str, group_size: int = DEFAULT_GROUP_SIZE,
                    rows_out: bool = False, where: str = "kernel") -> QuantizedKernel:
  """A float kernel float[C1..Ca, O...] (fan_in = a) in `scheme`; with `rows_out`, an embedding table float[O, C]
  (fan_in counts its leading output axis: 1). `where` names the layer in errors (a parameter path)."""
  check_scheme(scheme, group_size)
  kernel = jnp.asarray(kernel, jnp.float32)
  shape = tuple(kernel.shape)
  if rows_out:
    matrix = kernel.reshape(shape[0], -1).T  # [C, O]
  else:
    matrix = kernel.reshape(math.prod(shape[:fan_in]), -1)  # [C, O]
  num_inputs, num_outputs = matrix.shape
  if scheme != "int4":
    scales = jnp.max(jnp.abs(matrix), axis=0) / 127.0  # [O]
    scales = jnp.where(scales == 0, 1.0, scales)
    values = jnp.clip(jnp.round(matrix / scales), -127, 127).astype(jnp.int8)
    return QuantizedKernel(values.T if rows_out else values, scales, shape, fan_in, scheme, 0, rows_out)
  if num_inputs % group_size:
    raise ValueError(f"{where}: int4 groups of {group_size} inputs cannot split the layer's {num_inputs} inputs "
                     f"(kernel shape {shape}); pick a group size that divides {num_inputs}, or int8")
  groups = matrix.reshape(num_inputs // group_size, group_size, num_outputs)  # [G, g, O]
  scales = jnp.max(jnp.abs(groups), axis=1) / 7.0  # [G, O]
  # Kept in bfloat16 (2 bytes a group, not 4: 0.56 bytes a weight with groups of 32), rounded up so that the
  # group's largest weight still fits within 7 steps; 8 bits of mantissa are far finer than int4's 15 levels.
  scales = (jnp.where(scales == 0, 1.0, scales) * (1 + 2.0**-7)).astype(jnp.bfloat16)
  quantized = jnp.clip(jnp.round(groups / scales.astype(jnp.float32)[:, None]), -7, 7).astype(jnp.int8)  # [G, g, O]
  low, high = jnp.split(quantized, 2, axis=1)  # [G, g/2, O] each
  packed = (low & 0x0F) | (high << 4)
  if rows_out:
    return QuantizedKernel(jnp.transpose(packed, (2, 0, 1)), scales.T, shape, fan_in, scheme, group_size, True)
  return QuantizedKernel(packed, scales, shape, fan_in, scheme, group_size, False)


def _unpacked(kernel: QuantizedKernel) -> jax.Array:
  """The integer weights int8[C, O] (or [G, g, O] for int4; [O, C] / [O, G, g] with rows_out)."""
  if kernel.scheme != "int4":
    return kernel.values
  packed = kernel.values
  low = jnp.right_shift(jnp.left_shift(packed, 4), 4)  # arithmetic shifts sign-extend the nibble
  high = jnp.right_shift(packed, 4)
  return jnp.concatenate([low, high], axis=-1 if kernel.rows_out else 1)


def dequantize(kernel: QuantizedKernel, dtype=jnp.float32) -> jax.Array:
  """The float kernel of kernel.shape (for tests, and for embedding rows)."""
  values = _unpacked(kernel).astype(jnp.float32)
  if kernel.scheme == "int4":
    scales = kernel.scales.astype(jnp.float32)
    scaled = values * (scales[:, :, None] if kernel.rows_out else scales[:, None])
    matrix = scaled.reshape(kernel.num_outputs, -1).T if kernel.rows_out else scaled.reshape(-1, kernel.num_outputs)
  else:
    matrix = (values * kernel.scales[:, None]).T if kernel.rows_out else values * kernel.scales
  return (matrix.T if kernel.rows_out else matrix).reshape(kernel.shape).astype(dtype)


def embedding_rows(table: QuantizedKernel, ids: jax.Array, dtype) -> jax.Array:
  """Rows `ids` int[...] of a quantized embedding table (rows_out) -> float[..., D] in `dtype`: only the looked-up
  rows are dequantized."""
  assert table.rows_out, "embedding_rows reads a table quantized with rows_out=True"
  values = jnp.take(table.values, ids, axis=0)  # [..., C] or [..., G, g/2]
  scales = jnp.take(table.scales, ids, axis=0).astype(jnp.float32)  # [...] or [..., G]
  if table.scheme == "int4":
    low = jnp.right_shift(jnp.left_shift(values, 4), 4)
    rows = jnp.concatenate([low, jnp.right_shift(values, 4)], axis=-1).astype(jnp.float32) * scales[..., None]
    rows = rows.reshape(*ids.shape, -1)
  else:
    rows = values.astype(jnp.float32) * scales[..., None]
  return rows.astype(dtype)


def _int_dot(x_int: jax.Array, weights: jax.Array, kernel: QuantizedKernel) -> jax.Array:
  """int8[M, C] activations x the kernel's int8 weights -> int32 per group: [M, O], or [G, M, O] for int4."""
  if kernel.scheme == "int4":
    groups = weights.shape[1] if kernel.rows_out else weights.shape[0]
    x_groups = x_int.reshape(x_int.shape[0], groups, -1)  # [M, G, g]
    numbers = (((2,), (2,)), ((1,), (1,))) if kernel.rows_out else (((2,), (1,)), ((1,), (0,)))
    return jax.lax.dot_general(x_groups, weights, numbers, preferred_element_type=jnp.int32)  # [G, M, O]
  numbers = (((1,), (1,)), ((), ())) if kernel.rows_out else (((1,), (0,)), ((), ()))
  return jax.lax.dot_general(x_int, weights, numbers, preferred_element_type=jnp.int32)  # [M, O]


def _scaled(accumulated: jax.Array, kernel: QuantizedKernel) -> jax.Array:
  """int32 products [M, O] (or [G, M, O]) as float32[M, O] in the weights' units."""
  if kernel.scheme == "int4":
    scales = (kernel.scales.T if kernel.rows_out else kernel.scales).astype(jnp.float32)  # [G, O]
    return jnp.sum(accumulated.astype(jnp.float32) * scales[:, None, :], axis=0)
  return accumulated.astype(jnp.float32) * kernel.scales


def _matmul_integer(x: jax.Array, kernel: QuantizedKernel) -> jax.Array:
  """float[M, C] x the kernel -> float32[M, O] through int8 x int8 matmuls (the CPU's path; W8A8 everywhere)."""
  rows = x.shape[0]
  if rows == 1 and kernel.scheme == "w8a8":  # XLA's CPU backend runs a one-row int8 product on a slow path; two rows
    x = jnp.concatenate([x, jnp.zeros_like(x)])  # take the fast one (weight-only schemes have two rows: the limbs)
  x = x.astype(jnp.float32)
  weights = _unpacked(kernel)
  peak = jnp.max(jnp.abs(x), axis=1, keepdims=True)  # [M, 1], one scale per token
  if kernel.scheme == "w8a8":
    step = jnp.where(peak == 0, 1.0, peak / 127.0)
    x_int = jnp.clip(jnp.round(x / step), -127, 127).astype(jnp.int8)
    out = _scaled(_int_dot(x_int, weights, kernel), kernel) * step
  else:
    step = jnp.where(peak == 0, 1.0, peak / _LIMB_MAX)
    whole = jnp.round(x / step)  # |whole| <= _LIMB_MAX
    high = jnp.round(whole / _LIMB)
    low = whole - _LIMB * high  # within [-128, 128]
    high, low = high.astype(jnp.int8), jnp.clip(low, -128, 127).astype(jnp.int8)
    both = _int_dot(jnp.concatenate([high, low]), weights, kernel)  # one matmul for the two limbs: [2M, ...]
    high_out, low_out = jnp.split(_scaled(both, kernel), 2)
    out = (high_out * _LIMB + low_out) * step
  return out[:rows]


def _matmul_float(x: jax.Array, kernel: QuantizedKernel) -> jax.Array:
  """float[M, C] x the kernel dequantized to x's dtype -> float32[M, O]: the GPU and TPU path of weight-only schemes
  (XLA fuses the convert and the scales into the matmul's operand read), and the CPU's for many rows (a prefill),
  where the layer's float copy is a temporary of the program whose cost the rows share."""
  numbers = (((1,), (1,)), ((), ())) if kernel.rows_out else (((1,), (0,)), ((), ()))
  if kernel.scheme == "int4":
    matrix = dequantize(kernel, x.dtype).reshape(kernel.shape[0] if kernel.rows_out else kernel.num_inputs, -1)
    return jax.lax.dot_general(x, matrix, numbers, preferred_element_type=jnp.float32)
  weights = kernel.values.astype(x.dtype)
  return jax.lax.dot_general(x, weights, numbers, preferred_element_type=jnp.float32) * kernel.scales


def contract(x: jax.Array, kernel: QuantizedKernel, axes: int | None = None, result_dtype=None) -> jax.Array:
  """`matmul.contract` for a quantized kernel: x float[..., C1..Ca] contracted with the kernel's inputs ->
  float[..., O...] in `result_dtype` (x's by default), accumulated in int32 or float32. For inference (no
  gradient)."""
  axes = kernel.fan_in if axes is None else axes
  if kernel.rows_out:
    in_shape, out_shape = kernel.shape[1:], kernel.shape[:1]
  else:
    in_shape, out_shape = kernel.shape[:axes], kernel.shape[axes:]
  if tuple(x.shape[x.ndim - len(in_shape):]) != tuple(in_shape):
    raise ValueError(f"input of shape {x.shape} does not match the quantized kernel's inputs {in_shape}")
  lead = x.shape[:x.ndim - len(in_shape)]
  flat = x.reshape(-1, math.prod(in_shape))  # [M, C]
  integer = kernel.scheme == "w8a8" or (runtime.cpu_tuned() and flat.shape[0] <= INTEGER_ROWS)
  out = _matmul_integer(flat, kernel) if integer else _matmul_float(flat, kernel)
  return out.reshape(*lead, *out_shape).astype(result_dtype or x.dtype)


def error_bound(kernel: QuantizedKernel) -> np.ndarray:
  """Half a quantization step per weight, float32 of the float kernel's shape: the most a round trip may move it."""
  return np.asarray(dequantize(kernel.replace(values=jnp.ones_like(kernel.values) * (
      0x11 if kernel.scheme == "int4" else 1))) / 2)
