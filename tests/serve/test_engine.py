import threading

import numpy as np
import pytest

from vlmjax.infer import engine as engine_module
from vlmjax.infer.engine import Engine

MAX_LEN = 64


@pytest.fixture(scope="module")
def engine(tiny_vlm):
  engine = Engine(tiny_vlm, num_slots=3, max_len=MAX_LEN).start()
  yield engine
  engine.stop()


def _prompt(vlm, question: str, image_seed: int | None):
  """(prompt ids int[T], pixel values float32[1, H, W, 3] or None) of one user turn."""
  content = [{"type": "text", "text": question}]
  pixels = None
  if image_seed is not None:
    content.insert(0, {"type": "image"})
    image = np.random.default_rng(image_seed).integers(0, 256, (20, 24, 3), np.uint8)
    pixels = vlm.image_processor([image])
  return vlm.prompt_ids([{"role": "user", "content": content}], 0 if pixels is None else 1), pixels


def _alone(vlm, prompt_ids, pixels, max_tokens, **sampling) -> list[int]:
  """The request decoded by itself through `VLM.generate_ids`, cut after its end token."""
  tokens = vlm.generate_ids(np.asarray([prompt_ids]), None if pixels is None else pixels[None],
                            max_new_tokens=max_tokens, **sampling)[0].tolist()
  ends = [i for i, token in enumerate(tokens) if token in vlm.eos_token_ids]
  return tokens[:ends[0] + 1] if ends else tokens


def _submit_all(engine, vlm, specs):
  """Submits a request per (question, image seed or None, max_tokens) -> [(request, prompt ids, pixels)]."""
  submitted = []
  for question, seed, max_tokens in specs:
    ids, pixels = _prompt(vlm, question, seed)
    submitted.append((engine.submit(ids, pixels, max_tokens=max_tokens), ids, pixels))
  return submitted


def _assert_each_decodes_as_if_alone(vlm, submitted, timeout: float = 60) -> None:
  for request, ids, pixels in submitted:
    assert request.wait(timeout).token_ids == _alone(vlm, ids, pixels, request.max_tokens)


def _after_tokens(count: int):
  """A listener, and an event set once the request has produced `count` tokens."""
  reached, seen = threading.Event(), []

  def listener(output):
    seen.extend(output.token_ids)
    if len(seen) >= count or output.finish_reason:
      reached.set()

  return listener, reached


def test_staggered_requests_each_decode_as_if_alone(engine, tiny_vlm):
  specs = [("What colour is the circle?", 0, 21), ("How many triangles are there?", 1, 5),
           ("Describe the picture in detail.", None, 21), ("What colour?", 2, 5),
           ("Is the big square blue?", 3, 21), ("Hi", None, 5)]
  prompts = [_prompt(tiny_vlm, question, seed) for question, seed, _ in specs]
  assert len({len(ids) for ids, _ in prompts}) == len(specs)  # every prompt has its own length
  listener, first_is_decoding = _after_tokens(2)
  requests = [engine.submit(*prompts[0], max_tokens=specs[0][2], listener=listener)]
  first_is_decoding.wait(30)
  for (ids, pixels), (_, _, max_tokens) in zip(prompts[1:], specs[1:]):  # arriving while the first decodes
    requests.append(engine.submit(ids, pixels, max_tokens=max_tokens))
  for request, (ids, pixels), (_, _, max_tokens) in zip(requests, prompts, specs):
    request.wait(60)
    assert request.token_ids == _alone(tiny_vlm, ids, pixels, max_tokens), request.prompt_ids
    assert request.finish_reason == ("stop" if request.token_ids[-1] in tiny_vlm.eos_token_ids else "length")
  # Requests were inserted while others were decoding, and 6 requests shared 3 slots.
  assert any(a.first_token_at < b.first_token_at < a.finished_at for a in requests for b in requests)
  assert max(r.first_token_at for r in requests[3:]) > min(r.finished_at for r in requests[:3])
  assert engine.num_running == engine.num_waiting == 0


