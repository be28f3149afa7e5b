import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sizes
from vlmjax.infer import paged
from vlmjax.models import paged_cache
from vlmjax.models.decoder import Decoder, DecoderConfig

CONFIG = DecoderConfig(**sizes.lm("tiny", vocab_size=61, width=32, depth=2, num_heads=4, num_kv_heads=2,
                                  mlp_dim=64).to_dict(), scan_layers=False)
PAGE_SIZE, MAX_LEN, BUCKET = 4, 32, 16


def test_the_allocator_hands_out_each_page_once_and_takes_them_all_back():
  pages = paged.PageAllocator(6)
  first, second = pages.allocate(4), pages.allocate(2)
  assert sorted(first + second) == list(range(6)) and pages.num_free == 0
  with pytest.raises(paged.PoolExhausted, match="1 pages asked for, 0 of 6 free"):
    pages.allocate(1)
  pages.free(first)
  with pytest.raises(AssertionError, match="page .* is freed but was not allocated"):
    pages.free(first[:1])
  pages.free(second)
  assert pages.num_free == 6 and sorted(pages.allocate(6)) == list(range(6))


@pytest.fixture(scope="module")
def decoder():
  model = Decoder(CONFIG)
  params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32),
                                    jnp.arange(4)[None]))["params"]
  params = jax.tree.map(lambda p: p * 3.0 if p.ndim >= 2 else p, params)  # a less flat greedy path
  step = jax.jit(lambda tokens, cache: model.apply({"params": params}, tokens, cache.lengths[:, None], cache))
  return model, params, step


