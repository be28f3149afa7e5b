"""An OpenAI-compatible HTTP server over the continuous-batching engine (FastAPI + uvicorn).

    vlmjax serve --checkpoint /tmp/serve_model --port 8000 [--slots 8 --api_key KEY --image_dir DIR]
                 [--pages N --page_size 16 --prefix_caching --prefill_chunk 256 --prefill_budget 1024]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
    client.chat.completions.create(model="serve_model", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
        {"type": "text", "text": "What colour is the circle?"}]}])

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models (behind the API key when one is set),
GET /health, GET /metrics (Prometheus). Images come inline as base64 `data:` URLs, or as local files under the
directory the operator allows; the server never fetches from the network. Errors have OpenAI's body
{"error": {"message", "type", "param", "code"}}.
"""

import asyncio
import base64
import binascii
import contextlib
import io
import logging
import os
import secrets

import fastapi
import prometheus_client
import uvicorn
from fastapi.exceptions import RequestValidationError
from PIL import Image, UnidentifiedImageError
from prometheus_client.core import CounterMetricFamily
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from vlmjax.infer.engine import Engine, PromptTooLong
from vlmjax.infer.requests import Output, Request
from vlmjax.serve import chat_page
from vlmjax.serve import protocol

_log = logging.getLogger(__name__)
MAX_IMAGE_BYTES = 20 * 2**20  # encoded size of one image
MAX_IMAGE_PIXELS = 4096 * 4096
IMAGE_FORMATS = ("PNG", "JPEG")


class APIError(Exception):
  """An error the client caused (or must hear about), answered with OpenAI's error body."""

  def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
               kind: str = "invalid_request_error"):
    super().__init__(message)
    self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

  def response(self) -> fastapi.responses.JSONResponse:
    error = protocol.ErrorInfo(message=self.message, type=self.kind, param=self.param, code=self.code)
    return fastapi.responses.JSONResponse(protocol.ErrorResponse(error=error).model_dump(), status_code=self.status)


class Metrics:
  """The server's Prometheus metrics, in a registry of its own."""

  def __init__(self):
    self.registry = prometheus_client.CollectorRegistry()
    options = {"registry": self.registry}
    self.running = prometheus_client.Gauge("vlmjax_requests_running", "Requests holding a decode slot.", **options)
    self.waiting = prometheus_client.Gauge("vlmjax_requests_waiting", "Requests queued for a slot.", **options)
    self.ttft = prometheus_client.Histogram(
        "vlmjax_time_to_first_token_seconds", "From arrival to the first generated token.",
        buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), **options)
    self.tpot = prometheus_client.Histogram(
        "vlmjax_time_per_output_token_seconds", "Mean time between a request's generated tokens after the first.",
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1), **options)
    self.prompt_tokens = prometheus_client.Counter("vlmjax_prompt_tokens", "Prompt tokens prefilled.", **options)
    self.generated = prometheus_client.Counter("vlmjax_generation_tokens", "Tokens generated.", **options)
    self.finished = prometheus_client.Counter("vlmjax_requests_finished", "Requests ended, by finish reason.",
                                              ["finish_reason"], **options)
    self.pages_used = prometheus_client.Gauge("vlmjax_kv_pages_used", "KV-cache pages held (requests and the "
                                              "prefix cache).", **options)
    self.pages_total = prometheus_client.Gauge("vlmjax_kv_pages_total", "KV-cache pages in the pool.", **options)
    self.prefix_hits = prometheus_client.Counter("vlmjax_prefix_cache_hits", "Requests that read part of their "
                                                 "prompt from the prefix cache.", **options)
    self.prefix_hit_tokens = prometheus_client.Counter("vlmjax_prefix_cache_hit_tokens", "Prompt tokens read from "
                                                       "the prefix cache instead of prefilled.", **options)

  def watch(self, engine: Engine) -> None:
    self.running.set_function(lambda: engine.num_running)
    self.waiting.set_function(lambda: engine.num_waiting)
    self.pages_used.set_function(lambda: engine.pages.num_pages - engine.pages.num_free)
    self.pages_total.set(engine.pages.num_pages)
    self.registry.register(_Preemptions(engine))

  def observe(self, request: Request) -> None:
    """Called by the engine as each request ends."""
    self.finished.labels(request.finish_reason).inc()
    self.generated.inc(len(request.token_ids))
    if request.cached_tokens:
      self.prefix_hits.inc()
      self.prefix_hit_tokens.inc(request.cached_tokens)
    if request.first_token_at is None:
      return
    self.prompt_tokens.inc(len(request.prompt_ids))
    self.ttft.observe(request.first_token_at - request.submitted_at)
    if len(request.token_ids) > 1:
      self.tpot.observe((request.finished_at - request.first_token_at) / (len(request.token_ids) - 1))


