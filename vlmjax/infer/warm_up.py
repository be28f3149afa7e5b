"""Compiling, before a server starts, every program its engine can call (`Engine.warm_up`): no request waits behind a
compilation, and no stream stalls while one runs inside the engine loop.

What the engine compiles, and for what:
  prefill        (bucket, image bucket, rows): prompts prefilled whole, up to `prefill_chunk` tokens (every
                 bucket for a prefix-LM model), several of a bucket in one call;
  insert         (bucket, rows) of those calls, and one more for the last piece of a prompt prefilled in pieces;
  prefill_chunk  (bucket, image bucket): the pieces of prompts longer than `prefill_chunk`, the first reaching past
                 its images, and the rest of a prompt whose start is in the prefix cache;
  generate       each read width; add_pages, set_allowed and release; and the few eager calls of `submit` and of a
                 preemption;
  scoring        each bucket: the prompts whose own log-probabilities completions return (`echo`).
A model whose images give a token count each (LLaVA-NeXT, Qwen2.5-VL) gets every program but the prefills with images:
those follow the tile or window count of what is prefilled together as well (`slots._image_input`), and compile when
first called (one per prompt bucket, batch and tile or window bucket); `warm_up` logs that it leaves them out.
Synthetic prompts go through the engine's own methods, so each call has the argument types of a real one, into
slots whose page rows are all the null page (their keys and values are written nowhere); the slots are freed
after. A prompt of a bucket is as short as the bucket allows, so that as many as a real burst would be are
prefilled together. With JAX's persistent compilation cache (`runtime.use_compilation_cache`), a restarted server
reads the programs from disk instead of compiling them.
"""

import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from vlmjax.infer import scoring
from vlmjax.infer.requests import Request
from vlmjax.infer.sampling import SamplingParams
from vlmjax.infer.scheduler import Slot
from vlmjax.infer.slots import add_pages, prefill_rows, set_allowed

_log = logging.getLogger(__name__)


def warm_up(engine, max_images: int) -> float:
  """Compiles the engine's programs for prompts of up to `max_images` images; the seconds it took. Before
  `engine.start()` only: the engine thread must not run meanwhile."""
  if any(thread.is_alive() for thread in engine._threads):
    raise RuntimeError("warm_up runs before the engine starts")
  began = time.perf_counter()
  if engine.config.variable_image_tokens and max_images:
    _log.warning("warm-up compiles the prefills without images only: this model's images give a token count each "
                 "(image_grid_pinpoints or Qwen2.5-VL's own resolutions), and a prefill with images compiles when "
                 "first called, once per prompt bucket, batch and tile or window bucket")
    max_images = 0
  # What to compile depends on the prefix cache (`_pieces`): listed before it is set aside.
  whole, pieces = list(_whole_prefills(engine, max_images)), list(_pieces(engine, max_images))
  prefix_cache, engine.prefix_cache = engine.prefix_cache, None  # nothing synthetic is listed in it
  try:
    for images, length, prompts in whole:
      for slot in range(prompts):
        _place(engine, slot, length, images)
      engine._prefill([(slot, length) for slot in range(prompts)])
      _clear(engine)
    for images, length in pieces:
      _place(engine, 0, length, images)
      engine._prefill_piece(0, length)
      _clear(engine)
    for width in engine._read_widths:
      engine._generate(width)
    if not engine.config.prefix_lm:  # the prompts completions score with `echo`
      for bucket in engine.buckets:
        scoring.prompt_logprobs(engine.vlm.params, engine.config, [0] * _shortest(engine, bucket),
                                engine.vlm.pad_token_id, engine.buckets)
    padding = np.full((3, engine.num_slots), engine.num_slots, np.int32)  # changes nothing
    engine._state = add_pages(engine._state, *padding)
    engine._state = set_allowed(engine._state, np.tile(engine._unconstrained, (engine.num_slots, 1)))
    jax.lax.dynamic_index_in_dim(engine._state.keys, jnp.int32(0), keepdims=False)  # a preempted slot's key
    SamplingParams.fill(1, 0.5, 1, 0.5)  # submit's
    jax.random.key(0), jax.random.key(2**32 - 1)
    jax.block_until_ready(engine._state)
  finally:
    engine.prefix_cache = prefix_cache
  return time.perf_counter() - began


