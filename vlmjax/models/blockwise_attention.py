"""Attention a block of keys at a time with a running softmax, for XLA's CPU backend, which has no fused attention
kernel (on a GPU or TPU `fused_attention` hands the work to cuDNN or splash attention).

XLA computes `jax.nn.dot_product_attention` as written: the [T, S] scores of every head are written to memory, then
read back for the mask, the maximum, the exponentials and their sums and the value matmul. At the lengths of a large
image those passes, not the arithmetic, set the time: on the 2-core AMD EPYC, a prefill of 2135 tokens spent 0.11 s
a layer in attention (PyTorch's flash kernel: 0.036 s), and the full-attention block of a 1280 x 1280 image in
Qwen2.5-VL's tower 0.72 s (PyTorch's: 0.44 s). Here each block of queries walks the key blocks with the running
maximum, sum and weighted values of FlashAttention's online softmax (Rabe & Staats 2021, "Self-attention does not
need O(n^2) memory"), so a block's scores stay in the cache; key blocks that no query of the block may see (above a
causal diagonal, or past every row's key length) are skipped, not masked, and blocks every query sees whole are
not masked either. It is differentiable (a `lax.map` over query blocks, a `lax.scan` over key blocks, the skip a
`lax.switch`), so the Qwen tower trains through it too.
"""

import functools

import jax
import jax.numpy as jnp

# Block sizes (queries x keys). On the 2-core AMD EPYC, the full-attention block of a 1280 x 1280 image (9216 patches,
# 4 heads of 48) took 0.56-0.62 s in blocks of 512 x 512, 0.65-0.69 s in 256 x 512 and 1024 x 512, 0.72-0.78 s in
# 512 x 1024 and 1024 x 1024, and 1.18 s in 256 x 256. A causal prefill of 2135 tokens (8 query and 4 key/value heads
# of 64) took 0.056 s a layer in 256 x 256, 0.061-0.074 s in 128 x 512 and 512 x 512: smaller blocks skip more of
# the triangle above the diagonal. With whole blocks unmasked and fitted causal blocks these became 0.44-0.50 s and
# 0.045-0.05 s (2176 tokens in 8 blocks of 272), and with a key/value head's query heads as the rows of one matmul
# the full-attention block 0.42-0.43 s (the prefill stays best in 272 x 272, 0.046-0.047 s, against 0.076 s in 136,
# 0.049-0.050 s in 368 and 0.047-0.048 s in 544). Not faster there: every block pair of one diagonal in one batched
# op (0.10-0.13 s: its scores no longer fit the cache), the key-block loop unrolled, keys laid out for an NN matmul,
# exp2 for exp, the maxima and sums reduced by XLA's loops instead of YNNPACK (0.56 s).
BLOCK = 512
CAUSAL_BLOCK = 256
_MASKED = -1e30  # a masked score: finite, so a block whose keys a query may not see yields no NaN


