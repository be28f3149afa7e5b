"""Blockwise attention against `jax.nn.dot_product_attention` over the whole mask: causal with right padding (the
key blocks past every row's length skipped), keys longer than the queries (a prefill into a longer cache), GQA,
segment ids that leave a query's first key blocks empty, blocks that do not divide the lengths, query blocks past
every row's length left out, blocks seen whole (no mask) beside masked ones, the fitted default blocks, bfloat16,
and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax.models import blockwise_attention

B, N, K, H = 2, 4, 2, 8


def _inputs(length: int, key_length: int, dtype=jnp.float32, seed: int = 0):
  keys = jax.random.split(jax.random.key(seed), 3)
  query = jax.random.normal(keys[0], (B, length, N, H))
  key, value = (jax.random.normal(k, (B, key_length, K, H)) for k in keys[1:])
  return query.astype(dtype), key.astype(dtype), value.astype(dtype)


def _reference(query, key, value, mask):
  """Every row of bool[B, T, S] sees at least one key."""
  return jax.nn.dot_product_attention(query, key, value, mask=jnp.asarray(mask)[:, None], scale=H**-0.5)


def _causal_mask(length: int, key_length: int, key_lengths) -> np.ndarray:
  slots = np.arange(key_length)
  return (slots[None, None, :] <= np.arange(length)[None, :, None]) & (slots < np.asarray(key_lengths)[:, None, None])


@pytest.mark.parametrize("length,key_length,block", [(40, 40, 16), (40, 40, 64), (37, 48, 8), (8, 32, 16)])
def test_causal_with_key_lengths_equals_the_masked_whole(length, key_length, block):
  query, key, value = _inputs(length, key_length)
  # Row 1 right-padded; key blocks past both rows' lengths (keys longer than the queries) are skipped.
  key_lengths = np.array([length, length - length // 4 - 1])
  with jax.default_matmul_precision("highest"):
    ours = blockwise_attention.attention(query, key, value, H**-0.5, causal=True, key_lengths=jnp.asarray(key_lengths),
                                         block=block)
    expected = _reference(query, key, value, _causal_mask(length, key_length, key_lengths))
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block", [8, 12, 64])
def test_segment_ids_equal_the_masked_whole(block):
  """Row 0: segments 0, 1 and padding (-1, seeing padding); row 1: one segment that begins after two blocks of 8
  padding keys, so its queries' running maximum starts from masked blocks."""
  length = 40
  ids = np.stack([np.repeat([0, 1, -1], [15, 17, 8]), np.repeat([-1, 3], [16, 24])]).astype(np.int32)
  query, key, value = _inputs(length, length, seed=1)
  with jax.default_matmul_precision("highest"):
    ours = blockwise_attention.attention(query, key, value, H**-0.5, query_ids=jnp.asarray(ids),
                                         key_ids=jnp.asarray(ids), block=block)
    expected = _reference(query, key, value, ids[:, :, None] == ids[:, None, :])
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)


def test_query_blocks_past_every_length_are_zeros_and_the_rest_unchanged():
  """Segments ending in padding (-1) from slot 21 in row 0 and 27 in row 1: blocks of 8 queries from slot 32 on are
  left out; the queries before them, padding in a computed block included, are as without query_lengths."""
  length = 40
  ids = np.stack([np.repeat([0, -1], [21, 19]), np.repeat([5, 6, -1], [10, 17, 13])]).astype(np.int32)
  query, key, value = _inputs(length, length, seed=3)
  attend = lambda **lengths: blockwise_attention.attention(query, key, value, H**-0.5, query_ids=jnp.asarray(ids),
                                                           key_ids=jnp.asarray(ids), block=8, **lengths)
  with jax.default_matmul_precision("highest"):
    ours, whole = attend(query_lengths=jnp.array([21, 27])), attend()
  np.testing.assert_array_equal(ours[:, 32:], 0)
  np.testing.assert_allclose(ours[:, :32], whole[:, :32], rtol=1e-6, atol=1e-7)
  assert np.all(np.isfinite(whole))


def test_bfloat16_is_within_its_rounding_of_float32():
  query, key, value = _inputs(64, 64, jnp.bfloat16)
  lengths = jnp.array([64, 50])
  ours = blockwise_attention.attention(query, key, value, H**-0.5, causal=True, key_lengths=lengths, block=16)
  assert ours.dtype == jnp.bfloat16
  with jax.default_matmul_precision("highest"):
    expected = _reference(*(x.astype(jnp.float32) for x in (query, key, value)), _causal_mask(64, 64, lengths))
  np.testing.assert_allclose(np.asarray(ours, np.float32), expected, atol=3e-2)


def test_gradients_equal_the_masked_whole():
  """The Qwen tower trains through it: gradients of queries, keys and values, with segments split by the blocks."""
  ids = jnp.asarray(np.repeat([0, 1], [10, 14])[None].repeat(B, 0), jnp.int32)
  query, key, value = _inputs(24, 24, seed=2)
  weights = jnp.cos(jnp.arange(H))

  def loss(attend, *qkv):
    return jnp.sum(attend(*qkv) * weights)
  ours = lambda *qkv: blockwise_attention.attention(*qkv, H**-0.5, query_ids=ids, key_ids=ids, block=8)
  whole = lambda *qkv: _reference(*qkv, ids[:, :, None] == ids[:, None, :])
  with jax.default_matmul_precision("highest"):
    for mine, expected in zip(jax.grad(loss, argnums=(1, 2, 3))(ours, query, key, value),
                              jax.grad(loss, argnums=(1, 2, 3))(whole, query, key, value)):
      np.testing.assert_allclose(mine, expected, rtol=1e-4, atol=1e-5)


def test_fitted_block_cuts_lengths_into_whole_blocks_near_the_target():
  assert blockwise_attention.fitted_block(2176, 256) == 272  # 8 blocks, not 9 of 256 (2304)
  assert blockwise_attention.fitted_block(2304, 256) == 256
  assert blockwise_attention.fitted_block(200, 256) == 200  # one block
  for length in range(257, 5000, 37):
    size = blockwise_attention.fitted_block(length, 256)
    blocks = -(-length // size)
    assert size % 16 == 0 and 256 * 2 // 3 <= size <= 256 * 2, (length, size)
    assert blocks * size - length < 16 * blocks, (length, size)  # no more padding than the rounding to 16


def test_the_default_blocks_of_a_causal_prefill_equal_the_masked_whole():
  """544 queries: two fitted blocks of 272 (not three of 256), the first key block seen whole by the second query
  block (no mask built), the diagonal ones masked."""
  assert blockwise_attention.fitted_block(544, blockwise_attention.CAUSAL_BLOCK) == 272
  query, key, value = _inputs(544, 544, seed=4)
  key_lengths = np.array([544, 400])
  with jax.default_matmul_precision("highest"):
    ours = blockwise_attention.attention(query, key, value, H**-0.5, causal=True, key_lengths=jnp.asarray(key_lengths))
    expected = _reference(query, key, value, _causal_mask(544, 544, key_lengths))
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)
