"""The engine serving models whose images give a token count each, LLaVA-NeXT (tiles) and Qwen2.5-VL (patches at each
image's own resolution, M-RoPE positions): requests with images of different sizes, submitted together or while others
decode, prefilled whole, in chunks, or after a prefix-cache hit, each decode as `VLM.generate_ids` decodes it alone;
warm-up for example image sizes, after which their requests compile nothing; and the OpenAI server answering chats with
images of mixed sizes as `VLM.chat` does, and refusing bad images with a 400. The tiny checkpoints are
test_llava_next.py's and test_qwen2_5_vl.py's (written by transformers)."""

import base64
import concurrent.futures
import dataclasses
import importlib
import io
import pathlib
import sys

import jax
import numpy as np
import openai
import pytest
from PIL import Image

import vlmjax
from vlmjax.infer.engine import Engine
from vlmjax.models import anyres, paged_cache, qwen_vl
from vlmjax.serve.server import Limits, create_app, warm_up_examples


def _interop_module(name: str):
  """A module of tests/interop, imported with that folder's conftest as `conftest` (its helpers import from it)."""
  sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "interop"))
  ours = sys.modules.pop("conftest", None)
  try:
    return importlib.import_module(name)
  finally:
    if ours is not None:
      sys.modules["conftest"] = ours
    sys.path.pop(0)


llava_next = _interop_module("test_llava_next")
qwen2_5_vl = _interop_module("test_qwen2_5_vl")
variable_tokens = _interop_module("variable_tokens")
WRITERS = {"llava_next": lambda directory: llava_next._write(llava_next.BACKBONES["llama"], "llama", directory),
           "qwen2_5_vl": lambda directory: qwen2_5_vl._write(directory, tie=False)}
MAX_LEN = 256
CHUNK = 48  # every image prompt below takes more than one piece in either family
# (height, width) per request: each its own token count (LLaVA-NeXT's pinpoint and unpadding, Qwen2.5-VL's grid); two
# images; none.
REQUESTS = [([(37, 52)], "What is in the picture?", 8), ([(61, 29)], "Describe the image in detail, please.", 6),
            ([], "The quick brown fox?", 8), ([(20, 90), (45, 45)], "Compare them.", 7),
            ([(83, 17)], "How many shapes are there?", 8)]


@pytest.fixture(scope="module", params=list(WRITERS))
def family(request) -> str:
  return request.param


@pytest.fixture(scope="module")
def vlm(family, tmp_path_factory):
  directory = str(tmp_path_factory.mktemp(family))
  WRITERS[family](directory)
  return vlmjax.load(directory)


def _count(vlm, size) -> int:
  """The placeholders of one processed image of size `size` (LLaVA-NeXT's (height, width), Qwen2.5-VL's grid)."""
  counting = qwen_vl if vlm.model_config.qwen_tower else anyres
  return counting.image_token_count(vlm.model_config, size)


def _prompt(vlm, sizes, question: str, seed: int):
  """(prompt ids int[T], the images as the processor makes them or None) of one user turn with its images first."""
  processed = vlm.image_processor(variable_tokens.images_of(sizes, seed)) if sizes else []
  counts = [_count(vlm, size) for _, size in processed]
  messages = [{"role": "user", "content": [{"type": "image"}] * len(sizes) + [{"type": "text", "text": question}]}]
  return vlm.prompt_ids(messages, len(sizes), counts), processed or None


def _alone(vlm, prompt_ids, images, max_tokens) -> list[int]:
  """The request decoded by itself through `VLM.generate_ids` (its own Tiles or Patches), cut after its end token."""
  batch = qwen_vl.batch_patches if vlm.model_config.qwen_tower else anyres.batch_tiles
  pixels = None if images is None else batch(vlm.model_config, [images])
  tokens = vlm.generate_ids(np.asarray([prompt_ids]), pixels, max_new_tokens=max_tokens)[0].tolist()
  ends = [i for i, token in enumerate(tokens) if token in vlm.eos_token_ids]
  return tokens[:ends[0] + 1] if ends else tokens


def _prompts(vlm, seed: int = 0):
  return [(*_prompt(vlm, sizes, question, seed + i), max_tokens)
          for i, (sizes, question, max_tokens) in enumerate(REQUESTS)]


def _check(vlm, requests, prompts) -> None:
  for request, (ids, images, max_tokens) in zip(requests, prompts):
    assert request.wait(120).token_ids == _alone(vlm, ids, images, max_tokens), [i.shape for i, _ in images or ()]