# The Pallas GPU kernel runs in Pallas' interpreter here, on the CPU: the kernel code a GPU compiles. (The TPU
# interpreter rounds matmul operands to bfloat16, as the TPU does: its kernel is checked below, at that precision.)
@pytest.mark.parametrize("kernel", [None, "pallas_gpu"])
def test_paged_decoding_matches_the_contiguous_cache_token_for_token(decoder, kernel):
  model, params, step = decoder
  lengths = np.array([5, 11])  # not whole pages
  prompts = np.random.default_rng(0).integers(1, 61, (2, BUCKET)).astype(np.int32)
  mask = np.arange(BUCKET)[None] < lengths[:, None]
  empty = CONFIG.init_cache(batch_size=2, max_len=BUCKET)
  logits, prefilled = model.apply({"params": params}, prompts, jnp.arange(BUCKET)[None].repeat(2, 0), empty,
                                  input_mask=mask)
  last = jnp.asarray(np.argmax(np.asarray(logits)[np.arange(2), lengths - 1], axis=-1), jnp.int32)

  contiguous = prefilled.extend(MAX_LEN - BUCKET)
  cache = paged_cache.PagedKVCache.zeros(num_layers=CONFIG.depth, num_pages=20, page_size=PAGE_SIZE, batch_size=2,
                                   max_len=MAX_LEN, num_kv_heads=CONFIG.num_kv_heads,
                                   head_dim=CONFIG.attention_head_dim, kernel=kernel, interpret=True)
  planned = [np.random.default_rng(1).permutation(20)[:8], [19, 3, 17, 0, 8, 11]]  # each row's pages, scattered
  # As the engine allocates: a row starts with the pages of its prompt and first token, and takes the next of
  # its pages before the step that writes past them.
  table = np.full((2, MAX_LEN // PAGE_SIZE), cache.num_pages, np.int32)
  held = [paged_cache.pages_for(length + 1, PAGE_SIZE) for length in lengths]
  for row in range(2):  # each row's prompt into its own pages, as the engine inserts one prompt at a time
    table[row, :held[row]] = planned[row][:held[row]]
    one_row = jax.tree.map(lambda x: x[row:row + 1], prefilled)  # a bucket longer than its pages: the rest dropped
    cache = cache.write_prompt(one_row, jnp.asarray(table[row]))
  cache = cache.replace(page_table=jnp.asarray(table), lengths=prefilled.lengths)

  tokens_contiguous, tokens_paged = last, last
  for _ in range(12):  # row 1 reaches 23 tokens, within its 6 pages
    for row, length in enumerate(cache.lengths.tolist()):
      if length + 1 > held[row] * PAGE_SIZE:
        table[row, held[row]] = planned[row][held[row]]
        held[row] += 1
    cache = cache.replace(page_table=jnp.asarray(table))
    logits_contiguous, contiguous = step(tokens_contiguous[:, None], contiguous)
    logits_paged, cache = step(tokens_paged[:, None], cache)
    # The kernel sums a row's pages in partitions by an online softmax (through exp2): float32 rounding in
    # another order, ~1e-6 of logits ~10 that two layers of weights x3 amplify up to ~1e-4. A wrong page,
    # length or head group is off by O(1).
    np.testing.assert_allclose(logits_paged, logits_contiguous, rtol=1e-5, atol=3e-4)
    tokens_contiguous = jnp.argmax(logits_contiguous[:, 0], axis=-1).astype(jnp.int32)
    tokens_paged = jnp.argmax(logits_paged[:, 0], axis=-1).astype(jnp.int32)
    assert tokens_paged.tolist() == tokens_contiguous.tolist()
  assert cache.lengths.tolist() == contiguous.lengths.tolist() == (lengths + 12).tolist()
  assert held == [5, 6]  # both rows grew page by page


def test_writes_past_a_rows_pages_touch_no_other_page():
  cache = paged_cache.PagedKVCache.zeros(num_layers=1, num_pages=3, page_size=2, batch_size=2, max_len=4,
                                   num_kv_heads=1, head_dim=1)
  layer = cache.replace(page_table=jnp.array([[0, 3], [3, 3]], jnp.int32)).layers()[0]  # row 1: no pages
  ones = jnp.ones((2, 1, 1, 1))
  layer, (keys, _) = layer.write_and_read(ones, ones, jnp.array([2, 0]))  # row 0 past its page, row 1 nowhere
  assert float(jnp.abs(layer.k).sum()) == 0.0 and keys.shape == (2, 4, 1, 1)


@pytest.mark.parametrize("kernel, tolerance", [("pallas_gpu", 1e-5), ("pallas_tpu", 2e-2)])
def test_a_kernel_attends_over_each_rows_pages_as_the_gather_does(kernel, tolerance):
  """One query per row (GQA: 4 heads over 2) against pages scattered over the pool, rows of different lengths,
  null pages past them. The TPU interpreter works at bfloat16 precision: a wrong page, length or head group
  would be off by far more than its tolerance."""
  rng = np.random.default_rng(0)
  batch, heads, kv_heads, head_dim, num_pages, page_size = 3, 4, 2, 8, 24, 4
  cache = paged_cache.PagedKVCache.zeros(num_layers=1, num_pages=num_pages, page_size=page_size, batch_size=batch,
                                   max_len=32, num_kv_heads=kv_heads, head_dim=head_dim, kernel=kernel,
                                   interpret=True)
  pool = lambda: jnp.asarray(rng.normal(size=cache.k[0].shape), jnp.float32)
  lengths = np.array([5, 32, 13])
  table = np.full((batch, 8), num_pages, np.int32)
  pages = rng.permutation(num_pages)
  for row, used in enumerate(paged_cache.pages_for(length, page_size) for length in lengths):
    table[row, :used], pages = pages[:used], pages[used:]
  layer = paged_cache.PagedLayer(pool(), pool(), jnp.asarray(table), kernel, True)
  query = jnp.asarray(rng.normal(size=(batch, 1, heads, head_dim)) / np.sqrt(head_dim), jnp.float32)
  out = layer.decode_attention(query, jnp.asarray(lengths, jnp.int32))
  keys, values = layer.read()  # [B, S, K, H]
  mask = (np.arange(32)[None, :] < lengths[:, None])[:, None, None, :]  # [B, 1, 1, S]
  expected = jax.nn.dot_product_attention(query, keys, values, mask=jnp.asarray(mask), scale=1.0)
  np.testing.assert_allclose(out, expected, rtol=tolerance, atol=tolerance)
