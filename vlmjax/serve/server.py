"""An OpenAI-compatible HTTP server over the continuous-batching engine (FastAPI + uvicorn).

    vlmjax serve --checkpoint /tmp/serve_model --port 8000 [--slots 8 --api_key KEY --image_dir DIR]
                 [--pages N --page_size 16 --prefix_caching --prefill_chunk 256 --prefill_budget 1024]
                 [--max_body_bytes N --max_images 8 --max_waiting 256 --compilation_cache DIR]
                 [--warm_up_image_sizes 1280x720,448x448]   (LLaVA-NeXT, Qwen2.5-VL: sizes warm-up compiles)

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
    client.chat.completions.create(model="serve_model", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
        {"type": "text", "text": "What colour is the circle?"}]}])

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models (behind the API key when one is set),
GET /health, GET /metrics (Prometheus; behind the key by option), GET / (a chat page, `chat_page.py`). Images
come inline as base64 `data:` URLs, or as local files under the directory the operator allows; the server never
fetches from the network. Errors have OpenAI's body {"error": {"message", "type", "param", "code"}}; what a
request may ask is bounded (`Limits`), and what it cannot have is refused before it costs memory.
"""

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import threading
from collections.abc import Callable, Sequence

import fastapi
import numpy as np
import prometheus_client
import uvicorn
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from vlmjax.data.images import DETAILS
from vlmjax.infer import scoring
from vlmjax.infer.admission import PromptTooLong
from vlmjax.infer.constrained import JSONGrammars
from vlmjax.infer.engine import Engine, QueueFull
from vlmjax.infer.requests import Output, Request, TokenLogprob
from vlmjax.serve import chat_page, protocol, replies
from vlmjax.serve.errors import APIError, internal
from vlmjax.serve.images import ImageLimits, each_processed, open_images
from vlmjax.serve.metrics import Metrics
from vlmjax.serve.middleware import LimitBody, RequireAPIKey

_log = logging.getLogger(__name__)
RETRY_AFTER_SECONDS = 1  # what a 503 from a full queue tells the client to wait


@dataclasses.dataclass(frozen=True)
class Limits:
  """What one request may ask of the server: its body's bytes, its images (count, bytes and pixels, in
  `images`), requests waiting for a slot (more get 503 with Retry-After)."""

  max_body_bytes: int = 64 * 2**20
  max_images: int = 8
  max_waiting: int = 256
  images: ImageLimits = ImageLimits()


class _Outputs:
  """The outputs of a reply's requests (one per choice), (choice index, Output) each, handed from the engine's
  detokenizer thread to the event loop."""

  def __init__(self):
    self._loop, self._queue = asyncio.get_running_loop(), asyncio.Queue()

  def listener(self, index: int) -> Callable[[Output], None]:
    return lambda output: self._loop.call_soon_threadsafe(self._queue.put_nowait, (index, output))

  async def get(self, timeout: float | None = None) -> tuple[int, Output]:
    return await asyncio.wait_for(self._queue.get(), timeout)


