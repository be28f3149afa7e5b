"""Constrained decoding: a request that must answer in JSON (OpenAI's `response_format`) samples, at each step, only
among the tokens that keep its text a prefix of a JSON value its schema accepts, and can end only once that value is
complete. llguidance (Microsoft's Earley parser over a tokenizer's vocabulary, the one vLLM and SGLang use) computes
each step's allowed tokens as a bitmask; the engine applies it on device before sampling.

    grammars = JSONGrammars(vlm.tokenizer, vocab_size, eos_token_ids)   # once per model
    engine.submit(prompt_ids, ..., constraint=grammars.constraint({"type": "object", ...}))
"""

import llguidance
import llguidance.numpy
import numpy as np

from vlmjax.data.tokenizer import Tokenizer


class _Vocabulary:
  """What llguidance reads of a tokenizer: each token's bytes, the special and end tokens, and an encoder."""

  def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]):
    self._tokenizer = tokenizer
    token_bytes = tokenizer.token_bytes
    # The model's vocabulary may be larger than the tokenizer's (padded embedding rows): those ids are never allowed.
    self.tokens = token_bytes[:vocab_size] + [b""] * (vocab_size - len(token_bytes))
    self.eos_token_id, self.bos_token_id = eos_token_ids[0], tokenizer.bos_token_id
    self.special_token_ids = sorted({*eos_token_ids, *(
        token_id for token_id, token in tokenizer.backend.get_added_tokens_decoder().items()
        if token.special and token_id < vocab_size)})

  def __call__(self, text: str | bytes) -> list[int]:
    """The tokens of `text` in the middle of a text: after a newline, so that a pre-tokenizer's prefix space
    (SentencePiece's "▁" at the start) is not added to it."""
    text = text.decode(errors="replace") if isinstance(text, bytes) else text
    anchor = self._tokenizer.encode("\n", add_special_tokens=False)
    ids = self._tokenizer.encode("\n" + text, add_special_tokens=False)
    return ids[len(anchor):] if ids[:len(anchor)] == anchor else self._tokenizer.encode(text, add_special_tokens=False)


class JSONGrammars:
  """JSON-schema constraints over one model's vocabulary (llguidance's view of the tokenizer is built once)."""

  def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]):
    self.vocab_size = vocab_size
    self._tokenizer = llguidance.LLTokenizer(
        llguidance.TokenizerWrapper(_Vocabulary(tokenizer, vocab_size, eos_token_ids)), n_vocab=vocab_size)

  def constraint(self, schema: dict | None = None) -> "JSONConstraint":
    """A fresh constraint to a JSON value of `schema` (None: any JSON object); ValueError for a schema llguidance
    cannot compile, naming what is wrong."""
    try:
      grammar = llguidance.LLMatcher.grammar_from_json_schema(
          {"type": "object"} if schema is None else schema,
          defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
    except ValueError as error:
      raise ValueError(f"the JSON schema is not valid: {error}") from error
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self._tokenizer)
    if failed:
      raise ValueError(f"the JSON schema cannot be used: {messages[0]}")
    return JSONConstraint(llguidance.LLMatcher(self._tokenizer, grammar, log_level=0), self.vocab_size)


class JSONConstraint:
  """One request's place in its grammar (`requests.Constraint`), followed on the engine thread."""

  def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int):
    self._matcher = matcher
    self._mask = llguidance.numpy.allocate_token_bitmask(1, vocab_size)

  def allowed(self) -> np.ndarray:
    llguidance.numpy.fill_next_token_bitmask(self._matcher, self._mask, 0)
    return self._mask[0].copy()

  def advance(self, token: int) -> None:
    # A token outside the mask cannot be sampled; the matcher's error state would only end the request early.
    self._matcher.consume_token(token)

