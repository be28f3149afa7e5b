"""Prefix reuse: the full prompt pages of earlier requests, shared with later requests that start the same way.

A prompt's k-th full page is keyed by a hash of the request's image bytes and its first k pages of token ids,
so a second question about the same image finds the pages of the chat template and the image, and prefills only
the rest. The cache holds one reference to each page it lists (`PageAllocator.share`); a request that reuses
pages holds one more. Entries whose pages nobody else holds are evicted least recently used first when the pool
needs pages. Causal models only: under a prefix-LM mask a prompt token's keys depend on the tokens after it.
"""

import collections
import hashlib

import numpy as np

from vlmjax.infer.paged import PageAllocator


def page_keys(prompt_ids: list[int], pixel_values, page_size: int) -> list[bytes]:
  """One key per full page of the prompt: key k hashes the image bytes and the token ids of pages 0..k.

  pixel_values: float32[I, H, W, 3], or per image LLaVA-NeXT's (tiles float32[n, S, S, 3], (height, width)) or
  Qwen2.5-VL's (patches float32[t·h·w, 3·T·p·p], grid (t, h, w)), or None. The processed pixels and their sizes are
  hashed, so the same image under other processor settings is another key."""
  digest = hashlib.sha256()
  if isinstance(pixel_values, list):
    for pixels, size in pixel_values:
      digest.update(np.asarray(size, np.int64).tobytes())
      digest.update(np.ascontiguousarray(pixels, np.float32).tobytes())
  elif pixel_values is not None:
    digest.update(np.ascontiguousarray(pixel_values, np.float32).tobytes())
  keys = []
  for start in range(0, len(prompt_ids) - page_size + 1, page_size):
    digest.update(np.asarray(prompt_ids[start:start + page_size], np.int32).tobytes())
    keys.append(digest.copy().digest())
  return keys


class PrefixCache:
  """Prompt pages by their `page_keys`, least recently used first."""

  def __init__(self, pages: PageAllocator):
    self.pages = pages
    self._entries: collections.OrderedDict[bytes, int] = collections.OrderedDict()  # key -> page

  @property
  def num_entries(self) -> int:
    return len(self._entries)

  def lookup(self, keys: list[bytes]) -> list[int]:
    """The pages of the longest run of `keys` held, from the first (each marked as just used)."""
    found = []
    for key in keys:
      if key not in self._entries:
        break
      self._entries.move_to_end(key)
      found.append(self._entries[key])
    return found

  def add(self, keys: list[bytes], pages: list[int]) -> None:
    """Lists `pages` (the prompt pages keyed by `keys`, in order) for later requests."""
    for key, page in zip(keys, pages):
      if key not in self._entries:
        self._entries[key] = page
        self.pages.share([page])
      self._entries.move_to_end(key)

  def evict(self, num_free: int) -> None:
    """Drops least recently used entries that only the cache holds until `num_free` pages are free (or none
    is left to drop)."""
    for key in list(self._entries):
      if self.pages.num_free >= num_free:
        return
      if self.pages.references(self._entries[key]) == 1:
        self.pages.free([self._entries.pop(key)])

  def clear(self) -> None:
    """Drops every entry (pages still used by requests stay with them)."""
    self.pages.free(list(self._entries.values()))
    self._entries.clear()