def test_prompts_admitted_together_are_prefilled_in_one_call_and_decode_as_if_alone(engine, tiny_vlm, monkeypatch):
  calls = []  # prompts per prefill call
  prefill = engine_module.prefill
  monkeypatch.setattr(engine_module, "prefill", lambda params, config, prompts, *args: calls.append(len(prompts))
                      or prefill(params, config, prompts, *args))
  specs = [("What colour is the circle?", 4, 9), ("How many triangles are there?", 5, 6), ("What colour?", 6, 9)]
  with engine._condition:  # the engine thread admits all three in one iteration: one call, a batch of 4 rows
    submitted = _submit_all(engine, tiny_vlm, specs)
  _assert_each_decodes_as_if_alone(tiny_vlm, submitted)
  assert calls == [3]


def test_decode_steps_through_the_pallas_gpu_kernel_decode_as_if_alone(tiny_vlm):
  # The kernel in Pallas' interpreter, on the CPU; its pool in the kernel's layout, prompts written into it.
  engine = Engine(tiny_vlm, num_slots=2, max_len=MAX_LEN, attention_kernel="pallas_gpu", interpret_kernel=True)
  assert engine._state.cache.kernel == "pallas_gpu"
  engine.start()
  specs = [("What colour is the circle?", 7, 9), ("Hi", None, 6), ("How many triangles are there?", 8, 7)]
  _assert_each_decodes_as_if_alone(tiny_vlm, _submit_all(engine, tiny_vlm, specs), timeout=120)
  engine.stop()


def test_seeded_sampling_matches_a_request_alone(engine, tiny_vlm):
  ids, pixels = _prompt(tiny_vlm, "What colour is the circle?", 5)
  requests = [engine.submit(ids, pixels, max_tokens=21, temperature=1.5, top_p=0.9, seed=seed) for seed in (7, 8)]
  for request, seed in zip(requests, (7, 8)):
    expected = _alone(tiny_vlm, ids, pixels, 21, temperature=1.5, top_p=0.9, seed=seed)
    assert request.wait(60).token_ids == expected
  assert requests[0].token_ids != requests[1].token_ids


def test_a_stop_string_ends_the_request_and_is_cut_from_the_text(engine, tiny_vlm):
  ids, pixels = _prompt(tiny_vlm, "What colour?", 4)
  free = engine.submit(ids, pixels, max_tokens=20).wait(60)
  assert free.text == tiny_vlm.tokenizer.decode(free.token_ids) and len(free.text) >= 6, free.text
  stop = free.text[3:5]
  stopped = engine.submit(ids, pixels, max_tokens=20, stop=["@@never@@", stop]).wait(60)
  assert stopped.text == free.text[:free.text.index(stop)]
  assert stopped.finish_reason == "stop" and len(stopped.token_ids) < len(free.token_ids)
  assert free.token_ids[:len(stopped.token_ids)] == stopped.token_ids


def test_cancelling_frees_the_slot_and_unqueues_a_waiting_request(engine, tiny_vlm):
  ids, _ = _prompt(tiny_vlm, "Hi", None)
  listener, decoding = _after_tokens(2)
  running = [engine.submit(ids, max_tokens=MAX_LEN - len(ids), listener=listener)]
  running += [engine.submit(ids, max_tokens=MAX_LEN - len(ids)) for _ in range(engine.num_slots - 1)]
  waiting = engine.submit(ids, max_tokens=3)
  decoding.wait(30)
  engine.cancel(waiting)
  for request in running:
    engine.cancel(request)
  for request in running + [waiting]:
    assert request.wait(30).finish_reason == "cancelled"
  assert waiting.token_ids == [] and len(running[0].token_ids) < MAX_LEN - len(ids)
  assert engine.num_running == engine.num_waiting == 0
  assert engine.submit(ids, max_tokens=4).wait(30).finish_reason in ("stop", "length")


