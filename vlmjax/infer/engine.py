"""Continuous batching: a fixed number of decode slots on device, refilled as requests end.

    engine = Engine(vlm, num_slots=32, max_len=2048, num_pages=1024)
    engine.start()
    request = engine.submit(prompt_ids, pixel_values, max_tokens=64, temperature=0.7, seed=1)
    request.wait().text

Three jitted calls (in `slots.py`), as JAX serving engines (JetStream) split the work:
  `prefill`  one prompt (its images encoded) into a cache of its length bucket; one compilation per bucket.
  `insert`   that cache into a free slot of the batched `SlotState`, with the slot's first token, sampling
             settings and PRNG key, while the other slots keep their place.
  `generate` one token for every slot.
The engine thread loops: admit (prefill + insert) → dispatch `generate` → copy the admitted requests' first
tokens (ready before the step is) → one host copy of the step's tokens → free the slots that ended. A second
thread detokenizes, checks stop strings and hands each request's new text to its listener while the next step
runs. Prompts are prefilled whole, one at a time, between steps (no chunked prefill).

The slots' keys and values live in a paged cache (`paged.PagedKVCache`): a request is admitted when a slot is
free and the pool has the pages for its prompt plus max_tokens, which it holds until it ends. Reserving the
whole request at admission means a running request never waits for a page and never takes a neighbour's;
a request the pool cannot hold yet waits in the queue (first come, first served). With short requests, far
more slots fit the memory a [slots, max_len] cache would take.
"""

import collections
import dataclasses
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vlmjax.infer import generate as generation
from vlmjax.infer import paged
from vlmjax.infer.prefix_cache import PrefixCache, page_keys
from vlmjax.infer.sampling import SamplingParams
from vlmjax.infer.slots import Prefix, generate, init_state, insert, prefill, prefill_after_cached, release

_log = logging.getLogger(__name__)
DEFAULT_MAX_LEN = 2048  # a slot's context when neither the caller nor the checkpoint states one
FINISH_REASONS = ("stop", "length", "cancelled", "error")  # stop: an end token or a stop string


class PromptTooLong(ValueError):
  """The prompt plus the tokens asked for do not fit a slot's context."""


@dataclasses.dataclass(frozen=True)
class Output:
  """What a request produced since its previous output; `finish_reason` (one of FINISH_REASONS) is set on the
  last one only, `error` when the engine failed."""

  text: str
  token_ids: tuple[int, ...]
  finish_reason: str | None = None
  error: str | None = None


class Request:
  """A request as the engine tracks it, made by `Engine.submit`. The engine thread decodes it; the detokenizer
  thread alone writes `token_ids`, `text`, `finish_reason` and the timings (time.monotonic() seconds)."""

  def __init__(self, prompt_ids: list[int], pixel_values: np.ndarray | None, max_tokens: int,
               sampling: SamplingParams, key: jax.Array, stop: tuple[str, ...],
               listener: Callable[[Output], None] | None):
    self.prompt_ids, self.pixel_values, self.max_tokens = prompt_ids, pixel_values, max_tokens
    self.sampling, self.key, self.stop, self.listener = sampling, key, stop, listener
    self.token_ids: list[int] = []
    self.text = ""  # what has been handed out: the generated text, minus a stop string and what follows it
    self.finish_reason: str | None = None
    self.error: str | None = None
    self.submitted_at = time.monotonic()
    self.first_token_at: float | None = None
    self.finished_at: float | None = None
    self.done = threading.Event()
    self.cancelled = False
    self.num_decoded = 0  # tokens the engine has produced for it (the engine thread's count)
    self.cached_tokens = 0  # prompt tokens read from the prefix cache instead of prefilled

  def wait(self, timeout: float | None = None) -> "Request":
    if not self.done.wait(timeout):
      raise TimeoutError(f"the request did not finish within {timeout} s")
    return self


