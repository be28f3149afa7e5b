"""The fused-attention path's arguments on a CPU: each mask in the kernels' form (flags, lengths) gives, through
XLA, exactly what today's path gives with the materialized mask; splash attention in Pallas's interpreter gives XLA's
attention; and the dispatch picks cuDNN, splash or XLA by backend, dtype and shape. The kernels themselves need a GPU
or TPU (README: the GPU-relevant tests)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax import runtime
from vlmjax.models import fused_attention, layers

B, T, N, K, H = 2, 16, 4, 2, 8
SCALE = H**-0.5


def _qkv(length=T, key_length=T, heads=N, kv_heads=K, head_dim=H, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=(B, n, h, head_dim)), dtype)
               for n, h in ((length, heads), (key_length, kv_heads), (key_length, kv_heads)))


def _index(length):
  return jnp.broadcast_to(jnp.arange(length), (B, length))


def _today(query, key, value, mask):
  """The path the kernels replace: XLA over the materialized mask."""
  return layers._jax_attention(query, key, value, mask, SCALE)


def test_causal_right_padding_as_lengths_gives_the_materialized_mask_s_attention():
  query, key, value = _qkv()
  lengths = jnp.array([T, 11])
  dense = layers.make_attention_mask(_index(T), _index(T), kv_valid=_index(T) < lengths[:, None])
  flags = fused_attention.kernel_mask(dense, causal=True, key_lengths=lengths)
  assert flags.mask is None and flags.is_causal
  np.testing.assert_array_equal(fused_attention.jax_attention(query, key, value, flags, SCALE),
                                _today(query, key, value, dense))


def test_a_prefill_into_a_longer_cache_as_lengths_gives_the_same_attention():
  """T new tokens from slot 0 over S > T cache slots, the slots past each row's prompt unwritten."""
  query, key, value = _qkv(key_length=24)
  lengths = jnp.array([T, 9])
  dense = layers.make_attention_mask(_index(T), _index(24), kv_valid=_index(24) < lengths[:, None])
  flags = fused_attention.kernel_mask(dense, causal=True, key_lengths=lengths)
  np.testing.assert_array_equal(fused_attention.jax_attention(query, key, value, flags, SCALE),
                                _today(query, key, value, dense))


@pytest.mark.parametrize("kind", ["full", "causal with packed segments", "prefix-LM", "left padding"])
def test_masks_the_flags_cannot_say_keep_the_materialized_mask(kind):
  query, key, value = _qkv(heads=K)  # one query head per key/value head as well
  index = _index(T)
  segments = (index >= 5).astype(jnp.int32)
  dense, causal = {
      "full": (None, False),
      "causal with packed segments": (layers.make_attention_mask(index, index, q_segment_ids=segments,
                                                                 kv_segment_ids=segments), True),
      "prefix-LM": (layers.make_attention_mask(index, index, prefix_lengths=jnp.array([4, 7])), False),
      "left padding": (layers.make_attention_mask(index, index, kv_valid=index >= jnp.array([[0], [3]])), True),
  }[kind]
  flags = fused_attention.kernel_mask(dense, causal=causal)
  assert flags.mask is dense and flags.key_lengths is None
  np.testing.assert_array_equal(fused_attention.jax_attention(query, key, value, flags, SCALE),
                                _today(query, key, value, dense))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_splash_attention_gives_xla_s_attention(causal):
  """Pallas's interpreter on the CPU, at the kernel's smallest tile (128 queries, keys and head dims); grouped
  heads, one row right-padded."""
  length = head_dim = fused_attention.SPLASH_BLOCK
  query, key, value = _qkv(length, length, head_dim=head_dim)
  lengths = jnp.array([length, 100])
  flags = fused_attention.kernel_mask(None, causal=causal, key_lengths=lengths)
  assert fused_attention.splash_fits(query, key, flags)
  expected = fused_attention.jax_attention(query, key, value, flags, head_dim**-0.5)
  out = fused_attention.splash_attention(query, key, value, flags, head_dim**-0.5, interpret=True)
  np.testing.assert_allclose(out, expected, atol=2e-5)


def test_splash_attention_s_gradients_are_xla_s():
  """Training's backward pass through the kernel (causal, one row right-padded), in Pallas's interpreter."""
  length = head_dim = fused_attention.SPLASH_BLOCK
  inputs = _qkv(length, length, head_dim=head_dim)
  flags = fused_attention.kernel_mask(None, causal=True, key_lengths=jnp.array([length, 100]))
  weights = jnp.cos(jnp.arange(head_dim))

  def gradients(attention):
    loss = lambda *qkv: jnp.sum(attention(*qkv, flags, head_dim**-0.5) * weights)
    return jax.grad(loss, argnums=(0, 1, 2))(*inputs)
  splash = gradients(lambda *args: fused_attention.splash_attention(*args, interpret=True))
  for ours, expected in zip(splash, gradients(fused_attention.jax_attention)):
    np.testing.assert_allclose(ours, expected, atol=1e-5 * float(jnp.abs(expected).max()))


@pytest.mark.parametrize("backend, dtype, head_dim, materialized, expected", [
    ("gpu", jnp.bfloat16, 64, False, "cudnn"),
    ("gpu", jnp.float16, 128, True, "cudnn"),  # cuDNN takes the mask as a bias
    ("gpu", jnp.float32, 64, False, "xla"),
    ("gpu", jnp.bfloat16, 256, False, "xla"),
    ("gpu", jnp.bfloat16, 12, False, "xla"),
    ("tpu", jnp.bfloat16, 128, False, "splash"),
    ("tpu", jnp.bfloat16, 64, False, "xla"),
    ("tpu", jnp.bfloat16, 128, True, "xla"),
    ("cpu", jnp.bfloat16, 128, False, "xla"),
])
def test_the_dispatch_picks_the_backend_s_kernel_where_it_fits(monkeypatch, backend, dtype, head_dim, materialized,
                                                               expected):
  length = fused_attention.SPLASH_BLOCK
  query, key, value = (jax.ShapeDtypeStruct((B, length, n, head_dim), dtype) for n in (N, K, K))
  mask = jnp.ones((B, 1, length, length), bool) if materialized else None
  chosen = []
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  monkeypatch.setattr(fused_attention, "jax_attention", lambda *a, implementation="xla": chosen.append(implementation))
  monkeypatch.setattr(fused_attention, "splash_attention", lambda *a: chosen.append("splash"))
  fused_attention.attention(query, key, value, fused_attention.kernel_mask(mask, causal=True), SCALE)
  assert chosen == [expected]


def test_the_standard_path_on_a_cpu_computes_what_it_did():
  """`Attention` off the CPU-tuned path (VLMJAX_CPU_TUNING=0) through `fused_attention.attention` on the CPU: a
  causal mask with padding gives, bit for bit, what the plain mask gives, which is today's call (XLA over it)."""
  attention = layers.Attention(num_heads=N, num_kv_heads=K, head_dim=H)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(B, T, N * H)), jnp.float32)
  index = _index(T)
  dense = layers.make_attention_mask(index, index, kv_valid=index < jnp.array([[T], [10]]))
  params = attention.init(jax.random.key(0), x, dense)
  with runtime.cpu_tuning(False):
    causal, _ = attention.apply(params, x, layers.CausalMask(dense))
    plain, _ = attention.apply(params, x, dense)
  np.testing.assert_array_equal(causal, plain)
