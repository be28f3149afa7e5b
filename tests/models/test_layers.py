import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax.models import layers


def _random(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_rmsnorm_llama_and_gemma_forms():
  x = _random((2, 3, 8))
  weight = _random((8,), seed=1)
  expected_normed = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-6)
  for unit_offset, scale in ((False, weight), (True, 1.0 + weight)):
    norm = layers.RMSNorm(eps=1e-6, unit_offset=unit_offset)
    out = norm.apply({"params": {"scale": weight}}, x)
    np.testing.assert_allclose(out, expected_normed * scale, rtol=1e-5, atol=1e-6)


def test_layernorm_matches_numpy():
  x = _random((4, 16)) * 3 + 1
  scale, bias = _random((16,), 1), _random((16,), 2)
  out = layers.LayerNorm(eps=1e-5).apply({"params": {"scale": scale, "bias": bias}}, x)
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  np.testing.assert_allclose(out, (x - mean) / np.sqrt(var + 1e-5) * scale + bias, rtol=1e-5, atol=1e-5)


def _naive_mask(q_index, kv_index, causal, kv_valid, q_seg, kv_seg, prefix):
  batch, t, s = q_index.shape[0], q_index.shape[1], kv_index.shape[1]
  mask = np.zeros((batch, 1, t, s), bool)
  for b, i, j in itertools.product(range(batch), range(t), range(s)):
    qi, kj = q_index[b, i], kv_index[b, j]
    allowed = (kj <= qi or (prefix is not None and kj < prefix[b])) if causal else True
    if kv_valid is not None:
      allowed &= bool(kv_valid[b, j])
    if q_seg is not None:
      allowed &= q_seg[b, i] == kv_seg[b, j]
    mask[b, 0, i, j] = allowed
  return mask


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("with_prefix", [True, False])
@pytest.mark.parametrize("with_padding", [True, False])
@pytest.mark.parametrize("with_segments", [True, False])
def test_attention_mask_matches_naive_reference(causal, with_prefix, with_padding, with_segments):
  rng = np.random.default_rng(0)
  batch, length = 3, 7
  index = np.broadcast_to(np.arange(length), (batch, length))
  kv_valid = np.arange(length)[None] < np.array([7, 4, 1])[:, None] if with_padding else None
  segments = np.array([[1, 1, 1, 2, 2, 3, 3], [1, 1, 1, 1, 1, 1, 1], [1, 2, 2, 2, 3, 0, 0]]) if with_segments else None
  prefix = rng.integers(0, length + 1, size=batch) if with_prefix else None
  got = layers.make_attention_mask(
      jnp.asarray(index), jnp.asarray(index), causal=causal,
      kv_valid=None if kv_valid is None else jnp.asarray(kv_valid),
      q_segment_ids=None if segments is None else jnp.asarray(segments),
      kv_segment_ids=None if segments is None else jnp.asarray(segments),
      prefix_lengths=None if prefix is None else jnp.asarray(prefix))
  np.testing.assert_array_equal(got, _naive_mask(index, index, causal, kv_valid, segments, segments,
                                                 prefix if causal else None))


def test_attention_mask_with_cache_offsets():
  # Two new tokens written at slots 3.. and 5.. of a 9-slot cache: queries see valid slots up to their own.
  q_index = jnp.array([[3, 4], [5, 6]])
  kv_index = jnp.broadcast_to(jnp.arange(9), (2, 9))
  kv_valid = kv_index < jnp.array([[5], [7]])
  got = layers.make_attention_mask(q_index, kv_index, kv_valid=kv_valid)
  expected = _naive_mask(np.asarray(q_index), np.asarray(kv_index), True, np.asarray(kv_valid), None, None, None)
  np.testing.assert_array_equal(got, expected)
  assert got[0, 0, 0].tolist() == [True] * 4 + [False] * 5


def _attention_params(module, x, seed):
  return nn.meta.unbox(module.init(jax.random.key(seed), x, None, jnp.zeros(x.shape[:2], jnp.int32)))


@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_grouped_query_attention_equals_mha_with_repeated_kv(num_kv_heads):
  num_heads, head_dim, width = 4, 8, 16
  x = jnp.asarray(_random((2, 5, width)))
  positions = jnp.broadcast_to(jnp.arange(5), (2, 5))
  mask = layers.make_attention_mask(positions, positions)
  gqa = layers.Attention(num_heads, num_kv_heads, head_dim, rope_theta=10000.0)
  mha = layers.Attention(num_heads, num_heads, head_dim, rope_theta=10000.0)
  params = _attention_params(gqa, x, 0)
  group = num_heads // num_kv_heads
  repeated = jax.tree.map(lambda p: p, params)
  for name in ("key", "value"):
    repeated["params"][name]["kernel"] = jnp.repeat(params["params"][name]["kernel"], group, axis=1)
  out_gqa, _ = gqa.apply(params, x, mask, positions)
  out_mha, _ = mha.apply(repeated, x, mask, positions)
  np.testing.assert_allclose(out_gqa, out_mha, rtol=1e-5, atol=1e-5)


