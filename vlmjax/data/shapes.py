"""The built-in "shapes" data set: a tensorflow-datasets builder writing array_record, with no TensorFlow.

  build(out_dir, get_config())            # writes out_dir/shapes/<VERSION>/, skipped if built with this config
  source = load(out_dir, "train")         # random access (len, []) for grain
  render_grid([source[i] for i in range(8)], "grid.png")

Every image comes from its own generator seeded with (seed, split, index), so a build is deterministic and
the records of two builds are byte-identical. Splits are generated test, validation, train, and each skips
scenes (the objects: shape, colour, size and box) already used by an earlier split or by itself, so no scene
appears twice anywhere, whatever its background noise: a test scene is never trained on.

Record (as `load` returns it): image uint8[S, S, 3]; image_id int (index in its split); caption str (the
canonical caption, for image-text contrastive pairs); and, stored as JSON `Text` features: scene (list of
{shape, colour, size, box: [x0, y0, x1, y1], ends exclusive}), captions, vqa, pope, multiple_choice,
grounding, conversation (see `shapes_scene.annotate`).
"""

import itertools
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from PIL import Image, ImageDraw, ImageFont
from tensorflow_datasets.proto import tf_example_pb2

from vlmjax.data import shapes_scene, shapes_tokenizer
from vlmjax.data.images import ImageProcessor

NAME = "shapes"
# 1.1.0: the tokenizer keeps sentence punctuation and line breaks out of words (shapes_tokenizer.SEPARATE);
# the records are those of 1.0.0.
# 1.2.0: images stored as their raw bytes (one bytes feature), not a list of 12288 int64 values: the same
# records, built in 30 s instead of 49 (tfds wrote each int64 list value by value).
# 1.3.0: splits de-duplicated by scene, not by pixels (the background noise made every image unique: 5 of 500
# validation and 4 of 500 test scenes were also in train); the train split changes where it repeated them.
VERSION = "1.3.0"
SPLITS = ("test", "validation", "train")  # generation order: a split never reuses an earlier split's image
JSON_FIELDS = ("scene", "captions", "vqa", "pope", "multiple_choice", "grounding", "conversation")


def get_config() -> ml_collections.ConfigDict:
  """Default data set: 21000 images, about 30 s to build on 2 CPU cores and 183 MB on disk."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.image_size = 64  # pixels per side (64 or more); objects scale with it
  config.max_objects = 4  # each image holds 1..max_objects objects (at most 4)
  config.noise = True  # uniform background noise in [0, shapes_scene.NOISE_MAX]
  config.questions_per_type = 1  # VQA questions per image of each type (colour, shape, count, ...)
  config.splits = ml_collections.ConfigDict({"train": 20000, "validation": 500, "test": 500})
  config.lock()
  return config


def _check_config(config: ml_collections.ConfigDict) -> None:
  if set(config.splits.keys()) != set(SPLITS):
    raise ValueError(f"config.splits must name exactly {SPLITS}, got {sorted(config.splits.keys())}")
  if min(config.splits.values()) < 1:
    raise ValueError(f"every split needs at least 1 image, got config.splits={config.splits.to_dict()}")
  if config.image_size < 64:
    raise ValueError(f"config.image_size={config.image_size}: small shapes would be unreadable; use 64 or more")
  if not 1 <= config.max_objects <= 4:
    raise ValueError(f"config.max_objects={config.max_objects} must be between 1 and 4")
  if config.seed < 0 or config.questions_per_type < 1:
    raise ValueError(f"need seed >= 0 and questions_per_type >= 1, got {config.seed}, {config.questions_per_type}")


def _unique_scenes(config, split: str, taken: set[tuple]) -> Iterator[tuple[int, tuple, np.ndarray]]:
  """(candidate index, objects, uint8[S, S, 3]) for the split's images whose scene (its objects, sorted) is not
  in `taken`; adds each yielded scene to `taken`."""
  for candidate in itertools.count():
    rng = np.random.default_rng([config.seed, SPLITS.index(split), candidate, 0])
    objects, image = shapes_scene.sample_scene(rng, config.image_size, config.max_objects, config.noise)
    if objects not in taken:
      taken.add(objects)
      yield candidate, objects, image


def generate_split(config: ml_collections.ConfigDict, split: str) -> Iterator[dict[str, Any]]:
  """The split's examples, in order, as written (JSON fields as strings)."""
  taken: set[tuple] = set()
  for earlier in SPLITS[: SPLITS.index(split)]:  # replays earlier splits' scenes to avoid them
    for _ in itertools.islice(_unique_scenes(config, earlier, taken), config.splits[earlier]):
      pass
  images = itertools.islice(_unique_scenes(config, split, taken), config.splits[split])
  for index, (candidate, objects, image) in enumerate(images):
    rng = np.random.default_rng([config.seed, SPLITS.index(split), candidate, 1])
    annotations = shapes_scene.annotate(objects, rng, config.questions_per_type)
    annotations["scene"] = [o.to_json() for o in objects]
    example = {"image": image, "image_id": index, "caption": annotations["captions"][0]}
    yield {**example, **{field: json.dumps(annotations[field]) for field in JSON_FIELDS}}


