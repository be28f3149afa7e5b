"""The server's limits under hostile requests: each gets its 4xx or 503 before it costs memory, and the server goes
on serving."""

import base64
import http.client
import io
import json
import logging
import socket
import threading

import numpy as np
import pytest
from PIL import Image

from vlmjax.serve import images as images_lib
from vlmjax.serve.images import ImageLimits
from vlmjax.serve.server import Limits, create_app

KEY = "limits-key"
MODEL = "tiny"
MAX_BODY = 2 * 2**20
GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def server(tiny_vlm, serve_app):
  limits = Limits(max_body_bytes=MAX_BODY, max_images=20,
                  images=ImageLimits(max_bytes=MAX_BODY, max_pixels=4096 * 4096, max_request_pixels=3 * 1024 * 1024))
  app = create_app(tiny_vlm, MODEL, num_slots=2, max_len=64, api_key=KEY, limits=limits, page_size=4)
  with serve_app(app) as port:
    yield {"port": port, "app": app}


def _request(port: int, path: str, body=None, headers=None, method: str = "POST"):
  """(status, headers, parsed JSON or text) of a raw request; `body` a dict or bytes."""
  connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
  headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}", **(headers or {})}
  data = body if isinstance(body, bytes) or body is None else json.dumps(body)
  connection.request(method, path, data, headers)
  response = connection.getresponse()
  status, text = response.status, response.read().decode()
  connection.close()
  try:
    return status, dict(response.getheaders()), json.loads(text)
  except json.JSONDecodeError:
    return status, dict(response.getheaders()), text


def _still_serving(port: int) -> bool:
  status, _, reply = _request(port, "/v1/chat/completions", GOOD)
  return status == 200 and reply["choices"][0]["finish_reason"] in ("stop", "length")


def _png_url(width: int, height: int) -> str:
  """A flat PNG: a few kB however many pixels (what a decompression-minded client sends)."""
  out = io.BytesIO()
  Image.new("RGB", (width, height), (200, 30, 30)).save(out, format="PNG")
  return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def _with_images(*urls: str) -> dict:
  return {**GOOD, "messages": [{"role": "user", "content": [
      *({"type": "image_url", "image_url": {"url": url}} for url in urls), {"type": "text", "text": "What is it?"}]}]}


def test_a_300_mb_body_is_refused_from_its_content_length_unread(server):
  port = server["port"]
  with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {KEY}\r\nContent-Length: {300 * 2**20}\r\n\r\n".encode() + b'{"model"')
    answer = sock.recv(65536).decode()  # the answer comes with 8 of the 300 MB sent
  assert answer.startswith("HTTP/1.1 413"), answer
  assert '"code":"request_too_large"' in answer and str(MAX_BODY) in answer
  assert _still_serving(port)


def test_a_chunked_body_past_the_limit_is_refused_while_read(server):
  port = server["port"]
  connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
  chunks = (b"x" * 2**19 for _ in range(8))  # 4 MiB, twice the limit, with no Content-Length
  connection.request("POST", "/v1/chat/completions", chunks, {"Authorization": f"Bearer {KEY}"},
                     encode_chunked=True)
  response = connection.getresponse()
  assert response.status == 413 and json.loads(response.read())["error"]["code"] == "request_too_large"
  assert _still_serving(port)


def test_images_past_the_context_are_refused_before_any_is_decoded(server, monkeypatch):
  decoded = []
  decode = images_lib._decode
  monkeypatch.setattr(images_lib, "_decode", lambda image, where: (decoded.append(where), decode(image, where))[1])
  big = _png_url(4096, 4096)
  status, _, reply = _request(server["port"], "/v1/chat/completions", _with_images(*[big] * 20))
  # 20 images of 4 tokens each do not fit a context of 64 tokens: refused from the prompt alone.
  assert status == 400 and reply["error"]["code"] == "context_length_exceeded", reply
  assert decoded == []
  # Within the context, the request's pixel budget (3 Mpx) is checked from the headers, before decoding too.
  status, _, reply = _request(server["port"], "/v1/chat/completions", _with_images(_png_url(1024, 1024),
                                                                                      _png_url(2048, 1100)))
  assert status == 400 and reply["error"]["code"] == "image_too_large", reply
  assert reply["error"]["param"] == "messages.0.content.1" and decoded == []
  status, _, reply = _request(server["port"], "/v1/chat/completions", _with_images(_png_url(4097, 4096)))
  assert status == 400 and reply["error"]["code"] == "image_too_large" and decoded == []
  assert _still_serving(server["port"])
  status, _, _ = _request(server["port"], "/v1/chat/completions", _with_images(_png_url(64, 64)))
  assert status == 200 and decoded == ["messages.0.content.0"]


def test_more_images_than_allowed(tiny_vlm, serve_app):
  app = create_app(tiny_vlm, MODEL, num_slots=1, max_len=64, limits=Limits(max_images=2), page_size=4)
  with serve_app(app) as port:
    status, _, reply = _request(port, "/v1/chat/completions", _with_images(*[_png_url(8, 8)] * 3))
    assert status == 400 and reply["error"]["code"] == "too_many_images", reply
    assert _still_serving(port)


