"""Compiling, before a server starts, every program its engine can call (`Engine.warm_up`): no request waits behind a
compilation, and no stream stalls while one runs inside the engine loop.

What the engine compiles, and for what:
  prefill        (bucket, image input, rows): prompts prefilled whole, up to `prefill_chunk` tokens (every bucket
                 for a prefix-LM model), several of a bucket in one call;
  insert         (bucket, rows) of those calls, and one more for the last piece of a prompt prefilled in pieces;
  prefill_chunk  (bucket, image input): the pieces of prompts longer than `prefill_chunk`, the first reaching past
                 its images, and the rest of a prompt whose start is in the prefix cache;
  generate       each read width; add_pages, set_allowed and release; and the few eager calls of `submit` and of a
                 preemption;
  scoring        each bucket: the prompts whose own log-probabilities completions return (`echo`).
The image input's shape is what a prefill follows (`slots.image_input`): a fixed-count model's images are padded to a
power of two (`slots.image_bucket`), so a few counts cover up to `max_images`. A model whose images give a token
count each (LLaVA-NeXT, Qwen2.5-VL) pads the tiles or windows of all the images prefilled together to a bucket, so
its programs follow the images' sizes, their count and how many prompts share the call: warm-up compiles the
prefills of prompts holding 1 to `max_images` copies of each example image it is given (what the image processor
makes of the sizes a deployment expects; `vlmjax serve --warm_up_image_sizes`), alone and in bursts of copies of
the prompt; other sizes compile when first called. Each distinct program is compiled once: synthetic calls are
listed with their program's key and the repeats dropped.
Synthetic prompts go through the engine's own methods, so each call has the argument types of a real one, into
slots whose page rows are all the null page (their keys and values are written nowhere); the slots are freed
after. A prompt of a bucket is as short as the bucket allows, so that as many as a real burst would be are
prefilled together. With JAX's persistent compilation cache (`runtime.use_compilation_cache`), a restarted server
reads the programs from disk instead of compiling them.
"""

import dataclasses
import logging
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vlmjax.data.variable_images import VariableImages
from vlmjax.infer import scoring
from vlmjax.infer.requests import Request
from vlmjax.infer.sampling import SamplingParams
from vlmjax.infer.scheduler import Slot
from vlmjax.infer.slots import add_pages, image_bucket, prefill_rows, set_allowed

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Images:
  """A synthetic prompt's images: its placeholders, and its pixel values as `Engine.submit` takes them (None
  without images)."""

  placeholders: int
  pixel_values: np.ndarray | list | None = None


def warm_up(engine, max_images: int, examples: Sequence = ()) -> float:
  """Compiles the engine's programs for prompts of up to `max_images` images; the seconds it took. `examples`: for
  a model whose images give a token count each, images as its image processor makes them ((tiles, size) or
  (patches, grid) each, as `Engine.submit` takes them), whose prefills of 1 to max_images copies a prompt are
  compiled too. Before `engine.start()` only: the engine thread must not run meanwhile."""
  if any(thread.is_alive() for thread in engine._threads):
    raise RuntimeError("warm_up runs before the engine starts")
  if examples and not engine.config.variable_image_tokens:
    raise ValueError("example images are for a model whose images give a token count each; this model's every "
                     "image gives the same tokens, and warm-up compiles its prefills with images without examples")
  began = time.perf_counter()
  if engine.config.variable_image_tokens and max_images and not examples:
    _log.warning("warm-up compiles the prefills without images only: this model's images give a token count each "
                 "(image_grid_pinpoints or Qwen2.5-VL's own resolutions), and a prefill with images compiles when "
                 "first called, once per prompt bucket, batch and tile or window bucket, unless example images "
                 "(vlmjax serve --warm_up_image_sizes) were given")
  image_sets = _image_sets(engine, max_images, examples)
  # What to compile depends on the prefix cache (`_pieces`): listed before it is set aside.
  whole, pieces = list(_whole_prefills(engine, image_sets)), list(_pieces(engine, image_sets))
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
  _log.info("warm-up: %d prefills of whole prompts and %d of pieces", len(whole), len(pieces))
  return time.perf_counter() - began