class Engine:
  """Continuous batching over `num_slots` slots of `max_len` tokens (prompt + generated) each, whose keys and
  values share a pool of `num_pages` pages of `page_size` tokens (default: enough for every slot to be full,
  the memory of a [num_slots, max_len] cache). With `prefix_caching` (causal models), requests that start with
  the same images and tokens share the full pages of that prefix (`prefix_cache.PrefixCache`). With
  `static_batching` the slots are filled only when all of them are free (the baseline continuous batching is
  measured against, in tools/bench_serve.py).

  `on_finish(request)` is called (from the detokenizer thread) once per request as it ends, for metrics.
  """

  def __init__(self, vlm, num_slots: int = 8, max_len: int | None = None,
               on_finish: Callable[[Request], None] | None = None, *, num_pages: int | None = None,
               page_size: int = paged.DEFAULT_PAGE_SIZE, prefix_caching: bool = False, static_batching: bool = False):
    if num_slots < 1:
      raise ValueError(f"num_slots must be at least 1, got {num_slots}")
    self.vlm, self.num_slots, self.on_finish, self.page_size = vlm, num_slots, on_finish, page_size
    self.static_batching = static_batching
    self.config = vlm.model_config
    self.max_len = max_len or vlm.max_len or DEFAULT_MAX_LEN
    self.buckets = tuple(b for b in generation.BUCKETS if b < self.max_len) + (self.max_len,)
    self.error: BaseException | None = None
    self.pages = paged.PageAllocator(num_pages or num_slots * paged.pages_for(self.max_len, page_size))
    self._state = init_state(self.config, num_slots, self.max_len, self.pages.num_pages, page_size)
    self._slots: list[Request | None] = [None] * num_slots
    self._slot_pages: list[list[int]] = [[] for _ in range(num_slots)]  # the pages each slot's request holds
    if prefix_caching and self.config.prefix_lm:
      raise ValueError("prefix caching needs a causal model: under a prefix-LM mask a prompt's keys depend on "
                       "the tokens after them")
    self.prefix_cache = PrefixCache(self.pages) if prefix_caching else None
    self._inserted: list[tuple[int, jax.Array]] = []  # (slot, first token) of the requests admitted this round
    self._waiting: collections.deque[Request] = collections.deque()
    self._condition = threading.Condition()
    self._accepting = self._stopping = False
    self._to_detokenizer: queue.SimpleQueue = queue.SimpleQueue()
    self._threads = [threading.Thread(target=self._run, name="engine", daemon=True),
                     threading.Thread(target=self._detokenize, name="detokenizer", daemon=True)]

  @property
  def num_running(self) -> int:
    return sum(request is not None for request in self._slots)

  @property
  def num_waiting(self) -> int:
    return len(self._waiting)

  @property
  def healthy(self) -> bool:
    return self._accepting and self.error is None

  def start(self) -> "Engine":
    self._accepting = True
    for thread in self._threads:
      thread.start()
    return self

  def stop(self, drain: bool = True, timeout: float | None = None) -> None:
    """Stops accepting requests; with `drain`, finishes the running and waiting ones first, else cancels them."""
    with self._condition:
      self._accepting, self._stopping = False, True
      if not drain:
        for request in [*self._waiting, *filter(None, self._slots)]:
          request.cancelled = True
      self._condition.notify_all()
    for thread in self._threads:
      if thread.is_alive():
        thread.join(timeout)

  def submit(self, prompt_ids: Sequence[int], pixel_values: np.ndarray | None = None, *,
             max_tokens: int | None = None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int | None = None, stop: Sequence[str] = (),
             listener: Callable[[Output], None] | None = None) -> Request:
    """Queues one request; ValueError when it cannot run (too long, bad settings, images not matching).

    Args:
      prompt_ids: int[T], image placeholders expanded (as `VLM.prompt_ids` gives them).
      pixel_values: float32[I, H, W, 3] normalized images, one per placeholder run, or None.
      max_tokens: tokens to generate at most (default: the rest of the slot's context).
      seed: the request's PRNG seed (default: random); with the same seed a request samples what
        `VLM.generate_ids(..., seed=seed)` samples for it alone.
      stop: strings that end the generation; the text is cut before them.
      listener: called from the detokenizer thread with each Output (new text as it becomes final).
    """
    prompt_ids = [int(token) for token in prompt_ids]
    if not prompt_ids:
      raise ValueError("the prompt is empty")
    room = self.max_len - len(prompt_ids)
    if room < 1:
      raise PromptTooLong(f"a prompt of {len(prompt_ids)} tokens leaves no room to generate in the context "
                          f"of {self.max_len} tokens")
    max_tokens = room if max_tokens is None else max_tokens
    if max_tokens < 1:
      raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    if max_tokens > room:
      raise PromptTooLong(f"a prompt of {len(prompt_ids)} tokens plus max_tokens={max_tokens} does not fit "
                          f"the context of {self.max_len} tokens")
    num_images = 0 if pixel_values is None else len(pixel_values)
    size = self.config.vision.image_size
    if num_images and pixel_values.shape[1:] != (size, size, 3):
      raise ValueError(f"pixel_values must be float32[I, {size}, {size}, 3], got {list(pixel_values.shape)}")
    placeholders = prompt_ids.count(self.config.image_token_id)
    if placeholders != num_images * self.config.tokens_per_image:
      raise ValueError(f"the prompt holds {placeholders} image placeholder tokens but {num_images} images need "
                       f"{num_images * self.config.tokens_per_image}")
    if any(not text for text in stop):
      raise ValueError("stop strings must not be empty")
    if self._pages_needed(len(prompt_ids), max_tokens) > self.pages.num_pages:
      raise PromptTooLong(f"a prompt of {len(prompt_ids)} tokens plus max_tokens={max_tokens} needs "
                          f"{self._pages_needed(len(prompt_ids), max_tokens)} pages of {self.page_size} tokens; "
                          f"the pool has {self.pages.num_pages}: ask for fewer tokens or give the engine more pages")
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    request = Request(prompt_ids, pixel_values, max_tokens, SamplingParams.fill(1, temperature, top_k, top_p),
                      jax.random.key(seed), tuple(stop), listener)
    with self._condition:
      if not self._accepting:
        raise RuntimeError("the engine is not accepting requests: it is stopping or has failed"
                           + (f" ({self.error})" if self.error else ""))
      self._waiting.append(request)
      self._condition.notify_all()
    return request

  def cancel(self, request: Request) -> None:
    """Ends a waiting or running request (finish_reason 'cancelled'); its slot is freed before the next step."""
    with self._condition:
      request.cancelled = True
      self._condition.notify_all()

  # The engine thread.

  def _run(self) -> None:
    try:
      while self._admit():
        self._step()
    except Exception as error:  # an XLA or model failure: every request ends with it, and health turns bad
      _log.exception("the engine failed")
      self.error = error
      with self._condition:
        self._accepting = False
        ended = [*self._waiting, *filter(None, self._slots)]
        self._waiting.clear()
        self._slots = [None] * self.num_slots
        for pages in self._slot_pages:
          self.pages.free(pages)
          pages.clear()
      for request in ended:
        self._to_detokenizer.put((request, None, "error"))
    finally:
      self._to_detokenizer.put(None)

  def _admit(self) -> bool:
    """Waits for work, frees the slots of ended requests and fills free slots from the queue. False when
    stopped with nothing left to do."""
    self._inserted = []
    with self._condition:
      self._condition.wait_for(lambda: self._waiting or self.num_running or self._stopping)
      admitted = []
      for request in list(self._waiting):
        if request.cancelled:
          self._waiting.remove(request)
          self._to_detokenizer.put((request, None, "cancelled"))
      for slot, request in enumerate(self._slots):
        if request is not None and (request.cancelled or request.done.is_set()):  # done: a stop string
          self._free(slot, "cancelled" if request.cancelled else None)
      # Static batching (a baseline to measure against) fills the slots only once every one of them is free.
      admitting = not self.static_batching or not self.num_running
      for slot in range(self.num_slots):
        if admitting and self._slots[slot] is None and self._waiting and self._reserve_pages(slot, self._waiting[0]):
          admitted.append((slot, self._waiting.popleft()))
          self._slots[slot] = admitted[-1][1]
      if not self.num_running:
        return not (self._stopping and not self._waiting)
    for slot, request in admitted:
      pages = np.full((self._state.cache.page_table.shape[1],), self.pages.num_pages, np.int32)  # null-padded
      pages[:len(self._slot_pages[slot])] = self._slot_pages[slot]
      prefix = self._prefill(request, pages)
      self._state, first = insert(prefix, self._state, jnp.int32(slot), pages, request.sampling, request.key)
      if self.prefix_cache is not None:
        keys = page_keys(request.prompt_ids, request.pixel_values, self.page_size)
        self.prefix_cache.add(keys, self._slot_pages[slot][:len(keys)])
      self._inserted.append((slot, first))
    return True

  def _pages_needed(self, prompt_length: int, max_tokens: int) -> int:
    return paged.pages_for(prompt_length + max_tokens, self.page_size)

  def _prefill(self, request: Request, pages: np.ndarray) -> Prefix:
    """The request's prompt through the model: whole, or past its `cached_tokens` found in the prefix cache."""
    cached_tokens = request.cached_tokens
    if not cached_tokens:
      bucket = generation.bucket_length(len(request.prompt_ids), self.buckets)
      return prefill(self.vlm.params, self.config, request.prompt_ids, request.pixel_values, bucket,
                     self.vlm.pad_token_id)
    rest = request.prompt_ids[cached_tokens:]
    bucket = generation.bucket_length(len(rest), self.buckets)
    input_ids = np.full((1, bucket), self.vlm.pad_token_id, np.int32)
    input_ids[0, :len(rest)] = rest
    self._state, logits = prefill_after_cached(self.vlm.params, self.config, self._state, input_ids,
                                               np.arange(bucket)[None] < len(rest), pages, jnp.int32(cached_tokens))
    empty = self.config.decoder.init_cache(batch_size=1, max_len=0)  # nothing left for `insert` to copy
    return Prefix(cache=empty.replace(lengths=jnp.array([len(request.prompt_ids)], jnp.int32)), logits=logits)

  def _cached_prefix(self, request: Request) -> list[int]:
    """The prefix cache's pages for the start of the request's prompt, each with one more holder: at most up to
    the last image placeholder's page (an image is encoded whole) and short of the last token (whose logits
    the first sample needs)."""
    if self.prefix_cache is None:
      return []
    shared = self.prefix_cache.lookup(page_keys(request.prompt_ids, request.pixel_values, self.page_size))
    shared = shared[:(len(request.prompt_ids) - 1) // self.page_size]
    if request.pixel_values is not None:
      last_image = max(i for i, token in enumerate(request.prompt_ids) if token == self.config.image_token_id)
      if len(shared) * self.page_size <= last_image:  # an image not wholly cached is encoded again, whole
        shared = []
    self.pages.share(shared)
    return shared

  def _reserve_pages(self, slot: int, request: Request) -> bool:
    """Gives `slot` the pages `request` needs to its end, starting with the prefix cache's pages for its prompt;
    False (nothing taken) when the pool lacks them, even after evicting prefix-cache entries."""
    shared = self._cached_prefix(request)
    needed = self._pages_needed(len(request.prompt_ids), request.max_tokens) - len(shared)
    if self.prefix_cache is not None and self.pages.num_free < needed:
      self.prefix_cache.evict(needed)
    try:
      self._slot_pages[slot] = shared + self.pages.allocate(needed)
    except paged.PoolExhausted:
      self.pages.free(shared)
      return False
    request.cached_tokens = len(shared) * self.page_size
    return True

  def _step(self) -> None:
    if not self.num_running:
      return
    self._state, tokens = generate(self.vlm.params, self.config, self._state)
    # The admitted requests' first tokens are ready before the step is: they go out while it runs.
    for (slot, _), first in zip(self._inserted, jax.device_get([first for _, first in self._inserted])):
      self._deliver(slot, int(first))
    tokens = jax.device_get(tokens)  # the step's one copy
    for slot, request in enumerate(self._slots):
      if request is not None:  # still running, a request admitted this round included
        self._deliver(slot, int(tokens[slot]))

  def _deliver(self, slot: int, token: int) -> None:
    """Hands a slot's new token to the detokenizer; frees the slot when the token ends the request."""
    request = self._slots[slot]
    request.num_decoded += 1
    reason = ("stop" if token in self.vlm.eos_token_ids else
              "length" if request.num_decoded >= request.max_tokens else None)
    if reason:  # freed first, so that a finished request's slot and pages are back when it is seen to end
      self._free(slot, None)
    self._to_detokenizer.put((request, token, reason))

  def _free(self, slot: int, reason: str | None) -> None:
    request, self._slots[slot] = self._slots[slot], None
    self._state = release(self._state, jnp.int32(slot))
    self.pages.free(self._slot_pages[slot])
    self._slot_pages[slot] = []
    if reason:
      self._to_detokenizer.put((request, None, reason))

  # The detokenizer thread.

  def _detokenize(self) -> None:
    while (item := self._to_detokenizer.get()) is not None:
      request, token, reason = item
      if request.done.is_set():  # ended already (a stop string), later tokens are dropped
        continue
      try:
        self._emit(request, token, reason)
      except Exception:  # a listener that fails (its client is gone) ends its own request only
        _log.exception("a request's listener or on_finish failed; cancelling the request")
        self.cancel(request)

  def _emit(self, request: Request, token: int | None, reason: str | None) -> None:
    now = time.monotonic()
    if token is not None:
      request.token_ids.append(token)
      request.first_token_at = request.first_token_at or now
    text = self.vlm.tokenizer.decode(request.token_ids)  # the whole text each time: merges may change the tail
    end = len(text)
    found = [index for index in (text.find(stop, max(0, len(request.text) - len(stop) + 1)) for stop in request.stop)
             if index >= 0]
    if found:
      end, reason = min(found), "stop"
    elif reason is None:
      end -= _undecided_tail(text, request.stop)
    new_text = text[len(request.text):end]
    request.text += new_text
    if reason == "error":
      request.error = f"the engine failed: {self.error}"
    if reason:
      request.finish_reason, request.finished_at = reason, now
      request.done.set()
    try:
      if request.listener is not None:
        request.listener(Output(text=new_text, token_ids=() if token is None else (token,), finish_reason=reason,
                                error=request.error))
    finally:
      if reason and self.on_finish is not None:
        self.on_finish(request)


def _undecided_tail(text: str, stops: tuple[str, ...]) -> int:
  """How many trailing characters to hold back: an incomplete UTF-8 character (U+FFFD), or the longest tail that
  may be the start of a stop string."""
  if text.endswith("\ufffd"):
    return 1
  for size in range(min(len(text), max(map(len, stops), default=1) - 1), 0, -1):
    if any(stop.startswith(text[-size:]) for stop in stops):
      return size
  return 0
