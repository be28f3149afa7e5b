"""The engine's host-side bookkeeping, without a model: pages as sequences grow, preemption, the prefill plan."""

import jax

from vlmjax.infer.paged import PageAllocator
from vlmjax.infer.prefix_cache import PrefixCache
from vlmjax.infer.requests import Request
from vlmjax.infer.sampling import SamplingParams
from vlmjax.infer.scheduler import Scheduler

PAGE_SIZE = 4


def _request(length: int, images_end: int = 0) -> Request:
  return Request(list(range(10, 10 + length)), None, images_end, 16, SamplingParams.fill(1), jax.random.key(0), (),
                 None)


def _decode(scheduler: Scheduler, slot: int, *tokens: int) -> None:
  """The slot prefilled and its tokens delivered, as the engine's steps leave it."""
  entry = scheduler.slots[slot]
  entry.prefilled = len(entry.context_ids)
  entry.request.decoded_ids += tokens


def test_sequences_take_pages_as_they_grow_and_the_latest_admitted_is_preempted():
  pages = PageAllocator(5)
  scheduler = Scheduler(3, pages, PAGE_SIZE, None, None)
  first, second, third = _request(7), _request(8), _request(2)  # 8 tokens end on a page: its first token's page too
  scheduler.waiting.extend([first, second, third])
  scheduler.admit()
  assert [len(entry.pages) for entry in scheduler.slots[:2]] == [2, 3] and scheduler.slots[2] is None
  assert list(scheduler.waiting) == [third] and pages.num_free == 0  # no page for the third's prompt: it waits
  _decode(scheduler, 0, 1)
  _decode(scheduler, 1, 1)
  assert scheduler.grow() == ([], [])  # the next step writes within their pages
  _decode(scheduler, 0, 2)  # 9 tokens: the next step writes past the first's 2 pages
  held = list(scheduler.slots[1].pages)
  grown, preempted = scheduler.grow()
  assert preempted == [(1, preempted[0][1])] and preempted[0][1].request is second and scheduler.slots[1] is None
  assert grown == [(0, 2, grown[0][2])] and grown[0][2] in held  # one of the pages the preempted one gave back
  assert list(scheduler.waiting) == [second, third] and scheduler.num_preemptions == 1 and pages.num_free == 2
  scheduler.admit()  # the preempted request needs 3 pages again (its 8 tokens, its generated one, the next)
  assert list(scheduler.waiting) == [second, third]
  scheduler.free(0)
  scheduler.admit()
  assert scheduler.slots[0].request is second and scheduler.slots[0].context_ids == second.prompt_ids + [1]
  assert scheduler.slots[1].request is third and pages.num_free == 1
  scheduler.free(0)
  scheduler.free(1)
  assert pages.num_free == 5


def test_a_sequence_that_is_the_latest_admitted_preempts_itself_and_the_cache_gives_up_its_pages_first():
  pages = PageAllocator(4)
  cache = PrefixCache(pages)
  scheduler = Scheduler(2, pages, PAGE_SIZE, cache, None)
  cached = pages.allocate(1)
  cache.add([b"unused"], cached)
  pages.free(cached)  # only the cache holds it now
  earlier, later = _request(3), _request(6)
  scheduler.waiting.extend([earlier, later])
  scheduler.admit()  # 1 + 2 pages; the cache's page is still there
  _decode(scheduler, 0, 1)
  _decode(scheduler, 1, 1, 2, 3)  # 9 tokens: past its 2 pages
  grown, preempted = scheduler.grow()
  assert grown == [(1, 2, cached[0])] and preempted == [] and cache.num_entries == 0  # evicted, not preempted
  _decode(scheduler, 1, 4, 5, 6, 7)  # 13 tokens: past its 3 pages, and the pool is empty
  grown, preempted = scheduler.grow()
  assert grown == [] and [slot for slot, _ in preempted] == [1] and list(scheduler.waiting) == [later]
  assert pages.num_free == 3 and scheduler.num_running == 1


def test_a_long_prompt_is_prefilled_one_chunk_per_iteration_while_short_ones_go_whole():
  scheduler = Scheduler(3, PageAllocator(16), PAGE_SIZE, None, prefill_chunk=4)
  long, short, longer = _request(11, images_end=6), _request(4), _request(9)
  scheduler.waiting.extend([long, short, longer])
  scheduler.admit()
  plans = []
  while plan := scheduler.to_prefill():
    plans.append(plan)
    for slot, end in plan:  # as the engine's prefill calls leave them
      scheduler.slots[slot].prefilled = end
  # The first chunk reaches past the image; the later long prompt waits for the earlier one's chunks.
  assert plans == [[(0, 6), (1, 4)], [(0, 10)], [(0, 11)], [(2, 4)], [(2, 8)], [(2, 9)]]


def test_an_iteration_prefills_within_the_budget_the_earliest_admitted_first():
  scheduler = Scheduler(4, PageAllocator(32), PAGE_SIZE, None, prefill_chunk=8, prefill_budget=10)
  requests = [_request(6), _request(3), _request(5), _request(20, images_end=2)]
  scheduler.waiting.extend(requests)
  scheduler.admit()
  plans = []
  while plan := scheduler.to_prefill():
    plans.append(plan)
    for slot, end in plan:
      scheduler.slots[slot].prefilled = end
  # 6 + 3 tokens fit the budget of 10 and the third prompt waits; it and the long prompt's first chunk of 8 would
  # exceed it, so each goes in an iteration of its own.
  assert plans == [[(0, 6), (1, 3)], [(2, 5)], [(3, 8)], [(3, 16)], [(3, 20)]]