def _canonicalize_records(path: str) -> None:
  """Rewrites one array_record file with deterministic protobuf serialization.

  tfds writes each tf.Example's feature map in hash order, which protobuf (upb) randomizes per process;
  sorted keys make two builds byte-identical. Records keep their order and content.
  """
  reader = ArrayRecordReader(path)
  count = reader.num_records()
  with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), delete=False) as temporary:
    writer = ArrayRecordWriter(temporary.name, "group_size:1")  # the options tfds writes with
    for start in range(0, count, 1000):
      for record in reader.read(start, min(start + 1000, count)):
        writer.write(tf_example_pb2.Example.FromString(record).SerializeToString(deterministic=True))
    writer.close()
  reader.close()
  os.replace(temporary.name, path)


class ShapesBuilder(tfds.core.GeneratorBasedBuilder):
  """tfds builder of the shapes data set; its config (a ConfigDict) is stored in the dataset metadata."""

  name = NAME
  VERSION = tfds.core.Version(VERSION)

  def __init__(self, *, shapes_config: ml_collections.ConfigDict, **kwargs):
    self._shapes_config = shapes_config
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self._shapes_config.image_size
    features = {
      "image": tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES),
      "image_id": tfds.features.Tensor(shape=(), dtype=np.int64),
      "caption": tfds.features.Text(),
      **{field: tfds.features.Text() for field in JSON_FIELDS},
    }
    return tfds.core.DatasetInfo(
      builder=self,
      description="Procedurally drawn coloured shapes with captions, VQA, POPE, multiple choice, "
      "grounding and conversations (vlmjax.data.shapes).",
      features=tfds.features.FeaturesDict(features),
      disable_shuffling=True,
      metadata=tfds.core.MetadataDict(config=self._shapes_config.to_dict()),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split: str):
    for example in generate_split(self._shapes_config, split):
      yield example["image_id"], example

  def _download_and_prepare(self, dl_manager, download_config) -> None:
    super()._download_and_prepare(dl_manager, download_config)
    for path in sorted(self.data_path.glob("*.array_record-*")):  # still the incomplete directory here
      _canonicalize_records(os.fspath(path))


def build(out_dir: str | os.PathLike, config: ml_collections.ConfigDict | None = None) -> None:
  """Writes the data set to out_dir/shapes/<VERSION>/; does nothing if it is there, built with `config`."""
  config = get_config() if config is None else config
  _check_config(config)
  builder = ShapesBuilder(shapes_config=config, data_dir=os.fspath(out_dir), file_format="array_record")
  if builder.is_prepared():
    built_with = builder.info.metadata["config"]
    if built_with != json.loads(json.dumps(config.to_dict())):
      raise ValueError(
        f"{builder.data_path} holds shapes built with another config ({built_with}, asked for "
        f"{config.to_dict()}); build into another directory or delete that one"
      )
  else:
    with tempfile.TemporaryDirectory() as downloads:  # tfds wants one; nothing is downloaded
      builder.download_and_prepare(download_dir=downloads)
  if not os.path.exists(os.path.join(tokenizer_dir(out_dir), "preprocessor_config.json")):
    train_split = load(out_dir, "train")
    texts = (text for i in range(len(train_split)) for text in shapes_tokenizer.texts_of(train_split[i]))
    shapes_tokenizer.train(texts, tokenizer_dir(out_dir))
    processor = ImageProcessor(size={"height": config.image_size, "width": config.image_size})
    with open(os.path.join(tokenizer_dir(out_dir), "preprocessor_config.json"), "w") as f:
      json.dump(processor.to_dict(), f, indent=1)


