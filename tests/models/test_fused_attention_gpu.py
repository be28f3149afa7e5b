"""cuDNN's flash attention on a GPU: the kernel `fused_attention.attention` picks gives XLA's attention and gradients,
and a bfloat16 `Attention` layer's training step compiles to it. Skipped elsewhere: the suite runs on the CPU unless
told (README: `JAX_PLATFORMS=cuda` for the GPU-relevant tests)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax import runtime
from vlmjax.models import fused_attention, layers

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (JAX_PLATFORMS=cuda)")

B, T, N, K, H = 2, 256, 8, 2, 64


def _inputs():
  rng = np.random.default_rng(0)
  query, key, value = (jnp.asarray(rng.normal(size=(B, T, n, H)), jnp.bfloat16) for n in (N, K, K))
  return query, key, value, fused_attention.kernel_mask(None, causal=True, key_lengths=jnp.array([T, 200]))


def test_cudnn_gives_xla_s_attention_and_gradients():
  query, key, value, mask = _inputs()
  weights = jnp.cos(jnp.arange(H)).astype(jnp.bfloat16)

  def run(implementation):
    def loss(*qkv):
      out = fused_attention.jax_attention(*qkv, mask, H**-0.5, implementation=implementation)
      return jnp.sum((out * weights).astype(jnp.float32)), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(query, key, value)
    return [np.asarray(x, np.float32) for x in (out, *grads)]
  for ours, expected in zip(run("cudnn"), run("xla")):
    np.testing.assert_allclose(ours, expected, atol=3e-2 * np.abs(expected).max())  # bfloat16: 8 bits of mantissa


def test_a_bfloat16_attention_layer_trains_through_cudnn():
  layer = layers.Attention(num_heads=N, num_kv_heads=K, head_dim=H, dtype=jnp.bfloat16)
  x = jnp.ones((B, T, N * H), jnp.bfloat16)
  index = jnp.broadcast_to(jnp.arange(T), (B, T))
  mask = layers.CausalMask(layers.make_attention_mask(index, index), key_lengths=jnp.array([T, 200]))
  params = layer.init(jax.random.key(0), x, mask)
  assert not runtime.cpu_tuned()
  step = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, x, mask)[0].astype(jnp.float32))))
  assert "cudnn" in step.lower(params).compile().as_text()