@pytest.mark.parametrize("prefill_chunk", [None, CHUNK])
def test_mixed_sizes_submitted_together_and_staggered_decode_as_if_alone(vlm, prefill_chunk):
  prompts = _prompts(vlm)
  assert len({len(ids) for ids, _, _ in prompts}) == len(prompts)  # every prompt its own length
  for ids, images, _ in prompts:
    # Chunked, an image prompt takes more than one piece: the first reaches past its images, the next come after
    # them (Qwen2.5-VL's at M-RoPE positions past the images', made without them).
    images_end = 1 + max((i for i, token in enumerate(ids) if token == vlm.model_config.image_token_id), default=-1)
    assert not images or len(ids) > max(CHUNK, images_end), (len(ids), images_end)
  engine = Engine(vlm, num_slots=3, max_len=MAX_LEN, prefill_chunk=prefill_chunk).start()
  try:
    together = [engine.submit(ids, images, max_tokens=max_tokens) for ids, images, max_tokens in prompts]
    _check(vlm, together, prompts)
    first = engine.submit(prompts[0][0], prompts[0][1], max_tokens=prompts[0][2])
    while len(first.decoded_ids) < 2 and not first.done.is_set():
      first.done.wait(0.01)
    staggered = [first] + [engine.submit(ids, images, max_tokens=max_tokens) for ids, images, max_tokens in
                           prompts[1:]]
    _check(vlm, staggered, prompts)
  finally:
    engine.stop()


def test_a_repeated_image_hits_the_prefix_cache(vlm):
  engine = Engine(vlm, num_slots=2, max_len=MAX_LEN, prefix_caching=True, page_size=8).start()
  try:
    first_turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in it?"}]}]
    follow_up = first_turn + [{"role": "assistant", "content": "A fox."},
                              {"role": "user", "content": "How many shapes are there?"}]
    asked = []
    for messages, seed in [(first_turn, 0), (follow_up, 0), (follow_up, 1)]:
      images = vlm.image_processor(variable_tokens.images_of([(37, 52)], seed))
      ids = vlm.prompt_ids(messages, 1, [_count(vlm, images[0][1])])
      asked.append((engine.submit(ids, images, max_tokens=6).wait(120), ids, images))
    for request, ids, images in asked:
      assert request.token_ids == _alone(vlm, ids, images, 6)
    # The follow-up on the same image reads the template and the image from the cache, not another image's (and
    # prefills the rest at the positions after the image's).
    assert asked[0][0].cached_tokens == 0
    assert asked[1][0].cached_tokens >= _count(vlm, asked[1][2][0][1])
    assert asked[2][0].cached_tokens == 0
  finally:
    engine.stop()


def test_a_preempted_request_decodes_on_as_if_alone(vlm):
  # Two image prompts whose pages fill the pool: the first one's next page preempts the second, which is prefilled
  # again after it with the tokens it had decoded (Qwen2.5-VL's at their cache slot + its M-RoPE offset).
  prompts = _prompts(vlm)[:2]
  num_pages = sum(paged_cache.pages_for(len(ids) + 1, 16) for ids, _, _ in prompts)
  engine = Engine(vlm, num_slots=2, max_len=MAX_LEN, num_pages=num_pages, page_size=16).start()
  try:
    with engine._condition:  # held: both admitted at once
      requests = [engine.submit(ids, images, max_tokens=16) for ids, images, _ in prompts]
    for request, (ids, images, _) in zip(requests, prompts):
      assert request.wait(120).token_ids == _alone(vlm, ids, images, 16)
    assert engine.num_preemptions > 0
  finally:
    engine.stop()


def test_a_placeholder_id_it_decoded_is_text_when_prefilled_again_after_a_preemption(vlm):
  # The same model with the placeholder id moved to the first token the preempted request decodes (the prompts'
  # placeholders take image embeddings, so the id's own embedding row is never read in a prompt and the model
  # decodes as before): that token is in the context prefilled again, where it must embed as text.
  prompts = _prompts(vlm)[:2]
  decoded = _alone(vlm, prompts[1][0], prompts[1][1], 16)
  placeholder, token = vlm.model_config.image_token_id, decoded[0]
  assert token not in [*prompts[0][0], *prompts[1][0], *vlm.eos_token_ids, vlm.pad_token_id]
  config = vlm.config.copy_and_resolve_references()
  with config.unlocked():
    config.model.image_token_id = token
  moved = dataclasses.replace(vlm, config=config)
  prompts = [([token if t == placeholder else t for t in ids], images, n) for ids, images, n in prompts]
  assert _alone(moved, prompts[1][0], prompts[1][1], 16) == decoded
  num_pages = sum(paged_cache.pages_for(len(ids) + 1, 16) for ids, _, _ in prompts)
  engine = Engine(moved, num_slots=2, max_len=MAX_LEN, num_pages=num_pages, page_size=16).start()
  try:
    with engine._condition:  # held: both admitted at once
      requests = [engine.submit(ids, images, max_tokens=16) for ids, images, _ in prompts]
    assert requests[1].wait(120).token_ids == decoded
    assert requests[0].wait(120).token_ids == _alone(moved, prompts[0][0], prompts[0][1], 16)
    assert engine.num_preemptions > 0
  finally:
    engine.stop()


