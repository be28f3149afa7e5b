"""A request to the serving engine (`engine.py`) and what its client receives: the text as it becomes final.

The engine thread decodes a request's tokens; the detokenizer thread turns each new token into text
(`Request.receive`): the whole text decoded again (a merge may change the tail), a stop string found and cut,
and a tail held back while it may still become a stop string or an incomplete UTF-8 character.
"""

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Protocol

import jax
import numpy as np

from vlmjax.infer.sampling import SamplingParams

FINISH_REASONS = ("stop", "length", "cancelled", "error")  # stop: an end token or a stop string


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
  """A generated token's log-probability under the model (log-softmax of its logits, before temperature or any
  constraint), and the most likely tokens' (token id, log-probability), the likeliest first."""

  logprob: float
  top: tuple[tuple[int, float], ...]


@dataclasses.dataclass(frozen=True)
class Output:
  """What a request produced since its previous output; `finish_reason` (one of FINISH_REASONS) is set on the
  last one only, `error` when the engine failed. `logprobs`: of `token_ids`, when the request asked for them."""

  text: str
  token_ids: tuple[int, ...]
  finish_reason: str | None = None
  error: str | None = None
  logprobs: tuple[TokenLogprob, ...] = ()


class Constraint(Protocol):
  """What a request may generate, followed token by token on the engine thread (`constrained.py`)."""

  def allowed(self) -> np.ndarray:
    """int32[ceil(V / 32)]: bit t % 32 of word t // 32 set when token t may come next."""

  def advance(self, token: int) -> None:
    """The request generated `token`."""


class Request:
  """A request as the engine tracks it, made by `Engine.submit`. The engine thread decodes it (`decoded_ids`,
  and moves `key` on when it preempts it); the detokenizer thread alone writes `token_ids`, `text`,
  `finish_reason` and the timings (time.monotonic() seconds). `images_end`: the prompt's tokens up to and
  including its last image placeholder (0 without images); `pixel_values`: its images as `Engine.submit` takes
  them."""

  def __init__(self, prompt_ids: list[int], pixel_values: np.ndarray | list | None, images_end: int, max_tokens: int,
               sampling: SamplingParams, key: jax.Array, stop: tuple[str, ...],
               listener: Callable[[Output], None] | None, top_logprobs: int | None = None,
               constraint: Constraint | None = None):
    self.prompt_ids, self.pixel_values, self.images_end = prompt_ids, pixel_values, images_end
    self.max_tokens, self.sampling, self.key, self.stop, self.listener = max_tokens, sampling, key, stop, listener
    self.top_logprobs, self.constraint = top_logprobs, constraint
    self.logprobs: list[TokenLogprob] | None = None if top_logprobs is None else []  # of token_ids
    self.token_ids: list[int] = []
    self.text = ""  # what has been handed out: the generated text, minus a stop string and what follows it
    self.finish_reason: str | None = None
    self.error: str | None = None
    self.submitted_at = time.monotonic()
    self.first_token_at: float | None = None
    self.finished_at: float | None = None
    self.done = threading.Event()
    self.cancelled = False
    self.decoded_ids: list[int] = []  # the tokens the engine has produced for it (the engine thread's copy)
    self.cached_tokens = 0  # prompt tokens read from the prefix cache instead of prefilled (at its last admission)

  @property
  def num_tokens(self) -> int:
    """The prompt's tokens and those the engine has generated so far."""
    return len(self.prompt_ids) + len(self.decoded_ids)

  def wait(self, timeout: float | None = None) -> "Request":
    if not self.done.wait(timeout):
      raise TimeoutError(f"the request did not finish within {timeout} s")
    return self

  def receive(self, token: int | None, reason: str | None, decode: Callable[[list[int]], str],
              engine_error: BaseException | None, scores: TokenLogprob | None = None) -> Output:
    """The detokenizer thread's step: takes the request's next token (None: none, it only ends) with its scores
    (when it asked for logprobs) and the reason it ends (None: it goes on), and returns the Output for its
    listener; a stop string found ends it here."""
    now = time.monotonic()
    if token is not None:
      self.token_ids.append(token)
      self.first_token_at = self.first_token_at or now
      if self.logprobs is not None:
        scores = TokenLogprob(scores.logprob, scores.top[:self.top_logprobs])
        self.logprobs.append(scores)
    text = decode(self.token_ids)  # the whole text each time: merges may change the tail
    end = len(text)
    found = [index for index in (text.find(stop, max(0, len(self.text) - len(stop) + 1)) for stop in self.stop)
             if index >= 0]
    if found:
      end, reason = min(found), "stop"
    elif reason is None:
      end -= _undecided_tail(text, self.stop)
    new_text = text[len(self.text):end]
    self.text += new_text
    if reason == "error":
      self.error = f"the engine failed: {engine_error}"
    if reason:
      self.finish_reason, self.finished_at = reason, now
      self.done.set()
    return Output(text=new_text, token_ids=() if token is None else (token,), finish_reason=reason, error=self.error,
                  logprobs=() if token is None or self.logprobs is None else (scores,))


def _undecided_tail(text: str, stops: tuple[str, ...]) -> int:
  """How many trailing characters to hold back: an incomplete UTF-8 character (U+FFFD), or the longest tail that
  may be the start of a stop string."""
  if text.endswith("\ufffd"):
    return 1
  for size in range(min(len(text), max(map(len, stops), default=1) - 1), 0, -1):
    if any(stop.startswith(text[-size:]) for stop in stops):
      return size
  return 0
