"""The host side of the paged KV cache (`models/paged_cache.py`): which pages of the pool are free, and who holds
each allocated one, and how many pages the pool has."""

from vlmjax.models import paged_cache
from vlmjax.models.vlm import VLMConfig


class PoolExhausted(RuntimeError):
  """Fewer free pages than asked for; the caller waits for pages to come back."""


class PageAllocator:
  """The host-side free list of a pool's pages, with a reference count per allocated page: a page shared by
  several holders (requests with the same prefix, the prefix cache) goes back to the pool when the last frees it."""

  def __init__(self, num_pages: int):
    if num_pages < 1:
      raise ValueError(f"num_pages must be at least 1, got {num_pages}")
    self.num_pages = num_pages
    self._free = list(range(num_pages - 1, -1, -1))  # popped from the end: pages 0, 1, ... first
    self._references: dict[int, int] = {}  # allocated page -> holders

  @property
  def num_free(self) -> int:
    return len(self._free)

  def references(self, page: int) -> int:
    return self._references.get(page, 0)

  def allocate(self, count: int) -> list[int]:
    """`count` free pages, one holder each; PoolExhausted (nothing taken) when fewer are free."""
    if count > len(self._free):
      raise PoolExhausted(f"{count} pages asked for, {len(self._free)} of {self.num_pages} free")
    pages = [self._free.pop() for _ in range(count)]
    self._references.update((page, 1) for page in pages)
    return pages

  def share(self, pages: list[int]) -> None:
    """One more holder for each of these allocated pages."""
    for page in pages:
      assert page in self._references, f"page {page} is shared but was not allocated"
      self._references[page] += 1

  def free(self, pages: list[int]) -> None:
    """One holder less for each page; a page nobody holds goes back to the pool."""
    for page in pages:
      assert page in self._references, f"page {page} is freed but was not allocated"
      self._references[page] -= 1
      if not self._references[page]:
        del self._references[page]
        self._free.append(page)


def _token_bytes(config: VLMConfig, dtype) -> int:
  """Bytes a token's keys and values take in `dtype` across the model's layers (`paged_cache.token_bytes`)."""
  decoder = config.decoder
  return paged_cache.token_bytes(num_layers=decoder.depth, num_kv_heads=decoder.num_kv_heads,
                                 head_dim=decoder.attention_head_dim, dtype=dtype)


def default_num_pages(config: VLMConfig, num_slots: int, max_len: int, page_size: int) -> int:
  """Pages of the pool in the bytes of a [num_slots, max_len] cache in the compute dtype: a pool in that dtype holds
  every slot full; an INT8 one (a scale per token and head beside the int8 values) holds (2 H) / (H + 4) times as
  many tokens in bfloat16's bytes, (4 H) / (H + 4) in float32's."""
  full = num_slots * paged_cache.pages_for(max_len, page_size)
  return full * _token_bytes(config, config.decoder.dtype) // _token_bytes(config, config.decoder.cache_dtype)


def pool_bytes(config: VLMConfig, num_pages: int, page_size: int) -> int:
  """Bytes the pool's pages hold (keys and values of every layer, INT8 scales included)."""
  return num_pages * page_size * _token_bytes(config, config.decoder.cache_dtype)
