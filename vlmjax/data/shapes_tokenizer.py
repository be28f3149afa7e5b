"""The shapes data set's tokenizer: a small BPE trained on the data set's own text when it is built, saved beside
it in the Hugging Face layout (tokenizer.json + tokenizer_config.json with a LLaVA-style chat template), so it
loads exactly as a checkpoint's tokenizer does.

    USER: <image>
    What colour is the circle? ASSISTANT: red</s>USER: ... ASSISTANT:
"""

import json
import os
import string
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from vlmjax.data import shapes_tasks

PAD, BOS, EOS, IMAGE = "<pad>", "<s>", "</s>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, IMAGE)  # ids 0, 1, 2, 3: configs/shapes_tiny.py's image_token_id is 3
SEPARATE = r"[?.,!;'\[\]\n]"  # characters the BPE never merges with a neighbour

# LLaVA-1.5's conversation format. Content is a string (with "<image>" inline) or a list of OpenAI-style parts.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}{%- set ns = namespace(text='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set ns.text = ns.text + '<image>\n' -%}"
    "{%- else -%}{%- set ns.text = ns.text + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- set text = ns.text -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{ 'USER: ' + text + ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT: ' + text + eos_token }}"
    "{%- else -%}{{ raise_exception('shapes chat template: roles are user and assistant, got ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


def train(texts: Iterable[str], out_dir: str, vocab_size: int = 512) -> None:
  """Trains the BPE on `texts` and writes tokenizer.json and tokenizer_config.json into out_dir."""
  tokenizer = Tokenizer(models.BPE(unk_token=None))
  # Metaspace (as SentencePiece): spaces become part of the tokens, so decode(encode(text)) == text. Sentence
  # punctuation and line breaks are tokens of their own, as in the tokenizers of real LMs: merged into words, the
  # BPE made ten tokens of each shape name ("▁circle", "▁circle?", "▁circle.", "▁circle?\nA.", ...), and the
  # model had to learn separately which image tokens each one names. A colon stays with its word, so the
  # template's "ASSISTANT:" is one token per turn.
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
      pre_tokenizers.Split(Regex(SEPARATE), behavior="isolated")])
  tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
  # Every printable ASCII character is in the vocabulary: the BPE has no unknown token, so a character it never
  # saw in training would silently vanish from the text.
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                initial_alphabet=list(string.printable))
  tokenizer.train_from_iterator(texts, trainer)
  os.makedirs(out_dir, exist_ok=True)
  tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
            "add_bos_token": False, "add_eos_token": False, "chat_template": CHAT_TEMPLATE}
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=1)


def texts_of(record: dict) -> Iterable[str]:
  """Every prompt and answer a model reads or writes about a shapes record, plus the template's own words."""
  yield "USER: ASSISTANT:"
  yield from record["captions"]
  for question, answer in [(q["question"], q["answer"]) for q in record["vqa"]] + shapes_tasks.other_tasks(record):
    yield question
    yield answer
  for message in record["conversation"]:
    yield message["content"]