def _image_sets(engine, max_images: int, examples: Sequence) -> list[_Images]:
  """No images, then each count from 1 to max_images: zero images of the model's size (a fixed-count model), or
  that many copies of each example (a model whose images give a token count each)."""
  config, sets = engine.config, [_Images(0)]
  for count in range(1, max_images + 1):
    if not config.variable_image_tokens:
      size = config.vision.image_size
      sets.append(_Images(count * config.tokens_per_image, np.zeros((count, size, size, 3), np.float32)))
    for pixels, size in examples:
      sets.append(_Images(count * engine.vlm.image_token_count(size), [(pixels, size)] * count))
  return sets


def _program(engine, images: _Images, prompts: int, rows: int, bucket: int) -> tuple[int, int, int]:
  """The key of the prefill program that `prompts` copies of a prompt of `bucket` with these images take in a call
  of `rows` rows: the bucket, the rows and what the image input's shape follows (`slots.image_input`): the image
  bucket of a fixed-count model's images, the padded tiles or windows of all the call's images otherwise."""
  if images.pixel_values is None:
    return bucket, rows, 0
  if not engine.config.variable_image_tokens:
    return bucket, rows, image_bucket(engine.config, len(images.pixel_values))
  return bucket, rows, VariableImages(engine.config).padded_units(images.pixel_values * prompts)


def _shortest(engine, bucket: int) -> int:
  """The shortest prompt of a bucket."""
  smaller = [b for b in engine.buckets if b < bucket]
  return (smaller[-1] if smaller else 0) + 1


def _whole_prefills(engine, image_sets: list[_Images]):
  """(images, prompt length, prompts) of each `prefill` and `insert` program: per image set and length bucket, the
  number of prompts that gives each batch size (and, with a token count per image, each tile or window bucket)."""
  chunk, budget = engine._scheduler.prefill_chunk, engine._scheduler.prefill_budget
  longest = engine.max_len - 1 if chunk is None else min(chunk, engine.max_len - 1)
  seen = set()
  for images in image_sets:
    for bucket in engine.buckets:
      length = max(_shortest(engine, bucket), images.placeholders, 1)
      if length > longest or length > bucket:
        continue
      together = engine.num_slots if budget is None else min(engine.num_slots, max(1, budget // length))
      for prompts in range(1, together + 1):
        program = _program(engine, images, prompts, prefill_rows(bucket, prompts), bucket)
        if program not in seen:
          seen.add(program)
          yield images, length, prompts


def _pieces(engine, image_sets: list[_Images]):
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
      yield image_sets[0], length
  if not chunked:
    return
  if engine.config.fastv is not None:  # FastV's prompts with images are prefilled whole
    return
  seen = set()
  for images in image_sets[1:]:
    for bucket in engine.buckets:
      length = max(_shortest(engine, bucket), chunk, images.placeholders)
      program = _program(engine, images, 1, 1, bucket)
      if length <= min(bucket, longest) and program not in seen:
        seen.add(program)
        yield images, length


def _place(engine, slot: int, length: int, images: _Images) -> None:
  """A synthetic request of `length` tokens, its images' placeholders first, in `slot` with no pages."""
  config = engine.config
  filler = 0 if config.image_token_id != 0 else 1
  prompt = [config.image_token_id] * images.placeholders + [filler] * (length - images.placeholders)
  request = Request(prompt, images.pixel_values, images.placeholders, 1, SamplingParams.fill(1), jax.random.key(0),
                    (), None)
  engine._scheduler.slots[slot] = Slot(request, pages=[], context_ids=prompt, prefilled=0, chunked=False,
                                       admission=0)


def _clear(engine) -> None:
  """Frees the synthetic slots; drops their first tokens."""
  for slot, entry in enumerate(engine._scheduler.slots):
    if entry is not None:
      engine._free(slot, None)
  engine._inserted = []