def test_a_full_queue_answers_503_with_retry_after(tiny_vlm, serve_app):
  app = create_app(tiny_vlm, MODEL, num_slots=1, max_len=64, limits=Limits(max_waiting=1), page_size=4)
  engine, go = app.state.engine, threading.Event()
  run = engine._threads[0]._target
  engine._threads[0] = threading.Thread(target=lambda: (go.wait(60), run()), daemon=True)  # a stalled engine
  with serve_app(app) as port:
    waiting = {}
    first = threading.Thread(target=lambda: waiting.update(reply=_request(port, "/v1/chat/completions", GOOD)))
    first.start()
    while engine.num_waiting < 1:
      assert first.is_alive()
      first.join(0.01)
    status, headers, reply = _request(port, "/v1/chat/completions", GOOD)
    assert status == 503 and headers["retry-after"] == "1" and reply["error"]["code"] == "overloaded", reply
    go.set()
    first.join(60)
    assert waiting["reply"][0] == 200 and _still_serving(port)


@pytest.mark.parametrize("settings, param", [({"top_k": 10**30}, "top_k"), ({"top_k": 2**40}, "top_k"),
                                             ({"top_k": 129}, "messages"),
                                             ({"stop": ["x" * 65]}, "stop"), ({"stop": list("abcde")}, "stop")])
def test_sampling_settings_past_their_bounds(server, settings, param):
  status, _, reply = _request(server["port"], "/v1/chat/completions", {**GOOD, **settings})
  assert status == 400 and reply["error"]["param"] == param, reply
  assert _still_serving(server["port"])


def test_a_failure_inside_the_server_says_internal_error_and_a_request_id(server, tiny_vlm, monkeypatch, caplog):
  secret = "/srv/models/private-checkpoint"
  monkeypatch.setattr(tiny_vlm, "prompt_ids", lambda *args: (_ for _ in ()).throw(RuntimeError(secret)))
  with caplog.at_level(logging.ERROR, logger="vlmjax.serve.server"):
    status, _, reply = _request(server["port"], "/v1/chat/completions", GOOD)
  assert status == 500 and secret not in json.dumps(reply), reply
  request_id = reply["error"]["message"].split("request id ")[1].split(")")[0]
  assert any(request_id in record.getMessage() and secret in caplog.text for record in caplog.records)
  monkeypatch.undo()
  assert _still_serving(server["port"])


def test_the_key_in_any_case_metrics_behind_it_by_option_and_no_docs(tiny_vlm, serve_app, server):
  port = server["port"]
  for scheme in ("bearer", "BEARER", "Bearer"):
    assert _request(port, "/v1/models", headers={"Authorization": f"{scheme} {KEY}"}, method="GET")[0] == 200
  assert _request(port, "/v1/models", headers={"Authorization": f"Basic {KEY}"}, method="GET")[0] == 401
  assert _request(port, "/metrics", headers={"Authorization": ""}, method="GET")[0] == 200  # open by default
  for route in ("/docs", "/redoc", "/openapi.json"):
    assert _request(port, route, method="GET")[0] == 404
  app = create_app(tiny_vlm, MODEL, num_slots=1, max_len=64, api_key=KEY, metrics_need_key=True, docs=True,
                   page_size=4)
  with serve_app(app) as guarded:
    assert _request(guarded, "/metrics", headers={"Authorization": ""}, method="GET")[0] == 401
    status, _, text = _request(guarded, "/metrics", method="GET")
    assert status == 200 and "vlmjax_requests_running" in text
    assert _request(guarded, "/openapi.json", method="GET")[0] == 200


def test_an_engine_failure_ends_serve_with_an_error_for_its_supervisor(tiny_vlm, tmp_path, monkeypatch):
  from vlmjax.infer.engine import Engine
  from vlmjax.interop import hf
  from vlmjax.serve import server as server_lib
  checkpoint = str(tmp_path / "tiny")
  hf.save_pretrained(checkpoint, tiny_vlm.config, tiny_vlm.params, tiny_vlm.tokenizer, tiny_vlm.image_processor,
                     tiny_vlm.eos_token_ids, tiny_vlm.pad_token_id, max_len=64)
  monkeypatch.setattr(Engine, "_step", lambda self: (_ for _ in ()).throw(RuntimeError("device lost")))
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
  ended = {}

  def run():
    try:
      server_lib.serve(checkpoint, port=port, num_slots=1, page_size=4)
    except server_lib.EngineFailed as error:
      ended["error"] = error

  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  while True:  # until it listens
    try:
      status, _, reply = _request(port, "/v1/chat/completions", GOOD)
      break
    except OSError:
      assert thread.is_alive()
      thread.join(0.1)
  assert status == 500 and "device lost" not in json.dumps(reply) and "request id" in reply["error"]["message"]
  thread.join(60)
  assert not thread.is_alive() and "device lost" in str(ended["error"])
