"""Continuous batching: a fixed number of decode slots on device, refilled as requests end.

    engine = Engine(vlm, num_slots=32, max_len=2048, num_pages=1024)
    engine.start()
    request = engine.submit(prompt_ids, pixel_values, max_tokens=64, temperature=0.7, seed=1)
    request.wait().text

The jitted calls (in `slots.py`), as JAX serving engines (JetStream) split the work:
  `prefill`        the prompts admitted together (their images encoded) into a cache of their length bucket, in
                   one call per bucket; one compilation per bucket and batch size.
  `prefill_chunk`  a piece of a prompt straight into its slot's pages, attending over the pieces before it.
  `insert`         a prefilled prompt into a free slot of the batched `SlotState`, with the slot's first token,
                   sampling settings and PRNG key, while the other slots keep their place.
  `add_pages`      new pages into the page-table rows of the slots whose sequences grow into them.
  `set_allowed`    the tokens each constrained slot may sample next (a JSON schema's grammar, `constrained.py`).
  `generate`       one token for every slot, reading as much of the page table as the longest sequence needs,
                   with each token's log-probability and the likeliest alternatives (copied only when asked for).
The engine thread loops: drop the requests that ended → give pages to the sequences about to grow past theirs
(preempting if need be) → admit → prefill → dispatch `generate` → copy the inserted requests' first tokens
(ready before the step is) → one host copy of the step's tokens. A constrained request's first token is copied
before the step instead: its grammar needs it to say what may come next. Which request holds which slot and pages,
and what each iteration prefills, is `scheduler.Scheduler`'s host-side bookkeeping; this module makes the device
calls. A second thread detokenizes, checks stop strings and hands each request's new text to its listener while
the next step runs. `warm_up` compiles every program before the engine starts (`warm_up.py`).

Pages (`paged_cache.PagedKVCache`): a request is admitted when a slot is free and the pool has the pages of its prompt
(and of its first generated token, when the prompt ends on a page boundary); requests the pool cannot hold yet
wait in the queue, first come first served. Before each step, a decoding sequence whose next token falls past
its pages takes one more from the pool (a small update of its page-table row on device). When the pool has none,
prefix-cache entries nobody uses go first, then the most recently admitted request is preempted: its pages are
freed and it goes back to the front of the queue, to be prefilled again with the tokens it had generated
(recompute preemption; it keeps its PRNG key, and nothing it streamed is streamed again). Its greedy output is
the one it would have had without the preemption. With short requests, far more slots fit the memory a
[slots, max_len] cache would take.

Prefill: a prompt of at most `prefill_chunk` tokens past what the prefix cache holds of it is prefilled in one
call, in the loop iteration that admits it, together with the other prompts of its bucket admitted then. A
longer one is prefilled in chunks of `prefill_chunk` tokens, each written into the slot's pages and attending
over the chunks before it, one chunk per loop iteration (of the earliest admitted such prompt): the decoding
slots take a step between chunks instead of stalling behind a long prompt. Its images are encoded whole, in the
first chunk, which reaches past the last of them. The greedy tokens are those of a whole-prompt prefill.
Prefix-LM prompts attend bidirectionally and are prefilled whole. One iteration prefills at most
`prefill_budget` prompt tokens, the earliest admitted first; the rest wait, admitted, for the next iteration.

Images with a token count each (LLaVA-NeXT's `image_grid_pinpoints`, Qwen2.5-VL's own resolutions): a request
carries its images as the image processor makes them, (tiles, size) or (patches, grid) each, its placeholders
expanded to each image's count. Each prefill call lays out the `Tiles` or `Patches` of the prompts it holds
(`slots.image_input`): their tiles or windows padded to a bucket, each row's image tokens indexed within its prompt
bucket, so the programs follow the prompt bucket, the batch and the tile or window bucket. Chunked prefill (the
images in the first piece) and the prefix cache (keyed by the processed pixels, so by the image and the processor's
settings) take them as they take fixed-size images. Qwen2.5-VL's M-RoPE positions are made on the host from a
context's tokens and its images' grids (`slots.context_positions`), so that a piece after the images takes its
positions without them; each slot holds its offset, which its decode steps add to the cache slot.
"""

