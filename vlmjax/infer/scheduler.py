"""The engine's host-side bookkeeping: which request holds which slot and which pages of the pool, and what each
loop iteration prefills. Plain Python; `engine.py` makes the device calls it decides on.

  admission   the request at the front of the queue takes a free slot and the pages of its prompt and of the
              first token it samples (the prefix cache's pages first); it waits while the pool lacks them.
  growth      before each decode step, a decoding sequence whose next token falls past its pages takes one more.
  preemption  when the pool has no page for it, the prefix cache drops an entry nobody else holds or, failing
              that, the most recently admitted request is preempted: its pages are freed and it goes back to
              the front of the queue, to be prefilled again with the tokens it generated (recompute preemption).
  prefill     per loop iteration: one call for each admitted prompt that needs no more, and the next chunk of
              the earliest admitted longer one, so that the decoding slots take a step between its chunks; at
              most `prefill_budget` prompt tokens in all (the earliest admitted first), so that a burst of new
              prompts delays the running streams by one bounded prefill per step.
"""

import collections
import dataclasses

from vlmjax.infer import paged
from vlmjax.infer.prefix_cache import PrefixCache, page_keys
from vlmjax.infer.requests import Request
from vlmjax.models import paged_cache


@dataclasses.dataclass
class Slot:
  """A slot's request from its admission until it ends or is preempted."""

  request: Request
  pages: list[int]  # the pool's pages it holds, in page-table order (the prefix cache's first)
  context_ids: list[int]  # what this admission prefills: the prompt, then the tokens decoded before a preemption
  prefilled: int  # tokens of context_ids whose keys and values are in `pages` (the cached ones first)
  chunked: bool  # its prefill takes more than one call: one chunk per loop iteration
  admission: int  # the admissions so far when it was admitted: the latest admitted is preempted first

  @property
  def decoding(self) -> bool:
    """Prefilled (and inserted into the decode batch): it takes part in the decode steps."""
    return self.prefilled == len(self.context_ids)


