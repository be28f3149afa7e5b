"""The server as clients see it: the `openai` client and raw HTTP against uvicorn on a free loopback port."""

import base64
import http.client
import io
import json
import signal
import subprocess
import sys
import threading
import time
from typing import Callable

import jax
import numpy as np
import openai
import pytest
from PIL import Image

from vlmjax.serve.images import ImageLimits
from vlmjax.serve.server import Limits, create_app

KEY = "test-key"
MODEL = "tiny"
MAX_LEN = 64


@pytest.fixture(scope="module")
def server(tiny_vlm, tmp_path_factory, serve_app):
  image_dir = tmp_path_factory.mktemp("images")
  # Prefix caching on, in pages of 4 tokens: repeated images in these tests read their prompt's start from it.
  app = create_app(tiny_vlm, MODEL, num_slots=3, max_len=MAX_LEN, api_key=KEY, image_dir=str(image_dir),
                   limits=Limits(images=ImageLimits(max_bytes=32 * 1024)), page_size=4, prefix_caching=True)
  with serve_app(app) as port:
    yield {"port": port, "app": app, "image_dir": image_dir}
  assert not app.state.engine.healthy


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=f"http://127.0.0.1:{server['port']}/v1", api_key=KEY, max_retries=0, timeout=60)


def _png(seed: int, size=(20, 24)) -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format="PNG")
  return out.getvalue()


def _data_url(data: bytes, kind: str = "png") -> str:
  return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


def _chat(url: str, text: str = "What colour is the circle?", detail: str | None = None) -> list[dict]:
  image_url = {"url": url, **({"detail": detail} if detail else {})}
  return [{"role": "user", "content": [{"type": "image_url", "image_url": image_url}, {"type": "text", "text": text}]}]


def _post(port: int, path: str, body, key: str | None = KEY, method: str = "POST"):
  """(status, parsed JSON body) of a raw request; `body` is a dict, or bytes sent as they are."""
  connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
  headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
  connection.request(method, path, body if isinstance(body, bytes) else json.dumps(body), headers)
  response = connection.getresponse()
  status, data = response.status, response.read()
  connection.close()
  return status, json.loads(data)


def test_chat_with_an_image_plain_and_streaming(client, tiny_vlm):
  png = _png(0)
  messages = _chat(_data_url(png))
  reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0)
  expected = tiny_vlm.chat([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                             "text": "What colour is the circle?"}]}],
                           [Image.open(io.BytesIO(png))], max_new_tokens=5)
  assert reply.choices[0].message.content == expected and reply.choices[0].message.role == "assistant"
  assert reply.object == "chat.completion" and reply.model == MODEL and reply.id.startswith("chatcmpl-")
  assert reply.choices[0].finish_reason in ("stop", "length")
  prompt_tokens = len(tiny_vlm.prompt_ids([{"role": "user", "content": [{"type": "image"}, {
      "type": "text", "text": "What colour is the circle?"}]}], 1))
  assert reply.usage.prompt_tokens == prompt_tokens and 1 <= reply.usage.completion_tokens <= 5
  assert reply.usage.total_tokens == prompt_tokens + reply.usage.completion_tokens

  chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                               stream=True, stream_options={"include_usage": True}))
  assert chunks[0].choices[0].delta.role == "assistant"
  assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
  assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason
  assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
  assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_image_detail_changes_nothing_for_a_fixed_size_model(client):
  # Every image of a fixed-size model gives the same tokens: low, high and auto are the image as it comes.
  replies = [client.chat.completions.create(model=MODEL, messages=_chat(_data_url(_png(4)), detail=detail),
                                            max_tokens=5, temperature=0) for detail in (None, "low", "high", "auto")]
  assert len({(reply.choices[0].message.content, reply.usage.prompt_tokens) for reply in replies}) == 1
  assert all(reply.usage.prompt_tokens_details.cached_tokens > 0 for reply in replies[1:])  # the same pixels