def test_attention_matches_naive_softmax():
  num_heads, head_dim, width, length = 2, 4, 8, 6
  x = jnp.asarray(_random((1, length, width)))
  positions = jnp.arange(length)[None]
  mask = layers.make_attention_mask(positions, positions)
  attention = layers.Attention(num_heads, num_heads, head_dim, use_bias=True)
  params = _attention_params(attention, x, 3)
  out, _ = attention.apply(params, x, mask, positions)
  p = jax.tree.map(np.asarray, params["params"])
  q = np.einsum("btd,dnh->btnh", x, p["query"]["kernel"]) + p["query"]["bias"]
  k = np.einsum("btd,dnh->btnh", x, p["key"]["kernel"]) + p["key"]["bias"]
  v = np.einsum("btd,dnh->btnh", x, p["value"]["kernel"]) + p["value"]["bias"]
  scores = np.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(head_dim)
  scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  mixed = np.einsum("bnqk,bknh->bqnh", weights, v)
  expected = np.einsum("bqnh,nhd->bqd", mixed, p["out"]["kernel"]) + p["out"]["bias"]
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
  q = jnp.asarray(_random((1, 1, 1, 16)))
  k = jnp.asarray(_random((1, 1, 1, 16), seed=1))

  def score(m, n):
    rq = layers.apply_rope(q, jnp.array([[m]]), 10000.0)
    rk = layers.apply_rope(k, jnp.array([[n]]), 10000.0)
    return float(jnp.sum(rq * rk))

  for offset in (0, 3, 11):
    reference = score(offset, 0)
    for start in (5, 40, 1000):
      np.testing.assert_allclose(score(start + offset, start), reference, rtol=1e-3, atol=1e-4)
  assert abs(score(3, 0) - score(0, 0)) > 1e-3  # positions do change the score
  # Rotation preserves norms.
  np.testing.assert_allclose(jnp.linalg.norm(layers.apply_rope(q, jnp.array([[77]]), 10000.0)),
                             jnp.linalg.norm(q), rtol=1e-5)


def test_rope_of_positions_known_when_tracing_matches_rope_computed_in_the_program():
  """numpy positions (constants of the program) against the same positions as a jax array (`trig.sincos` in the
  program), jitted, rows differing and one [1, T] row broadcast over the batch."""
  x = jnp.asarray(_random((2, 300, 2, 32)))
  positions = np.stack([np.arange(300), np.arange(300) * 7 + 5]).astype(np.int32)
  computed = jax.jit(lambda x, p: layers.apply_rope(x, p, 10000.0))(x, positions)
  constant = jax.jit(lambda x: layers.apply_rope(x, positions, 10000.0))(x)
  np.testing.assert_allclose(constant, computed, rtol=0, atol=1e-6)
  broadcast = jax.jit(lambda x: layers.apply_rope(x, positions[:1], 10000.0))(x)
  second_row_at_first_positions = layers.apply_rope(x[1:], jnp.asarray(positions[:1]), 10000.0)
  np.testing.assert_allclose(broadcast, jnp.concatenate([computed[:1], second_row_at_first_positions]), atol=1e-6)
  assert not np.allclose(broadcast[1], computed[1], atol=1e-3)  # the second row's positions differ


@pytest.mark.parametrize("activation,gated", [("silu", True), ("gelu_tanh", True), ("gelu", False),
                                               ("quick_gelu", False)])
def test_feed_forward_variants_match_numpy(activation, gated):
  x = jnp.asarray(_random((2, 3, 8)))
  mlp = layers.FeedForward(16, activation=activation, gated=gated, use_bias=not gated)
  params = nn.meta.unbox(mlp.init(jax.random.key(0), x))["params"]
  p = jax.tree.map(np.asarray, params)
  x = np.asarray(x)
  reference = {
      "silu": lambda h: h / (1 + np.exp(-h)),
      "gelu_tanh": lambda h: 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3))),
      "gelu": lambda h: 0.5 * h * (1 + np.vectorize(__import__("math").erf)(h / np.sqrt(2))),
      "quick_gelu": lambda h: h / (1 + np.exp(-1.702 * h)),
  }[activation]
  if gated:
    hidden = reference(x @ p["gate"]["kernel"]) * (x @ p["up"]["kernel"])
    expected = hidden @ p["down"]["kernel"]
  else:
    hidden = reference(x @ p["up"]["kernel"] + p["up"]["bias"])
    expected = hidden @ p["down"]["kernel"] + p["down"]["bias"]
  np.testing.assert_allclose(mlp.apply({"params": params}, jnp.asarray(x)), expected, rtol=1e-4, atol=1e-5)


def test_unknown_names_are_errors():
  with pytest.raises(ValueError, match="unknown MLP activation 'relu6'"):
    layers.FeedForward(4, activation="relu6").init(jax.random.key(0), jnp.ones((1, 1, 2)))
  with pytest.raises(ValueError, match="unknown remat policy 'sometimes'"):
    layers.remat_policy("sometimes")