def test_requests_that_cannot_run_are_refused(engine, tiny_vlm):
  ids, pixels = _prompt(tiny_vlm, "What colour is the circle?", 0)
  with pytest.raises(ValueError, match=rf"a prompt of {len(ids)} tokens plus max_tokens=40 does not fit the "
                     rf"context of {MAX_LEN} tokens"):
    engine.submit(ids, pixels, max_tokens=40)
  with pytest.raises(ValueError, match=r"the prompt holds 4 image placeholder tokens but 0 images need 0"):
    engine.submit(ids, None, max_tokens=4)
  with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 0.0"):
    engine.submit(ids, pixels, max_tokens=4, top_p=0.0)


def test_stopping_drains_running_and_waiting_requests(tiny_vlm):
  engine = Engine(tiny_vlm, num_slots=3, max_len=MAX_LEN).start()
  ids, _ = _prompt(tiny_vlm, "Hi", None)
  requests = [engine.submit(ids, max_tokens=8) for _ in range(5)]
  engine.stop(drain=True)
  assert [request.finish_reason in ("stop", "length") for request in requests] == [True] * 5
  with pytest.raises(RuntimeError, match="the engine is not accepting requests"):
    engine.submit(ids, max_tokens=2)


def test_an_engine_failure_ends_every_request_with_its_error(tiny_vlm, monkeypatch):
  submitted = threading.Event()

  def broken_step(*args):
    submitted.wait(30)
    raise RuntimeError("device lost")

  monkeypatch.setattr(engine_module, "generate", broken_step)
  engine = Engine(tiny_vlm, num_slots=3, max_len=MAX_LEN).start()
  ids, _ = _prompt(tiny_vlm, "Hi", None)
  requests = [engine.submit(ids, max_tokens=8) for _ in range(5)]  # some running, some waiting
  submitted.set()
  for request in requests:
    assert request.wait(30).finish_reason == "error" and request.error == "the engine failed: device lost"
  assert not engine.healthy and engine.num_running == engine.num_waiting == 0
  with pytest.raises(RuntimeError, match=r"not accepting requests: it is stopping or has failed \(device lost\)"):
    engine.submit(ids, max_tokens=2)
  engine.stop()