class _Preemptions:
  """vlmjax_preemptions_total: the engine's count, read as /metrics is scraped."""

  def __init__(self, engine: Engine):
    self.engine = engine

  def collect(self):
    yield CounterMetricFamily(
        "vlmjax_preemptions", "Requests preempted for want of KV-cache pages (prefilled again later).",
        value=self.engine.num_preemptions)


class _RequireAPIKey:
  """ASGI middleware: /v1/ routes need `Authorization: Bearer <key>` (checked before the body is read)."""

  def __init__(self, app, api_key: str):
    self.app, self.expected = app, f"Bearer {api_key}".encode()

  async def __call__(self, scope, receive, send):
    if scope["type"] == "http" and scope["path"].startswith("/v1/"):
      given = dict(scope["headers"]).get(b"authorization", b"")
      if not secrets.compare_digest(given, self.expected):
        message = "missing API key" if not given else "incorrect API key"
        response = APIError(401, f"{message}: send the header 'Authorization: Bearer <key>'",
                            code="invalid_api_key").response()
        return await response(scope, receive, send)
    await self.app(scope, receive, send)


class _Outputs:
  """One request's outputs, handed from the engine's detokenizer thread to the event loop."""

  def __init__(self):
    self._loop, self._queue = asyncio.get_running_loop(), asyncio.Queue()

  def put(self, output: Output) -> None:
    self._loop.call_soon_threadsafe(self._queue.put_nowait, output)

  async def get(self, timeout: float | None = None) -> Output:
    return await asyncio.wait_for(self._queue.get(), timeout)


def load_image(url: str, where: str, image_dir: str | None, max_bytes: int = MAX_IMAGE_BYTES) -> Image.Image:
  """The image of an `image_url` part: a base64 `data:` URL, or a local file under `image_dir`.
  APIError 400 for anything else, and for what is not a PNG/JPEG of acceptable size."""
  if url.startswith("data:"):
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
      raise APIError(400, f"{where}: a data: URL must be base64 (data:image/png;base64,...)", param=where)
    if len(payload) * 3 // 4 > max_bytes:
      raise APIError(400, f"{where}: the image is larger than {max_bytes} bytes", param=where, code="image_too_large")
    try:
      data = base64.b64decode(payload, validate=True)
    except binascii.Error as error:
      raise APIError(400, f"{where}: the data: URL is not valid base64 ({error})", param=where,
                     code="invalid_image") from error
  elif url.split(":", 1)[0].lower() in ("http", "https"):
    raise APIError(400, f"{where}: remote image URLs are not fetched (the server does not reach the network); send "
                   f"the image inline as a base64 data: URL", param=where, code="remote_image_refused")
  elif url.startswith("file://") or os.path.isabs(url):
    data = _read_allowed_file(url.removeprefix("file://"), where, image_dir, max_bytes)
  else:
    raise APIError(400, f"{where}: an image URL is a base64 data: URL or an absolute local path, got {url[:40]!r}",
                   param=where)
  try:
    image = Image.open(io.BytesIO(data))
    if image.format not in IMAGE_FORMATS or image.width * image.height > MAX_IMAGE_PIXELS:
      raise APIError(400, f"{where}: a {image.format} image of {image.width}x{image.height} pixels; send a PNG or "
                     f"JPEG of at most {MAX_IMAGE_PIXELS} pixels", param=where, code="invalid_image")
    image.load()
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
    detail = "" if isinstance(error, UnidentifiedImageError) else f" ({error})"
    raise APIError(400, f"{where}: not a decodable PNG or JPEG image{detail}", param=where,
                   code="invalid_image") from error
  return image


def _read_allowed_file(path: str, where: str, image_dir: str | None, max_bytes: int) -> bytes:
  if image_dir is None:
    raise APIError(400, f"{where}: local image files are not allowed on this server (the operator allows a directory "
                   f"with --image_dir); send the image as a base64 data: URL", param=where)
  allowed, real = os.path.realpath(image_dir), os.path.realpath(path)
  if os.path.commonpath([allowed, real]) != allowed:
    raise APIError(400, f"{where}: {path} is outside the directory this server allows images from", param=where)
  if not os.path.isfile(real):
    raise APIError(400, f"{where}: no image file {path}", param=where)
  if os.path.getsize(real) > max_bytes:
    raise APIError(400, f"{where}: the image is larger than {max_bytes} bytes", param=where, code="image_too_large")
  with open(real, "rb") as f:
    return f.read()


