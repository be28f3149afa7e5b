"""Low-bit kernels and the INT8 KV cache's numbers: round trips within the scheme's bound, the quantized matmul
against the float matmul over the dequantized kernel, on the CPU's integer path and the standard path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax import runtime
from vlmjax.models import kv_cache, paged_cache, quant


def _kernel(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@pytest.mark.parametrize("scheme,group_size", [("int8", 0), ("w8a8", 0), ("int4", 32), ("int4", 128)])
@pytest.mark.parametrize("rows_out", [False, True])
def test_a_round_trip_moves_no_weight_by_more_than_half_a_step(scheme, group_size, rows_out):
  kernel = _kernel((256, 128))
  quantized = quant.quantize_kernel(kernel, 1, scheme, group_size or 128, rows_out=rows_out)
  back = np.asarray(quant.dequantize(quantized))
  assert back.shape == kernel.shape
  bound = quant.error_bound(quantized)
  assert np.all(np.abs(back - np.asarray(kernel)) <= bound * (1 + 1e-6) + 1e-7)
  # The bound is the scheme's: half of max|w| / 127 per output channel, or / 7 per group of inputs (its scale kept
  # in bfloat16, rounded up).
  levels, rounding = (7, 2**-6) if scheme == "int4" else (127, 1e-6)
  assert float(bound.max()) <= float(jnp.abs(kernel).max()) / levels / 2 * (1 + rounding)


def test_int4_holds_two_weights_a_byte_and_int8_one():
  kernel = _kernel((256, 64))
  int8 = quant.quantize_kernel(kernel, 1, "int8")
  int4 = quant.quantize_kernel(kernel, 1, "int4", 128)
  assert int8.values.dtype == jnp.int8 and int8.values.nbytes == 256 * 64
  assert int4.values.nbytes == 256 * 64 // 2 and int4.scales.shape == (2, 64)


@pytest.mark.parametrize("tuned", [True, False], ids=["cpu_integer", "standard"])
@pytest.mark.parametrize("scheme,bound", [("int8", 2e-4), ("int4", 2e-4), ("w8a8", 0.02)])
@pytest.mark.parametrize("rows", [1, 5])
def test_the_quantized_matmul_equals_the_float_matmul_over_the_dequantized_kernel(tuned, scheme, bound, rows):
  """Weight-only schemes keep the activations' precision (16-bit limbs on the CPU); W8A8 rounds them to INT8 per
  token. A [N, H, D] kernel with fan_in 2 (the attention's output) and one row (batch-1 decoding) included."""
  kernel = _kernel((4, 32, 64))
  x = jax.random.normal(jax.random.key(1), (rows, 3, 4, 32)) * 5
  quantized = quant.quantize_kernel(kernel, 2, scheme, 64)
  reference = jnp.einsum("btnh,nhd->btd", x, quant.dequantize(quantized))
  with runtime.cpu_tuning(tuned):
    out = quant.contract(x, quantized)
  assert out.shape == reference.shape and out.dtype == x.dtype
  relative = float(jnp.linalg.norm(out - reference) / jnp.linalg.norm(reference))
  assert relative < bound, relative


def test_a_quantized_embedding_table_gives_its_rows_and_serves_as_a_tied_head():
  table = _kernel((100, 64))
  quantized = quant.quantize_kernel(table, 1, "int4", 32, rows_out=True)
  dequantized = quant.dequantize(quantized)
  ids = jnp.array([[3, 99, 0]])
  np.testing.assert_allclose(quant.embedding_rows(quantized, ids, jnp.float32), dequantized[ids], atol=1e-6)
  x = jax.random.normal(jax.random.key(2), (2, 64))
  np.testing.assert_allclose(quant.contract(x, quantized), x @ dequantized.T, rtol=2e-3, atol=2e-3)


def test_unknown_schemes_and_shapes_a_scheme_cannot_take_are_refused_by_name():
  with pytest.raises(ValueError, match="unknown quantization scheme 'int3'"):
    quant.quantize_kernel(_kernel((8, 8)), 1, "int3")
  with pytest.raises(ValueError, match=r"decoder/layers_0/mlp/down/kernel: int4 groups of 128 .* 96 inputs"):
    quant.quantize_kernel(_kernel((96, 8)), 1, "int4", 128, where="decoder/layers_0/mlp/down/kernel")
  with pytest.raises(ValueError, match="even number"):
    quant.quantize_kernel(_kernel((96, 8)), 1, "int4", 3)


def test_int8_keys_and_values_round_trip_within_half_a_step_per_token_and_head():
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 16)) * 4
  values, scales = kv_cache.quantize_heads(x)
  assert values.dtype == jnp.int8 and scales.shape == (2, 5, 3)
  back = kv_cache.dequantize_heads(values, scales, jnp.float32)
  assert np.all(np.abs(np.asarray(back - x)) <= np.asarray(scales)[..., None] / 2 * (1 + 1e-6))


@pytest.mark.parametrize("kernel", [None, "pallas_tpu"], ids=["gather_layout", "kernel_layout"])
def test_an_int8_pool_reads_back_what_was_written_within_half_a_step(kernel):
  cache = paged_cache.PagedKVCache.zeros(num_layers=1, num_pages=6, page_size=4, batch_size=2, max_len=8,
                                         num_kv_heads=2, head_dim=8, dtype=jnp.int8, kernel=kernel)
  table = jnp.array([[4, 1], [0, 6]], jnp.int32)  # row 1's second page is the null page
  layer = cache.layers()[0].replace(page_table=table)
  keys = jax.random.normal(jax.random.key(0), (2, 5, 2, 8))
  layer = layer.write(keys, -keys, jnp.array([0, 0], jnp.int32))
  read_keys, read_values = layer.read()  # [2, 8, 2, 8]
  tolerance = float(jnp.abs(keys).max()) / 127 / 2 * 1.001
  np.testing.assert_allclose(read_keys[0, :5], keys[0], atol=tolerance)
  np.testing.assert_allclose(read_values[1, :4], -keys[1, :4], atol=tolerance)
  assert layer.k.values.nbytes + layer.k.scales.nbytes < 0.5 * 6 * 4 * 2 * 8 * 4  # against float32 pages


def test_token_bytes_are_what_the_pools_arrays_take():
  for dtype, ratio in (("float32", 1.0), ("int8", (32 + 4) / (4 * 32))):
    cache = paged_cache.PagedKVCache.zeros(num_layers=2, num_pages=5, page_size=4, batch_size=1, max_len=8,
                                           num_kv_heads=3, head_dim=32, dtype=dtype)
    held = sum(leaf.nbytes for leaf in jax.tree.leaves((cache.k, cache.v)))
    assert held == 5 * 4 * paged_cache.token_bytes(num_layers=2, num_kv_heads=3, head_dim=32, dtype=dtype)
    assert paged_cache.token_bytes(num_layers=2, num_kv_heads=3, head_dim=32, dtype=dtype) == ratio * 2 * 2 * 3 * 32 * 4
