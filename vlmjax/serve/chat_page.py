"""The chat page at `/`: chat.html, one file of HTML, CSS and JS that talks to /v1/models and /v1/chat/completions
from the browser (no build step, nothing fetched from elsewhere). The page itself needs no API key; the key the
person types guards the /v1/ routes it calls."""

import importlib.resources

import fastapi

router = fastapi.APIRouter()


@router.get("/", include_in_schema=False)
def chat_page() -> fastapi.responses.HTMLResponse:
  # Read on each request (a few kB): an edited page shows on reload, and no-cache makes the browser ask.
  page = importlib.resources.files("vlmjax.serve").joinpath("chat.html").read_text(encoding="utf-8")
  return fastapi.responses.HTMLResponse(page, headers={"Cache-Control": "no-cache"})
