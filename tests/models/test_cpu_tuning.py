"""The switch between the numerics written for XLA's CPU backend and the standard JAX path (`runtime.cpu_tuned`),
and the two paths held against each other on the CPU: a model's logits and gradients, RoPE, long causal attention.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sizes
from vlmjax import runtime
from vlmjax.models import layers
from vlmjax.models.vlm import VLM, VLMConfig

MODEL = dict(
    vision=sizes.vit("Ti/16", "siglip", image_size=16, patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64),
    decoder=sizes.lm("tiny", vocab_size=101, width=48, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=96),
    image_token_id=100, projector="mlp2x_gelu")


def _custom_calls(config, params, inputs) -> int:
  """How many custom-VJP calls (the CPU path's own backward passes) the model's program makes, traced afresh
  under the path in force (a function object traced once keeps its program)."""
  apply = lambda params: VLM(config).apply({"params": params}, **inputs)[0]
  return str(jax.make_jaxpr(apply)(params)).count("custom_vjp_call")


def test_the_cpu_path_applies_on_the_cpu_unless_switched_off(monkeypatch):
  assert jax.default_backend() == "cpu" and runtime.cpu_tuned()
  monkeypatch.setenv(runtime.SWITCH, "0")
  assert not runtime.cpu_tuned()
  with runtime.cpu_tuning(True):
    assert runtime.cpu_tuned()
  monkeypatch.setenv(runtime.SWITCH, "1")
  with runtime.cpu_tuning(False):
    assert not runtime.cpu_tuned()
  assert runtime.cpu_tuned()


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def model(request):
  config = VLMConfig.from_dict({**MODEL, "dtype": request.param})
  params = nn.meta.unbox(VLM(config).init(jax.random.key(0), **config.example_inputs(1)))["params"]
  inputs = config.example_inputs(2, 12, seed=1)
  return config, params, inputs


def _loss_and_grads(config, params, inputs):
  """(logits float32[B, T, V], the mean log-likelihood's gradient) of a program traced afresh under the path in
  force."""
  def loss(params):
    logits = VLM(config).apply({"params": params}, **inputs)[0]
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return logits, grads


def test_the_cpu_path_and_the_standard_path_give_the_same_logits_and_gradients(model):
  config, params, inputs = model
  with runtime.cpu_tuning(True):
    assert _custom_calls(config, params, inputs) > 0
    tuned = _loss_and_grads(config, params, inputs)
  with runtime.cpu_tuning(False):
    assert _custom_calls(config, params, inputs) == 0
    standard = _loss_and_grads(config, params, inputs)
  # float32: the same sums in another order (measured: logits 1.5e-6 apart, gradients 1.2e-6 relative).
  # bfloat16: the paths round at different places (the CPU path keeps the activation and its gating product in
  # float32), logits of size 4 a few bfloat16 steps (0.03) apart, gradients 2% (measured: 0.055, 0.020).
  in_float32 = config.decoder.dtype == "float32"
  np.testing.assert_allclose(tuned[0], standard[0], atol=1e-5 if in_float32 else 0.1)
  flat_standard = dict(jax.tree_util.tree_leaves_with_path(standard[1]))
  largest = max(float(np.abs(leaf).max()) for leaf in flat_standard.values())
  for path, tuned_grad in jax.tree_util.tree_leaves_with_path(tuned[1]):
    standard_grad = np.asarray(flat_standard[path], np.float32)
    # Relative to the leaf's own size, or to a hundredth of the largest gradient for leaves that are nearly zero
    # (attention's key bias, which the softmax cancels).
    scale = max(float(np.abs(standard_grad).max()), largest / 100)
    error = np.abs(np.asarray(tuned_grad, np.float32) - standard_grad).max() / scale
    assert error < (1e-5 if in_float32 else 0.05), (jax.tree_util.keystr(path), error)


def test_rope_by_polynomial_and_by_jnp_sin_agree():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 9, 3, 16)), jnp.float32)
  positions = jnp.asarray([np.arange(9), np.arange(9) * 1000 + 7], jnp.int32)
  with runtime.cpu_tuning(True):
    tuned = jax.jit(lambda x, p: layers.apply_rope(x, p, 10_000.0))(x, positions)
  with runtime.cpu_tuning(False):
    standard = jax.jit(lambda x, p: layers.apply_rope(x, p, 10_000.0))(x, positions)
  np.testing.assert_allclose(tuned, standard, atol=2e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_blocked_causal_attention_is_one_masked_attention(dtype):
  """Past CAUSAL_BLOCK queries the CPU path attends block by block; the standard path in one call."""
  length = layers.CAUSAL_BLOCK * 2 + 5
  attention = layers.Attention(num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=10_000.0, dtype=dtype)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, length, 16)), jnp.float32)
  positions = np.arange(length)[None]
  index = jnp.broadcast_to(jnp.arange(length), (2, length))
  mask = layers.CausalMask(layers.make_attention_mask(index, index))
  params = attention.init(jax.random.key(0), x, mask, positions)

  def loss(params, x):
    out = attention.apply(params, x, mask, positions)[0]
    return jnp.sum(out.astype(jnp.float32) ** 2), out

  results = []
  for tuned in (True, False):
    with runtime.cpu_tuning(tuned):
      results.append(jax.jit(jax.value_and_grad(loss, argnums=1, has_aux=True))(params, x))
  ((_, tuned_out), tuned_grad), ((_, standard_out), standard_grad) = results
  tolerance = 1e-5 if dtype == "float32" else 3e-2
  np.testing.assert_allclose(np.asarray(tuned_out, np.float32), np.asarray(standard_out, np.float32),
                             atol=tolerance, rtol=tolerance)
  scale = np.abs(standard_grad).max()
  assert np.abs(tuned_grad - standard_grad).max() / scale < (1e-5 if dtype == "float32" else 0.05)
