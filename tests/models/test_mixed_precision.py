"""`matmul.contract`, `matmul.add_bias` and `dot_attention.dot_product_attention`: the same values and gradients
as JAX's own einsum, sum and attention, and every matmul of the forward and backward pass on compute-dtype
operands."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax import runtime
from vlmjax.models import dot_attention, matmul


@pytest.fixture(autouse=True)
def _cpu_path():
  """These tests hold the numerics written for XLA's CPU backend, whatever the backend (the standard path is
  JAX's own; tests/models/test_cpu_tuning.py holds the two against each other)."""
  with runtime.cpu_tuning(True):
    yield


BF16 = jnp.bfloat16


def _normal(seed, shape, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape).astype(dtype)


def _dot_operand_dtypes(fn, *args) -> set[tuple[str, str, str]]:
  """{(lhs, rhs, result) element types} of the dot_generals in fn's lowered program."""
  text = jax.jit(fn).lower(*args).as_text()
  signatures = re.findall(r"stablehlo\.dot_general.*?: \(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\) -> "
                          r"tensor<[^>]*x(\w+)>", text)
  assert signatures, "no dot_general in the program"
  return set(signatures)


# [B, T, D] x [D, N, H] (a query projection), [B, T, N, H] x [N, H, D] (the output projection), and an MLP's down
# projection at the shapes_tiny step's size (its weight gradient once ran into a matmul XLA's CPU backend cannot run
# in bfloat16).
CONTRACTIONS = [("BTD,DNH->BTNH", (2, 5, 8), (8, 3, 4), 1), ("BTNH,NHD->BTD", (2, 5, 3, 4), (3, 4, 8), 2),
                ("BTF,FD->BTD", (8, 224, 384), (384, 128), 1)]


@pytest.mark.parametrize("equation,x_shape,kernel_shape,axes", CONTRACTIONS)
def test_contract_in_float32_is_the_einsum_with_its_gradients(equation, x_shape, kernel_shape, axes):
  x, kernel, weights = _normal(0, x_shape), _normal(1, kernel_shape), _normal(2, x_shape[:-axes] + kernel_shape[axes:])
  ours = lambda x, k: (matmul.contract(x, k, axes) * weights).sum()
  reference = lambda x, k: (jnp.einsum(equation, x, k) * weights).sum()
  np.testing.assert_allclose(matmul.contract(x, kernel, axes), jnp.einsum(equation, x, kernel), rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.grad(ours, (0, 1))(x, kernel), jax.grad(reference, (0, 1))(x, kernel)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("equation,x_shape,kernel_shape,axes", CONTRACTIONS)
def test_contract_in_bfloat16_multiplies_bfloat16_and_accumulates_in_float32(equation, x_shape, kernel_shape, axes):
  """bfloat16 activations against a float32 master kernel: the forward result and the activations' gradient in
  bfloat16, the kernel's gradient in float32, each the float32 product of the bfloat16-rounded operands; all
  three matmuls (forward, both gradients) take bfloat16 operands and give float32 results."""
  x, kernel = _normal(0, x_shape, BF16), _normal(1, kernel_shape)
  grad_out = _normal(2, x_shape[:-axes] + kernel_shape[axes:], BF16)
  out, vjp = jax.vjp(lambda x, k: matmul.contract(x, k, axes), x, kernel)
  grad_x, grad_kernel = vjp(grad_out)
  assert (out.dtype, grad_x.dtype, grad_kernel.dtype) == (BF16, BF16, jnp.float32)

  f32 = lambda a: np.asarray(a, np.float32)
  kernel_rounded = f32(kernel.astype(BF16))
  expected_grad_x, expected_grad_kernel = jax.vjp(lambda x, k: jnp.einsum(equation, x, k), f32(x),
                                                  kernel_rounded)[1](f32(grad_out))
  np.testing.assert_allclose(f32(out), jnp.einsum(equation, f32(x), kernel_rounded), rtol=1e-2, atol=1e-2)
  np.testing.assert_allclose(f32(grad_x), expected_grad_x, rtol=1e-2, atol=1e-2)
  # float32 sums of exact products, in another order over up to 1792 rows (bfloat16 rounding would be ~4e-3)
  np.testing.assert_allclose(grad_kernel, expected_grad_kernel, rtol=1e-4, atol=1e-4)

  loss = lambda x, k: (matmul.contract(x, k, axes).astype(jnp.float32) * f32(grad_out)).sum()
  assert _dot_operand_dtypes(jax.grad(loss, (0, 1)), x, kernel) == {("bf16", "bf16", "f32")}
  jitted_grad_x, jitted_grad_kernel = jax.jit(jax.grad(loss, (0, 1)))(x, kernel)  # compiled as a whole, it runs
  np.testing.assert_allclose(f32(jitted_grad_x), f32(grad_x), rtol=1e-2, atol=1e-2)
  np.testing.assert_allclose(jitted_grad_kernel, grad_kernel, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, BF16])
