"""Input pipelines with grain: conversations -> token ids, loss masks and pixels, batched, checkpointable.

    dataset = train_dataset(source, to_example, seed=0, batch_size=32, length=192)
    iterator = iter(dataset)             # grain DatasetIterator: get_state() / set_state(state)
    batch = next(iterator)               # {input_ids, targets, loss_mask, input_mask, pixel_values}: numpy
                                         # packing=True adds segment_ids and positions (vlmjax.data.packing)

Every process reads its own part of one global order (`process_index::process_count`), so the global batch is
the processes' batches side by side and holds the same examples for any number of processes. Worker processes
(`num_workers`) decode records without changing which batches come out. A record that fails to read or decode
is logged with its index, skipped and counted; it never stops the run.

`train_dataset` is `batches(examples(source, ...))`; `vlmjax.data.sources` mixes several `examples` (grain's
`MapDataset.mix`) into the same `batches`.
"""

import dataclasses
import logging
from typing import Any, Callable, Sequence

import grain
import numpy as np
from absl import flags

from vlmjax.data import packing as packing_lib
from vlmjax.data.tokenizer import Tokenizer

Messages = list[dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class ConversationEncoder:
  """Renders a conversation with the chat template, tokenizes it, expands image placeholders and marks the
  assistant tokens (content and the end token the template puts after it) for the loss.

  The rendered text is tokenized as transformers' processors tokenize a rendered conversation: with the
  tokenizer's own special tokens (its BOS) unless the text already starts with BOS.

  Attributes:
    tokenizer: the model's `vlmjax.data.tokenizer.Tokenizer` (chat template and end token included).
    image_token_id: the placeholder id; each one becomes `tokens_per_image` copies.
    max_length: examples are truncated to this many tokens; None keeps them whole.
    end_turns: put the end token after each assistant turn the template does not end with it (and mark it for
      the loss), so that the model learns to stop where the training format says a turn ends.
  """

  tokenizer: Tokenizer
  image_token_id: int
  tokens_per_image: int
  max_length: int | None
  end_turns: bool = False

  def __call__(self, messages: Messages) -> tuple[np.ndarray, np.ndarray]:
    """-> (ids int32[T], assistant bool[T]) with T <= max_length."""
    text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    text, spans = _assistant_spans(text, messages, self.tokenizer.eos_token, self.end_turns)
    encoding = self.tokenizer.encode_rendered(text)
    ids = np.asarray(encoding.ids, np.int32)
    offsets = np.asarray(encoding.offsets).reshape(-1, 2)  # [T, 2] character start, end of each token
    assistant = np.zeros(len(ids), bool)
    for start, end in spans:  # a token belongs to a turn if it overlaps it (a leading space may come along)
      assistant |= (offsets[:, 1] > start) & (offsets[:, 0] < end)
    copies = np.where(ids == self.image_token_id, self.tokens_per_image, 1)
    ids, assistant = np.repeat(ids, copies), np.repeat(assistant, copies)
    return ids[:self.max_length], assistant[:self.max_length]


def _assistant_spans(text: str, messages: Messages, eos_token: str,
                     end_turns: bool) -> tuple[str, list[tuple[int, int]]]:
  """(text, character spans of each assistant turn's content plus a directly following end token in it).

  Every message's text is looked for in order after the previous one, so an answer that also occurs inside
  its question ("... to the left or to the right ...? right") is found where the answer is. With end_turns, an
  assistant turn that the end token does not directly follow gets one inserted after its last text.
  """
  spans, cursor = [], 0
  for message in messages:
    content = message["content"]
    pieces = [content] if isinstance(content, str) else [p["text"] for p in content if p.get("type") == "text"]
    for number, piece in enumerate(pieces):
      start = text.find(piece, cursor)
      if start < 0:
        raise ValueError(f"the chat template's output does not contain the {message['role']} turn {piece!r} "
                         f"after position {cursor}: the template does not produce the expected roles")
      cursor = start + len(piece)
      if message["role"] == "assistant":
        if end_turns and number == len(pieces) - 1 and not text.startswith(eos_token, cursor):
          text = text[:cursor] + eos_token + text[cursor:]
        if text.startswith(eos_token, cursor):
          cursor += len(eos_token)
        spans.append((start, cursor))
  return text, spans


def example_arrays(ids: np.ndarray, token_weights: np.ndarray, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
  """Next-token training arrays of one example: targets are the ids shifted left, and each position's loss
  weight is its *next* token's: token_weights bool[T] (the assistant tokens, as `ConversationEncoder` marks
  them) or float[T]."""
  targets = np.append(ids[1:], 0).astype(np.int32)
  loss_mask = np.append(token_weights[1:], 0).astype(np.float32)
  return {"input_ids": ids.astype(np.int32), "targets": targets, "loss_mask": loss_mask,
          "pixel_values": pixel_values.astype(np.float32)}


TOKEN_KEYS = ("input_ids", "targets", "loss_mask")


def pad_batch(examples: Sequence[dict[str, np.ndarray]], length: int) -> dict[str, np.ndarray]:
  """Stacks examples, right-padding the token arrays (TOKEN_KEYS) to `length` (one static shape: one
  compilation) and adding input_mask when they have input_ids; other arrays (pixels, labels, ids of the
  records) are stacked as they are."""
  def pad(array):
    return np.pad(array, (0, length - len(array)))
  batch = {key: np.stack([pad(e[key]) if key in TOKEN_KEYS else e[key] for e in examples]) for key in examples[0]}
  if "input_ids" in examples[0]:
    batch["input_mask"] = np.stack([np.arange(length) < len(e["input_ids"]) for e in examples])
  return batch


class BadRecords:
  """How many records failed to decode and were skipped (in this process, worker processes' included)."""

  def __init__(self):
    self.count = 0


@dataclasses.dataclass(frozen=True)
class _BadRecord:
  """What a record that failed to decode becomes (in a worker process, maybe), until it is logged and dropped."""

  index: int
  source_name: str
  error: str


class _ToExample(grain.transforms.RandomMap):
  """Reads record `index` of `source` and applies `to_example(record, rng)`; a record that raises (reading it or
  making it an example) becomes a `_BadRecord`. It is dropped later, in the process that makes the batches, so
  that every worker's order stays in step and every failure is counted."""

  def __init__(self, source, to_example: Callable[[Any, np.random.Generator], dict], source_name: str):
    self._source = source
    self._to_example = to_example
    self._source_name = source_name

  def random_map(self, index, rng: np.random.Generator):
    try:
      return self._to_example(self._source[index], rng)
    except Exception as error:  # a missing or corrupt image or a malformed record must not stop training
      return _BadRecord(index, self._source_name, f"{type(error).__name__}: {error}")


class _DropBadRecords(grain.transforms.Filter):
  """Logs each `_BadRecord` with its index and source, counts it and drops it."""

  def __init__(self, bad_records: BadRecords):
    self._bad_records = bad_records

  def filter(self, element) -> bool:
    if not isinstance(element, _BadRecord):
      return True
    self._bad_records.count += 1
    logging.warning("skipping record %d of %s (%s); %d skipped so far", element.index, element.source_name,
                    element.error, self._bad_records.count)
    return False


def examples(source, to_example: Callable[[Any, np.random.Generator], dict], *, seed: int,
             num_epochs: int | None = None, shuffle: bool = True,
             source_name: str = "the data source") -> grain.MapDataset:
  """The examples of `source` in one global order: shuffled by seed (reshuffled each epoch), repeated, each made
  by `to_example` with a Generator seeded per position. A record that fails becomes a placeholder that `batches`
  logs (as record `index` of `source_name`), counts and drops.

  Args:
    source: random access (`len`, `[i]`) records, e.g. `vlmjax.data.shapes.load(dir, "train")`; reading one may
      raise (a missing image), as may to_example.
    to_example: (record, numpy Generator seeded per element) -> `example_arrays(...)`.
    num_epochs: None repeats forever.
  """
  dataset = grain.MapDataset.range(len(source))
  if shuffle:
    dataset = dataset.shuffle(seed=seed)
  return dataset.repeat(num_epochs).random_map(_ToExample(source, to_example, source_name), seed=seed)


def batches(dataset: grain.MapDataset, *, batch_size: int, length: int, process_index: int = 0,
            process_count: int = 1, bad_records: BadRecords | None = None, packing: bool = False,
            images_per_row: int | None = None, num_workers: int = 0, prefetch: int = 2,
            collate: Callable[[list[dict]], dict] | None = None) -> grain.IterDataset:
  """Batches of this process's part of the global order of examples `dataset` (from `examples`, or a mix of
  several), bad records dropped.

  Args:
    batch_size: rows per batch *on this process* (the global batch divided by process_count).
    length: the static token length of a row.
    bad_records: counts the records skipped because they failed to decode.
    packing: several examples per row, with segment_ids and positions (`vlmjax.data.packing`); else one
      example per row, padded. Each process packs its own part, so which examples share a global batch then
      depends on the process count.
    images_per_row: with packing, the image slots of a row (pixel_values [B, images_per_row, H, W, 3]).
    num_workers: processes that decode records (to_example); 0 decodes in this process's reader threads. The
      batches are the same for any number (the workers deal the examples out in turn and this process packs
      and batches them), but a saved iterator state restores only into the same number.
    prefetch: batches a background thread keeps ready; 0 makes each batch when it is asked for.
    collate: a batch of unpacked examples; default `pad_batch` at `length`.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if packing and images_per_row is None:
    raise ValueError("packing needs images_per_row: the image slots of a row, e.g. length // tokens_per_image")
  # One global order, dealt out: process p takes positions p, p + P, ... (lazily: it only decodes its own).
  # Global batch b is then positions [b*G, (b+1)*G) whatever the process count, with the same per-example
  # randomness, so a run on N processes sees what a run on one sees.
  # One reader thread a few examples ahead (the prefetch thread below keeps whole batches ready): grain's
  # default, 16 threads and 500 examples ahead, spends 3x the CPU on the same batches (the shapes finetune batch:
  # 65 ms of CPU against 21), CPU that the train step's XLA threads compete for on a small machine (the shapes
  # main job's classify steps run about 15% faster with one thread).
  dataset = dataset[process_index::process_count].to_iter_dataset(
      grain.ReadOptions(num_threads=1, prefetch_buffer_size=16))
  # Worker w decodes positions w, w + W, ... of this process's part; they are read back in turn, so the order
  # is the in-process one. Bad records are dropped only after that (a worker that dropped one would fall out
  # of step), and packing (which depends on every example before) happens here too.
  if num_workers and not flags.FLAGS.is_parsed():
    # Starting workers reads one of grain's absl flags: outside an absl app (pytest, a notebook) nothing parsed
    # them and that raises UnparsedFlagAccessError. The defaults are what grain wants.
    flags.FLAGS.mark_as_parsed()
  dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  dataset = dataset.filter(_DropBadRecords(bad_records or BadRecords()))
  if packing:
    dataset = packing_lib.pack(dataset, length=length, images_per_row=images_per_row, rows=batch_size)
    dataset = dataset.batch(batch_size, drop_remainder=True)
  else:
    collate = collate or (lambda examples: pad_batch(examples, length))
    dataset = dataset.batch(batch_size, drop_remainder=True, batch_fn=collate)
  if prefetch:
    dataset = grain.experimental.ThreadPrefetchIterDataset(dataset, prefetch_buffer_size=prefetch)
  return dataset


def train_dataset(source, to_example: Callable[[Any, np.random.Generator], dict], *, seed: int, batch_size: int,
                  length: int, process_index: int = 0, process_count: int = 1, num_epochs: int | None = None,
                  shuffle: bool = True, source_name: str = "the data source",
                  bad_records: BadRecords | None = None, packing: bool = False, images_per_row: int | None = None,
                  num_workers: int = 0, prefetch: int = 2) -> grain.IterDataset:
  """Batches of this process's part of `source`, shuffled by seed (reshuffled each epoch), repeated: `examples`
  then `batches`, whose arguments these are."""
  return batches(examples(source, to_example, seed=seed, num_epochs=num_epochs, shuffle=shuffle,
                          source_name=source_name),
                 batch_size=batch_size, length=length, process_index=process_index, process_count=process_count,
                 bad_records=bad_records, packing=packing, images_per_row=images_per_row, num_workers=num_workers,
                 prefetch=prefetch)
