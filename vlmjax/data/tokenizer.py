"""Tokenizers as Hugging Face checkpoints carry them: `tokenizer.json` (the `tokenizers` library),
`tokenizer_config.json` (special tokens, BOS handling) and a Jinja chat template (from `chat_template.jinja`,
`chat_template.json` or `tokenizer_config.json`), rendered the way transformers renders it.
"""

import json
import os
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers


def _token_text(value: Any) -> str | None:
  """A special token as tokenizer_config.json stores it: a string, or an AddedToken dict with 'content'."""
  return value.get("content") if isinstance(value, dict) else value


def _raise_exception(message: str):
  raise jinja2.exceptions.TemplateError(message)


def read_chat_template(directory: str, tokenizer_config: dict) -> str | None:
  """The chat template, looked for where transformers looks: chat_template.jinja, chat_template.json, then
  tokenizer_config.json (a string, or a list of {name, template} where 'default' wins)."""
  path = os.path.join(directory, "chat_template.jinja")
  if os.path.exists(path):
    with open(path) as f:
      return f.read()
  path = os.path.join(directory, "chat_template.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)["chat_template"]
  template = tokenizer_config.get("chat_template")
  if isinstance(template, list):
    named = {item["name"]: item["template"] for item in template}
    return named.get("default", next(iter(named.values()), None))
  return template


class Tokenizer:
  """Text <-> token ids, plus the chat template.

  Attributes:
    backend: the `tokenizers.Tokenizer` (token offsets, batch encoding).
    bos_token, eos_token, pad_token: their texts (or None); *_id: their ids.
  """

  def __init__(self, backend: tokenizers.Tokenizer, tokenizer_config: dict, chat_template: str | None,
               name: str = "tokenizer"):
    self.backend = backend
    self.name = name
    self.bos_token = _token_text(tokenizer_config.get("bos_token"))
    self.eos_token = _token_text(tokenizer_config.get("eos_token"))
    self.pad_token = _token_text(tokenizer_config.get("pad_token"))
    self.chat_template = chat_template
    self._template = None
    if chat_template is not None:
      environment = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                                 extensions=[jinja2.ext.loopcontrols])
      environment.globals["raise_exception"] = _raise_exception
      self._template = environment.from_string(chat_template)

  @classmethod
  def from_directory(cls, directory: str) -> "Tokenizer":
    """Reads tokenizer.json and tokenizer_config.json (and the chat template) from a model directory."""
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{directory} has no tokenizer.json")
    config_path = os.path.join(directory, "tokenizer_config.json")
    tokenizer_config = {}
    if os.path.exists(config_path):
      with open(config_path) as f:
        tokenizer_config = json.load(f)
    return cls(tokenizers.Tokenizer.from_file(path), tokenizer_config, read_chat_template(directory, tokenizer_config),
               name=directory)

  def _id(self, token: str | None) -> int | None:
    return None if token is None else self.backend.token_to_id(token)

  @property
  def bos_token_id(self) -> int | None:
    return self._id(self.bos_token)

  @property
  def eos_token_id(self) -> int | None:
    return self._id(self.eos_token)

  @property
  def pad_token_id(self) -> int | None:
    return self._id(self.pad_token)

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size()

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of `text`; with add_special_tokens, the tokenizer's post-processor adds BOS etc. as
    transformers' `tokenizer(text)` does. Text rendered by a chat template already holds its specials: encode
    it with add_special_tokens=False (as `apply_chat_template(tokenize=True)` does)."""
    return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The conversation rendered by the chat template. Message content is a string or a list of OpenAI-style
    parts ({"type": "image"}, {"type": "text", "text": ...})."""
    if self._template is None:
      raise ValueError(f"{self.name} has no chat template (chat_template.jinja, chat_template.json or "
                       f"tokenizer_config.json)")
    try:
      return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                   pad_token=self.pad_token or "")
    except jinja2.exceptions.TemplateError as error:
      raise ValueError(f"the chat template of {self.name} failed: {error}") from error
