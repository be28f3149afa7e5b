"""Tokenizers as Hugging Face checkpoints carry them: `tokenizer.json` (the `tokenizers` library),
`tokenizer_config.json` (special tokens, BOS/EOS handling) and a Jinja chat template (from `chat_template.jinja`,
`chat_template.json` or `tokenizer_config.json`), read and rendered the way transformers does.
"""

import datetime
import functools
import json
import os
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import tokenizers
import tokenizers.processors

# Named special tokens transformers passes to chat templates (when set).
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(value: Any) -> str | None:
  """A special token as tokenizer_config.json stores it: a string, or an AddedToken dict with 'content'."""
  return value.get("content") if isinstance(value, dict) else value


def _raise_exception(message: str):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  # transformers' override: Jinja's own filter escapes HTML characters.
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationTag(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}` (transformers marks assistant text with it): renders the body."""

  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

  def _render(self, caller):
    return caller()


def _byte_level_alphabet() -> list[str]:
  """GPT-2's byte-level alphabet: the character that stands for each byte 0..255 in a byte-level BPE's tokens."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  others = iter(range(256, 512))
  return [chr(byte) if byte in printable else chr(next(others)) for byte in range(256)]


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


def _as_transformers_loads(backend: tokenizers.Tokenizer, tokenizer_config: dict) -> None:
  """What transformers does to tokenizer.json when it loads it (TokenizersBackend): the named and extra special
  tokens become special added tokens (split out of text, skipped by decode), and when tokenizer_config.json says
  add_bos_token / add_eos_token (or tokenizer.json has no post-processor) the post-processor becomes
  `[bos] $A [eos]` as those flags say."""
  extra = tokenizer_config.get("extra_special_tokens") or tokenizer_config.get("additional_special_tokens") or []
  values = [tokenizer_config.get(name) for name in SPECIAL_TOKENS]
  values += list(extra.values()) if isinstance(extra, dict) else list(extra)
  added = []
  for value in values:
    if isinstance(value, dict):
      options = {key: value[key] for key in ("single_word", "lstrip", "rstrip", "normalized") if key in value}
      added.append(tokenizers.AddedToken(value["content"], special=True, **options))
    elif value is not None:
      added.append(tokenizers.AddedToken(value, special=True, normalized=False))
  backend.add_special_tokens(added)
  if "add_bos_token" in tokenizer_config or "add_eos_token" in tokenizer_config or backend.post_processor is None:
    bos, eos = _token_text(tokenizer_config.get("bos_token")), _token_text(tokenizer_config.get("eos_token"))
    add_bos = bool(tokenizer_config.get("add_bos_token")) and bos is not None
    add_eos = bool(tokenizer_config.get("add_eos_token")) and eos is not None
    single = f"{bos}:0 " * add_bos + "$A:0" + f" {eos}:0" * add_eos
    pair = single + f" {bos}:1" * add_bos + " $B:1" + f" {eos}:1" * add_eos
    specials = [(bos, backend.token_to_id(bos))] * add_bos + [(eos, backend.token_to_id(eos))] * add_eos
    backend.post_processor = tokenizers.processors.TemplateProcessing(single=single, pair=pair,
                                                                      special_tokens=specials)


class Tokenizer:
  """Text <-> token ids, plus the chat template.

  Attributes:
    backend: the `tokenizers.Tokenizer` (token offsets, batch encoding).
    config: the tokenizer_config.json contents.
    special_tokens: the named special tokens that are set ({"bos_token": "<s>", ...}).
    bos_token, eos_token, pad_token: their texts (or None); *_id: their ids.
  """

  def __init__(self, backend: tokenizers.Tokenizer, tokenizer_config: dict, chat_template: str | None,
               name: str = "tokenizer"):
    self.backend = backend
    self.config = dict(tokenizer_config)
    self.name = name
    self.special_tokens = {key: _token_text(tokenizer_config[key]) for key in SPECIAL_TOKENS
                           if tokenizer_config.get(key) is not None}
    self.bos_token = self.special_tokens.get("bos_token")
    self.eos_token = self.special_tokens.get("eos_token")
    self.pad_token = self.special_tokens.get("pad_token")
    self.chat_template = chat_template
    self._template = None
    if chat_template is not None:
      environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
          trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
      environment.filters["tojson"] = _tojson
      environment.globals["raise_exception"] = _raise_exception
      environment.globals["strftime_now"] = lambda format: datetime.datetime.now().strftime(format)
      self._template = environment.from_string(chat_template)

  def __reduce__(self):
    """Pickled (for the input pipeline's worker processes) as what it is built from: a compiled Jinja template
    does not pickle."""
    return type(self), (self.backend, self.config, self.chat_template, self.name)

  @classmethod
  def from_directory(cls, directory: str) -> "Tokenizer":
    """Reads tokenizer.json, tokenizer_config.json (special tokens missing there are taken from
    special_tokens_map.json) and the chat template from a model directory, as transformers loads them."""
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{directory} has no tokenizer.json")
    tokenizer_config = {}
    for file in ("special_tokens_map.json", "tokenizer_config.json"):  # the second overrides the first
      config_path = os.path.join(directory, file)
      if os.path.exists(config_path):
        with open(config_path) as f:
          tokenizer_config.update(json.load(f))
    backend = tokenizers.Tokenizer.from_file(path)
    _as_transformers_loads(backend, tokenizer_config)
    return cls(backend, tokenizer_config, read_chat_template(directory, tokenizer_config), name=directory)

  def save(self, directory: str) -> None:
    """Writes tokenizer.json, tokenizer_config.json and chat_template.jinja (when there is a template)."""
    os.makedirs(directory, exist_ok=True)
    self.backend.save(os.path.join(directory, "tokenizer.json"))
    config = {key: value for key, value in self.config.items() if key != "chat_template"}
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
      json.dump(config, f, indent=2)
    if self.chat_template is not None:
      with open(os.path.join(directory, "chat_template.jinja"), "w") as f:
        f.write(self.chat_template)

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
    transformers' `tokenizer(text)` does. Text a chat template rendered: `encode_rendered`."""
    return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

  def encode_rendered(self, text: str) -> tokenizers.Encoding:
    """A chat template's output tokenized as transformers' processors do (`ProcessorMixin.apply_chat_template`):
    a template that writes BOS itself gets no second one, one that does not (llava-1.5-hf's) gets the tokenizer's
    special tokens. The encoding's `ids` and `offsets` (character spans)."""
    return self.backend.encode(text, add_special_tokens=not (self.bos_token and text.startswith(self.bos_token)))

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  @functools.cached_property
  def token_bytes(self) -> list[bytes]:
    """The UTF-8 bytes each token id adds to a text, spaces included (what constrained decoding matches and
    OpenAI's logprobs report): a byte-level BPE's characters mapped back to their bytes, a byte-fallback token
    (<0x0A>) its byte, any other token what decoding it after another token adds. Special tokens: their text."""
    decoder = (json.loads(self.backend.to_str()).get("decoder") or {}).get("type")
    to_byte = {char: byte for byte, char in enumerate(_byte_level_alphabet())} if decoder == "ByteLevel" else None
    anchor = self.encode("a", add_special_tokens=False)[:1]
    offset = len(self.decode(anchor, skip_special_tokens=False))
    special = {token.content for token in self.backend.get_added_tokens_decoder().values() if token.special}
    tokens = []
    for token_id in range(self.backend.get_vocab_size(with_added_tokens=True)):
      token = self.backend.id_to_token(token_id) or ""
      if token in special:
        tokens.append(token.encode())
      elif to_byte is not None and all(char in to_byte for char in token):
        tokens.append(bytes(to_byte[char] for char in token))
      elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        tokens.append(bytes([int(token[3:5], 16)]))
      else:
        tokens.append(self.decode(anchor + [token_id], skip_special_tokens=False)[offset:].encode())
    return tokens

  def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The conversation rendered by the chat template, as transformers renders it (keys whose value is None are
    dropped; the set special tokens are template variables). Message content is a string or a list of
    OpenAI-style parts ({"type": "image"}, {"type": "text", "text": ...})."""
    if self._template is None:
      raise ValueError(f"{self.name} has no chat template (chat_template.jinja, chat_template.json or "
                       f"tokenizer_config.json)")
    messages = [{key: value for key, value in message.items() if value is not None} for message in messages]
    try:
      return self._template.render(messages=messages, tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt, **self.special_tokens)
    except jinja2.exceptions.TemplateError as error:
      raise ValueError(f"the chat template failed: {error}") from error

  def encode_prompt(self, text: str, image_token_id: int, tokens_per_image: int, prefix_lm: bool,
                    num_images: int = 1) -> list[int]:
    """Token ids of a plain prompt with its images, as LlavaProcessor / PaliGemmaProcessor build them.

    LLaVA (`prefix_lm=False`): every image placeholder in `text` becomes `tokens_per_image` placeholders and the
    text is encoded with the special tokens (BOS). PaliGemma (`prefix_lm=True`): without placeholders in `text`,
    `num_images` of them go first; BOS follows the last placeholder and "\\n" ends the prompt (the whole of it is
    the prefix); each placeholder becomes `tokens_per_image` and nothing else is added.
    """
    image_token = self.backend.id_to_token(image_token_id)
    if image_token is None:
      raise ValueError(f"image token id {image_token_id} is not in the vocabulary of {self.name}")
    if prefix_lm:
      if image_token not in text:
        text = image_token * num_images + text
      end = text.rfind(image_token) + len(image_token)
      text = text[:end] + (self.bos_token or "") + text[end:] + "\n"
    text = text.replace(image_token, image_token * tokens_per_image)
    return self.encode(text, add_special_tokens=not prefix_lm)