class Scheduler:
  """Slots, the waiting queue and the pool's pages (`pages`, shared with `prefix_cache` when there is one).
  Prompts longer than `prefill_chunk` tokens past their cached prefix (None: no limit) are prefilled in chunks.
  With `whole_image_prompts` (FastV, which ranks an image's tokens by the prompt's last token and prunes them from
  its later layers' caches), a prompt with images is prefilled whole in one call: not in chunks, and nothing of it
  read from the prefix cache (its pages from its first image on depend on its last token through the pruning,
  which their keys do not hold; other prompts never match those keys, and its pages before the image are a
  text prompt's)."""

  def __init__(self, num_slots: int, pages: paged.PageAllocator, page_size: int, prefix_cache: PrefixCache | None,
               prefill_chunk: int | None, prefill_budget: int | None = None, whole_image_prompts: bool = False):
    self.pages, self.page_size, self.prefix_cache, self.prefill_chunk = pages, page_size, prefix_cache, prefill_chunk
    self.prefill_budget, self.whole_image_prompts = prefill_budget, whole_image_prompts
    self.slots: list[Slot | None] = [None] * num_slots
    self.waiting: collections.deque[Request] = collections.deque()
    self.num_preemptions = self._admissions = 0

  @property
  def num_running(self) -> int:
    """Slots holding a request (being prefilled or decoding)."""
    return sum(entry is not None for entry in self.slots)

  def by_admission(self) -> list[int]:
    """The slots holding a request, the earliest admitted first."""
    return sorted((slot for slot, entry in enumerate(self.slots) if entry), key=lambda slot: self.slots[slot].admission)

  def free(self, slot: int) -> Slot:
    """Empties the slot; its pages go back to the pool (those the prefix cache or other requests hold stay)."""
    entry, self.slots[slot] = self.slots[slot], None
    self.pages.free(entry.pages)
    return entry

  def grow(self) -> tuple[list[tuple[int, int, int]], list[tuple[int, Slot]]]:
    """Gives each decoding sequence whose next token falls past its pages one more page, earliest admitted first.
    Returns (the pages given, (slot, page-table column, page) each; the slots preempted for them, with what
    they held)."""
    grown, preempted = [], []
    for slot in self.by_admission():
      entry = self.slots[slot]
      # The next step writes the keys of the request's latest token: its pages must hold num_tokens tokens.
      if (entry is None or not entry.decoding
          or len(entry.pages) >= paged_cache.pages_for(entry.request.num_tokens, self.page_size)):
        continue
      page = self._take_page(slot, preempted)
      if page is not None:
        grown.append((slot, len(entry.pages), page))
        entry.pages.append(page)
    return grown, preempted

  def _take_page(self, slot: int, preempted: list[tuple[int, Slot]]) -> int | None:
    """A page from the pool for `slot`. While there is none, the prefix cache drops an entry nobody else holds
    or, failing that, the latest admitted request is preempted (appended to `preempted`); None when that was
    `slot`'s own."""
    while not self.pages.num_free:
      if self.prefix_cache is not None:
        self.prefix_cache.evict(1)
      if not self.pages.num_free:
        victim = self.by_admission()[-1]
        preempted.append((victim, self.free(victim)))
        self.waiting.appendleft(preempted[-1][1].request)
        self.num_preemptions += 1
        if victim == slot:
          return None
    return self.pages.allocate(1)[0]

  def admit(self) -> None:
    """Moves requests from the front of the queue into free slots while the pool has the pages they need."""
    for slot in range(len(self.slots)):
      if not self.waiting:
        return
      if self.slots[slot] is None:
        entry = self._allocate(self.waiting[0])
        if entry is None:
          return
        self.slots[slot] = entry
        self.waiting.popleft()

  def _allocate(self, request: Request) -> Slot | None:
    """A slot entry for `request`, holding pages for its prompt, the tokens it generated before a preemption
    and the next one it samples (whose keys the first step writes), the prefix cache's first; None (nothing
    taken) when the pool lacks them, even after evicting prefix-cache entries."""
    context = request.prompt_ids + request.decoded_ids
    shared = self._cached_prefix(request, context)
    needed = paged_cache.pages_for(len(context) + 1, self.page_size) - len(shared)
    if self.prefix_cache is not None and self.pages.num_free < needed:
      self.prefix_cache.evict(needed)
    try:
      pages = shared + self.pages.allocate(needed)
    except paged.PoolExhausted:
      self.pages.free(shared)
      return None
    request.cached_tokens = len(shared) * self.page_size
    chunked = (self.prefill_chunk is not None and not self._whole(request)
               and len(context) - request.cached_tokens > self.prefill_chunk)
    self._admissions += 1
    return Slot(request, pages, context, prefilled=request.cached_tokens, chunked=chunked, admission=self._admissions)

  def _whole(self, request: Request) -> bool:
    """Whether the request is prefilled whole, from its first token (`whole_image_prompts` and it has images)."""
    return self.whole_image_prompts and request.images_end > 0

  def _cached_prefix(self, request: Request, context: list[int]) -> list[int]:
    """The prefix cache's pages for the start of `context` (the request's prompt and generated tokens), each with
    one more holder: at most up to the last image placeholder's page (an image is encoded whole) and short of
    the last token (whose logits the first sample needs)."""
    if self.prefix_cache is None or self._whole(request):
      return []
    shared = self.prefix_cache.lookup(page_keys(context, request.pixel_values, self.page_size))
    shared = shared[:(len(context) - 1) // self.page_size]
    if len(shared) * self.page_size < request.images_end:  # an image not wholly cached is encoded again, whole
      shared = []
    self.pages.share(shared)
    return shared

  def to_prefill(self) -> list[tuple[int, int]]:
    """This iteration's prefill calls, (slot, where the call's piece of its context ends) each: the whole rest
    of each context that needs one call, and the next chunk of the earliest admitted longer one, within the
    prefill budget. A chunk reaches past the images: they are encoded whole, in the first chunk."""
    calls, chunk_taken, tokens = [], False, 0
    for slot in self.by_admission():
      entry = self.slots[slot]
      if entry.decoding or (entry.chunked and chunk_taken):
        continue
      end = len(entry.context_ids)
      if entry.chunked:
        end = min(end, max(entry.prefilled + self.prefill_chunk, entry.request.images_end))
      tokens += end - entry.prefilled
      if calls and self.prefill_budget is not None and tokens > self.prefill_budget:
        break  # this prompt and those admitted after it wait for the next iteration (one call always goes)
      chunk_taken = chunk_taken or entry.chunked
      calls.append((slot, end))
    return calls
