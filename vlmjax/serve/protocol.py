"""Requests and responses of the OpenAI API subset the server speaks (pydantic models).

Requests refuse fields they do not know (an ignored field would silently give the client something else than it
asked for); ranges are checked here, so a bad value is a 400 that names the field.
"""

import time
import uuid
from typing import Annotated, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field


# Each generated token is checked against every stop string, on the thread that serves all streams.
MAX_STOPS, MAX_STOP_CHARS = 4, 64
MAX_CHOICES = 16  # `n`: each choice is a request of its own
MAX_TOP_LOGPROBS = 20


class _Request(BaseModel):
  model_config = ConfigDict(extra="forbid")


class ImageURL(_Request):
  url: str  # data:image/png;base64,... or a local file path (file:// or absolute) under the allowed directory
  # vlmjax.data.images.DETAILS: "low", the image at the cheapest the model takes it (Qwen2.5-VL: at most 64 tokens;
  # LLaVA-NeXT: its smallest tile grid); "high" and "auto", as the checkpoint's processor is configured. A fixed-size
  # model's images give the same tokens at any detail.
  detail: Literal["auto", "low", "high"] = "auto"


class TextPart(_Request):
  type: Literal["text"]
  text: str


class ImagePart(_Request):
  type: Literal["image_url"]
  image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Request):
  role: Literal["system", "user", "assistant"]
  content: str | list[ContentPart]


class StreamOptions(_Request):
  include_usage: bool = False


class JSONSchema(_Request):
  name: str = Field(max_length=64)
  schema_: dict | None = Field(None, alias="schema")  # None: any JSON object
  description: str | None = None
  strict: bool | None = None  # accepted; the schema is always followed exactly


class ResponseFormat(_Request):
  """`text` (no constraint), `json_object` (any JSON object) or `json_schema` (a value of that schema)."""

  type: Literal["text", "json_object", "json_schema"]
  json_schema: JSONSchema | None = None

  @pydantic.model_validator(mode="after")
  def _schema_given(self):
    if (self.type == "json_schema") != (self.json_schema is not None):
      raise ValueError("json_schema is given with type 'json_schema', and only then")
    return self


class GenerationRequest(_Request):
  """Settings both endpoints share. `top_k` is an extension (as vLLM's); 0 keeps every token. `n` choices are
  sampled with seeds seed, seed + 1, ... when a seed is given."""

  model: str
  max_tokens: int | None = Field(None, ge=1)
  temperature: float = Field(1.0, ge=0.0, le=2.0)
  top_p: float = Field(1.0, gt=0.0, le=1.0)
  top_k: int = Field(0, ge=0, le=2**31 - 1)  # the engine refuses more than the vocabulary
  n: int = Field(1, ge=1, le=MAX_CHOICES)
  stop: str | list[str] | None = None
  seed: int | None = Field(None, ge=0, le=2**32 - 1)  # a PRNG key holds 32 bits of seed
  stream: bool = False
  stream_options: StreamOptions | None = None
  user: str | None = None  # an end-user id, accepted and unused

  @pydantic.field_validator("stop")
  @classmethod
  def _stop_strings(cls, stop):
    stops = [stop] if isinstance(stop, str) else stop or []
    if len(stops) > MAX_STOPS or not all(0 < len(text) <= MAX_STOP_CHARS for text in stops):
      raise ValueError(f"stop takes up to {MAX_STOPS} strings of 1 to {MAX_STOP_CHARS} characters")
    return stops


class ChatCompletionRequest(GenerationRequest):
  messages: list[ChatMessage] = Field(min_length=1)
  max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
  logprobs: bool = False
  top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
  response_format: ResponseFormat | None = None

  @pydantic.model_validator(mode="after")
  def _top_logprobs_need_logprobs(self):
    if self.top_logprobs is not None and not self.logprobs:
      raise ValueError("top_logprobs needs logprobs: true")
    return self

  @property
  def token_limit(self) -> int | None:
    return self.max_completion_tokens or self.max_tokens


