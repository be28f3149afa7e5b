"""Training data people have on disk, for finetuning Hugging Face LLaVA-1.5, LLaVA-NeXT, PaliGemma and Qwen2.5-VL
checkpoints.

    specs = parse_sources("llava:mix665k.json:images/:3,coco:captions_train2017.json:train2017/")   # data.sources
    inputs = ModelInputs(tokenizer, image_processor, image_token_id=32000, tokens_per_image=576,
                         prefix_lm=False, max_length=2048)
    dataset = train_dataset(specs, inputs, seed=0, batch_size=8, length=2048)
    batch = next(iter(dataset))    # numpy, the batch leading: see "Batches" below

Sources: `data.sources` is comma-separated entries `KIND:JSON_PATH:IMAGE_DIR[:WEIGHT]` (weight a positive number,
1 by default; a source is drawn in proportion to its weight, whatever its size). KIND is
  llava            LLaVA instruction data (LLaVA-Instruct-150K, llava_v1_5_mix665k.json): a JSON list of {"id",
                   "image" (optional: a file name in IMAGE_DIR, or a list of them), "conversations": [{"from":
                   "human" | "gpt", "value": str}]}, an "<image>" tag in the human text for each image; rows without
                   "image" are text-only.
  llava_pretrain   LLaVA's caption pretraining data (LCS-558K, blip_laion_cc_sbu_558k.json): the same layout, a
                   human turn (its text ignored) and a gpt turn holding the caption.
  coco             COCO captions (captions_train2017.json: "images" + "annotations") and its image folder; each
                   view of an image draws one of its captions with the example's rng.

Examples. Each is rendered as the checkpoint's own training inputs are:
  llava, causal models (LLaVA): the conversation through the checkpoint's chat template, each "<image>" tag an
    {"type": "image"} content part where it was (the line breaks LLaVA puts beside a tag dropped), the text around
    it {"type": "text"} parts; the loss is on the assistant turns only, as LLaVA's training code masks them. LLaVA
    trains every assistant turn to end with the end token (`</s>`, its conversation format's sep2), but Hugging
    Face's llava-1.5 chat template does not write it: where the template does not end a turn with the end token,
    it is put directly after the turn's text and trained, so the finetuned model still learns to stop. BOS is
    added as transformers' processor adds it (unless the template writes it).
  llava_pretrain and coco, causal models: LLaVA's `preprocess_plain` (its align stage): BOS (as the tokenizer adds
    it), the image, the caption and "\\n" (the plain format's separator); the loss on the caption and "\\n".
  prefix-LM models (PaliGemma, no chat template), as transformers' PaliGemmaProcessor builds training inputs
    (`suffix=`): the prefix is the image placeholders, BOS, the prompt and "\\n" (attended bidirectionally,
    `prefix_lengths` its length), the suffix the answer and EOS (the loss on the suffix only). Captions take the
    prompt "caption en". A multi-turn conversation becomes one (prefix, suffix) per view: one assistant turn is
    drawn with the example's rng, its answer is the suffix and every turn before it (questions and answers, each
    without its image tags, joined by "\\n") the prompt; over the epochs every answer is trained, each in its
    context. (Training only the last answer would drop most of LLaVA-Instruct's answers.)
  Image placeholders are expanded to `tokens_per_image` copies (the Hugging Face convention); they and padding
  carry no loss. A text-only row's images are zeros of the processor's output size.
  Models whose images give a token count each (LLaVA-NeXT, Qwen2.5-VL; `variable_images`): each image's placeholder
  is expanded to its own count, and a batch's images are one `Tiles` or `Patches` (`vlmjax.data.variable_images`).
  Qwen2.5-VL's captions go through its chat template (the image as the user turn, the caption as the answer): LLaVA's
  plain format has no place for its vision start and end tokens.

Bad rows never stop a run: a row whose image is missing or does not decode, a conversation without an assistant
turn, more "<image>" tags than images or images without tags, an unknown speaker, a row longer than max_length
(skipped, not truncated) raises when it is made an example; the pipeline logs it with the JSON file and the row
(the entry's index in that file), counts it (`pipeline.BadRecords`) and goes on.

Batches (numpy, B = batch_size rows on this process, T = length, I = images_per_example):
    input_ids, targets int32[B, T]; loss_mask float32[B, T]; input_mask bool[B, T]
    pixel_values float32[B, I, H, W, 3]     the k-th run of placeholders in a row meets its k-th image
                                            (`Tiles` or `Patches` for models with variable image tokens)
    prefix_lengths int32[B]                 prefix-LM models only
  With packing (causal models only): several examples per row, plus segment_ids and positions int32[B, T], and
  pixel_values float32[B, N, H, W, 3] with N = images_per_row (`vlmjax.data.packing`). Prefix-LM examples are not
  packed: a packed row would need a bidirectional prefix per segment, which the model's mask does not take. Nor are
  LLaVA-NeXT's and Qwen2.5-VL's: packing carries fixed-size image slots, and Qwen's M-RoPE would restart per
  segment.
"""