def fitted_block(length: int, target: int) -> int:
  """The block size, a multiple of 16 near `target`, that cuts `length` positions into whole blocks with the least
  padding: 2176 tokens into 8 blocks of 272, not 9 of 256 (2304), so no block of padding alone is computed."""
  if length <= target:
    return length
  best = None
  for count in (length // target, -(-length // target)):
    size = -(-length // (count * 16)) * 16  # ceil(length / count), rounded up to 16
    padded = -(-length // size) * size
    if best is None or padded < best[0]:
      best = (padded, size)
  return best[1]


def _pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
  padding = [(0, 0)] * x.ndim
  padding[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, padding)


def attention(query: jax.Array, key: jax.Array, value: jax.Array, scale: float, *, causal: bool = False,
              key_lengths: jax.Array | None = None, query_ids: jax.Array | None = None,
              key_ids: jax.Array | None = None, query_lengths: jax.Array | None = None,
              block: int | None = None) -> jax.Array:
  """Softmax attention of float[B, T, N, H] queries over float[B, S, K, H] keys and values (N a multiple of K: GQA)
  -> float[B, T, N, H] in the query's dtype; scores, sums and the weighted values in float32.

  Query t sees key s where every given condition holds: causal, s <= t (query t at key slot t, from 0);
  key_lengths int[B], s < key_lengths[b]; query_ids int[B, T] and key_ids int[B, S], equal ids (segments, images).
  A query that sees no key gets the mean of the values it was masked from (finite, and meaningless: padding).
  query_lengths: int[B], the queries at slots from query_lengths[b] on are padding, whatever they see: a block of
  queries past every row's length is not computed, and its outputs are zeros.
  block: the query and key block size (default: `fitted_block` of the queries near CAUSAL_BLOCK when causal,
  else BLOCK).
  """
  batch, length, num_heads, head_dim = query.shape
  key_length, num_kv_heads = key.shape[1], key.shape[2]
  group = num_heads // num_kv_heads
  block = block or fitted_block(length, CAUSAL_BLOCK if causal else BLOCK)
  query_block, key_block = min(block, length), min(block, key_length)
  num_query_blocks, num_key_blocks = -(-length // query_block), -(-key_length // key_block)
  if key_length % key_block and key_lengths is None:
    key_lengths = jnp.full((batch,), key_length, jnp.int32)  # the padding below is no key
  query = _pad_to(query * jnp.asarray(scale, query.dtype), 1, num_query_blocks * query_block)
  key, value = (_pad_to(x, 1, num_key_blocks * key_block) for x in (key, value))
  # [blocks, B, K, G·block, H] queries (the G query heads of a key/value head stacked as rows of one matmul: as
  # [B, K, G, block, H] the scores of each block pair took a copy into another layout) and [blocks, B, K, block, H]
  # keys and values: per block, batched matmuls.
  queries = query.reshape(batch, num_query_blocks, query_block, num_kv_heads, group, head_dim)
  queries = queries.transpose(1, 0, 3, 4, 2, 5).reshape(num_query_blocks, batch, num_kv_heads, group * query_block,
                                                        head_dim)
  keys, values = (x.reshape(batch, num_key_blocks, key_block, num_kv_heads, head_dim).transpose(1, 0, 3, 2, 4)
                  for x in (key, value))
  ids = query_ids is not None
  if ids:
    query_ids = _pad_to(query_ids, 1, num_query_blocks * query_block).reshape(batch, num_query_blocks, -1)
    key_ids = _pad_to(key_ids, 1, num_key_blocks * key_block).reshape(batch, num_key_blocks, -1)
    query_ids, key_ids = query_ids.transpose(1, 0, 2), key_ids.transpose(1, 0, 2)  # [blocks, B, block]
  else:
    query_ids = jnp.zeros((num_query_blocks, batch, 0), jnp.int32)
    key_ids = jnp.zeros((num_key_blocks, batch, 0), jnp.int32)
  seen = key_length if key_lengths is None else jnp.max(key_lengths)  # no key block from here on is needed
  queries_seen = None if query_lengths is None else jnp.max(query_lengths)  # nor query block

  def one_query_block(block):
    i, block_queries, block_query_ids = block  # [B, K, G·Bq, H], [B, Bq] (or [B, 0])
    query_slots = i * query_block + jnp.arange(query_block)
    row_slots = jnp.tile(query_slots, group)  # [G·Bq]: the slot of each row, query head by query head
    row_ids = jnp.tile(block_query_ids, (1, group))  # [B, G·Bq] (or [B, 0]): the id of each row

    def add_key_block(carry, key_block_of):
      j, block_keys, block_values, block_key_ids = key_block_of  # [B, K, Bk, H] twice, [B, Bk] (or [B, 0])
      start = j * key_block
      needed = start < seen
      if causal:
        needed &= start <= query_slots[-1]

      def compute(masked: bool, carry):
        peak, total, weighted = carry  # [B, K, G·Bq] twice, [B, K, G·Bq, H]
        scores = jnp.einsum("bkqh,bksh->bkqs", block_queries, block_keys, preferred_element_type=jnp.float32)
        if masked:
          key_slots = start + jnp.arange(key_block)
          allowed = jnp.ones((batch, group * query_block, key_block), bool)
          if causal:
            allowed &= key_slots[None, None, :] <= row_slots[None, :, None]
          if key_lengths is not None:
            allowed &= (key_slots[None, :] < key_lengths[:, None])[:, None, :]
          if ids:
            allowed &= row_ids[:, :, None] == block_key_ids[:, None, :]
          scores = jnp.where(allowed[:, None], scores, _MASKED)
        new_peak = jnp.maximum(peak, jnp.max(scores, axis=-1))
        weights = jnp.exp(scores - new_peak[..., None])
        shrink = jnp.exp(peak - new_peak)
        weighted = weighted * shrink[..., None] + jnp.einsum(
            "bkqs,bksh->bkqh", weights.astype(block_values.dtype), block_values, preferred_element_type=jnp.float32)
        return new_peak, total * shrink + jnp.sum(weights, axis=-1), weighted

      # A block that every query of the block sees whole (below the diagonal, within every row's keys, one image)
      # skips building and applying the mask: a pass over its scores fewer.
      whole = jnp.array(True)
      if causal:
        whole &= start + key_block - 1 <= query_slots[0]
      if key_lengths is not None:
        whole &= start + key_block <= jnp.min(key_lengths)
      if ids:
        first = block_query_ids[0, 0]
        whole &= jnp.all(block_query_ids == first) & jnp.all(block_key_ids == first)
      branch = jnp.where(needed, jnp.where(whole, 1, 2), 0)
      steps = [lambda carry: carry, functools.partial(compute, False), functools.partial(compute, True)]
      return jax.lax.switch(branch, steps, carry), None

    def attend(_):
      shape = (batch, num_kv_heads, group * query_block)
      start = (jnp.full(shape, _MASKED, jnp.float32), jnp.zeros(shape, jnp.float32),
               jnp.zeros((*shape, head_dim), jnp.float32))
      (_, total, weighted), _ = jax.lax.scan(add_key_block, start,
                                             (jnp.arange(num_key_blocks), keys, values, key_ids))
      return (weighted / total[..., None]).astype(block_queries.dtype)

    if queries_seen is None:
      return attend(None)
    padding = lambda _: jnp.zeros(block_queries.shape, block_queries.dtype)
    return jax.lax.cond(query_slots[0] < queries_seen, attend, padding, None)

  out = jax.lax.map(one_query_block, (jnp.arange(num_query_blocks), queries, query_ids))  # [Tb, B, K, G·Bq, H]
  out = out.reshape(num_query_blocks, batch, num_kv_heads, group, query_block, head_dim)
  out = out.transpose(1, 0, 4, 2, 3, 5).reshape(batch, num_query_blocks * query_block, num_heads, head_dim)
  return out[:, :length]
