"""The paged KV cache: keys and values in fixed-size pages of one pool, read through a page table per row.

    pages = PageAllocator(num_pages)
    row_pages = pages.allocate(pages_for(prompt_length + 1, page_size))   # host side: the prompt, its first token
    logits, cache = decoder.apply(params, tokens, positions, cache)        # cache: a PagedKVCache
    row_pages += pages.allocate(1)   # before the step whose token falls past the row's pages (its table row too)

Memory follows the tokens a row really holds (whole pages of them), not rows x max_len: a row's pages are taken
as its sequence grows, so the pool may hold more rows than it could if each reserved its longest length (the
engine preempts a row when the pool runs dry). A page-table entry past a row's pages holds `cache.num_pages`,
the null page: writes to it are dropped and reads of it are masked.

Attention reads a row by gathering its pages into the contiguous [B, S, K, H] layout the contiguous cache gives
(`PagedLayer.write_and_read`), then runs the same masked attention, so both caches produce the same numbers. The
gather runs everywhere. On a GPU or TPU, a decode step (one new token per row) instead calls the Pallas
paged-attention kernel JAX ships for that platform (`PagedLayer.decode_attention`), which reads the pages where
they lie; the pool is then kept in the kernels' layout, [K, P, page_size, H] (`KERNELS`, `kernel_for`).

An INT8 pool (`dtype=jnp.int8`) holds `kv_cache.Int8Buffer`s: int8 pages with a float32 scale per token and head
(scales [P, K, page_size], or [K, P, page_size] in the kernels' layout), the same numbers as the contiguous INT8
cache. Its decode steps use the gather too (the kernels read float pages).
"""

import contextlib
import math

import flax.struct
import jax
import jax.numpy as jnp

from vlmjax.models.kv_cache import Int8Buffer, KVCache, dequantize_heads, quantize_heads

DEFAULT_PAGE_SIZE = 16  # tokens per page


