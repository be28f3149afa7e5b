"""Input pipelines with grain: conversations -> token ids, loss masks and pixels, batched, checkpointable.

    dataset = train_dataset(source, to_example, seed=0, batch_size=32)
    iterator = iter(dataset)             # grain DatasetIterator: get_state() / set_state(state)
    batch = next(iterator)               # {input_ids, targets, loss_mask, input_mask, pixel_values}: numpy

Every process reads its own part of one global order (`process_index::process_count`), so the global batch is
the processes' batches side by side and holds the same examples for any number of processes. A record that fails to decode is logged with its index, skipped and
counted; it never stops the run.
"""

import dataclasses
import logging
from typing import Any, Callable, Sequence

import grain
import numpy as np

from vlmjax.data.tokenizer import Tokenizer

Messages = list[dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class ConversationEncoder:
  """Renders a conversation with the chat template, tokenizes it, expands image placeholders and marks the
  assistant tokens (content and the end token the template puts after it) for the loss.

  Attributes:
    tokenizer: the model's `vlmjax.data.tokenizer.Tokenizer` (chat template and end token included).
    image_token_id: the placeholder id; each one becomes `tokens_per_image` copies.
    max_length: examples are truncated to this many tokens.
  """

  tokenizer: Tokenizer
  image_token_id: int
  tokens_per_image: int
  max_length: int

  def __call__(self, messages: Messages) -> tuple[np.ndarray, np.ndarray]:
    """-> (ids int32[T], assistant bool[T]) with T <= max_length."""
    text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    spans = _assistant_spans(text, messages, self.tokenizer.eos_token)
    encoding = self.tokenizer.backend.encode(text, add_special_tokens=False)
    ids = np.asarray(encoding.ids, np.int32)
    offsets = np.asarray(encoding.offsets).reshape(-1, 2)  # [T, 2] character start, end of each token
    assistant = np.zeros(len(ids), bool)
    for start, end in spans:  # a token belongs to a turn if it overlaps it (a leading space may come along)
      assistant |= (offsets[:, 1] > start) & (offsets[:, 0] < end)
    copies = np.where(ids == self.image_token_id, self.tokens_per_image, 1)
    ids, assistant = np.repeat(ids, copies), np.repeat(assistant, copies)
    return ids[:self.max_length], assistant[:self.max_length]


def _assistant_spans(text: str, messages: Messages, eos_token: str) -> list[tuple[int, int]]:
  """Character spans of each assistant turn's content (plus a directly following end token) in `text`.

  Every message's text is looked for in order after the previous one, so an answer that also occurs inside
  its question ("... to the left or to the right ...? right") is found where the answer is.
  """
  spans, cursor = [], 0
  for message in messages:
    content = message["content"]
    pieces = [content] if isinstance(content, str) else [p["text"] for p in content if p.get("type") == "text"]
    for piece in pieces:
      start = text.find(piece, cursor)
      if start < 0:
        raise ValueError(f"the chat template's output does not contain the {message['role']} turn {piece!r} "
                         f"after position {cursor}: the template does not produce the expected roles")
      cursor = start + len(piece)
      if message["role"] == "assistant":
        if text.startswith(eos_token, cursor):
          cursor += len(eos_token)
        spans.append((start, cursor))
  return spans


def example_arrays(ids: np.ndarray, assistant: np.ndarray, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
  """Next-token training arrays of one example: targets are the ids shifted left, and the loss counts the
  positions whose *next* token is an assistant token."""
  targets = np.append(ids[1:], 0).astype(np.int32)
  loss_mask = np.append(assistant[1:], False).astype(np.float32)
  return {"input_ids": ids.astype(np.int32), "targets": targets, "loss_mask": loss_mask,
          "pixel_values": pixel_values.astype(np.float32)}


TOKEN_KEYS = ("input_ids", "targets", "loss_mask")


def pad_batch(examples: Sequence[dict[str, np.ndarray]], length: int) -> dict[str, np.ndarray]:
  """Stacks examples, right-padding the token arrays (TOKEN_KEYS) to `length` (one static shape: one
  compilation) and adding input_mask; other arrays (pixels, ids of the records) are stacked as they are."""
  def pad(array):
    return np.pad(array, (0, length - len(array)))
  batch = {key: np.stack([pad(e[key]) if key in TOKEN_KEYS else e[key] for e in examples]) for key in examples[0]}
  batch["input_mask"] = np.stack([np.arange(length) < len(e["input_ids"]) for e in examples])
  return batch


class BadRecords:
  """How many records failed to decode and were skipped (in this process)."""

  def __init__(self):
    self.count = 0


class _SkipBadRecords(grain.transforms.RandomMap):
  """Applies `to_example(record, rng)`; a record that raises is logged with its index, counted and skipped."""

  def __init__(self, to_example: Callable[[Any, np.random.Generator], dict | None], source_name: str,
               bad_records: BadRecords):
    self._to_example = to_example
    self._source_name = source_name
    self._bad_records = bad_records

  def random_map(self, element, rng: np.random.Generator):
    index, record = element
    try:
      return self._to_example(record, rng)
    except Exception as error:  # a corrupt image or a malformed record must not stop training
      self._bad_records.count += 1
      logging.warning("skipping record %d of %s (%s: %s); %d skipped so far", index, self._source_name,
                      type(error).__name__, error, self._bad_records.count)
      return None


class _Indexed:
  """A random-access source whose items come with their index (for error messages)."""

  def __init__(self, source):
    self._source = source

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    return index, self._source[index]


def train_dataset(source, to_example: Callable[[Any, np.random.Generator], dict], *, seed: int, batch_size: int,
                  length: int, process_index: int = 0, process_count: int = 1, num_epochs: int | None = None,
                  shuffle: bool = True, source_name: str = "the data source",
                  bad_records: BadRecords | None = None) -> grain.IterDataset:
  """Batches of this process's part of `source`, shuffled by seed (reshuffled each epoch), repeated.

  Args:
    source: random access (`len`, `[i]`) records, e.g. `vlmjax.data.shapes.load(dir, "train")`.
    to_example: (record, numpy Generator seeded per element) -> `example_arrays(...)`.
    batch_size: examples per batch *on this process* (the global batch divided by process_count).
    length: the static token length batches are padded to.
    num_epochs: None repeats forever.
    bad_records: counts the records skipped because they failed to decode.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  dataset = grain.MapDataset.source(_Indexed(source))
  if shuffle:
    dataset = dataset.shuffle(seed=seed)
  skip_bad = _SkipBadRecords(to_example, source_name, bad_records or BadRecords())
  dataset = dataset.repeat(num_epochs).random_map(skip_bad, seed=seed)
  # One global order, dealt out: process p takes positions p, p + P, ... (lazily: it only decodes its own).
  # Global batch b is then positions [b*G, (b+1)*G) whatever the process count, with the same per-example
  # randomness, so a run on N processes sees what a run on one sees.
  dataset = dataset[process_index::process_count]
  dataset = dataset.filter(lambda example: example is not None).to_iter_dataset()
  return dataset.batch(batch_size, drop_remainder=True, batch_fn=lambda examples: pad_batch(examples, length))
