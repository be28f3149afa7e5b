"""ASGI middleware that answers before the app reads a request: the API key, and the size of the body."""

import secrets

from vlmjax.serve.errors import APIError


class RequireAPIKey:
  """Paths starting with one of `prefixes` need `Authorization: Bearer <key>` (the scheme in any case, as RFC
  7235 has it), checked before the body is read."""

  def __init__(self, app, api_key: str, prefixes: tuple[str, ...]):
    self.app, self.expected, self.prefixes = app, api_key.encode(), prefixes

  async def __call__(self, scope, receive, send):
    if scope["type"] == "http" and scope["path"].startswith(self.prefixes):
      given = dict(scope["headers"]).get(b"authorization", b"")
      scheme, _, key = given.strip().partition(b" ")
      if scheme.lower() != b"bearer" or not secrets.compare_digest(key.strip(), self.expected):
        message = "missing API key" if not given else "incorrect API key"
        response = APIError(401, f"{message}: send the header 'Authorization: Bearer <key>'",
                            code="invalid_api_key").response()
        return await response(scope, receive, send)
    await self.app(scope, receive, send)


class LimitBody:
  """A request body over `max_bytes` gets 413: from its Content-Length before a byte of it is read, or, sent
  without one (chunked), as soon as what was read passes the limit. The body is read here whole (the JSON parser
  would read it whole anyway) and handed on to the app."""

  def __init__(self, app, max_bytes: int):
    self.app, self.max_bytes = app, max_bytes

  def _too_large(self) -> APIError:
    return APIError(413, f"the request body is larger than this server's limit of {self.max_bytes} bytes",
                    code="request_too_large")

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    length = dict(scope["headers"]).get(b"content-length")
    if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
      error = self._too_large() if length.isdigit() else APIError(400, "Content-Length is not a number")
      return await error.response()(scope, receive, send)
    body, more = bytearray(), True
    while more:
      message = await receive()
      if message["type"] != "http.request":  # the client left
        return
      body += message.get("body", b"")
      more = message.get("more_body", False)
      if len(body) > self.max_bytes:
        return await self._too_large().response()(scope, receive, send)
    handed_on = False

    async def replay():
      nonlocal handed_on
      if handed_on:
        return await receive()  # later: the disconnect a streaming response waits for
      handed_on = True
      return {"type": "http.request", "body": bytes(body), "more_body": False}

    await self.app(scope, replay, send)