import logging
import os
import queue
import threading
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vlmjax.infer import admission, paged
from vlmjax.infer import generate as generation
from vlmjax.infer.prefix_cache import PrefixCache, page_keys
from vlmjax.infer.requests import Constraint, Output, Request, TokenLogprob
from vlmjax.infer.sampling import SamplingParams, TokenScores
from vlmjax.infer.scheduler import Scheduler
from vlmjax.infer import warm_up as warm_up_lib
from vlmjax.infer.slots import (Prefix, add_pages, allowed_words, context_positions, generate, image_bucket, init_state,
                                insert, prefill, prefill_chunk, prefill_rows, release, set_allowed)
from vlmjax.models import paged_cache

_log = logging.getLogger(__name__)
DEFAULT_MAX_LEN = 2048  # a slot's context when neither the caller nor the checkpoint states one
DEFAULT_PREFILL_CHUNK = 256  # prompt tokens per prefill call; a longer prompt is prefilled between decode steps
# Prompt tokens prefilled per loop iteration at most (one call always goes): the most a burst of new prompts delays
# the running streams' next token by.
DEFAULT_PREFILL_BUDGET = 1024
# A decode step reads the page table's first columns only, as many as the longest sequence needs rounded up to
# the next of READ_WIDTHS equal steps of a slot's table (one compilation each): its gather and attention follow
# the tokens held, not the slots' context.
READ_WIDTHS = 8


class QueueFull(RuntimeError):
  """The waiting queue holds `max_waiting` requests already: the client should come back later."""