def test_images_that_do_not_match_the_prompt_are_refused(vlm):
  engine = Engine(vlm, num_slots=1, max_len=MAX_LEN)
  ids, images = _prompt(vlm, [(37, 52)], "Hi", 0)
  other = vlm.image_processor(variable_tokens.images_of([(61, 29)]))
  with pytest.raises(ValueError, match="image placeholder tokens but 1 images need"):
    engine.submit(ids, other, max_tokens=2)
  with pytest.raises(ValueError, match="takes float32"):
    engine.submit(ids, [(images[0][0][:1], images[0][1])], max_tokens=2)


def _data_url(image: np.ndarray) -> str:
  out = io.BytesIO()
  Image.fromarray(image).save(out, format="PNG")
  return f"data:image/png;base64,{base64.b64encode(out.getvalue()).decode()}"


def test_the_server_answers_chats_with_images_of_mixed_sizes(vlm, family, serve_app):
  # Warm-up (of the programs without images, for these models) takes one path for both families: run for one.
  app = create_app(vlm, family, num_slots=2, max_len=MAX_LEN, warm_up=family == "qwen2_5_vl",
                   limits=Limits(max_images=2), prefix_caching=True, page_size=8, prefill_chunk=64)
  # One request with two sizes, and requests of other sizes at once, one of them without an image.
  chats = [((37, 52), (20, 90)), ((61, 29),), (), ((45, 45),)]
  with serve_app(app) as port:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)

    def ask(sizes):
      images = variable_tokens.images_of(sizes, seed=len(sizes))
      content = [{"type": "image_url", "image_url": {"url": _data_url(image)}} for image in images]
      reply = client.chat.completions.create(model=family, max_tokens=6, temperature=0, messages=[
          {"role": "user", "content": content + [{"type": "text", "text": "What is in the picture?"}]}])
      expected = vlm.chat([{"role": "user", "content": [{"type": "image"}] * len(images) + [
          {"type": "text", "text": "What is in the picture?"}]}], images, max_new_tokens=6)
      return reply.choices[0].message.content, expected, reply.usage.prompt_tokens

    with concurrent.futures.ThreadPoolExecutor(len(chats)) as pool:
      answers = list(pool.map(ask, chats))
    # An image that does not decode, and for Qwen2.5-VL one its processor refuses (a side over 200 times the
    # other), is a 400 naming it, as a fixed-size model's is.
    bad = [("data:image/png;base64,aGVsbG8=", "not a decodable PNG or JPEG")]
    if family == "qwen2_5_vl":
      bad.append((_data_url(variable_tokens.images_of([(1, 250)])[0]), "too elongated"))
    for url, message in bad:
      with pytest.raises(openai.BadRequestError, match=message) as refused:
        client.chat.completions.create(model=family, max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {"url": url}}]}])
      assert refused.value.body["param"] == "messages.0.content.1"
  for (text, expected, _), sizes in zip(answers, chats):
    assert text == expected, sizes
  assert len({prompt_tokens for _, _, prompt_tokens in answers}) == len(chats)  # each its own image tokens