def create_app(vlm, model_name: str, *, num_slots: int = 8, max_len: int | None = None, api_key: str | None = None,
               image_dir: str | None = None, limits: Limits = Limits(), metrics_need_key: bool = False,
               docs: bool = False, warm_up: bool = False, warm_up_image_sizes: Sequence[tuple[int, int]] = (),
               **paging) -> fastapi.FastAPI:
  """The app and its engine (`app.state.engine`), started and drained with the app's lifespan; with `warm_up`,
  every program the engine can need for requests of up to `limits.max_images` images is compiled before the app
  takes requests (`Engine.warm_up`: no request then compiles, nor stalls the others); for a model whose images give
  a token count each, those of images of the (height, width) `warm_up_image_sizes`, at every detail. With `api_key`,
  /v1/ routes (and /metrics with `metrics_need_key`) need it; `docs`: FastAPI's /docs, /redoc and
  /openapi.json. `paging`: the engine's num_pages, page_size, prefix_caching, prefill_chunk and prefill_budget."""
  if image_dir is not None and not os.path.isdir(image_dir):
    raise ValueError(f"--image_dir {image_dir} is not a directory")
  if warm_up_image_sizes and not vlm.model_config.variable_image_tokens:
    raise ValueError("--warm_up_image_sizes is for a model whose images give a token count each (LLaVA-NeXT, "
                     "Qwen2-VL, Qwen2.5-VL); this model's every image gives the same tokens, and warm-up covers them")
  metrics = Metrics()
  engine = Engine(vlm, num_slots=num_slots, max_len=max_len, on_finish=metrics.observe,
                  max_waiting=limits.max_waiting, **paging)
  metrics.watch(engine)
  started = protocol.now()

  @contextlib.asynccontextmanager
  async def lifespan(app):
    if warm_up:
      seconds = await asyncio.to_thread(engine.warm_up, limits.max_images,
                                        warm_up_examples(vlm, warm_up_image_sizes))
      metrics.warm_up.set(seconds)
      _log.info("compiled the engine's programs in %.1f s", seconds)
    engine.start()
    yield
    await asyncio.to_thread(engine.stop)  # uvicorn has let in-flight requests finish; drain what is left

  documented = {} if docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
  app = fastapi.FastAPI(title="vlmjax", lifespan=lifespan, **documented)
  app.state.engine = engine
  app.add_middleware(LimitBody, max_bytes=limits.max_body_bytes)
  if api_key:  # added last: it runs first, before the body is read
    app.add_middleware(RequireAPIKey, api_key=api_key, prefixes=("/v1/", "/metrics") if metrics_need_key else ("/v1/",))

  @app.exception_handler(APIError)
  async def api_error(request, error: APIError):
    return error.response()

  @app.exception_handler(RequestValidationError)
  async def invalid_request(request, error: RequestValidationError):
    first = error.errors()[0]
    if first["type"] == "json_invalid":
      return APIError(400, f"malformed JSON body: {first.get('ctx', {}).get('error', first['msg'])}",
                      code="json_invalid").response()
    reported, param = protocol.reported_error(error.errors(), error.body)
    return APIError(400, f"{param or 'body'}: {reported['msg']}", param=param, code=reported["type"]).response()

  @app.exception_handler(HTTPException)
  async def http_error(request, error: HTTPException):
    where = f"{request.method} {request.url.path}"
    message = {404: f"no route {where}", 405: f"method not allowed: {where}"}.get(error.status_code,
                                                                                  str(error.detail))
    return APIError(error.status_code, message).response()

  @app.exception_handler(Exception)
  async def server_error(request, error: Exception):
    request_id = protocol.new_id("req")
    _log.error("request %s (%s %s) failed", request_id, request.method, request.url.path, exc_info=error)
    return internal(request_id).response()

  def check_model(name: str) -> None:
    if name != model_name:
      raise APIError(404, f"the model '{name}' does not exist; this server serves '{model_name}'", param="model",
                     code="model_not_found")

  def check_fits(prompt_ids: list[int], max_tokens: int | None, param: str) -> None:
    try:
      if max_tokens == 0:  # the prompt is only scored (completions' echo)
        if len(prompt_ids) > engine.max_len:
          raise PromptTooLong(f"a prompt of {len(prompt_ids)} tokens does not fit the context of {engine.max_len}")
      else:
        engine.check_fits(len(prompt_ids), max_tokens)
    except PromptTooLong as error:
      raise APIError(400, str(error), param=param, code="context_length_exceeded") from error
    except ValueError as error:
      raise APIError(400, str(error), param=param) from error

  @functools.cache
  def json_grammars() -> JSONGrammars:
    return JSONGrammars(vlm.tokenizer, vlm.model_config.decoder.vocab_size, vlm.eos_token_ids)

  def constraint_of(response_format: protocol.ResponseFormat | None):
    """A fresh constraint for one choice, or None."""
    if response_format is None or response_format.type == "text":
      return None
    try:
      return json_grammars().constraint(response_format.json_schema.schema_ if response_format.json_schema else None)
    except ValueError as error:
      raise APIError(400, f"response_format: {error}", param="response_format") from error

  def submit(prompt_ids, pixel_values, body: protocol.GenerationRequest, outputs: _Outputs, param: str,
             top_logprobs: int | None, response_format: protocol.ResponseFormat | None = None) -> list[Request]:
    """The body's `n` requests (seeds seed, seed + 1, ... when it gives one); none stays queued if one is refused."""
    seeds = [None] * body.n if body.seed is None else [(body.seed + i) % 2**32 for i in range(body.n)]
    requests = []
    try:
      for index, seed in enumerate(seeds):
        requests.append(engine.submit(
            prompt_ids, pixel_values, max_tokens=body.token_limit, temperature=body.temperature, top_k=body.top_k,
            top_p=body.top_p, seed=seed, stop=body.stop or (), logprobs=top_logprobs,
            constraint=constraint_of(response_format), listener=outputs.listener(index)))
    except BaseException as error:
      for request in requests:
        engine.cancel(request)
      if isinstance(error, PromptTooLong):
        raise APIError(400, str(error), param=param, code="context_length_exceeded") from error
      if isinstance(error, ValueError):
        raise APIError(400, str(error), param=param) from error
      if isinstance(error, QueueFull):
        raise APIError(503, str(error), kind="server_error", code="overloaded",
                       headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from error
      if isinstance(error, RuntimeError):  # its text may name the engine's failure: for the log, not the client
        raise APIError(503, "the server is not accepting requests: it is stopping or has failed",
                       kind="server_error", code="unavailable") from error
      raise
    return requests

  variable_tokens = vlm.model_config.variable_image_tokens

  def submit_chat(body: protocol.ChatCompletionRequest, outputs: _Outputs) -> list[Request]:
    """The conversation's prompt, checked against the context before its images are read and decoded (after, for a
    model whose images give a token count each: LLaVA-NeXT, Qwen2.5-VL)."""
    messages, image_urls, details = [], [], []
    for i, message in enumerate(body.messages):
      content = message.content
      if not isinstance(content, str):
        content = [{"type": "text", "text": part.text} if part.type == "text" else {"type": "image"}
                   for part in content]
        image_urls += [(part.image_url.url, f"messages.{i}.content.{j}")
                       for j, part in enumerate(message.content) if part.type == "image_url"]
        details += [part.image_url.detail for part in message.content if part.type == "image_url"]
      messages.append({"role": message.role, "content": content})
    if len(image_urls) > limits.max_images:
      raise APIError(400, f"messages: {len(image_urls)} images; this server takes at most {limits.max_images} per "
                     f"request", param="messages", code="too_many_images")
    pixel_values, counts = None, None
    if variable_tokens:  # the placeholders follow the images' sizes (and details): they are read (within limits) first
      processors = [vlm.image_processor.at_detail(detail) for detail in details]
      pixel_values = each_processed(processors, open_images(image_urls, image_dir, limits.images), image_urls) or None
      counts = [vlm.image_token_count(size) for _, size in pixel_values or ()]
    try:
      prompt_ids = vlm.prompt_ids(messages, len(image_urls), counts)
    except ValueError as error:
      raise APIError(400, str(error), param="messages") from error
    check_fits(prompt_ids, body.token_limit, "messages")
    if not variable_tokens:  # every image gives the same tokens, at any detail
      images = open_images(image_urls, image_dir, limits.images)
      pixel_values = vlm.image_processor(images) if images else None
    return submit(prompt_ids, pixel_values, body, outputs, "messages",
                  (body.top_logprobs or 0) if body.logprobs else None, body.response_format)

  def failure(output: Output) -> APIError:
    if output.error:
      request_id = protocol.new_id("req")
      _log.error("request %s: %s", request_id, output.error)
      return internal(request_id)
    return APIError(503, "the request was cancelled: the server is shutting down", kind="server_error")

  async def finished(requests: list[Request], outputs: _Outputs, http_request: fastapi.Request) -> None:
    """Waits until every request has ended; a client that hangs up cancels them. APIError when one failed."""
    ended = 0
    while ended < len(requests):
      try:
        _, output = await outputs.get(timeout=1.0)
      except TimeoutError:
        if await http_request.is_disconnected():
          for request in requests:
            engine.cancel(request)
        continue
      if output.finish_reason:
        if output.finish_reason not in ("stop", "length"):
          for request in requests:
            engine.cancel(request)
          raise failure(output)
        ended += 1

  async def sse(requests: list[Request], prompt_tokens: int, outputs: _Outputs, chunk, include_usage: bool,
                firsts=()):
    """Server-sent events: `firsts`, then chunk(index, output) for each output with news, a last chunk with the
    usage when asked for, [DONE]. A client that hangs up cancels the stream's task here, and the requests."""
    try:
      for first in firsts:
        yield f"data: {first.model_dump_json()}\n\n"
      ended = 0
      while ended < len(requests):
        index, output = await outputs.get()
        if output.finish_reason in ("cancelled", "error"):
          yield f"data: {failure(output).response().body.decode()}\n\n"
          return
        if output.text or output.finish_reason or output.logprobs:
          yield f"data: {chunk(index, output).model_dump_json()}\n\n"
        ended += bool(output.finish_reason)
      if include_usage:
        yield f"data: {chunk(usage=usage(requests, prompt_tokens)).model_dump_json()}\n\n"
      yield "data: [DONE]\n\n"
    finally:
      for request in requests:
        engine.cancel(request)  # nothing left to do when it ended; frees the slot when the client left

  def usage(requests: list[Request], prompt_tokens: int) -> protocol.Usage:
    """The prompt once, every choice's tokens; the prompt tokens the first choice read from the prefix cache."""
    return protocol.Usage.of(prompt_tokens, sum(len(request.token_ids) for request in requests),
                             requests[0].cached_tokens if requests else 0)

  def include_usage(body: protocol.GenerationRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)

  @app.post("/v1/chat/completions")
  async def chat_completions(body: protocol.ChatCompletionRequest, http_request: fastapi.Request):
    check_model(body.model)
    outputs = _Outputs()
    requests = await run_in_threadpool(submit_chat, body, outputs)
    reply_id, created = protocol.new_id("chatcmpl"), protocol.now()

    def reply(choices=(), usage=None):
      return protocol.ChatCompletionChunk(id=reply_id, created=created, model=model_name, choices=list(choices),
                                          usage=usage)

    def logprobs_of(token_ids, logprobs):
      return replies.chat_logprobs(token_ids, logprobs, vlm.tokenizer.token_bytes) if body.logprobs else None

    if body.stream:
      def chunk(index=0, output=None, usage=None):
        if usage:
          return reply(usage=usage)
        delta = protocol.Delta(content=output.text if output.text or output.logprobs else None)
        return reply([protocol.ChatChunkChoice(index=index, delta=delta, finish_reason=output.finish_reason,
                                               logprobs=logprobs_of(output.token_ids, output.logprobs))])
      firsts = [reply([protocol.ChatChunkChoice(index=index, delta=protocol.Delta(role="assistant", content=""))])
                for index in range(body.n)]
      return fastapi.responses.StreamingResponse(
          sse(requests, len(requests[0].prompt_ids), outputs, chunk, include_usage(body), firsts),
          media_type="text/event-stream")
    await finished(requests, outputs, http_request)
    return protocol.ChatCompletion(id=reply_id, created=created, model=model_name,
                                   usage=usage(requests, len(requests[0].prompt_ids)), choices=[
        protocol.ChatChoice(index=index, message=protocol.AssistantMessage(content=request.text),
                            finish_reason=request.finish_reason,
                            logprobs=logprobs_of(request.token_ids, request.logprobs))
        for index, request in enumerate(requests)])

  def submit_completion(body: protocol.CompletionRequest, outputs: _Outputs):
    """(the prompt's ids, its own logprobs when echoed with logprobs, the requests: none for max_tokens 0)."""
    prompt_ids = vlm.tokenizer.encode(body.prompt)
    check_fits(prompt_ids, body.max_tokens, "prompt")
    scored = None
    if body.echo and body.logprobs is not None:
      if vlm.model_config.prefix_lm:
        raise APIError(400, "echo with logprobs needs a causal model: a prefix-LM's prompt attends both ways",
                       param="echo")
      scored = scoring.prompt_logprobs(vlm.params, vlm.model_config, prompt_ids, vlm.pad_token_id, engine.buckets)
      scored = [None] + [TokenLogprob(scores.logprob, scores.top[:body.logprobs]) for scores in scored]
    requests = submit(prompt_ids, None, body, outputs, "prompt", body.logprobs) if body.max_tokens != 0 else []
    return prompt_ids, scored, requests

  @app.post("/v1/completions")
  async def completions(body: protocol.CompletionRequest, http_request: fastapi.Request):
    check_model(body.model)
    outputs = _Outputs()
    prompt_ids, scored, requests = await run_in_threadpool(submit_completion, body, outputs)
    reply_id, created = protocol.new_id("cmpl"), protocol.now()
    echoed = body.prompt if body.echo else ""

    def reply(choices=(), usage=None):
      return protocol.Completion(id=reply_id, created=created, model=model_name, choices=list(choices), usage=usage)

    def logprobs_of(token_ids, logprobs, text_start=0, with_prompt=True):
      """The tokens' logprobs, the echoed prompt's first when `with_prompt`; text offsets from `text_start`."""
      if body.logprobs is None:
        return None
      if scored is not None and with_prompt:
        token_ids, logprobs = [*prompt_ids, *token_ids], [*scored, *logprobs]
      return replies.completion_logprobs(token_ids, logprobs, vlm.tokenizer.token_bytes, text_start)

    echo_choices = [protocol.CompletionChoice(index=index, text=echoed, logprobs=logprobs_of([], []),
                                              finish_reason=None if requests else "length")
                    for index in range(body.n)] if body.echo else []
    if body.stream:
      streamed = [len(echoed)] * body.n  # each choice's text so far: where its next chunk's offsets start

      def chunk(index=0, output=None, usage=None):
        if usage:
          return reply(usage=usage)
        logprobs = logprobs_of(output.token_ids, output.logprobs, streamed[index], with_prompt=False)
        streamed[index] += len(output.text)
        return reply([protocol.CompletionChoice(index=index, text=output.text, finish_reason=output.finish_reason,
                                                logprobs=logprobs)])
      firsts = [reply([choice]) for choice in echo_choices]
      return fastapi.responses.StreamingResponse(
          sse(requests, len(prompt_ids), outputs, chunk, include_usage(body), firsts), media_type="text/event-stream")
    await finished(requests, outputs, http_request)
    if not requests:
      return reply(echo_choices, usage(requests, len(prompt_ids)))
    return reply([protocol.CompletionChoice(index=index, text=echoed + request.text,
                                            finish_reason=request.finish_reason,
                                            logprobs=logprobs_of(request.token_ids, request.logprobs))
                  for index, request in enumerate(requests)], usage(requests, len(prompt_ids)))

  @app.get("/v1/models")
  async def models():
    return protocol.ModelList(data=[protocol.Model(id=model_name, created=started)])

  @app.get("/health")
  async def health():
    if not engine.healthy:  # why goes to the log, not to whoever asks
      raise APIError(503, "the engine is not serving", kind="server_error", code="unavailable")
    return {"status": "ok"}

  @app.get("/metrics", include_in_schema=False)
  async def metrics_text():
    return fastapi.Response(prometheus_client.generate_latest(metrics.registry),
                            media_type=prometheus_client.CONTENT_TYPE_LATEST)

  app.include_router(chat_page.router)  # the chat page at /
  return app


class EngineFailed(RuntimeError):
  """The engine stopped on an error while serving: the process should end with a non-zero status, for a
  supervisor to start it again."""


def warm_up_examples(vlm, sizes: Sequence[tuple[int, int]]) -> list:
  """What the image processor makes, at each detail a request may ask for, of an image of each (height, width) in
  `sizes`, one per distinct result: the example images `Engine.warm_up` compiles prefills for."""
  examples = {}
  for height, width in sizes:
    image = np.zeros((height, width, 3), np.uint8)
    for detail in DETAILS:
      (pixels, size), = vlm.image_processor.at_detail(detail)([image])
      examples.setdefault(tuple(size), (pixels, size))
  return list(examples.values())


def serve(checkpoint: str, *, host: str = "127.0.0.1", port: int = 8000, num_slots: int = 8,
          max_len: int | None = None, api_key: str | None = None, image_dir: str | None = None,
          model_name: str | None = None, load_options: dict | None = None, **options) -> None:
  """Loads the checkpoint (`vlmjax.load(checkpoint, **load_options)`) and serves it until SIGINT/SIGTERM (uvicorn
  stops accepting, lets in-flight requests finish, then the engine drains). Raises EngineFailed, after uvicorn has
  shut down, when the engine failed. `options`: create_app's."""
  import vlmjax

  model_name = model_name or os.path.basename(os.path.normpath(checkpoint))
  if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
    _log.warning("serving on %s without --api_key: anyone who reaches this address can use the model", host)
  app = create_app(vlmjax.load(checkpoint, **(load_options or {})), model_name, num_slots=num_slots, max_len=max_len,
                   api_key=api_key, image_dir=image_dir, **options)
  server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info"))
  engine = app.state.engine

  def stop_when_the_engine_fails():
    engine.failed.wait()
    _log.critical("the engine failed (%s): shutting down", engine.error)
    server.should_exit = True

  threading.Thread(target=stop_when_the_engine_fails, name="engine-watch", daemon=True).start()
  server.run()
  if engine.error is not None:
    raise EngineFailed(f"the engine failed: {engine.error!r}")
