import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax.models import blockwise_attention, dot_attention, layers
from vlmjax.models.decoder import Decoder, DecoderConfig

LLAMA = DecoderConfig(vocab_size=97, width=32, depth=3, num_heads=4, num_kv_heads=2, mlp_dim=48, norm_eps=1e-5)
GEMMA = DecoderConfig(vocab_size=89, width=32, depth=2, num_heads=4, num_kv_heads=1, head_dim=16, mlp_dim=64,
                      activation="gelu_tanh", norm_unit_offset=True, scale_embeddings=True, tie_embeddings=True,
                      final_logit_softcap=5.0)


def _init(config, seed=0, length=6):
  tokens = jnp.zeros((1, length), jnp.int32)
  params = Decoder(config).init(jax.random.key(seed), tokens, jnp.zeros_like(tokens))
  # Random norm scales so that every weight matters.
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p + 0.1 * jax.random.normal(jax.random.key(len(str(path))), p.shape)
      if "norm" in jax.tree_util.keystr(path) else p, nn.meta.unbox(params))


def _tokens(batch, length, vocab, seed=1):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (batch, length)), jnp.int32)


def _positions(batch, length):
  return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))


@pytest.fixture(scope="module", params=[LLAMA, GEMMA], ids=["llama", "gemma"])
def model(request):
  config = request.param
  return config, _init(config)


def test_scanned_stack_equals_unrolled(model):
  config, params = model
  tokens = _tokens(2, 7, config.vocab_size)
  scanned, _ = Decoder(config).apply(params, tokens, _positions(2, 7))
  unrolled, _ = Decoder(config.replace(scan_layers=False)).apply(layers.unstack_layers(params), tokens,
                                                                 _positions(2, 7))
  np.testing.assert_allclose(scanned, unrolled, rtol=1e-5, atol=1e-5)


def test_unstacked_parameters_are_an_unrolled_stack_and_stack_back(model):
  config, params = model
  unrolled = layers.unstack_layers(params)
  expected = jax.eval_shape(lambda: _init(config.replace(scan_layers=False)))
  assert jax.tree.structure(unrolled) == jax.tree.structure(expected)
  jax.tree.map(lambda got, want: np.testing.assert_equal(got.shape, want.shape), unrolled, expected)
  jax.tree.map(np.testing.assert_array_equal, layers.stack_layers(unrolled), params)


def test_unrolled_layers_decode_through_their_own_caches_as_the_scanned_stack_does(model):
  """A padded prefill, then single tokens: the same logits (and cache) scanned over the stacked parameters
  and unrolled over the unstacked ones, each layer writing its own cache buffer."""
  config, params = model
  tokens = _tokens(2, 9, config.vocab_size, seed=3)
  mask = jnp.asarray([[True] * 5, [True] * 3 + [False] * 2])
  results = []
  for layer_config, layer_params in [(config, params),
                                     (config.replace(scan_layers=False), layers.unstack_layers(params))]:
    step = jax.jit(Decoder(layer_config).apply)
    cache = layer_config.init_cache(batch_size=2, max_len=12)
    logits, cache = step(layer_params, tokens[:, :5], _positions(2, 5), cache, input_mask=mask)
    stepped = [logits[jnp.arange(2), cache.lengths - 1]]
    for t in range(5, 9):
      logits, cache = step(layer_params, tokens[:, t:t + 1], cache.lengths[:, None], cache)
      stepped.append(logits[:, 0])
    results.append((jnp.stack(stepped, axis=1), cache))
  (scanned, scanned_cache), (unrolled, unrolled_cache) = results
  np.testing.assert_allclose(unrolled, scanned, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(jnp.argmax(unrolled, -1), jnp.argmax(scanned, -1))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), unrolled_cache, scanned_cache)
  np.testing.assert_array_equal(unrolled_cache.lengths, [9, 7])