def test_the_server_takes_an_image_at_low_and_high_detail(vlm, family, serve_app):
  if family == "qwen2_5_vl":  # the tiny model's max_pixels is the low detail's 64 tokens: served with twice that
    size = vlm.image_processor.size
    vlm = dataclasses.replace(vlm, image_processor=dataclasses.replace(
        vlm.image_processor, size={**size, "longest_edge": 2 * size["longest_edge"]}))
  low_vlm = dataclasses.replace(vlm, image_processor=vlm.image_processor.at_detail("low"))
  app = create_app(vlm, family, num_slots=2, max_len=MAX_LEN, prefix_caching=True, page_size=8)
  # LLaVA-NeXT: a 2x2 grid of tiles, at low a 2x1 one; Qwen2.5-VL: 110 tokens, at low 56.
  image = variable_tokens.images_of([(100, 90)], seed=3)[0]
  messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
  with serve_app(app) as port:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)

    def ask(detail):
      image_url = {"url": _data_url(image), **({"detail": detail} if detail else {})}
      return client.chat.completions.create(model=family, max_tokens=6, temperature=0, messages=[
          {"role": "user", "content": [{"type": "image_url", "image_url": image_url}, messages[0]["content"][1]]}])

    # In turn: no detail, high (its pages from the cache), low (none of them), low again (its own).
    absent, high, low, low_again = [ask(detail) for detail in (None, "high", "low", "low")]
    with pytest.raises(openai.BadRequestError, match="image_url.detail") as refused:
      ask("medium")
    assert refused.value.body["param"] == "messages.0.content.0.image_url.detail"
  for reply, reference in [(absent, vlm), (high, vlm), (low, low_vlm), (low_again, low_vlm)]:
    assert reply.choices[0].message.content == reference.chat(messages, [image], max_new_tokens=6)
    processed = reference.image_processor([image])
    assert reply.usage.prompt_tokens == len(reference.prompt_ids(messages, 1, [_count(vlm, processed[0][1])]))
  assert low.usage.prompt_tokens < high.usage.prompt_tokens == absent.usage.prompt_tokens
  # The prefix cache keys an image by its processed pixels and size: low and high share no page.
  cached = [reply.usage.prompt_tokens_details.cached_tokens for reply in (absent, high, low, low_again)]
  assert cached[0] == 0 and cached[1] > 0 and cached[2] == 0 and cached[3] > 0, cached


def test_warm_up_with_example_sizes_compiles_the_prefills_their_requests_take(vlm, compilations):
  # Warmed for one size at every detail: requests of that size, in a burst (prefilled together) and at low detail,
  # and one without images, compile nothing, and the burst decodes as if alone; an image of another size compiles
  # on first use. Whole prefills only (no chunks, no prefix cache) and few page-table widths: fewer programs.
  size, other = (61, 29), (37, 52)  # the other one more tile or window bucket
  jax.clear_caches()  # what this file compiled before: every program the requests take is the warm-up's
  engine = Engine(vlm, num_slots=2, max_len=96, page_size=16, prefill_chunk=None)
  examples = warm_up_examples(vlm, [size])
  # LLaVA-NeXT tiles a low-detail image at its smallest pinpoint; this size gives Qwen2.5-VL's grid at either detail.
  assert len(examples) == (1 if vlm.model_config.qwen_tower else 2)
  engine.warm_up(1, examples)
  prompts = [(*_prompt(vlm, [size], "What is in the picture?", 0), 4), (*_prompt(vlm, [size], "Describe it.", 1), 4),
             (*_prompt(vlm, [], "The quick brown fox?", 2), 4)]
  low_images = vlm.image_processor.at_detail("low")(variable_tokens.images_of([size], 3))
  low_ids = vlm.prompt_ids([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Small?"}]}],
                           1, [_count(vlm, low_images[0][1])])
  prompts.append((low_ids, low_images, 4))
  compiled_before = sum(compilations.values())
  engine.start()
  try:
    requests = [engine.submit(ids, images, max_tokens=max_tokens) for ids, images, max_tokens in prompts]
    for request in requests:
      request.wait(120)
    compiled_serving = sum(compilations.values()) - compiled_before
    ids, images = _prompt(vlm, [other], "And this?", 4)
    before_other = sum(compilations.values())
    engine.submit(ids, images, max_tokens=2).wait(120)
    compiled_other = sum(compilations.values()) - before_other
  finally:
    engine.stop()
  assert compiled_serving == 0, compilations
  assert compiled_other > 0  # the size not warmed compiles its prefill
  _check(vlm, requests[:2], prompts[:2])


def test_the_server_warms_up_for_the_sizes_it_is_given_at_every_detail(vlm, serve_app, monkeypatch):
  # What the app hands `Engine.warm_up` (recorded, not compiled): the sizes as the processor makes them at each
  # detail, one per distinct result.
  app = create_app(vlm, "m", num_slots=1, max_len=MAX_LEN, warm_up=True, limits=Limits(max_images=3),
                   warm_up_image_sizes=[(61, 29), (20, 90)])
  calls = []
  monkeypatch.setattr(app.state.engine, "warm_up", lambda *args: calls.append(args) or 0.0)
  with serve_app(app):
    pass
  (max_images, examples), = calls
  expected = {}  # (size, pixel shape) of each size at each detail, the first of each size
  for size in ((61, 29), (20, 90)):
    for detail in ("auto", "low", "high"):
      (pixels, processed_size), = vlm.image_processor.at_detail(detail)(variable_tokens.images_of([size]))
      expected.setdefault(tuple(processed_size), pixels.shape)
  assert max_images == 3
  assert [(tuple(size), pixels.shape) for pixels, size in examples] == list(expected.items())
  assert len(examples) == (2 if vlm.model_config.qwen_tower else 4)  # LLaVA-NeXT's low detail tiles apart