def test_local_image_files_under_the_allowed_directory(client, server):
  path = server["image_dir"] / "circle.png"
  path.write_bytes(_png(1))
  by_path = client.chat.completions.create(model=MODEL, messages=_chat(str(path)), max_tokens=3, temperature=0)
  by_url = client.chat.completions.create(model=MODEL, messages=_chat(f"file://{path}"), max_tokens=3,
                                          temperature=0)
  inline = client.chat.completions.create(model=MODEL, messages=_chat(_data_url(_png(1))), max_tokens=3,
                                          temperature=0)
  assert by_path.choices[0].message.content == by_url.choices[0].message.content == inline.choices[0].message.content


def test_text_completions_and_model_listing(client):
  reply = client.completions.create(model=MODEL, prompt="What colour is the", max_tokens=6, temperature=0)
  assert reply.object == "text_completion" and reply.choices[0].finish_reason in ("stop", "length")
  assert 1 <= reply.usage.completion_tokens <= 6
  streamed = list(client.completions.create(model=MODEL, prompt="What colour is the", max_tokens=6, temperature=0,
                                            stream=True))
  assert "".join(c.choices[0].text for c in streamed) == reply.choices[0].text
  assert streamed[-1].choices[0].finish_reason == reply.choices[0].finish_reason
  assert [model.id for model in client.models.list()] == [MODEL]
  seeded = [client.completions.create(model=MODEL, prompt="Hi", max_tokens=8, temperature=1.5, seed=3).choices[0].text
            for _ in range(2)]
  assert seeded[0] == seeded[1]


GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
IMAGE = "messages.0.content.0"
BAD_REQUESTS = {  # body: (status, param, code)
    "malformed JSON": (b'{"model": "tiny", "messages": [', 400, None, "json_invalid"),
    "missing field": ({"model": MODEL}, 400, "messages", "missing"),
    "unknown field": ({**GOOD, "functions": []}, 400, "functions", "extra_forbidden"),
    "unknown model": ({**GOOD, "model": "gpt-4o"}, 404, "model", "model_not_found"),
    "undecodable image": ({**GOOD, "messages": _chat(_data_url(b"not an image"))}, 400, IMAGE, "invalid_image"),
    "invalid base64": ({**GOOD, "messages": _chat("data:image/png;base64,@@@")}, 400, IMAGE, "invalid_image"),
    "oversized image": ({**GOOD, "messages": _chat(_data_url(_png(2, size=(128, 128))))}, 400, IMAGE,
                        "image_too_large"),
    "remote image URL": ({**GOOD, "messages": _chat("https://example.com/cat.png")}, 400, IMAGE,
                         "remote_image_refused"),
    "file outside the image directory": ({**GOOD, "messages": _chat("/etc/hostname")}, 400, IMAGE, None),
    "prompt longer than the context": ({**GOOD, "messages": [{"role": "user", "content": "colour " * 60}]}, 400,
                                       "messages", "context_length_exceeded"),
    "max_tokens past the context": ({**GOOD, "max_tokens": MAX_LEN}, 400, "messages", "context_length_exceeded"),
    "unknown image detail": ({**GOOD, "messages": _chat(_data_url(_png(0)), detail="medium")}, 400,
                             f"{IMAGE}.image_url.detail", "literal_error"),
    "unknown content part": ({**GOOD, "messages": [{"role": "user", "content": [{"type": "video", "url": "x"}]}]}, 400,
                             IMAGE, "union_tag_invalid"),
    "temperature out of range": ({**GOOD, "temperature": 2.5}, 400, "temperature", "less_than_equal"),
    "top_p out of range": ({**GOOD, "top_p": 0}, 400, "top_p", "greater_than"),
    "max_tokens zero": ({**GOOD, "max_tokens": 0}, 400, "max_tokens", "greater_than_equal"),
    "n above the bound": ({**GOOD, "n": 17}, 400, "n", "less_than_equal"),
    "top_logprobs without logprobs": ({**GOOD, "top_logprobs": 2}, 400, None, "value_error"),
    "json_schema without a schema": ({**GOOD, "response_format": {"type": "json_schema"}}, 400, "response_format",
                                     "value_error"),
    "negative seed": ({**GOOD, "seed": -1}, 400, "seed", "greater_than_equal"),
    "role the template refuses": ({**GOOD, "messages": [{"role": "system", "content": "Be brief."}]}, 400,
                                  "messages", None),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, case):
  body, status, param, code = BAD_REQUESTS[case]
  got, reply = _post(server["port"], "/v1/chat/completions", body)
  assert got == status, reply
  assert set(reply["error"]) == {"message", "type", "param", "code"} and reply["error"]["message"], reply
  assert (reply["error"]["param"], reply["error"]["code"]) == (param, code), reply
  assert _post(server["port"], "/v1/chat/completions", GOOD)[0] == 200