import dataclasses
import math
from typing import Callable

import grain
import numpy as np

from vlmjax.data import formats, pipeline
from vlmjax.data.images import ImageProcessor
from vlmjax.data.tokenizer import Tokenizer
from vlmjax.data.variable_images import VariableImages

KINDS = ("llava", "llava_pretrain", "coco")
IMAGE_TAG = "<image>"  # LLaVA's tag in the JSON's human turns
CAPTION_PROMPT = "caption en"  # PaliGemma's captioning prompt
PLAIN_SEPARATOR = "\n"  # LLaVA's conv_llava_plain separator, after each caption


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """One entry of `data.sources`: a data set's kind, its JSON file, its image folder and its mixing weight."""

  kind: str
  json_path: str
  image_dir: str
  weight: float = 1.0


def parse_sources(spec: str) -> list[SourceSpec]:
  """`data.sources` ("KIND:JSON_PATH:IMAGE_DIR[:WEIGHT],...") -> its entries; a malformed entry is a ValueError
  naming it. Files are not read here (`train_dataset` reads them)."""
  entries = spec.split(",") if spec.strip() else []
  if not entries:
    raise ValueError(f"data.sources={spec!r} names no data: give KIND:JSON_PATH:IMAGE_DIR[:WEIGHT], ... with KIND "
                     f"one of {', '.join(KINDS)}")
  specs = []
  for number, entry in enumerate(entries):
    fields = entry.strip().split(":")
    where = f"data.sources entry {number} ({entry.strip()!r})"
    if len(fields) not in (3, 4) or not all(field.strip() for field in fields):
      raise ValueError(f"{where}: expected KIND:JSON_PATH:IMAGE_DIR or KIND:JSON_PATH:IMAGE_DIR:WEIGHT")
    kind, json_path, image_dir = (field.strip() for field in fields[:3])
    if kind not in KINDS:
      raise ValueError(f"{where}: unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    weight = 1.0
    if len(fields) == 4:
      try:
        weight = float(fields[3])
      except ValueError:
        raise ValueError(f"{where}: the weight {fields[3]!r} is not a number") from None
      if not (math.isfinite(weight) and weight > 0):
        raise ValueError(f"{where}: the weight must be a positive number, got {fields[3]!r}")
    specs.append(SourceSpec(kind, json_path, image_dir, weight))
  return specs


def open_source(spec: SourceSpec):
  """The random-access records of one source (`vlmjax.data.formats`); its file is read and checked here, each
  row's images when the row is read."""
  if spec.kind == "coco":
    return formats.CocoCaptions(spec.json_path, spec.image_dir, check_images=False)
  return formats.LlavaInstructions(spec.json_path, spec.image_dir)


@dataclasses.dataclass(frozen=True)
class ModelInputs:
  """What the examples must fit.

  Attributes:
    tokenizer: the checkpoint's tokenizer, with its chat template (causal models) and end token.
    image_processor: the checkpoint's image processor (a fixed output size, or images at their own size with
      `variable_images`).
    image_token_id: the image placeholder's id; tokens_per_image: the copies each image expands to (None with
      `variable_images`, which counts each image's).
    prefix_lm: PaliGemma-style inputs (prefix + suffix, `prefix_lengths`) instead of the chat template.
    max_length: the most tokens an example may have; a longer one is skipped.
    images_per_example: the image slots of an example (pixel_values [I, H, W, 3]); a row with more is skipped. Not
      used with `variable_images` (a row takes what its length allows).
    variable_images: LLaVA-NeXT's or Qwen2.5-VL's image arithmetic; None for fixed-size images.
  """

  tokenizer: Tokenizer
  image_processor: ImageProcessor
  image_token_id: int
  tokens_per_image: int | None
  prefix_lm: bool
  max_length: int
  images_per_example: int = 1
  variable_images: VariableImages | None = None

  @property
  def image_token(self) -> str:
    return self.tokenizer.backend.id_to_token(self.image_token_id)


def _check_tags(conversation: list[dict], images: list) -> None:
  """One "<image>" tag in the user turns per image, none in the answers, and an answer to train on."""
  tags = sum(turn["content"].count(IMAGE_TAG) for turn in conversation if turn["role"] == "user")
  if tags != len(images):
    raise ValueError(f"{tags} {IMAGE_TAG} tags in the human turns for {len(images)} images")
  answers = [turn["content"] for turn in conversation if turn["role"] == "assistant"]
  if not answers:
    raise ValueError("no gpt (assistant) turn to train on")
  if any(IMAGE_TAG in answer for answer in answers):
    raise ValueError(f"a gpt turn holds an {IMAGE_TAG} tag")
  if not all(answer.strip() for answer in answers):
    raise ValueError("an empty gpt turn")


def _content_parts(text: str) -> list[dict]:
  """A LLaVA turn's text -> content parts: {"type": "image"} where each tag was, the text around the tags (without
  the line breaks LLaVA puts beside a tag) as {"type": "text"} parts."""
  parts = []
  for number, piece in enumerate(text.split(IMAGE_TAG)):
    if number:
      parts.append({"type": "image"})
    if piece.strip():
      parts.append({"type": "text", "text": piece.strip()})
  return parts


def _caption_turns(record: dict, kind: str, rng: np.random.Generator) -> tuple[list, list[dict]]:
  """A caption record -> (its images, [the user turn, the caption as the assistant turn])."""
  if kind == "coco":
    if not record["captions"]:
      raise ValueError(f"image {record['image_id']} has no caption")
    caption = record["captions"][rng.integers(len(record["captions"]))]
    return [record["image"]], [{"role": "user", "content": IMAGE_TAG}, {"role": "assistant", "content": caption}]
  conversation = record["conversation"]
  if [turn["role"] for turn in conversation] != ["user", "assistant"]:
    raise ValueError("a caption row is one human turn and one gpt turn (LLaVA's preprocess_plain), got "
                     f"{[turn['role'] for turn in conversation]}")
  _check_tags(conversation, record["images"])
  return record["images"], conversation


class _Examples:
  """Makes the arrays of one example from its images and turns, as the module docstring says."""

  def __init__(self, inputs: ModelInputs):
    self.inputs = inputs
    # With variable image tokens each placeholder stays single until `_finish` knows its image's count.
    self.copies = 1 if inputs.variable_images else inputs.tokens_per_image
    self.encoder = pipeline.ConversationEncoder(inputs.tokenizer, inputs.image_token_id, self.copies,
                                                max_length=None, end_turns=True)

  def _pixels(self, images: list) -> np.ndarray:
    """float32[images_per_example, H, W, 3]: the processed images, then zeros."""
    slots = self.inputs.images_per_example
    if len(images) > slots:
      raise ValueError(f"{len(images)} images, more than images_per_example={slots}")
    pixels = np.zeros((slots, *self.inputs.image_processor.output_size, 3), np.float32)
    if images:
      pixels[:len(images)] = self.inputs.image_processor(images)
    return pixels

  def _finish(self, ids: np.ndarray, weights: np.ndarray, images: list, **extra) -> dict[str, np.ndarray]:
    variable = self.inputs.variable_images
    if variable:
      processed = self.inputs.image_processor(images) if images else []
      ids, weights = variable.expand(ids, weights, processed)
    if len(ids) > self.inputs.max_length:
      raise ValueError(f"{len(ids)} tokens, more than max_length={self.inputs.max_length} (skipped, not truncated)")
    if variable:  # the processed images as they are: `VariableImages.collate` lays out the batch's
      return {**pipeline.example_arrays(ids, weights, np.zeros(0)), "pixel_values": processed, **extra}
    return {**pipeline.example_arrays(ids, weights, self._pixels(images)), **extra}

  def _expanded(self, ids: list[int]) -> np.ndarray:
    ids = np.asarray(ids, np.int32)
    return np.repeat(ids, np.where(ids == self.inputs.image_token_id, self.copies, 1))

  def chat(self, images: list, conversation: list[dict]) -> dict[str, np.ndarray]:
    """Causal: the conversation through the chat template, the loss on the assistant turns and their end token."""
    messages = [{"role": turn["role"], "content": _content_parts(turn["content"])} for turn in conversation]
    ids, assistant = self.encoder(messages)
    return self._finish(ids, assistant, images)

  def plain(self, images: list, caption: str) -> dict[str, np.ndarray]:
    """Causal: LLaVA's preprocess_plain, [BOS] <image> caption "\\n", the loss on the caption and "\\n"."""
    tokenizer = self.inputs.tokenizer
    # The image chunk encoded as LLaVA's tokenizer_image_token encodes it: with the tokenizer's BOS, if it adds one.
    head = self._expanded(tokenizer.encode(self.inputs.image_token * len(images), add_special_tokens=True))
    caption_ids = np.asarray(tokenizer.encode(caption + PLAIN_SEPARATOR, add_special_tokens=False), np.int32)
    return self._finish(np.concatenate([head, caption_ids]),
                        np.concatenate([np.zeros(len(head)), np.ones(len(caption_ids))]), images)

  def prefix_suffix(self, images: list, conversation: list[dict], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Prefix-LM: one drawn answer as the suffix, the turns before it as the prompt (PaliGemmaProcessor's
    layout, which Tokenizer.encode_prompt also builds for a prompt with images)."""
    tokenizer = self.inputs.tokenizer
    answers = [number for number, turn in enumerate(conversation) if turn["role"] == "assistant"]
    drawn = answers[rng.integers(len(answers))]
    prompt = "\n".join(turn["content"].replace(IMAGE_TAG, "").strip() for turn in conversation[:drawn])
    prefix = self._expanded(tokenizer.encode(
        self.inputs.image_token * len(images) + (tokenizer.bos_token or "") + prompt + "\n", add_special_tokens=False))
    suffix = np.asarray(tokenizer.encode(conversation[drawn]["content"] + tokenizer.eos_token,
                                         add_special_tokens=False), np.int32)
    return self._finish(np.concatenate([prefix, suffix]), np.concatenate([np.zeros(len(prefix)), np.ones(len(suffix))]),
                        images, prefix_lengths=np.int32(len(prefix)))


def example_fn(kind: str, inputs: ModelInputs) -> Callable[[dict, np.random.Generator], dict[str, np.ndarray]]:
  """(a record of an `open_source` of this kind, rng) -> {input_ids, targets, loss_mask: [t] (t <= max_length),
  pixel_values float32[images_per_example, H, W, 3] (with variable image tokens: the processed images, a list),
  prefix_lengths int32[] (prefix-LM models)}; a row that
  cannot be a training example raises (the pipeline skips it)."""
  if kind not in KINDS:
    raise ValueError(f"unknown data source kind {kind!r}; choose one of {', '.join(KINDS)}")
  if inputs.tokenizer.eos_token is None:
    raise ValueError(f"{inputs.tokenizer.name} has no end token (eos_token): training needs one to end answers")
  if inputs.image_token is None:
    raise ValueError(f"image_token_id {inputs.image_token_id} is not in the vocabulary of {inputs.tokenizer.name}")
  if not inputs.prefix_lm and inputs.tokenizer.chat_template is None:
    raise ValueError(f"{inputs.tokenizer.name} has no chat template: a causal model's conversations need one")
  examples = _Examples(inputs)

  def to_example(record: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    if kind == "llava":
      images, conversation = record["images"], record["conversation"]
      _check_tags(conversation, images)
    else:
      images, conversation = _caption_turns(record, kind, rng)
    if inputs.prefix_lm:
      if kind != "llava":
        conversation = [{"role": "user", "content": CAPTION_PROMPT}, conversation[1]]
      return examples.prefix_suffix(images, conversation, rng)
    if kind == "llava" or (inputs.variable_images and inputs.variable_images.config.qwen_tower):
      return examples.chat(images, conversation)
    return examples.plain(images, conversation[1]["content"])
  return to_example


def _images_in_use(to_example: Callable, inputs: ModelInputs) -> Callable:
  """to_example whose pixel_values keep only the images its placeholders use ([i, H, W, 3], i <= I): in a packed
  row the k-th run of placeholders meets the row's k-th image, so a text-only example must bring none."""
  def trimmed(record, rng):
    example = to_example(record, rng)
    used = int(np.sum(example["input_ids"] == inputs.image_token_id)) // inputs.tokens_per_image
    return dict(example, pixel_values=example["pixel_values"][:used])
  return trimmed


def _source_seed(seed: int, number: int) -> int:
  """A seed of its own for source `number`, so that two sources of one length are not shuffled alike."""
  return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


def train_dataset(specs: list[SourceSpec], inputs: ModelInputs, *, seed: int, batch_size: int, length: int,
                  process_index: int = 0, process_count: int = 1, packing: bool = False,
                  images_per_row: int | None = None, bad_records: pipeline.BadRecords | None = None,
                  num_workers: int = 0, prefetch: int = 2) -> grain.IterDataset:
  """Batches (see the module docstring) of the sources mixed by weight, each shuffled and repeated forever.

  One global order is dealt out to the processes as `pipeline.train_dataset` deals it (`pipeline.batches`), and
  the iterator's `get_state()` / `set_state()` resume it exactly (save the state with the checkpoint).
  grain's mix is a deterministic interleaving by weight (3:1 takes 3 of the first, 1 of the second, in turn),
  not a random draw: any stretch of the order holds the sources in proportion, less the rows skipped.

  Args:
    specs: `parse_sources(config.data.sources)`.
    inputs: the checkpoint's tokenizer, image processor and image-token layout; max_length <= length.
    batch_size: rows per batch on this process (the global batch divided by process_count).
    length: tokens per row (one static shape).
    packing: several examples per row (causal models only); images_per_row its image slots, by default
      length // tokens_per_image (what never turns away an example for its images).
    bad_records: counts the rows skipped; num_workers, prefetch: as `pipeline.batches`.
  """
  if not specs:
    raise ValueError("no data sources: give data.sources")
  if inputs.max_length > length:
    raise ValueError(f"max_length={inputs.max_length} is more than the row length {length}")
  if packing and inputs.prefix_lm:
    raise ValueError("packing prefix-LM (PaliGemma) examples is not supported: each would need its own "
                     "bidirectional prefix within the row; train with packing off")
  if packing and inputs.variable_images:
    raise ValueError("packing is not supported for models whose images give a token count each (LLaVA-NeXT, "
                     "Qwen2.5-VL): a packed row has fixed-size image slots, and M-RoPE positions would need to "
                     "restart per example; train with data.packing=False")
  if packing:
    images_per_row = images_per_row or max(length // inputs.tokens_per_image, inputs.images_per_example)
  parts = []
  for number, spec in enumerate(specs):
    to_example = example_fn(spec.kind, inputs)
    if packing:
      to_example = _images_in_use(to_example, inputs)
    parts.append(pipeline.examples(open_source(spec), to_example, seed=_source_seed(seed, number),
                                   source_name=spec.json_path))
  mixed = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, [spec.weight for spec in specs])
  collate = None if inputs.variable_images is None else (
      lambda examples: inputs.variable_images.collate(examples, length))
  return pipeline.batches(mixed, batch_size=batch_size, length=length, process_index=process_index,
                          process_count=process_count, bad_records=bad_records, packing=packing,
                          images_per_row=images_per_row, num_workers=num_workers, prefetch=prefetch,
                          collate=collate)