def test_one_token_at_a_time_through_cache_equals_full_forward(model):
  config, params = model
  decoder = Decoder(config)
  tokens = _tokens(2, 9, config.vocab_size)
  full, _ = decoder.apply(params, tokens, _positions(2, 9))
  step = jax.jit(decoder.apply)
  cache = config.init_cache(batch_size=2, max_len=12)
  stepped = []
  for t in range(9):
    logits, cache = step(params, tokens[:, t:t + 1], jnp.full((2, 1), t, jnp.int32), cache)
    stepped.append(logits)
  np.testing.assert_allclose(jnp.concatenate(stepped, axis=1), full, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(cache.lengths, [9, 9])


def test_padded_prefill_then_decode_equals_each_row_alone(model):
  config, params = model
  decoder = Decoder(config)
  lengths = np.array([6, 3, 1])
  tokens = _tokens(3, 8, config.vocab_size, seed=5)
  padded = jnp.where(jnp.arange(6)[None] < lengths[:, None], tokens[:, :6], 0)
  input_mask = jnp.arange(6)[None] < lengths[:, None]
  cache = config.init_cache(batch_size=3, max_len=10)
  prefill_logits, cache = decoder.apply(params, padded, _positions(3, 6), cache, input_mask=input_mask)
  np.testing.assert_array_equal(cache.lengths, lengths)
  # Each row continues with two more tokens, at its own position.
  next_tokens = tokens[:, 6:8]
  decoded = []
  for t in range(2):
    logits, cache = decoder.apply(params, next_tokens[:, t:t + 1], jnp.asarray(lengths + t)[:, None], cache)
    decoded.append(logits[:, 0])
  for row, length in enumerate(lengths):
    sequence = jnp.concatenate([tokens[row:row + 1, :length], next_tokens[row:row + 1]], axis=1)
    alone, _ = decoder.apply(params, sequence, _positions(1, length + 2))
    np.testing.assert_allclose(prefill_logits[row, :length], alone[0, :length], rtol=1e-4, atol=1e-4)
    for t in range(2):
      np.testing.assert_allclose(decoded[t][row], alone[0, length + t], rtol=1e-4, atol=1e-4)


def test_long_causal_sequences_attend_block_by_block_as_in_one_piece(model, monkeypatch):
  """Training (no cache) and a padded prefill that fills its cache, with blocks of 4 queries over 10 tokens (the
  last block short): the same logits as attention in one piece, and the same cache; then the prefill through
  `blockwise_attention` in blocks of 4 (the CPU's path for a prompt longer than one of its blocks), alike."""
  config, params = model
  decoder = Decoder(config)
  tokens = _tokens(2, 10, config.vocab_size, seed=7)
  input_mask = jnp.arange(10)[None] < jnp.array([[10], [7]])
  key_lengths = []  # the keys each attention call reads
  for module in (dot_attention, jax.nn):  # without a cache (training) and with one (the prefill)
    attention = module.dot_product_attention
    monkeypatch.setattr(module, "dot_product_attention", lambda q, k, *args, attention=attention, **kwargs:
                        key_lengths.append(k.shape[1]) or attention(q, k, *args, **kwargs))

  def run():
    trained, _ = decoder.apply(params, tokens, _positions(2, 10))
    prefilled, cache = decoder.apply(params, tokens, _positions(2, 10), config.init_cache(batch_size=2, max_len=10),
                                     input_mask=input_mask)
    return trained, prefilled, cache

  whole = run()
  assert set(key_lengths) == {10}
  key_lengths.clear()
  monkeypatch.setattr(layers, "CAUSAL_BLOCK", 4)
  blocked = run()
  # Each block reads the keys up to its last query (in every traced layer of both calls).
  assert len(key_lengths) >= 6 and key_lengths == [4, 8, 10] * (len(key_lengths) // 3)
  for a, b in zip(jax.tree.leaves(blocked), jax.tree.leaves(whole)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  both_calls = len(key_lengths)
  key_lengths.clear()
  monkeypatch.setattr(blockwise_attention, "CAUSAL_BLOCK", 4)
  _, prefilled, cache = run()
  assert len(key_lengths) == both_calls // 2  # training's blocks only: the prefill went blockwise
  for a, b in zip(jax.tree.leaves((prefilled, cache)), jax.tree.leaves(whole[1:])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_prefix_lm_cache_matches_full_forward():
  config, params = GEMMA, _init(GEMMA)
  decoder = Decoder(config)
  tokens = _tokens(1, 7, config.vocab_size, seed=3)
  prefix = jnp.array([4])
  full, _ = decoder.apply(params, tokens, _positions(1, 7), prefix_lengths=prefix)
  causal, _ = decoder.apply(params, tokens, _positions(1, 7))
  assert not np.allclose(full[:, :4], causal[:, :4], atol=1e-4)  # the prefix really is bidirectional
  cache = config.init_cache(batch_size=1, max_len=8)
  first, cache = decoder.apply(params, tokens[:, :4], _positions(1, 4), cache, prefix_lengths=prefix)
  np.testing.assert_allclose(first, full[:, :4], rtol=1e-4, atol=1e-4)
  for t in range(4, 7):
    logits, cache = decoder.apply(params, tokens[:, t:t + 1], jnp.array([[t]]), cache, prefix_lengths=prefix)
    np.testing.assert_allclose(logits[:, 0], full[:, t], rtol=1e-4, atol=1e-4)


def test_packed_segments_equal_separate_sequences():
  config, params = LLAMA, _init(LLAMA)
  decoder = Decoder(config)
  a, b = _tokens(1, 4, config.vocab_size, seed=7), _tokens(1, 3, config.vocab_size, seed=8)
  packed = jnp.concatenate([a, b], axis=1)
  segments = jnp.array([[1, 1, 1, 1, 2, 2, 2]])
  positions = jnp.array([[0, 1, 2, 3, 0, 1, 2]])
  logits, _ = decoder.apply(params, packed, positions, segment_ids=segments)
  alone_a, _ = decoder.apply(params, a, _positions(1, 4))
  alone_b, _ = decoder.apply(params, b, _positions(1, 3))
  np.testing.assert_allclose(logits, jnp.concatenate([alone_a, alone_b], axis=1), rtol=1e-4, atol=1e-4)


def test_gemma_ties_embeddings_scales_them_and_softcaps_logits():
  params = _init(GEMMA)
  assert "output_head" not in params["params"]
  assert "output_head" in _init(LLAMA)["params"]
  tokens = _tokens(1, 5, GEMMA.vocab_size)
  logits, _ = Decoder(GEMMA).apply(params, tokens, _positions(1, 5))
  assert float(jnp.max(jnp.abs(logits))) < GEMMA.final_logit_softcap
  uncapped, _ = Decoder(GEMMA.replace(final_logit_softcap=None)).apply(params, tokens, _positions(1, 5))
  np.testing.assert_allclose(logits, 5.0 * jnp.tanh(uncapped / 5.0), rtol=1e-5, atol=1e-5)
  embedded = Decoder(GEMMA).apply(params, tokens, method=Decoder.embed)
  np.testing.assert_allclose(embedded, params["params"]["embedding"][tokens] * np.sqrt(GEMMA.width), rtol=1e-6)


@pytest.mark.parametrize("changes,message", [
    (dict(width=30, num_heads=4), r"decoder.width=30 must split evenly into decoder.num_heads=4 heads"),
    (dict(width=48, num_heads=6, num_kv_heads=4), r"num_heads=6 must be a multiple of decoder.num_kv_heads=4"),
    (dict(head_dim=7), r"head_dim=7 must be even"),
    (dict(activation="swish2"), r"decoder.activation must be one of"),
    (dict(depth=0), r"decoder.depth must be a positive integer, got 0"),
])
def test_bad_sizes_fail_at_construction(changes, message):
  with pytest.raises(ValueError, match=message):
    LLAMA.replace(**changes)


def test_unknown_config_keys_are_errors():
  with pytest.raises(ValueError, match=r"unknown keys \['widht'\]"):
    DecoderConfig.from_dict({"widht": 3})