def test_api_key_and_unknown_routes(server):
  port = server["port"]
  for key in (None, "wrong"):
    status, reply = _post(port, "/v1/chat/completions", GOOD, key=key)
    assert status == 401 and reply["error"]["code"] == "invalid_api_key"
  status, reply = _post(port, "/v1/embeddings", GOOD)
  assert status == 404 and reply["error"]["message"] == "no route POST /v1/embeddings"
  assert _post(port, "/health", b"", key=None, method="GET") == (200, {"status": "ok"})


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, client, monkeypatch):
  engine = server["app"].state.engine
  body = {**GOOD, "max_tokens": MAX_LEN - 24, "temperature": 0, "stream": True}
  whole = client.chat.completions.create(**{**body, "stream": False})
  assert whole.choices[0].finish_reason == "length"  # undisturbed, it would run all max_tokens
  cancelled_before = _cancelled_count(server)
  # Each wait is on an event, not on time, so a loaded machine changes only how long this takes. The engine's
  # decode steps wait until the server has cancelled the request, so that the tiny model cannot decode all
  # max_tokens (ending by its length) before the hang-up is noticed; the test hangs up once the request is decoding,
  # and reads /metrics once the engine has reported the request's end to them. 60 s bounds an event that never comes.
  decoding, cancelled = threading.Event(), threading.Event()
  cancel, step = engine.cancel, engine._step
  with monkeypatch.context() as patch:
    patch.setattr(engine, "cancel", lambda request: (cancel(request), cancelled.set()))
    patch.setattr(engine, "_step", lambda: (decoding.set(), cancelled.wait(60), step()))
    ended = _watch_ends(engine, patch)
    connection = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=60)
    connection.request("POST", "/v1/chat/completions", json.dumps(body),
                       {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    assert decoding.wait(60), "the engine never stepped the streamed request"
    assert engine.num_running == 1
    connection.close()  # hang up mid-stream
    assert cancelled.wait(60), "the server did not cancel the request of the client that hung up"
    assert [request.finish_reason for request in ended(1)] == ["cancelled"]
  assert engine.num_running == 0  # its slot is free
  assert _cancelled_count(server) == cancelled_before + 1
  assert client.chat.completions.create(**{**body, "stream": False}).choices[0].message.content == \
      whole.choices[0].message.content


def _watch_ends(engine, monkeypatch) -> Callable[[int], list]:
  """`ended(count)`: the first `count` requests submitted from now on whose end the engine has reported to the
  server's metrics, waiting (60 s at most) until there are that many.

  Why: the engine reports an end (`on_finish`, the metrics' observer) on its detokenizer thread after it has handed
  the last output to the server, so a client can hold its reply, and see the slot free, before /metrics counts
  the request; a test waits on this before it reads /metrics."""
  condition, reported, since, on_finish = threading.Condition(), [], time.monotonic(), engine.on_finish

  def observe(request):
    on_finish(request)
    if request.submitted_at >= since:
      with condition:
        reported.append(request)
        condition.notify_all()

  def ended(count: int) -> list:
    with condition:
      assert condition.wait_for(lambda: len(reported) >= count, timeout=60), (
          f"the engine reported {len(reported)} of {count} requests ended within 60 s")
      return reported[:count]

  monkeypatch.setattr(engine, "on_finish", observe)
  return ended


def _cancelled_count(server) -> float:
  """vlmjax_requests_finished_total{finish_reason="cancelled"}, 0 before the first cancelled request."""
  name = 'vlmjax_requests_finished_total{finish_reason="cancelled"}'
  return next((float(line.split()[1]) for line in _metrics(server).splitlines() if line.startswith(name + " ")), 0.0)


def _metrics(server) -> str:
  connection = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=60)
  connection.request("GET", "/metrics")
  return connection.getresponse().read().decode()


def _metric(text: str, name: str) -> float:
  return float(next(line for line in text.splitlines() if line.startswith(name + " ")).split()[1])


def test_metrics_count_requests_tokens_latencies_pages_and_prefix_hits(server, client, monkeypatch):
  engine = server["app"].state.engine
  ended = _watch_ends(engine, monkeypatch)  # /metrics is read once the requests' ends are counted
  client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, temperature=0)
  ended(1)
  text = _metrics(server)
  for name in ("vlmjax_requests_running 0.0", "vlmjax_requests_waiting 0.0", "vlmjax_time_to_first_token_seconds_count",
               "vlmjax_time_per_output_token_seconds_bucket", "vlmjax_generation_tokens_total",
               "vlmjax_prompt_tokens_total"):
    assert name in text
  assert _metric(text, "vlmjax_generation_tokens_total") >= 3
  assert _metric(text, "vlmjax_kv_pages_total") == engine.pages.num_pages
  assert _metric(text, "vlmjax_kv_pool_tokens") == engine.pages.num_pages * engine.page_size
  assert _metric(text, "vlmjax_kv_pool_bytes") == sum(leaf.nbytes for leaf in jax.tree.leaves(
      (engine._state.cache.k, engine._state.cache.v)))
  assert _metric(text, "vlmjax_kv_pages_used") == engine.pages.num_pages - engine.pages.num_free  # the cache's
  assert _metric(text, "vlmjax_preemptions_total") == engine.num_preemptions == 0  # a pool for every slot full
  hits = _metric(text, "vlmjax_prefix_cache_hits_total")
  messages = _chat(_data_url(_png(7)), "How many circles are there?")
  first, second = (client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0)
                   for _ in range(2))
  assert first.choices[0].message.content == second.choices[0].message.content
  ended(3)
  text = _metrics(server)
  assert _metric(text, "vlmjax_prefix_cache_hits_total") == hits + 1  # the second read the image's pages
  assert _metric(text, "vlmjax_prefix_cache_hit_tokens_total") > 0