class CompletionRequest(GenerationRequest):
  prompt: str | list[str]
  max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for completions; 0 only with echo
  logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # the likeliest tokens reported with each
  echo: bool = False  # the prompt comes back before the completion, with its logprobs when asked for

  @pydantic.model_validator(mode="after")
  def _nothing_to_generate_only_with_echo(self):
    if self.max_tokens == 0 and not self.echo:
      raise ValueError("max_tokens 0 (nothing generated) is for echo: true, which scores the prompt")
    return self

  @pydantic.field_validator("prompt")
  @classmethod
  def _one_prompt(cls, prompt):
    if isinstance(prompt, list):
      if len(prompt) != 1:
        raise ValueError(f"one prompt per request (n=1), got {len(prompt)}")
      prompt = prompt[0]
    if not prompt:
      raise ValueError("the prompt is empty")
    return prompt

  @property
  def token_limit(self) -> int | None:
    return self.max_tokens


def reported_error(errors: list[dict], body) -> tuple[dict, str | None]:
  """The validation error (of pydantic's `errors()`, a FastAPI body's: `loc` starts with "body") that a 400 reports,
  and the place in the request body it names, as a client writes it (`messages.0.content.1.image_url.detail`).

  Where a value may take one of several forms (a message's content: a string or a list of parts), pydantic reports
  each form's error; the one that reached deepest into the value is the one meant. Its `loc` also names each form
  (`str`, `list[...]`) and a content part's `type` (the tag of a tagged union): following it through the body leaves
  those out."""
  error = max(errors, key=lambda error: len(error["loc"]))  # the first of the deepest
  loc, names, value, at_item = error["loc"][1:], [], body, False
  for i, part in enumerate(loc):
    if isinstance(part, int):
      names.append(str(part))
      value = value[part] if isinstance(value, list) and -len(value) <= part < len(value) else None
    elif isinstance(value, dict) and not (at_item and value.get("type") == part) and (
        part in value or (i == len(loc) - 1 and error["type"] == "missing")):
      names.append(part)
      value = value.get(part)
    at_item = isinstance(part, int)
  return error, ".".join(names) or None


# Responses.


def new_id(prefix: str) -> str:
  return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
  return int(time.time())


class PromptTokensDetails(BaseModel):
  cached_tokens: int  # read from the prefix cache instead of prefilled


class Usage(BaseModel):
  prompt_tokens: int
  completion_tokens: int
  total_tokens: int
  prompt_tokens_details: PromptTokensDetails

  @classmethod
  def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> "Usage":
    return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
               total_tokens=prompt_tokens + completion_tokens,
               prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


class TopLogprob(BaseModel):
  token: str
  logprob: float
  bytes: list[int]


class ChatTokenLogprob(TopLogprob):
  top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
  content: list[ChatTokenLogprob]


class CompletionLogprobs(BaseModel):
  """The legacy completions' shape: per token its text, log-probability (None for the prompt's first), the
  likeliest tokens there ({text: log-probability}) and where its text starts."""

  tokens: list[str]
  token_logprobs: list[float | None]
  top_logprobs: list[dict[str, float] | None]
  text_offset: list[int]


class AssistantMessage(BaseModel):
  role: Literal["assistant"] = "assistant"
  content: str


class ChatChoice(BaseModel):
  index: int = 0
  message: AssistantMessage
  finish_reason: Literal["stop", "length"]
  logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
  id: str
  object: Literal["chat.completion"] = "chat.completion"
  created: int
  model: str
  choices: list[ChatChoice]
  usage: Usage


class Delta(BaseModel):
  role: Literal["assistant"] | None = Field(None, exclude_if=lambda value: value is None)
  content: str | None = Field(None, exclude_if=lambda value: value is None)


class ChatChunkChoice(BaseModel):
  index: int = 0
  delta: Delta
  finish_reason: Literal["stop", "length"] | None = None
  logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
  id: str
  object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
  created: int
  model: str
  choices: list[ChatChunkChoice]
  usage: Usage | None = None


class CompletionChoice(BaseModel):
  index: int = 0
  text: str
  finish_reason: Literal["stop", "length"] | None = None
  logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
  """A whole completion, and (object='text_completion' too, as OpenAI sends it) each streamed chunk."""

  id: str
  object: Literal["text_completion"] = "text_completion"
  created: int
  model: str
  choices: list[CompletionChoice]
  usage: Usage | None = None


class Model(BaseModel):
  id: str
  object: Literal["model"] = "model"
  created: int
  owned_by: str = "vlmjax"


class ModelList(BaseModel):
  object: Literal["list"] = "list"
  data: list[Model]


class ErrorInfo(BaseModel):
  message: str
  type: str
  param: str | None = None
  code: str | None = None


class ErrorResponse(BaseModel):
  error: ErrorInfo