def _image_counts(engine, max_images: int) -> list[int]:
  """0, and the fewest images of each image bucket up to max_images' (1, 2, 3, 5, 9, ...; with FastV, whose image
  buckets are exact, every count)."""
  if engine.config.fastv is not None:
    return list(range(max_images + 1))
  counts, bucket = [0], 1
  while bucket // 2 + 1 <= max_images:
    counts.append(bucket // 2 + 1)
    bucket *= 2
  return counts


def _shortest(engine, bucket: int) -> int:
  """The shortest prompt of a bucket."""
  smaller = [b for b in engine.buckets if b < bucket]
  return (smaller[-1] if smaller else 0) + 1


def _whole_prefills(engine, max_images: int):
  """(images, prompt length, prompts) of each `prefill` and `insert` program: per image bucket and length bucket,
  the number of prompts that gives each batch size."""
  chunk, budget = engine._scheduler.prefill_chunk, engine._scheduler.prefill_budget
  longest = engine.max_len - 1 if chunk is None else min(chunk, engine.max_len - 1)
  for images in _image_counts(engine, max_images):
    for bucket in engine.buckets:
      length = max(_shortest(engine, bucket), _placeholders(engine, images), 1)
      if length > longest or length > bucket:
        continue
      together = engine.num_slots if budget is None else min(engine.num_slots, max(1, budget // length))
      seen = set()
      for prompts in range(1, together + 1):
        if prefill_rows(bucket, prompts) not in seen:
          seen.add(prefill_rows(bucket, prompts))
          yield images, length, prompts


def _pieces(engine, max_images: int):
  """(images, piece length) of each `prefill_chunk` program: pieces without images of every bucket up to the
  chunk's (a long prompt's pieces; the rest of a prompt after its cached start), and first pieces with images,
  from the chunk's bucket up to the context's (they reach past the prompt's last image)."""
  chunk = engine._scheduler.prefill_chunk
  if chunk is None and engine.prefix_cache is None:  # prefix-LM, or neither chunks nor a prefix cache
    return
  longest = engine.max_len - 1
  chunked = chunk is not None and longest > chunk
  for bucket in engine.buckets:
    length = _shortest(engine, bucket)
    if length <= min(chunk or longest, longest):
      yield 0, length
  if not chunked:
    return
  if engine.config.fastv is not None:  # FastV's prompts with images are prefilled whole
    return
  for images in _image_counts(engine, max_images)[1:]:
    for bucket in engine.buckets:
      length = max(_shortest(engine, bucket), chunk, _placeholders(engine, images))
      if length <= min(bucket, longest):
        yield images, length


def _placeholders(engine, images: int) -> int:
  """The placeholders of `images` synthetic images (of a fixed-count model, when there are any)."""
  return images * engine.config.tokens_per_image if images else 0


def _place(engine, slot: int, length: int, images: int) -> None:
  """A synthetic request of `length` tokens, its `images` placeholders first, in `slot` with no pages."""
  config = engine.config
  placeholders = _placeholders(engine, images)
  filler = 0 if config.image_token_id != 0 else 1
  prompt = [config.image_token_id] * placeholders + [filler] * (length - placeholders)
  pixel_values = None
  if images:  # of a fixed-count model only (Qwen2.5-VL's tower has no image size)
    size = config.vision.image_size
    pixel_values = np.zeros((images, size, size, 3), np.float32)
  request = Request(prompt, pixel_values, placeholders, 1, SamplingParams.fill(1), jax.random.key(0), (), None)
  engine._scheduler.slots[slot] = Slot(request, pages=[], context_ids=prompt, prefilled=0, chunked=False,
                                       admission=0)


def _clear(engine) -> None:
  """Frees the synthetic slots; drops their first tokens."""
  for slot, entry in enumerate(engine._scheduler.slots):
    if entry is not None:
      engine._free(slot, None)
  engine._inserted = []
