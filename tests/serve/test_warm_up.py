"""A warmed-up server compiles nothing while it serves: every program the engine calls for requests of 0 to
--max_images images, alone or in bursts, streamed, sampled, chunked or read from the prefix cache, was compiled
at start-up."""

import base64
import concurrent.futures
import http.client
import io

import numpy as np
import openai
import pytest
from PIL import Image

from vlmjax.infer.engine import Engine
from vlmjax.serve.server import Limits, create_app

MODEL = "tiny"
MAX_IMAGES = 2


@pytest.fixture(scope="module")
def warm_server(tiny_vlm, serve_app):
  # Prompts past 16 tokens are prefilled in pieces, and repeated ones read their start from the prefix cache: the
  # engine's every kind of call.
  app = create_app(tiny_vlm, MODEL, num_slots=2, max_len=48, limits=Limits(max_images=MAX_IMAGES), warm_up=True,
                   page_size=4, prefix_caching=True, prefill_chunk=16, prefill_budget=32)
  with serve_app(app) as port:
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)


def _image(seed: int) -> dict:
  pixels = np.random.default_rng(seed).integers(0, 256, (20 + seed, 24, 3), np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format="PNG")
  url = "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()
  return {"type": "image_url", "image_url": {"url": url}}


def _messages(images: int, words: int, seed: int) -> list[dict]:
  text = " ".join(["circle", "colour", "square", "left"][(seed + i) % 4] for i in range(words))
  return [{"role": "user", "content": [*(_image(seed + i) for i in range(images)), {"type": "text", "text": text}]}]


def test_no_compilation_while_serving_after_warm_up(warm_server, tiny_vlm, compilations):
  requests = [dict(images=images, words=words, seed=seed, stream=stream, temperature=temperature)
              for images in range(MAX_IMAGES + 1) for words in (1, 3, 8)
              for seed, stream, temperature in ((0, False, 0.0), (1, True, 0.9))]
  requests = [r for r in requests if _prompt_length(tiny_vlm, r) + 8 <= 48]
  assert {r["images"] for r in requests} == set(range(MAX_IMAGES + 1))
  assert max(_prompt_length(tiny_vlm, r) for r in requests) > 16  # some are prefilled in pieces
  with concurrent.futures.ThreadPoolExecutor(6) as pool:  # bursts: several prompts of a bucket prefilled together
    replies = list(pool.map(lambda r: _ask(warm_server, **r), requests * 2))
  # The same prompts again, one at a time: their starts come from the prefix cache.
  replies += [_ask(warm_server, **r) for r in requests]
  assert all(replies) and sum(compilations.values()) == 0, compilations
  greedy = [reply for reply, r in zip(replies, requests * 3) if r["temperature"] == 0.0]
  assert len(set(greedy)) > 1  # replies differ by prompt: the requests reached the model


def test_an_image_count_padded_to_its_bucket_gives_the_model_s_answer(tiny_vlm):
  images = [Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 24, 3), np.uint8)) for seed in range(3)]
  conversation = [{"role": "user", "content": [{"type": "image"}] * 3 + [{"type": "text", "text": "circle"}]}]
  engine = Engine(tiny_vlm, num_slots=1, max_len=48, page_size=4).start()
  try:  # three images, prefilled as four (the fourth all zeros, its embeddings not read)
    request = engine.submit(tiny_vlm.prompt_ids(conversation, 3), tiny_vlm.image_processor(images), max_tokens=6)
    assert request.wait(120).text == tiny_vlm.chat(conversation, images, max_new_tokens=6)
  finally:
    engine.stop()


def _prompt_length(vlm, request: dict) -> int:
  messages = _messages(request["images"], request["words"], request["seed"])
  parts = [{"type": "image"} if part["type"] == "image_url" else part for part in messages[0]["content"]]
  return len(vlm.prompt_ids([{"role": "user", "content": parts}], request["images"]))


def _ask(client, images: int, words: int, seed: int, stream: bool, temperature: float) -> str:
  settings = dict(model=MODEL, messages=_messages(images, words, seed), max_tokens=8, temperature=temperature,
                  seed=seed)
  if stream:
    return "".join(chunk.choices[0].delta.content or "" for chunk in
                   client.chat.completions.create(**settings, stream=True) if chunk.choices) or "(empty)"
  return client.chat.completions.create(**settings).choices[0].message.content or "(empty)"


def test_a_restarted_server_reads_its_programs_from_the_compilation_cache(tiny_vlm, tmp_path, serve_process):
  from vlmjax.interop import hf
  checkpoint, cache = str(tmp_path / "tiny"), tmp_path / "cache"
  hf.save_pretrained(checkpoint, tiny_vlm.config, tiny_vlm.params, tiny_vlm.tokenizer, tiny_vlm.image_processor,
                     tiny_vlm.eos_token_ids, tiny_vlm.pad_token_id, max_len=32)
  flags = ("--warm_up", "--max_images", "1", "--slots", "1", "--compilation_cache", str(cache))
  seconds = []
  for start in range(2):
    with serve_process(checkpoint, tmp_path / f"serve{start}.log", *flags) as (_, port):
      connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
      connection.request("GET", "/metrics")
      metrics = connection.getresponse().read().decode()
      seconds.append(float(next(line.split()[1] for line in metrics.splitlines()
                                if line.startswith("vlmjax_warm_up_seconds "))))
    if start == 0:
      assert any(cache.iterdir()), "the first start wrote no program to the cache"
  assert 0 < seconds[1] < 0.7 * seconds[0], seconds  # read, not compiled