def test_the_serve_command_checks_its_flags(tmp_path, tiny_vlm):
  run = lambda *args: subprocess.run([sys.executable, "-m", "vlmjax.cli", "serve", *args], capture_output=True,
                                     text=True, timeout=120)
  assert "vlmjax serve: --checkpoint PATH is required" in run("--api-key", "k").stderr
  assert run("--checkpoint", f"{tmp_path}/none").stderr.startswith(f"vlmjax serve: {tmp_path}/none is not a directory")
  assert "--warm_up_image_sizes takes WIDTHxHEIGHT sizes such as 1280x720, got '1280by720'" in run(
      "--checkpoint", f"{tmp_path}/none", "--warm_up_image_sizes", "640x480,1280by720").stderr
  with pytest.raises(ValueError, match="--warm_up_image_sizes is for a model whose images give a token count each"):
    create_app(tiny_vlm, MODEL, warm_up=True, warm_up_image_sizes=[(480, 640)])


def test_sigterm_stops_accepting_and_finishes_the_stream_in_flight(tiny_vlm, tmp_path, serve_process):
  from vlmjax.interop import hf
  checkpoint = str(tmp_path / "tiny")
  hf.save_pretrained(checkpoint, tiny_vlm.config, tiny_vlm.params, tiny_vlm.tokenizer, tiny_vlm.image_processor,
                     tiny_vlm.eos_token_ids, tiny_vlm.pad_token_id, max_len=MAX_LEN)
  with serve_process(checkpoint, tmp_path / "serve.log", "--slots", "2") as (process, port):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
    stream = client.completions.create(model="tiny", prompt="Hi", max_tokens=40, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = [next(stream)]
    process.send_signal(signal.SIGTERM)  # with the stream open: it is finished, not cut
    chunks += list(stream)
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 40
    # uvicorn waits for the open connection, runs the app's shutdown (the engine drains), then exits by the signal.
    assert process.wait(60) == -signal.SIGTERM
    assert "Application shutdown complete" in (tmp_path / "serve.log").read_text()
    with pytest.raises(openai.APIConnectionError):
      client.completions.create(model="tiny", prompt="Hi", max_tokens=2)