class Engine:
  """Continuous batching over `num_slots` slots of `max_len` tokens (prompt + generated) each, whose keys and
  values share a pool of `num_pages` pages of `page_size` tokens (default: the memory of a [num_slots, max_len]
  cache in the compute dtype, `paged.default_num_pages`: every slot full, and with an INT8 cache more pages in the same
  bytes, which the prefix cache keeps), taken as the sequences grow. Prompts longer than
  `prefill_chunk` tokens (None: no limit) are prefilled in chunks of that many, between decode steps, and each
  loop iteration prefills at most `prefill_budget` prompt tokens (None: every admitted prompt at once). With
  `prefix_caching` (causal models), requests that start with the same images and tokens share the full pages of
  that prefix (`prefix_cache.PrefixCache`). With `static_batching` the slots are filled only when all of them
  are free (the baseline continuous batching is measured against, in tools/bench_serve.py). Decode steps attend
  through `attention_kernel` (one of `paged_cache.KERNELS`, None: the gather; "auto": the Pallas kernel of this
  platform, where JAX ships one), in Pallas' interpreter with `interpret_kernel` (tests on the CPU). At most
  `max_waiting` requests wait for a slot (None: no limit); `submit` raises QueueFull past that.

  `on_finish(request)` is called (from the detokenizer thread) once per request as it ends, for metrics.
  `num_preemptions` counts the requests preempted for want of pages.
  """

  def __init__(self, vlm, num_slots: int = 8, max_len: int | None = None,
               on_finish: Callable[[Request], None] | None = None, *, num_pages: int | None = None,
               page_size: int = paged_cache.DEFAULT_PAGE_SIZE, prefix_caching: bool = False,
               static_batching: bool = False,
               prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK, prefill_budget: int | None = DEFAULT_PREFILL_BUDGET,
               attention_kernel: str | None = "auto", interpret_kernel: bool = False, max_waiting: int | None = None):
    if num_slots < 1:
      raise ValueError(f"num_slots must be at least 1, got {num_slots}")
    if prefill_chunk is not None and prefill_chunk < 1:
      raise ValueError(f"prefill_chunk must be at least 1 token (or None: each prompt whole), got {prefill_chunk}")
    if prefill_budget is not None and prefill_budget < 1:
      raise ValueError(f"prefill_budget must be at least 1 token (or None: no limit), got {prefill_budget}")
    self.vlm, self.num_slots, self.on_finish, self.page_size = vlm, num_slots, on_finish, page_size
    self.static_batching, self.prefill_chunk, self.max_waiting = static_batching, prefill_chunk, max_waiting
    self.config = vlm.model_config
    self.max_len = max_len or vlm.max_len or DEFAULT_MAX_LEN
    self.buckets = tuple(b for b in generation.BUCKETS if b < self.max_len) + (self.max_len,)
    self.error: BaseException | None = None
    self.failed = threading.Event()  # set when the engine thread stops on an error
    self.pages = paged.PageAllocator(num_pages or paged.default_num_pages(self.config, num_slots, self.max_len,
                                                                            page_size))
    if attention_kernel == "auto":
      attention_kernel = paged_cache.kernel_for(jax.default_backend())
    self._state = init_state(self.config, num_slots, self.max_len, self.pages.num_pages, page_size,
                             attention_kernel, interpret_kernel)
    table_width = self._state.cache.page_table.shape[1]
    self._read_widths = sorted({-(-table_width * step // READ_WIDTHS) for step in range(1, READ_WIDTHS + 1)})
    if prefix_caching and self.config.prefix_lm:
      raise ValueError("prefix caching needs a causal model: under a prefix-LM mask a prompt's keys depend on "
                       "the tokens after them")
    self.prefix_cache = PrefixCache(self.pages) if prefix_caching else None
    # A prefix-LM prompt attends bidirectionally: its keys need all of it at once.
    self._scheduler = Scheduler(num_slots, self.pages, page_size, self.prefix_cache,
                                None if self.config.prefix_lm else prefill_chunk, prefill_budget,
                                whole_image_prompts=self.config.fastv is not None)
    # (slot, first token, its TokenScores) of the requests inserted this round
    self._inserted: list[tuple[int, jax.Array, TokenScores]] = []
    self._unconstrained = np.full((allowed_words(self.config.decoder.vocab_size),), -1, np.int32)
    self._condition = threading.Condition()
    self._accepting = self._stopping = False
    self._to_detokenizer: queue.SimpleQueue = queue.SimpleQueue()
    self._threads = [threading.Thread(target=self._run, name="engine", daemon=True),
                     threading.Thread(target=self._detokenize, name="detokenizer", daemon=True)]

  @property
  def num_running(self) -> int:
    return self._scheduler.num_running

  @property
  def num_waiting(self) -> int:
    return len(self._scheduler.waiting)

  @property
  def num_preemptions(self) -> int:
    return self._scheduler.num_preemptions

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
        for request in self._requests():
          request.cancelled = True
      self._condition.notify_all()
    for thread in self._threads:
      if thread.is_alive():
        thread.join(timeout)

  def submit(self, prompt_ids: Sequence[int], pixel_values: np.ndarray | None = None, *,
             max_tokens: int | None = None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int | None = None, stop: Sequence[str] = (), logprobs: int | None = None,
             constraint: Constraint | None = None, listener: Callable[[Output], None] | None = None) -> Request:
    """Queues one request; ValueError when it cannot run (too long, bad settings, images not matching).

    Args:
      prompt_ids: int[T], image placeholders expanded (as `VLM.prompt_ids` gives them).
      pixel_values: float32[I, H, W, 3] normalized images, one per placeholder run, or None; for a model whose
        images give a token count each, what its image processor makes of them, their placeholders expanded to
        each one's count: LLaVA-NeXT's (tiles float32[n, S, S, 3], (height, width)) per image
        (`anyres.image_token_count`), Qwen2.5-VL's (patches float32[t·h·w, 3·T·p·p], grid (t, h, w))
        (`qwen_vl.image_token_count`).
      max_tokens: tokens to generate at most (default: the rest of the slot's context).
      seed: the request's PRNG seed (default: random); with the same seed a request samples what
        `VLM.generate_ids(..., seed=seed)` samples for it alone.
      stop: strings that end the generation; the text is cut before them.
      logprobs: None, or report each generated token's log-probability with this many (0 to MAX_TOP_LOGPROBS)
        of the most likely tokens (`Request.logprobs`, `Output.logprobs`).
      constraint: what the request may generate (a JSON schema's grammar, `constrained.py`); it samples among the
        tokens its `allowed()` gives at each step.
      listener: called from the detokenizer thread with each Output (new text as it becomes final).
    """
    prompt_ids = [int(token) for token in prompt_ids]
    max_tokens = self.check_fits(len(prompt_ids), max_tokens)
    admission.check_sampling(self.config.decoder.vocab_size, top_k, logprobs, stop)
    pixel_values = admission.checked_images(self.vlm, prompt_ids, pixel_values)
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    images_end = 1 + max((i for i, token in enumerate(prompt_ids) if token == self.config.image_token_id), default=-1)
    request = Request(prompt_ids, pixel_values, images_end, max_tokens,
                      SamplingParams.fill(1, temperature, top_k, top_p), jax.random.key(seed), tuple(stop), listener,
                      logprobs, constraint)
    with self._condition:
      if not self._accepting:
        raise RuntimeError("the engine is not accepting requests: it is stopping or has failed"
                           + (f" ({self.error})" if self.error else ""))
      if self.max_waiting is not None and len(self._scheduler.waiting) >= self.max_waiting:
        raise QueueFull(f"{len(self._scheduler.waiting)} requests are waiting for a slot already; try again later")
      self._scheduler.waiting.append(request)
      self._condition.notify_all()
    return request

  def check_fits(self, prompt_length: int, max_tokens: int | None) -> int:
    """The tokens a prompt of `prompt_length` tokens may generate: `max_tokens`, or the rest of the context when
    None. PromptTooLong when they do not fit a slot's context or the pool; ValueError for no prompt or tokens."""
    return admission.tokens_to_generate(prompt_length, max_tokens, self.max_len, self.page_size,
                                        self.pages.num_pages)

  def warm_up(self, max_images: int = 0, examples: Sequence = ()) -> float:
    """Compiles every program serving prompts of up to `max_images` images can call, before `start`; returns the
    seconds it took (`warm_up.py`). A model whose images give a token count each compiles its prefills with images
    for the `examples` (images as `submit` takes them, e.g. `vlm.image_processor(images)`) only."""
    return warm_up_lib.warm_up(self, max_images, examples)

  def cancel(self, request: Request) -> None:
    """Ends a waiting or running request (finish_reason 'cancelled'); its slot is freed before the next step."""
    with self._condition:
      request.cancelled = True
      self._condition.notify_all()

  def _requests(self) -> list[Request]:
    """The waiting and running requests."""
    return [*self._scheduler.waiting, *(entry.request for entry in self._scheduler.slots if entry)]

  # The engine thread.

  def _run(self) -> None:
    try:
      while self._schedule():
        self._prefill(self._scheduler.to_prefill())
        self._step()
    except Exception as error:  # an XLA or model failure: every request ends with it, and health turns bad
      _log.exception("the engine failed")
      self.error = error
      with self._condition:
        self._accepting = False
        ended = self._requests()
        self._scheduler.waiting.clear()
        for slot in self._scheduler.by_admission():
          self._scheduler.free(slot)
      for request in ended:
        self._to_detokenizer.put((request, None, "error", None))
      self.failed.set()
    finally:
      self._to_detokenizer.put(None)

  def _schedule(self) -> bool:
    """Waits for work, drops the requests that ended, gives the growing sequences their next pages and fills free
    slots from the queue. False when stopped with nothing left to do."""
    self._inserted = []
    scheduler = self._scheduler
    with self._condition:
      self._condition.wait_for(lambda: scheduler.waiting or scheduler.num_running or self._stopping)
      self._drop_ended()
      self._grow()
      # Static batching (a baseline to measure against) fills the slots only once every one of them is free.
      if not self.static_batching or not scheduler.num_running:
        scheduler.admit()
      return bool(scheduler.num_running) or not (self._stopping and not scheduler.waiting)

  def _drop_ended(self) -> None:
    """Takes the cancelled requests, and those a stop string ended (the detokenizer set them done), out of the
    queue and the slots."""
    waiting = self._scheduler.waiting
    for request in [request for request in waiting if request.cancelled or request.done.is_set()]:
      waiting.remove(request)
      if request.cancelled:
        self._to_detokenizer.put((request, None, "cancelled", None))
    for slot, entry in enumerate(self._scheduler.slots):
      if entry is not None and (entry.request.cancelled or entry.request.done.is_set()):
        self._free(slot, "cancelled" if entry.request.cancelled else None)

  def _grow(self) -> None:
    """The scheduler's page growth on device: each preempted slot released (a decoding one's PRNG key kept, so
    that it samples on from there), and the new pages written into the page table in one call."""
    grown, preempted = self._scheduler.grow()
    for slot, entry in preempted:
      if entry.decoding:
        entry.request.key = jax.lax.dynamic_index_in_dim(self._state.keys, jnp.int32(slot), keepdims=False)
      self._state = release(self._state, jnp.int32(slot))
    if grown:
      updates = np.full((3, self.num_slots), self.num_slots, np.int32)  # padded with slot N: changes nothing
      updates[:, :len(grown)] = np.array(grown, np.int32).T  # slots, page-table columns, pages
      self._state = add_pages(self._state, *updates)

  def _prefill(self, calls: list[tuple[int, int]]) -> None:
    """This iteration's prefill calls, (slot, where the piece of its context ends) each. The contexts that none
    of is cached and one call holds whole go through `prefill` together, those of a bucket and image bucket in
    batches of `prefill_rows`; the others in pieces through `prefill_chunk`. A slot whose context is all in is
    inserted."""
    whole: dict[tuple[int, int], list[int]] = {}  # (bucket, image bucket) -> slots
    for slot, end in calls:
      entry = self._scheduler.slots[slot]
      if not entry.prefilled and end == len(entry.context_ids):
        pixel_values = entry.request.pixel_values
        group = (generation.bucket_length(end, self.buckets),
                 image_bucket(self.config, 0 if pixel_values is None else len(pixel_values)))
        whole.setdefault(group, []).append(slot)
      else:
        self._prefill_piece(slot, end)
    for (bucket, _), slots in whole.items():
      limit = prefill_rows(bucket, len(slots))
      for first in range(0, len(slots), limit):
        batch = slots[first:first + limit]
        prompts = [(entry.context_ids, entry.request.pixel_values, len(entry.request.prompt_ids))
                   for entry in (self._scheduler.slots[slot] for slot in batch)]
        prefix = prefill(self.vlm.params, self.config, prompts, bucket, self.vlm.pad_token_id,
                         prefill_rows(bucket, len(batch)))
        for row, slot in enumerate(batch):
          self._insert(slot, prefix, row)

  def _prefill_piece(self, slot: int, end: int) -> None:
    """The slot's context from what its pages hold up to `end`, into its pages; inserted once it is all in."""
    entry = self._scheduler.slots[slot]
    request, context, start = entry.request, entry.context_ids, entry.prefilled
    config = self.config
    pixel_values = request.pixel_values if start < request.images_end else None  # the images are in this piece
    bucket = generation.bucket_length(end - start, self.buckets)
    self._state, prefix = prefill_chunk(self.vlm.params, config, self._state, context[start:end], pixel_values,
                                        bucket, self.vlm.pad_token_id, self._page_row(slot),
                                        context_positions(config, context, request.pixel_values), start,
                                        len(request.prompt_ids))
    entry.prefilled = end
    if end == len(context):
      self._insert(slot, prefix, 0)

  def _insert(self, slot: int, prefix: Prefix, row: int) -> None:
    """Puts the slot's prefilled context (row `row` of `prefix`) into the decode batch (its first token is
    delivered after the step) and lists its full pages in the prefix cache."""
    entry = self._scheduler.slots[slot]
    request = entry.request
    allowed = self._unconstrained if request.constraint is None else request.constraint.allowed()
    self._state, first, scores = insert(prefix, jnp.int32(row), self._state, jnp.int32(slot), self._page_row(slot),
                                        request.sampling, request.key, jnp.int32(len(request.prompt_ids)), allowed)
    entry.prefilled = len(entry.context_ids)
    if self.prefix_cache is not None:
      keys = page_keys(entry.context_ids, request.pixel_values, self.page_size)
      self.prefix_cache.add(keys, entry.pages[:len(keys)])
    self._inserted.append((slot, first, scores))

  def _page_row(self, slot: int) -> np.ndarray:
    """int32[max_pages]: the slot's pages, then null pages."""
    pages = self._scheduler.slots[slot].pages
    row = np.full((self._state.cache.page_table.shape[1],), self.pages.num_pages, np.int32)
    row[:len(pages)] = pages
    return row

  def _step(self) -> None:
    slots = self._scheduler.slots
    # A constrained request's next tokens depend on its first: that one is copied and delivered before the step.
    self._deliver_inserted(lambda request: request.constraint is not None)
    decoding = [entry for entry in slots if entry is not None and entry.decoding]
    if not decoding:
      return
    if any(entry.request.constraint is not None for entry in decoding):
      allowed = np.tile(self._unconstrained, (self.num_slots, 1))
      for slot, entry in enumerate(slots):
        if entry is not None and entry.decoding and entry.request.constraint is not None:
          allowed[slot] = entry.request.constraint.allowed()
      self._state = set_allowed(self._state, allowed)
    # Every decoding sequence's pages, the one this step writes into included, lie within the width read.
    held = max(len(entry.pages) for entry in decoding)
    tokens, scores = self._generate(next(width for width in self._read_widths if width >= held))
    # The other inserted requests' first tokens are ready before the step is: they go out while it runs.
    self._deliver_inserted(lambda request: True)
    if any(entry.request.top_logprobs is not None for entry in decoding):
      tokens, scores = jax.device_get((tokens, scores))  # the step's one copy
    else:
      tokens, scores = jax.device_get(tokens), None
    for slot, entry in enumerate(slots):
      if entry is not None and entry.decoding:  # still running, a request inserted this round included
        self._deliver(slot, int(tokens[slot]), None if scores is None else _row(scores, slot))

  def _deliver_inserted(self, which: Callable[[Request], bool]) -> None:
    """Copies and delivers the first tokens of this round's inserted requests that `which` picks."""
    chosen = [which(self._scheduler.slots[slot].request) for slot, _, _ in self._inserted]
    picked = [item for item, pick in zip(self._inserted, chosen) if pick]
    self._inserted = [item for item, pick in zip(self._inserted, chosen) if not pick]
    # Their scores are copied only for the requests that asked for logprobs.
    wanted = [(first, scores if self._scheduler.slots[slot].request.top_logprobs is not None else None)
              for slot, first, scores in picked]
    for (slot, _, _), (first, scores) in zip(picked, jax.device_get(wanted)):
      self._deliver(slot, int(first), None if scores is None else _row(scores, 0))

  def _generate(self, width: int) -> tuple[jax.Array, TokenScores]:
    """One decode step reading the page table's first `width` columns: the step's tokens int32[N] and their
    TokenScores (on device)."""
    self._state, tokens, scores = generate(self.vlm.params, self.config, self._state,
                                           None if width == self._read_widths[-1] else width)
    return tokens, scores

  def _deliver(self, slot: int, token: int, scores: TokenLogprob | None) -> None:
    """Hands a slot's new token (with its log-probabilities) to the detokenizer; frees the slot when the token
    ends the request."""
    request = self._scheduler.slots[slot].request
    request.decoded_ids.append(token)
    if request.constraint is not None:
      request.constraint.advance(token)
    reason = ("stop" if token in self.vlm.eos_token_ids else
              "length" if len(request.decoded_ids) >= request.max_tokens else None)
    if reason:  # freed first, so that a finished request's slot and pages are back when it is seen to end
      self._free(slot, None)
    self._to_detokenizer.put((request, token, reason, scores if request.top_logprobs is not None else None))

  def _free(self, slot: int, reason: str | None) -> None:
    request = self._scheduler.free(slot).request
    self._state = release(self._state, jnp.int32(slot))
    if reason:
      self._to_detokenizer.put((request, None, reason, None))

  # The detokenizer thread.

  def _detokenize(self) -> None:
    while (item := self._to_detokenizer.get()) is not None:
      request, token, reason, scores = item
      if request.done.is_set():  # ended already (a stop string), later tokens are dropped
        continue
      try:
        self._emit(request, token, reason, scores)
      except Exception:  # a listener that fails (its client is gone) ends its own request only
        _log.exception("a request's listener or on_finish failed; cancelling the request")
        self.cancel(request)

  def _emit(self, request: Request, token: int | None, reason: str | None, scores: TokenLogprob | None) -> None:
    output = request.receive(token, reason, self.vlm.tokenizer.decode, self.error, scores)
    try:
      if request.listener is not None:
        request.listener(output)
    finally:
      if output.finish_reason and self.on_finish is not None:
        self.on_finish(request)


def _row(scores: TokenScores, row: int) -> TokenLogprob:
  """One row of host TokenScores."""
  return TokenLogprob(logprob=float(scores.chosen[row]), top=tuple(
      zip(scores.top_ids[row].tolist(), scores.top[row].tolist())))
