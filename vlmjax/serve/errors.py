"""Errors as OpenAI's clients read them: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

import fastapi

from vlmjax.serve import protocol


class APIError(Exception):
  """An error the client caused (or must hear about), answered with OpenAI's error body; `headers` go with it
  (Retry-After on a 503)."""

  def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
               kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
    self.headers = headers

  def response(self) -> fastapi.responses.JSONResponse:
    error = protocol.ErrorInfo(message=self.message, type=self.kind, param=self.param, code=self.code)
    return fastapi.responses.JSONResponse(protocol.ErrorResponse(error=error).model_dump(), status_code=self.status,
                                          headers=self.headers)


def internal(request_id: str) -> APIError:
  """The only thing a client hears of a failure inside the server: the details go to the log, under the id."""
  return APIError(500, f"internal error (request id {request_id}); the server's log has the details",
                  kind="server_error", code="internal_error")