def create_app(vlm, model_name: str, *, num_slots: int = 8, max_len: int | None = None, api_key: str | None = None,
               image_dir: str | None = None, max_image_bytes: int = MAX_IMAGE_BYTES,
               **paging) -> fastapi.FastAPI:
  """The app and its engine (`app.state.engine`), started and drained with the app's lifespan. `paging`:
  the engine's num_pages, page_size, prefix_caching, prefill_chunk and prefill_budget."""
  if image_dir is not None and not os.path.isdir(image_dir):
    raise ValueError(f"--image_dir {image_dir} is not a directory")
  metrics = Metrics()
  engine = Engine(vlm, num_slots=num_slots, max_len=max_len, on_finish=metrics.observe, **paging)
  metrics.watch(engine)
  started = protocol.now()

  @contextlib.asynccontextmanager
  async def lifespan(app):
    engine.start()
    yield
    await asyncio.to_thread(engine.stop)  # uvicorn has let in-flight requests finish; drain what is left

  app = fastapi.FastAPI(title="vlmjax", lifespan=lifespan)
  app.state.engine = engine
  if api_key:
    app.add_middleware(_RequireAPIKey, api_key=api_key)

  @app.exception_handler(APIError)
  async def api_error(request, error: APIError):
    return error.response()

  @app.exception_handler(RequestValidationError)
  async def invalid_request(request, error: RequestValidationError):
    first = error.errors()[0]
    if first["type"] == "json_invalid":
      return APIError(400, f"malformed JSON body: {first.get('ctx', {}).get('error', first['msg'])}",
                      code="json_invalid").response()
    param = ".".join(str(part) for part in first["loc"][1:]) or None
    return APIError(400, f"{param or 'body'}: {first['msg']}", param=param, code=first["type"]).response()

  @app.exception_handler(HTTPException)
  async def http_error(request, error: HTTPException):
    where = f"{request.method} {request.url.path}"
    message = {404: f"no route {where}", 405: f"method not allowed: {where}"}.get(error.status_code,
                                                                                  str(error.detail))
    return APIError(error.status_code, message).response()

  @app.exception_handler(Exception)
  async def server_error(request, error: Exception):  # uvicorn logs the traceback
    return APIError(500, f"internal error: {type(error).__name__}: {error}", kind="server_error").response()

  def check_model(name: str) -> None:
    if name != model_name:
      raise APIError(404, f"the model '{name}' does not exist; this server serves '{model_name}'", param="model",
                     code="model_not_found")

  def submit(prompt_ids, pixel_values, body: protocol.GenerationRequest, outputs: _Outputs, param: str) -> Request:
    try:
      return engine.submit(prompt_ids, pixel_values, max_tokens=body.token_limit, temperature=body.temperature,
                           top_k=body.top_k, top_p=body.top_p, seed=body.seed, stop=body.stop or (),
                           listener=outputs.put)
    except PromptTooLong as error:
      raise APIError(400, str(error), param=param, code="context_length_exceeded") from error
    except ValueError as error:
      raise APIError(400, str(error), param=param) from error
    except RuntimeError as error:
      raise APIError(503, str(error), kind="server_error", code="unavailable") from error

  def submit_chat(body: protocol.ChatCompletionRequest, outputs: _Outputs) -> Request:
    messages, images = [], []
    for i, message in enumerate(body.messages):
      content = message.content
      if not isinstance(content, str):
        content = [{"type": "text", "text": part.text} if part.type == "text" else {"type": "image"}
                   for part in content]
        images += [load_image(part.image_url.url, f"messages.{i}.content.{j}", image_dir, max_image_bytes)
                   for j, part in enumerate(message.content) if part.type == "image_url"]
      messages.append({"role": message.role, "content": content})
    try:
      prompt_ids = vlm.prompt_ids(messages, len(images))
      pixel_values = vlm.image_processor(images) if images else None
    except ValueError as error:
      raise APIError(400, str(error), param="messages") from error
    return submit(prompt_ids, pixel_values, body, outputs, "messages")

  async def final_output(request: Request, outputs: _Outputs, http_request: fastapi.Request) -> Output:
    """Waits for the request's end; a client that hangs up cancels it."""
    while True:
      try:
        output = await outputs.get(timeout=1.0)
      except TimeoutError:
        if await http_request.is_disconnected():
          engine.cancel(request)
        continue
      if output.finish_reason:
        return output

  def failure(output: Output) -> APIError:
    if output.error:
      return APIError(500, output.error, kind="server_error")
    return APIError(503, "the request was cancelled: the server is shutting down", kind="server_error")

  async def sse(request: Request, outputs: _Outputs, chunk, include_usage: bool, first=None):
    """Server-sent events: `first`, then chunk(text, finish_reason) for each output with news, chunk(usage=...)
    when asked for, [DONE]. A client that hangs up cancels the stream's task here, and the request with it."""
    try:
      if first is not None:
        yield f"data: {first.model_dump_json()}\n\n"
      while (output := await outputs.get()).finish_reason not in ("cancelled", "error"):
        if output.text or output.finish_reason:
          yield f"data: {chunk(output.text, output.finish_reason).model_dump_json()}\n\n"
        if output.finish_reason:
          if include_usage:
            yield f"data: {chunk(usage=usage(request)).model_dump_json()}\n\n"
          yield "data: [DONE]\n\n"
          return
      yield f"data: {failure(output).response().body.decode()}\n\n"
    finally:
      engine.cancel(request)  # nothing left to do when it ended; frees the slot when the client left

  def usage(request: Request) -> protocol.Usage:
    return protocol.Usage.of(len(request.prompt_ids), len(request.token_ids))

  def include_usage(body: protocol.GenerationRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)

  @app.post("/v1/chat/completions")
  async def chat_completions(body: protocol.ChatCompletionRequest, http_request: fastapi.Request):
    check_model(body.model)
    outputs = _Outputs()
    request = await run_in_threadpool(submit_chat, body, outputs)
    reply_id, created = protocol.new_id("chatcmpl"), protocol.now()
    if body.stream:
      def chunk(text="", finish_reason=None, role=None, usage=None):
        delta = protocol.Delta(role=role, content=text if text or role else None)
        choices = [] if usage else [protocol.ChatChunkChoice(delta=delta, finish_reason=finish_reason)]
        return protocol.ChatCompletionChunk(id=reply_id, created=created, model=model_name, choices=choices,
                                            usage=usage)
      return fastapi.responses.StreamingResponse(
          sse(request, outputs, chunk, include_usage(body), first=chunk(role="assistant")),
          media_type="text/event-stream")
    output = await final_output(request, outputs, http_request)
    if output.finish_reason not in ("stop", "length"):
      raise failure(output)
    message = protocol.AssistantMessage(content=request.text)
    return protocol.ChatCompletion(id=reply_id, created=created, model=model_name, usage=usage(request),
                                   choices=[protocol.ChatChoice(message=message, finish_reason=output.finish_reason)])

  @app.post("/v1/completions")
  async def completions(body: protocol.CompletionRequest, http_request: fastapi.Request):
    check_model(body.model)
    outputs = _Outputs()
    request = await run_in_threadpool(lambda: submit(vlm.tokenizer.encode(body.prompt), None, body, outputs,
                                                     "prompt"))
    reply_id, created = protocol.new_id("cmpl"), protocol.now()
    if body.stream:
      def chunk(text="", finish_reason=None, usage=None):
        choices = [] if usage else [protocol.CompletionChoice(text=text, finish_reason=finish_reason)]
        return protocol.Completion(id=reply_id, created=created, model=model_name, choices=choices, usage=usage)
      return fastapi.responses.StreamingResponse(sse(request, outputs, chunk, include_usage(body)),
                                                 media_type="text/event-stream")
    output = await final_output(request, outputs, http_request)
    if output.finish_reason not in ("stop", "length"):
      raise failure(output)
    return protocol.Completion(id=reply_id, created=created, model=model_name, usage=usage(request), choices=[
        protocol.CompletionChoice(text=request.text, finish_reason=output.finish_reason)])

  @app.get("/v1/models")
  async def models():
    return protocol.ModelList(data=[protocol.Model(id=model_name, created=started)])

  @app.get("/health")
  async def health():
    if not engine.healthy:
      raise APIError(503, f"the engine is not serving{f': {engine.error}' if engine.error else ''}",
                     kind="server_error", code="unavailable")
    return {"status": "ok"}

  @app.get("/metrics")
  async def metrics_text():
    return fastapi.Response(prometheus_client.generate_latest(metrics.registry),
                            media_type=prometheus_client.CONTENT_TYPE_LATEST)

  app.include_router(chat_page.router)  # the chat page at /
  return app


def serve(checkpoint: str, *, host: str = "127.0.0.1", port: int = 8000, num_slots: int = 8,
          max_len: int | None = None, api_key: str | None = None, image_dir: str | None = None,
          model_name: str | None = None, **paging) -> None:
  """Loads the checkpoint and serves it until SIGINT/SIGTERM (uvicorn stops accepting, lets in-flight requests
  finish, then the engine drains)."""
  import vlmjax

  model_name = model_name or os.path.basename(os.path.normpath(checkpoint))
  if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
    _log.warning("serving on %s without --api_key: anyone who reaches this address can use the model", host)
  app = create_app(vlmjax.load(checkpoint), model_name, num_slots=num_slots, max_len=max_len, api_key=api_key,
                   image_dir=image_dir, **paging)
  uvicorn.run(app, host=host, port=port, log_level="info")