def pages_for(num_tokens: int, page_size: int) -> int:
  """Pages that hold `num_tokens` tokens."""
  return -(-num_tokens // page_size)


def token_bytes(*, num_layers: int, num_kv_heads: int, head_dim: int, dtype) -> int:
  """Bytes one token takes in the pool (keys and values of every layer): 2 L K H x the dtype's size, or for int8
  2 L K (H + 4), its scales included. A pool of a given memory holds (4 H) / (H + 4) times the float32 tokens in
  int8 (3.6x at H = 32), (2 H) / (H + 4) times the bfloat16 ones (1.94x at H = 128, LLaVA-1.5-7B's)."""
  per_head = head_dim + 4 if jnp.dtype(dtype) == jnp.int8 else head_dim * jnp.dtype(dtype).itemsize
  return 2 * num_layers * num_kv_heads * per_head


# JAX's Pallas paged-attention kernels, by platform. Their pool layout is [K, P, page_size, H]; without a kernel
# the pool is [P, K, H, page_size], whose gathered pages the CPU's attention matmuls read without a copy.
KERNELS = ("pallas_gpu", "pallas_tpu")


def kernel_for(backend: str) -> str | None:
  """The paged-attention kernel for a JAX backend ('gpu', 'tpu', 'cpu', ...): None (the gather) where JAX ships
  none."""
  return {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "rocm": "pallas_gpu", "tpu": "pallas_tpu"}.get(backend)


@flax.struct.dataclass
class PagedLayer:
  """One layer's view of the paged cache, what `layers.Attention` reads and writes.

  Attributes:
    k: the pool's key pages (P of them): float[P, K, H, page_size], or float[K, P, page_size, H] with a kernel;
      v: the value pages, the same shape.
    page_table: int32[B, max_pages], row b's pages in order; `P` (the null page) past its last page.
    kernel: None (gather, then attention) or one of KERNELS, which decode steps call.
    interpret: run the kernel in Pallas' interpreter (on the CPU, for tests).
  """

  k: jax.Array
  v: jax.Array
  page_table: jax.Array
  kernel: str | None = flax.struct.field(pytree_node=False, default=None)
  interpret: bool = flax.struct.field(pytree_node=False, default=False)

  @property
  def num_pages(self) -> int:
    return self.k.shape[1 if self.kernel else 0]

  @property
  def page_size(self) -> int:
    return self.k.shape[2 if self.kernel else 3]

  @property
  def quantized(self) -> bool:
    return isinstance(self.k, Int8Buffer)

  def write(self, key: jax.Array, value: jax.Array, write_index: jax.Array) -> "PagedLayer":
    """Writes the T new keys and values (float[B, T, K, H]) of row b at its slots write_index[b] onwards; a slot
    whose page-table entry is the null page is dropped."""
    slots = write_index[:, None] + jnp.arange(key.shape[1])[None, :]  # [B, T]
    pages = jnp.take_along_axis(self.page_table, slots // self.page_size, axis=1, mode="fill",
                                fill_value=self.num_pages)
    offsets = slots % self.page_size
    if self.kernel:  # [:, pages, offsets] of a [K, P, page_size, H] pool selects [K, B, T, H]
      put = lambda pool, new: pool.at[:, pages, offsets].set(
          jnp.transpose(new, (2, 0, 1, 3)).astype(pool.dtype), mode="drop")
      put_scales = lambda pool, new: pool.at[:, pages, offsets].set(jnp.transpose(new, (2, 0, 1)), mode="drop")
    else:  # [pages, :, :, offsets] of a [P, K, H, page_size] pool selects [B, T, K, H]
      put = lambda pool, new: pool.at[pages, :, :, offsets].set(new.astype(pool.dtype), mode="drop")
      put_scales = lambda pool, new: pool.at[pages, :, offsets].set(new, mode="drop")  # [P, K, page_size]
    if self.quantized:
      def put_int8(buffer, new):  # new [B, T, K, H] -> int8 and scales [B, T, K]
        values, scales = quantize_heads(new)
        return buffer.replace(values=put(buffer.values, values), scales=put_scales(buffer.scales, scales))
      return self.replace(k=put_int8(self.k, key), v=put_int8(self.v, value))
    return self.replace(k=put(self.k, key), v=put(self.v, value))

  def read(self) -> tuple[jax.Array, jax.Array]:
    """Every row's pages gathered: (keys, values) float[B, S, K, H], S = max_pages * page_size; slots past a row's
    length hold leftovers or zeros, which the mask hides."""
    batch, max_pages = self.page_table.shape

    def gather(pool):
      if self.kernel:  # [K, P, page_size, H] -> [K, B, max_pages, page_size, H]
        rows = jnp.transpose(jnp.take(pool, self.page_table, axis=1, mode="clip"), (1, 2, 3, 0, 4))
      else:  # [P, K, H, page_size] -> [B, max_pages, K, H, page_size]
        rows = jnp.transpose(jnp.take(pool, self.page_table, axis=0, mode="clip"), (0, 1, 4, 2, 3))
      return rows.reshape(batch, max_pages * self.page_size, *rows.shape[3:])

    def gather_scales(pool):  # [P, K, page_size] or [K, P, page_size] -> [B, S, K]
      if self.kernel:
        rows = jnp.transpose(jnp.take(pool, self.page_table, axis=1, mode="clip"), (1, 2, 3, 0))
      else:
        rows = jnp.transpose(jnp.take(pool, self.page_table, axis=0, mode="clip"), (0, 1, 3, 2))
      return rows.reshape(batch, max_pages * self.page_size, rows.shape[3])

    if self.quantized:
      return tuple(dequantize_heads(gather(buffer.values), gather_scales(buffer.scales), jnp.float32)
                   for buffer in (self.k, self.v))
    return gather(self.k), gather(self.v)

  def write_and_read(self, key: jax.Array, value: jax.Array, write_index: jax.Array):
    """`write`, then `read`: (this layer updated, (keys, values) float[B, S, K, H])."""
    layer = self.write(key, value, write_index)
    return layer, layer.read()

  def decode_attention(self, query: jax.Array, lengths: jax.Array) -> jax.Array:
    """Attention of one new token per row over its pages, through the kernel: query float[B, 1, N, H], already
    scaled; lengths int32[B], the keys row b holds (its new token's included) -> float[B, 1, N, H]."""
    # Entries past a row's length are never attended to; clipping the null page keeps every read in the pool.
    table = jnp.minimum(self.page_table, self.num_pages - 1)
    per_row = table.shape[1]
    if self.kernel == "pallas_gpu":  # the kernels are imported only where they run
      from jax.experimental.pallas.ops.gpu import paged_attention as gpu_kernel
      splits = math.gcd(per_row, 16)  # the kernel splits a row's pages into partitions of whole compute blocks
      out = gpu_kernel.paged_attention(query[:, 0], self.k, self.v, table, lengths, k_splits=splits,
                                       pages_per_compute_block=math.gcd(per_row // splits, 8),
                                       interpret=self.interpret)
    else:
      from jax.experimental.pallas import tpu as pltpu
      from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention as tpu_kernel
      interpreting = pltpu.force_tpu_interpret_mode() if self.interpret else contextlib.nullcontext()
      with interpreting:
        out = tpu_kernel(query[:, 0], self.k, self.v, lengths, table, pages_per_compute_block=math.gcd(per_row, 8))
    return out[:, None].astype(query.dtype)


@flax.struct.dataclass
class PagedKVCache:
  """Keys and values of every layer in one pool of pages per layer, shared by `batch` rows.

  Attributes:
    k: L arrays, each layer's key pages: float[P, K, H, page_size], or float[K, P, page_size, H] with a kernel;
      v: the value pages.
    page_table: int32[B, max_pages], each row's pages in order, P (the null page) past its last one.
    lengths: int32[B], tokens held by each row; row b's next token goes to slot lengths[b], that is page
      page_table[b, lengths[b] // page_size] at offset lengths[b] % page_size.
    pruned: int32[B], as `KVCache.pruned`: FastV's later layers hold row b's tokens in its first lengths[b] -
      pruned[b] slots.
    kernel, interpret: as `PagedLayer`'s.
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  page_table: jax.Array
  lengths: jax.Array
  pruned: jax.Array
  kernel: str | None = flax.struct.field(pytree_node=False, default=None)
  interpret: bool = flax.struct.field(pytree_node=False, default=False)

  @property
  def num_pages(self) -> int:
    return self.k[0].shape[1 if self.kernel else 0]

  @property
  def page_size(self) -> int:
    return self.k[0].shape[2 if self.kernel else 3]

  @property
  def max_len(self) -> int:
    return self.page_table.shape[1] * self.page_size

  @property
  def batch_size(self) -> int:
    return self.page_table.shape[0]

  def write_prompt(self, prompt: KVCache, pages: jax.Array) -> "PagedKVCache":
    """Copies a prefilled prompt (a KVCache of one row, L layers of float[1, K, H, T]) into `pages`
    (int32[max_pages], a row of the page table) from its first slot on; pages past the prompt's are untouched
    and null-page entries dropped."""
    num_prompt_pages = pages_for(prompt.max_len, self.page_size)
    targets = pages[:num_prompt_pages]

    padding = num_prompt_pages * self.page_size - prompt.max_len

    def put(pool, layer):  # layer [1, K, H, T]
      padded = jnp.pad(layer[0], ((0, 0), (0, 0), (0, padding)))
      in_pages = padded.reshape(*padded.shape[:2], num_prompt_pages, self.page_size)  # [K, H, n, page_size]
      if self.kernel:  # into [K, P, page_size, H]
        return pool.at[:, targets].set(jnp.transpose(in_pages, (0, 2, 3, 1)).astype(pool.dtype), mode="drop")
      return pool.at[targets].set(jnp.transpose(in_pages, (2, 0, 1, 3)).astype(pool.dtype), mode="drop")

    def put_scales(pool, scales):  # scales [1, K, T]
      in_pages = jnp.pad(scales[0], ((0, 0), (0, padding))).reshape(-1, num_prompt_pages, self.page_size)
      if self.kernel:  # into [K, P, page_size]
        return pool.at[:, targets].set(in_pages, mode="drop")
      return pool.at[targets].set(jnp.transpose(in_pages, (1, 0, 2)), mode="drop")  # into [P, K, page_size]

    def put_layer(pool, layer):
      if not isinstance(pool, Int8Buffer):
        return put(pool, layer.dequantized(pool.dtype) if isinstance(layer, Int8Buffer) else layer)
      if not isinstance(layer, Int8Buffer):  # a float prompt into an INT8 pool: quantized per token and head
        values, scales = quantize_heads(jnp.swapaxes(layer, 2, 3))  # [1, K, T, H], [1, K, T]
        layer = Int8Buffer(jnp.swapaxes(values, 2, 3), scales)
      return pool.replace(values=put(pool.values, layer.values), scales=put_scales(pool.scales, layer.scales))

    return self.replace(k=tuple(map(put_layer, self.k, prompt.k)), v=tuple(map(put_layer, self.v, prompt.v)))

  def layers(self) -> tuple[PagedLayer, ...]:
    return tuple(PagedLayer(k, v, self.page_table, self.kernel, self.interpret) for k, v in zip(self.k, self.v))

  def with_layers(self, layers: tuple[PagedLayer, ...], lengths: jax.Array, pruned: jax.Array) -> "PagedKVCache":
    return self.replace(k=tuple(layer.k for layer in layers), v=tuple(layer.v for layer in layers), lengths=lengths,
                        pruned=pruned)

  @classmethod
  def zeros(cls, *, num_layers: int, num_pages: int, page_size: int, batch_size: int, max_len: int,
            num_kv_heads: int, head_dim: int, dtype=jnp.float32, kernel: str | None = None,
            interpret: bool = False) -> "PagedKVCache":
    """An empty pool of `num_pages` pages and `batch_size` rows of up to `max_len` tokens (rounded up to whole
    pages), all pages free; in the layout of `kernel` (one of KERNELS, or None: gather); dtype int8: Int8Buffers."""
    if kernel is not None and kernel not in KERNELS:
      raise ValueError(f"unknown paged-attention kernel {kernel!r}; choose one of {list(KERNELS)} or None")
    shape = ((num_kv_heads, num_pages, page_size, head_dim) if kernel else
             (num_pages, num_kv_heads, head_dim, page_size))
    empty = ((lambda: Int8Buffer.zeros(shape, head_axis=3 if kernel else 2)) if jnp.dtype(dtype) == jnp.int8 else
             (lambda: jnp.zeros(shape, dtype)))
    return cls(k=tuple(empty() for _ in range(num_layers)), v=tuple(empty() for _ in range(num_layers)),
               page_table=jnp.full((batch_size, pages_for(max_len, page_size)), num_pages, jnp.int32),
               lengths=jnp.zeros((batch_size,), jnp.int32), pruned=jnp.zeros((batch_size,), jnp.int32),
               kernel=kernel, interpret=interpret)