def tokenizer_dir(out_dir: str | os.PathLike) -> str:
  """Where `build` saves the BPE tokenizer trained on the data set's text and the image processor's settings
  (Hugging Face layout: tokenizer.json, tokenizer_config.json, preprocessor_config.json)."""
  return os.path.join(out_dir, NAME, VERSION, "tokenizer")


@dataclass(frozen=True)
class ShapesSource:
  """Random-access view of one split: `len(source)`, `source[i]` -> the decoded record (module docstring)."""

  records: Any  # tfds ArrayRecordDataSource

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self.records[index]
    example = {"image": record["image"], "image_id": int(record["image_id"]),
           "caption": record["caption"].decode()}
    return {**example, **{field: json.loads(record[field]) for field in JSON_FIELDS}}


def load(out_dir: str | os.PathLike, split: str) -> ShapesSource:
  """The split ("train", "validation" or "test") of the data set `build` wrote to out_dir."""
  path = os.path.join(out_dir, NAME, VERSION)
  if not os.path.exists(os.path.join(path, "dataset_info.json")):
    raise FileNotFoundError(
      f"no shapes data set in {out_dir}: build it with `vlmjax data build shapes --out {out_dir}`")
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; the shapes data set has {SPLITS}")
  return ShapesSource(tfds.builder_from_directory(path).as_data_source(split=split))


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
  """Splits `text` at spaces into lines at most `width` pixels wide (a longer single word stays whole)."""
  lines, line = [], ""
  for word in text.split():
    candidate = f"{line} {word}" if line else word
    if line and font.getlength(candidate) > width:
      lines.append(line)
      line = word
    else:
      line = candidate
  return lines + [line]


def render_grid(
  examples: Sequence[dict[str, Any]], out_png: str | os.PathLike, columns: int = 4, scale: int = 3,
  questions: int = 5,
) -> None:
  """Writes a PNG grid of `examples` (as `load` returns them): each image enlarged `scale` times, its first
  grounding box outlined, and under it the caption, up to `questions` VQA pairs and that grounding pair."""
  if not examples:
    raise ValueError("render_grid needs at least one example")
  font = ImageFont.load_default(size=11)
  line_height, padding = 13, 12
  width = examples[0]["image"].shape[1] * scale
  texts = []
  for example in examples:
    lines = [example["caption"]]
    lines += [f"Q: {q['question']} A: {q['answer']}" for q in example["vqa"][:questions]]
    lines += [f"Where is {g['expression']}? {g['box']} (outlined)" for g in example["grounding"][:1]]
    texts.append([wrapped for line in lines for wrapped in _wrap(line, font, width)])
  cell_height = width + line_height * max(len(t) for t in texts) + 2 * padding
  rows = -(-len(examples) // columns)
  canvas = Image.new("RGB", (columns * (width + padding) + padding, rows * cell_height), "white")
  draw = ImageDraw.Draw(canvas)
  for i, (example, lines) in enumerate(zip(examples, texts)):
    left, top = padding + (i % columns) * (width + padding), padding + (i // columns) * cell_height
    image = Image.fromarray(example["image"]).resize((width, width), Image.Resampling.NEAREST)
    canvas.paste(image, (left, top))
    for g in example["grounding"][:1]:
      x0, y0, x1, y1 = (c * scale for c in g["box"])
      draw.rectangle((left + x0 - 1, top + y0 - 1, left + x1, top + y1), outline=(0, 255, 255))
    for j, line in enumerate(lines):
      draw.text((left, top + width + 4 + j * line_height), line, fill="black", font=font)
  canvas.save(out_png)
