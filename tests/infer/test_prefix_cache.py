import numpy as np

from vlmjax.infer.paged import PageAllocator
from vlmjax.infer.prefix_cache import PrefixCache, page_keys


def test_keys_follow_the_image_and_the_tokens_page_by_page():
  image = np.zeros((1, 4, 4, 3), np.float32)
  keys = page_keys([1, 2, 3, 4, 5], image, page_size=2)
  assert len(keys) == 2  # full pages only
  assert page_keys([1, 2, 3, 9], image, 2)[0] == keys[0] != page_keys([1, 2, 3, 9], image, 2)[1]
  assert page_keys([1, 2, 3, 4], image + 1, 2)[0] != keys[0]


def test_entries_are_shared_with_references_and_evicted_least_recently_used():
  pages = PageAllocator(4)
  cache = PrefixCache(pages)
  old, new = pages.allocate(2), pages.allocate(2)
  cache.add([b"old0", b"old1"], old)
  cache.add([b"new0", b"new1"], new)
  pages.free(old + new)  # the requests end; the cache still holds every page
  assert pages.num_free == 0 and cache.lookup([b"old0", b"gone", b"old1"]) == old[:1]  # old0: just used
  held = cache.lookup([b"new0"])
  pages.share(held)  # a request reuses new0: not evictable
  cache.evict(2)  # the two least recently used: old1, new1
  assert cache.num_entries == 2 and pages.num_free == 2 and cache.lookup([b"old0"]) == old[:1]
  cache.evict(4)
  assert cache.num_entries == 1 and pages.num_free == 3
  cache.clear()
  pages.free(held)
  assert pages.num_free == 4