def test_with_short_prompts_the_memory_of_two_full_slots_holds_sixteen_requests_and_more_wait(tiny_vlm):
  # The memory of a [2, 256] cache, 32 pages of 16 tokens, for 18 slots. Each short request fits two pages.
  engine = Engine(tiny_vlm, num_slots=18, max_len=256, num_pages=2 * 256 // 16, page_size=16).start()
  prompts = [_prompt(tiny_vlm, question, None) for question in ("Hi", "What colour?", "Describe.")]
  assert all(len(ids) + 3 <= 32 for ids, _ in prompts), [len(ids) for ids, _ in prompts]
  with engine._condition:  # held: the engine thread sees the whole burst at once
    requests = [engine.submit(*prompts[i % 3], max_tokens=3 - i % 2) for i in range(18)]
  for i, request in enumerate(requests):
    assert request.wait(60).token_ids == _alone(tiny_vlm, *prompts[i % 3], 3 - i % 2)
  running, waited = requests[:16], requests[16:]
  assert max(r.first_token_at for r in running) < min(r.finished_at for r in running)  # 16 at once: 8x
  assert min(r.first_token_at for r in waited) > min(r.finished_at for r in running)  # waited for pages
  assert engine.pages.num_free == engine.pages.num_pages
  engine.stop()


def test_after_a_burst_with_cancels_every_page_is_back_in_the_pool(tiny_vlm):
  engine = Engine(tiny_vlm, num_slots=3, max_len=MAX_LEN, num_pages=6, page_size=16).start()
  ids, pixels = _prompt(tiny_vlm, "What colour is the circle?", 4)
  listener, decoding = _after_tokens(2)
  requests = [engine.submit(ids, pixels, max_tokens=MAX_LEN - len(ids), listener=listener)]
  requests += [engine.submit(ids, pixels, max_tokens=max_tokens) for max_tokens in (20, 3, 11, 9, 2, 25)]
  decoding.wait(30)
  for request in requests[::3]:  # the first while it decodes, later ones while they wait or decode
    engine.cancel(request)
  for request in requests:
    assert request.wait(60).finish_reason in ("stop", "length", "cancelled")
  assert requests[0].finish_reason == "cancelled"
  assert engine.num_running == engine.num_waiting == 0 and engine.pages.num_free == 6
  engine.stop()
  engine = Engine(tiny_vlm, num_slots=1, max_len=256, num_pages=6).start()
  with pytest.raises(ValueError, match=r"needs 9 pages of 16 tokens; the pool has 6"):
    engine.submit(ids, pixels, max_tokens=100)
  engine.stop()


def test_a_prefix_cache_hit_decodes_exactly_as_without_the_cache_and_frees_its_pages(tiny_vlm):
  # Pages of 4 tokens: the three prompts share their first 12 tokens (chat template and image), 3 pages.
  engine = Engine(tiny_vlm, num_slots=2, max_len=MAX_LEN, num_pages=24, page_size=4, prefix_caching=True).start()
  questions = ("What colour is the circle?", "How many triangles are there?", "What colour is the square?")
  prompts = [_prompt(tiny_vlm, question, 6) for question in questions]  # one image, three questions
  first = engine.submit(*prompts[0], max_tokens=9)
  first.wait(60)
  assert engine.prefix_cache.num_entries == len(prompts[0][0]) // 4
  encode = engine_module.prefill
  calls = []
  engine_module.prefill = lambda *args: calls.append(args) or encode(*args)  # counts whole-prompt prefills
  try:
    later = [engine.submit(ids, pixels, max_tokens=9) for ids, pixels in prompts[1:]]
    for request, (ids, pixels) in zip([first, *later], prompts):
      assert request.wait(60).token_ids == _alone(tiny_vlm, ids, pixels, 9)
  finally:
    engine_module.prefill = encode
  assert calls == []  # the later questions about the image skipped the vision encoder and the prompt's start
  cached = engine.prefix_cache.num_entries
  assert engine.pages.num_free + cached == 24
  engine.submit(*_prompt(tiny_vlm, "Hi", None), max_tokens=MAX_LEN - 20).wait(60)  # 15 pages: evicts for them
  assert engine.prefix_cache.num_entries < cached
  engine.prefix_cache.clear()
  assert engine.num_running == engine.num_waiting == 0 and engine.pages.num_free == 24
  engine.stop()


def test_static_batching_fills_the_slots_only_when_all_are_free(tiny_vlm, monkeypatch):
  engine = Engine(tiny_vlm, num_slots=2, max_len=MAX_LEN, static_batching=True)
  decoded_at_insert = []  # at each insert: the tokens decoded so far by each request holding a slot
  insert = engine_module.insert
  monkeypatch.setattr(engine_module, "insert", lambda *args: decoded_at_insert.append(
      [len(entry.request.decoded_ids) for entry in engine._scheduler.slots if entry is not None]) or insert(*args))
  engine.start()
  specs = [("What colour is the circle?", 0, 15), ("Hi", None, 3), ("How many triangles are there?", 1, 4)]
  _assert_each_decodes_as_if_alone(tiny_vlm, _submit_all(engine, tiny_vlm, specs))
  # Three requests, two slots: two rounds. Every insert found only requests of its own round in the slots (none
  # had decoded a token yet), although the short request's slot freed while the long one was decoding.
  assert len(decoded_at_insert) == 3 and all(count == 0 for counts in decoded_at_insert for count in counts)
  engine.stop()


def test_a_pool_too_small_for_every_request_at_once_preempts_and_each_decodes_as_if_alone(tiny_vlm):
  # 6 pages of 16 tokens. The first two prompts (43 and 37 tokens) take 3 pages each at admission and need a 4th
  # within a few tokens: the pool runs dry while they decode, and the later admitted one is preempted. Prefix
  # caching holds the full prompt pages too; a preempted request finds its own prompt's pages there.
  engine = Engine(tiny_vlm, num_slots=3, max_len=MAX_LEN, num_pages=6, page_size=16, prefix_caching=True).start()
  specs = [("Describe the picture in detail.", None, {}), ("What colour is the circle?", 0, dict(
      temperature=1.5, top_p=0.9, seed=7)), ("Is the big square blue?", 3, {})]
  prompts = [_prompt(tiny_vlm, question, seed) for question, seed, _ in specs]
  streamed = [[] for _ in specs]  # what each listener received
  with engine._condition:  # held: the engine thread sees the whole burst at once
    requests = [engine.submit(ids, pixels, max_tokens=21, listener=lambda output, seen=seen: seen.extend(
        output.token_ids), **sampling) for (ids, pixels), (_, _, sampling), seen in zip(prompts, specs, streamed)]
  for request, (ids, pixels), (_, _, sampling), seen in zip(requests, prompts, specs, streamed):
    expected = _alone(tiny_vlm, ids, pixels, 21, **sampling)
    assert request.wait(60).token_ids == seen == expected  # nothing streamed twice, the sampled one included
    assert request.text == tiny_vlm.tokenizer.decode(expected)
  assert engine.num_preemptions > 0
  assert [request.cached_tokens for request in requests] == [0, 32, 32]  # the preempted read their prompt's pages
  assert engine.num_running == engine.num_waiting == 0
  assert engine.pages.num_free + engine.prefix_cache.num_entries == 6
  engine.prefix_cache.clear()
  assert engine.pages.num_free == 6
  engine.stop()


@pytest.fixture(scope="module")
def chunking_engine(tiny_vlm):
  """Prompts prefilled in chunks of 8 tokens; the module engine's shapes otherwise (its compiled steps)."""
  engine = Engine(tiny_vlm, num_slots=3, max_len=MAX_LEN, prefill_chunk=8).start()
  yield engine
  engine.stop()


def _record_chunks(monkeypatch, record) -> list:
  """What `record(args)` says of each `prefill_chunk` call from now on."""
  calls, prefill_chunk = [], engine_module.prefill_chunk
  monkeypatch.setattr(engine_module, "prefill_chunk", lambda *args: calls.append(record(args)) or prefill_chunk(*args))
  return calls


def test_a_prompt_prefilled_in_chunks_decodes_as_if_prefilled_whole(chunking_engine, tiny_vlm, monkeypatch):
  ids, pixels = _prompt(tiny_vlm, "What colour is the circle?", 0)  # 37 tokens; image placeholders at 7..10
  chunks = _record_chunks(monkeypatch, lambda args: (args[-2], args[4] is not None))  # (start, with images)
  request = chunking_engine.submit(ids, pixels, max_tokens=21).wait(60)
  assert request.token_ids == _alone(tiny_vlm, ids, pixels, 21)
  # The first chunk reaches past the image, which is encoded in it; then 8 tokens a chunk.
  assert chunks == [(0, True), (11, False), (19, False), (27, False), (35, False)]
  assert chunking_engine.pages.num_free == chunking_engine.pages.num_pages


def test_running_requests_decode_between_the_chunks_of_a_long_prompt(chunking_engine, tiny_vlm, monkeypatch):
  running_ids, _ = _prompt(tiny_vlm, "Describe the picture in detail.", None)  # 43 tokens: 6 chunks
  long_ids, long_pixels = _prompt(tiny_vlm, "Is the big square blue?", 3)  # 41 tokens: 5 chunks
  with chunking_engine._condition:  # held: both admitted at once, the first one's chunks first
    running = chunking_engine.submit(running_ids, max_tokens=21)
    long = chunking_engine.submit(long_ids, long_pixels, max_tokens=5)
    chunks = _record_chunks(monkeypatch, lambda args: (args[-2], len(running.decoded_ids)))  # (start, decoded)
  assert long.wait(60).token_ids == _alone(tiny_vlm, long_ids, long_pixels, 5)
  assert running.wait(60).token_ids == _alone(tiny_vlm, running_ids, None, 21)
  assert [start for start, _ in chunks] == [0, 8, 16, 24, 32, 40, 0, 11, 19, 27, 35]
  decoded = [count for _, count in chunks[6:]]  # the running request's tokens at each of the long one's chunks
  assert decoded[0] > 0 and all(before < after for before, after in zip(decoded, decoded[1:])), decoded