def test_add_bias_sums_the_bias_gradient_in_float32(dtype):
  """[B, T, N, H] activations in the compute dtype plus a float32 [N, H] bias: the sum in the activations' dtype,
  their gradient passed through, the bias's the float32 sum of the cotangent over B and T (bfloat16 accumulation
  over these 448 rows would be off by ~1e-2), by a float32-accumulating matmul."""
  y, bias, grad_out = _normal(0, (8, 56, 3, 4), dtype), _normal(1, (3, 4)), _normal(2, (8, 56, 3, 4), dtype)
  out, vjp = jax.vjp(matmul.add_bias, y, bias)
  grad_y, grad_bias = vjp(grad_out)
  assert (out.dtype, grad_y.dtype, grad_bias.dtype) == (dtype, dtype, jnp.float32)
  np.testing.assert_array_equal(out, y + bias.astype(dtype))
  np.testing.assert_array_equal(grad_y, grad_out)
  np.testing.assert_allclose(grad_bias, np.asarray(grad_out, np.float64).sum((0, 1)), rtol=1e-5, atol=1e-5)
  loss = lambda y, b: (matmul.add_bias(y, b).astype(jnp.float32) * grad_out.astype(jnp.float32)).sum()
  element = "bf16" if dtype == BF16 else "f32"
  assert _dot_operand_dtypes(jax.grad(loss, 1), y, bias) == {(element, element, "f32")}
  np.testing.assert_allclose(jax.jit(jax.grad(loss, 1))(y, bias), grad_bias, rtol=1e-5, atol=1e-5)


def _mask(batch, length):
  """Causal, with the last two keys of row 1 padding (its last query then sees only earlier keys)."""
  causal = jnp.tril(jnp.ones((length, length), bool))
  valid = jnp.arange(length)[None] < jnp.array([[length], [length - 2]])
  return (causal[None] & valid[:, None, :])[:, None][:batch]


# (query heads, key/value heads): multi-head, grouped-query, multi-query; with and without a mask.
ATTENTION_CASES = [(4, 4, True), (4, 2, True), (4, 1, True), (4, 2, False)]


@pytest.mark.parametrize("heads,kv_heads,masked", ATTENTION_CASES)
def test_attention_in_float32_is_jax_attention_with_its_gradients(heads, kv_heads, masked):
  batch, length, head_dim = 2, 7, 8
  query = _normal(0, (batch, length, heads, head_dim))
  key, value = _normal(1, (batch, length, kv_heads, head_dim)), _normal(2, (batch, length, kv_heads, head_dim))
  mask, weights = (_mask(batch, length) if masked else None), _normal(3, query.shape)
  ours = lambda q, k, v: dot_attention.dot_product_attention(q, k, v, mask, 0.3)
  reference = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, scale=0.3)
  np.testing.assert_allclose(ours(query, key, value), reference(query, key, value), rtol=1e-5, atol=1e-6)
  weighted = lambda attend: (lambda q, k, v: (attend(q, k, v) * weights).sum())
  for a, b in zip(jax.grad(weighted(ours), (0, 1, 2))(query, key, value),
                  jax.grad(weighted(reference), (0, 1, 2))(query, key, value)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_attention_in_bfloat16_follows_float32_with_bfloat16_matmuls():
  batch, length, heads, kv_heads, head_dim = 2, 7, 4, 2, 8
  q, k, v = (_normal(i, (batch, length, n, head_dim)) for i, n in enumerate((heads, kv_heads, kv_heads)))
  mask, weights = _mask(batch, length), _normal(3, q.shape)
  loss = lambda q, k, v: (dot_attention.dot_product_attention(q, k, v, mask, 0.3).astype(jnp.float32)
                          * weights).sum()
  low = tuple(a.astype(BF16) for a in (q, k, v))
  grads, expected = jax.grad(loss, (0, 1, 2))(*low), jax.grad(loss, (0, 1, 2))(*(a.astype(jnp.float32) for a in low))
  for a, b in zip(grads, expected):
    assert a.dtype == BF16
    np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=0.05, atol=0.05 * float(jnp.abs(b).max()))
  assert _dot_operand_dtypes(jax.grad(loss, (0, 1, 2)), *low) == {("bf16", "bf16", "f32")}


def test_attention_rejects_query_heads_that_do_not_share_key_heads_evenly():
  q, kv = _normal(0, (1, 3, 3, 4)), _normal(1, (1, 3, 2, 4))
  with pytest.raises(ValueError, match="3 query heads cannot share 2 key/value heads"):
    dot_attention.dot_product_attention(q, kv, kv, None, 1.0)
