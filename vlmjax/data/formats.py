"""The data people already have on disk, as random-access sources for the grain pipeline.

    LlavaInstructions("llava_v1_5_mix665k.json", "images/")    # LLaVA instruction JSON + an image folder
    CocoCaptions("captions_val2017.json", "val2017/")            # COCO captions
    VqaV2("questions.json", "annotations.json", "val2014/")      # VQAv2 questions + annotations
    PopeQuestions("coco_pope_random.json", "val2014/")          # POPE yes/no probes, one JSON object a line
    MmbenchQuestions("MMBench_DEV_EN.tsv")                       # MMBench TSV as VLMEvalKit ships it

Each source checks at construction that its files exist and that its entries have the fields it reads (an error
naming the file and the entry or line); the evaluation sources check every image they name too (one error naming
the first missing one), while LlavaInstructions (training data) leaves a missing image to the entry that names
it. Images are decoded with Pillow on access: a missing or corrupt image raises there, with its path, and the
training pipeline skips and counts that record. The evaluation sources (all but LlavaInstructions) also give
`annotation(index)`, the record without its image, and `image(index)`, so that a benchmark can list its questions
without decoding every image.
"""

import base64
import csv
import io
import json
import os
import string
from typing import Any

import numpy as np
from PIL import Image

LLAVA_ROLES = {"human": "user", "gpt": "assistant"}


def _read_json(path: str, what: str) -> Any:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} {path} does not exist")
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as error:
      raise ValueError(f"{path}: not valid JSON ({error})") from error


def _check_fields(entries: Any, fields: tuple[str, ...], path: str, what: str) -> None:
  """Every entry of the list `entries` is a JSON object with `fields`; else a ValueError naming path and entry."""
  if not isinstance(entries, list):
    raise ValueError(f"{path}: expected a list of {what}s, got {type(entries).__name__}")
  for number, entry in enumerate(entries):
    missing = [field for field in fields if not isinstance(entry, dict) or field not in entry]
    if missing:
      raise ValueError(f"{path}, {what} {number}: no {missing[0]!r} (each {what} needs {', '.join(fields)})")


def _section(data: Any, key: str, path: str) -> Any:
  if not isinstance(data, dict) or key not in data:
    raise ValueError(f"{path}: no {key!r} list at the top level")
  return data[key]


def _check_images(image_dir: str, names: list[str], source: str) -> None:
  if not os.path.isdir(image_dir):
    raise FileNotFoundError(f"the image folder {image_dir} of {source} does not exist")
  for name in names:
    if not os.path.isfile(os.path.join(image_dir, name)):
      raise FileNotFoundError(f"{source} names the image {name}, which is not in {image_dir}")


def load_image(path: str) -> np.ndarray:
  """uint8[H, W, 3]; an undecodable file raises ValueError naming it."""
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert("RGB"))
  except (OSError, ValueError) as error:
    raise ValueError(f"{path}: not a decodable image ({error})") from error


class LlavaInstructions:
  """LLaVA-style instruction data: a JSON list of {"id", "image" (optional: a file name in image_dir, or a list of
  them), "conversations": [{"from": "human" | "gpt", "value": ...}]} with "<image>" in the human turns. Records:
  {"id", "images": [uint8[H, W, 3], ...] (empty for a text-only entry), "conversation": [{"role": "user" |
  "assistant", "content": str}]}.

  The file and the image folder are checked at construction, each entry's images and speakers when it is read:
  a missing or corrupt image, or an unknown speaker, raises there naming the entry, and the training pipeline
  skips and counts that entry (one bad row among 665K must not stop a run).
  """

  def __init__(self, json_path: str, image_dir: str):
    self._entries = _read_json(json_path, "the LLaVA instruction file")
    self._path = json_path
    self._image_dir = image_dir
    if not isinstance(self._entries, list):
      raise ValueError(f"{json_path}: expected a list of entries, got {type(self._entries).__name__}")
    for number, entry in enumerate(self._entries):
      if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list):
        raise ValueError(f"{json_path}, entry {number}: no 'conversations' list")
    _check_images(image_dir, [], json_path)  # the folder; each entry's images when it is read

  def __len__(self) -> int:
    return len(self._entries)

  def _image(self, index: int, name: Any) -> np.ndarray:
    if not isinstance(name, str):
      raise ValueError(f"{self._path}, entry {index}: the image {name!r} is not a file name")
    path = os.path.join(self._image_dir, name)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{self._path}, entry {index}: the image {name} is not in {self._image_dir}")
    return load_image(path)

  def __getitem__(self, index: int) -> dict[str, Any]:
    entry = self._entries[index]
    conversation = []
    for turn in entry["conversations"]:
      if not isinstance(turn, dict) or turn.get("from") not in LLAVA_ROLES:
        speaker = turn.get("from") if isinstance(turn, dict) else turn
        raise ValueError(f"{self._path}, entry {index}: unknown speaker {speaker!r}; LLaVA turns are 'human' or "
                         f"'gpt'")
      if not isinstance(turn.get("value"), str):
        raise ValueError(f"{self._path}, entry {index}: a {turn['from']} turn without a text 'value'")
      conversation.append({"role": LLAVA_ROLES[turn["from"]], "content": turn["value"]})
    names = entry.get("image", [])
    images = [self._image(index, name) for name in (names if isinstance(names, list) else [names])]
    return {"id": entry.get("id", index), "images": images, "conversation": conversation}


class CocoCaptions:
  """COCO captions (`images` + `annotations` with `caption`). Records: {"image_id", "image", "captions"}.

  check_images: every image is checked at construction (evaluation: a benchmark is all or nothing); False leaves
  a missing one to raise when its record is read (training skips it).
  """

  def __init__(self, annotations_path: str, image_dir: str, check_images: bool = True):
    data = _read_json(annotations_path, "the COCO captions file")
    annotations, images = _section(data, "annotations", annotations_path), _section(data, "images", annotations_path)
    _check_fields(annotations, ("image_id", "caption"), annotations_path, "annotation")
    _check_fields(images, ("id", "file_name"), annotations_path, "image")
    captions: dict[int, list[str]] = {}
    for annotation in annotations:
      captions.setdefault(annotation["image_id"], []).append(annotation["caption"])
    self._images = [(image["id"], image["file_name"], captions.get(image["id"], [])) for image in images]
    self._image_dir = image_dir
    _check_images(image_dir, [name for _, name, _ in self._images] if check_images else [], annotations_path)

  def __len__(self) -> int:
    return len(self._images)

  def annotation(self, index: int) -> dict[str, Any]:
    image_id, _, captions = self._images[index]
    return {"image_id": image_id, "captions": captions}

  def image(self, index: int) -> np.ndarray:
    return load_image(os.path.join(self._image_dir, self._images[index][1]))

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {**self.annotation(index), "image": self.image(index)}


class VqaV2:
  """VQAv2 questions + annotations (10 answers each); images named COCO-style from the image id (or by a
  `file_name` pattern such as "COCO_val2014_{image_id:012d}.jpg"). Records: {"question_id", "image", "question",
  "answers", "question_type", "answer_type"}."""

  def __init__(self, questions_path: str, annotations_path: str, image_dir: str,
               file_name: str = "COCO_val2014_{image_id:012d}.jpg"):
    questions = _section(_read_json(questions_path, "the VQAv2 questions file"), "questions", questions_path)
    _check_fields(questions, ("question_id", "image_id", "question"), questions_path, "question")
    annotations = _section(_read_json(annotations_path, "the VQAv2 annotations file"), "annotations",
                           annotations_path)
    _check_fields(annotations, ("question_id", "answers"), annotations_path, "annotation")
    for number, annotation in enumerate(annotations):
      if not annotation["answers"] or not all(isinstance(a, dict) and "answer" in a for a in annotation["answers"]):
        raise ValueError(f"{annotations_path}, annotation {number}: 'answers' must be a non-empty list of "
                         f"{{'answer': ...}}")
    annotations = {a["question_id"]: a for a in annotations}
    missing = [q["question_id"] for q in questions if q["question_id"] not in annotations]
    if missing:
      raise ValueError(f"{annotations_path} has no annotation for question {missing[0]} of {questions_path}")
    self._rows = [(q, annotations[q["question_id"]]) for q in questions]
    self._image_dir = image_dir
    self._file_name = file_name
    _check_images(image_dir, sorted({file_name.format(image_id=q["image_id"]) for q in questions}), questions_path)

  def __len__(self) -> int:
    return len(self._rows)

  def annotation(self, index: int) -> dict[str, Any]:
    question, annotation = self._rows[index]
    return {"question_id": question["question_id"], "question": question["question"],
            "answers": [a["answer"] for a in annotation["answers"]],
            "question_type": annotation.get("question_type", ""), "answer_type": annotation.get("answer_type", "")}

  def image(self, index: int) -> np.ndarray:
    image_id = self._rows[index][0]["image_id"]
    return load_image(os.path.join(self._image_dir, self._file_name.format(image_id=image_id)))

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {**self.annotation(index), "image": self.image(index)}


def _read_jsonl(path: str, what: str, fields: tuple[str, ...]) -> list[tuple[int, dict]]:
  """(line number, object) of each non-blank line; a line that is not a JSON object with `fields` is a ValueError
  naming the file and the line."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} {path} does not exist")
  rows = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as error:
        raise ValueError(f"{path}, line {number}: not valid JSON ({error})") from error
      missing = [field for field in fields if not isinstance(row, dict) or field not in row]
      if missing:
        raise ValueError(f"{path}, line {number}: no {missing[0]!r} (each line needs {', '.join(fields)})")
      rows.append((number, row))
  if not rows:
    raise ValueError(f"{path}: no questions")
  return rows


class PopeQuestions:
  """POPE probes as the POPE repository ships them (coco_pope_random.json ...): one JSON object a line,
  {"question_id", "image" (a file name in image_dir), "text" (the question), "label" ("yes" | "no")}.
  Records: {"question_id", "question", "label", "image"}."""

  def __init__(self, jsonl_path: str, image_dir: str):
    self._rows = _read_jsonl(jsonl_path, "the POPE questions file", ("question_id", "image", "text", "label"))
    for number, row in self._rows:
      if str(row["label"]).strip().lower() not in ("yes", "no"):
        raise ValueError(f"{jsonl_path}, line {number}: label {row['label']!r} is neither 'yes' nor 'no'")
    self._image_dir = image_dir
    _check_images(image_dir, sorted({row["image"] for _, row in self._rows}), jsonl_path)

  def __len__(self) -> int:
    return len(self._rows)

  def annotation(self, index: int) -> dict[str, Any]:
    row = self._rows[index][1]
    return {"question_id": row["question_id"], "question": row["text"], "label": str(row["label"]).strip().lower()}

  def image(self, index: int) -> np.ndarray:
    return load_image(os.path.join(self._image_dir, self._rows[index][1]["image"]))

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {**self.annotation(index), "image": self.image(index)}


MMBENCH_COLUMNS = ("index", "question", "A", "B", "answer", "image")  # required; hint, category, l2-category,
                                                                     # g_index, C, D... optional
MMBENCH_OFFSET = 1_000_000  # VLMEvalKit's circular copies: index + k * 1e6, their question's index % 1e6
# A cell holding exactly one of these is empty to VLMEvalKit, which reads TSVs with pandas.read_csv(sep="\t"):
# pandas' default NA strings (pandas 2). So an option "None" is no option, as VLMEvalKit shows and scores it.
PANDAS_NA = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                       "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})
_IMAGE_REFERENCE = 64  # an image cell this long or shorter names the row holding the image (VLMEvalKit)


class MmbenchQuestions:
  """MMBench as VLMEvalKit ships and writes it: a TSV with a header row and columns index, question, hint, A, B,
  C, D... (an option's cell empty when a question has fewer), answer (a letter), category, l2-category and image
  (base64 PNG/JPEG), as pandas reads it (`PANDAS_NA`); other columns (source, split, comment...) are ignored.

  Circular copies are rows of their own (vlmeval/tools.py CIRCULAR writes them): the copy k of question i has
  index i + k * 1e6 and its options rotated, and its question is the `g_index` column where the file has one,
  else index % 1e6 (vlmeval/dataset/utils/multiple_choice.py mcq_circular_eval). An image cell of at most 64
  characters holds the index of the row whose image it shares (vlmeval/dataset/image_base.py ImageBaseDataset).
  `circular` says whether the file holds copies (a g_index column, or an index >= 1e6).

  Records: {"index": int, "g_index": int, "question", "hint" ("" if none), "options" {letter: text} (the
  non-empty ones, in letter order), "answer", "category" and "l2_category" ("" if none), "line" (where the row
  starts in the file), "image"}. A malformed row is a ValueError naming the file, the line and the field.
  """

  def __init__(self, tsv_path: str):
    if not os.path.isfile(tsv_path):
      raise FileNotFoundError(f"the MMBench TSV {tsv_path} does not exist")
    csv.field_size_limit(2**31 - 1)  # an image's base64 is far over csv's default cell limit of 128 KiB
    self._path = tsv_path
    self._rows = []  # (record without the image, the image cell)
    with open(tsv_path, newline="") as f:
      reader = csv.reader(f, delimiter="\t")
      header, start = next(reader, None), reader.line_num + 1
      missing = [column for column in MMBENCH_COLUMNS if header is None or column not in header]
      if missing:
        raise ValueError(f"{tsv_path}, line 1: no {missing[0]!r} column (MMBench needs "
                         f"{', '.join(MMBENCH_COLUMNS)})")
      self._letters = [letter for letter in string.ascii_uppercase if letter in header]
      self._g_index_column = "g_index" in header
      try:
        for cells in reader:
          if len(cells) != len(header):
            where = (f"the row ends before {header[len(cells)]!r}" if len(cells) < len(header)
                     else f"more than the header's last, {header[-1]!r}")
            raise ValueError(f"{tsv_path}, line {start}: {len(cells)} fields where the header has "
                             f"{len(header)} ({where})")
          self._rows.append(self._record(dict(zip(header, cells)), start))
          start = reader.line_num + 1
      except csv.Error as error:
        raise ValueError(f"{tsv_path}, line {start}: {error}") from error
    if not self._rows:
      raise ValueError(f"{tsv_path}: no questions")
    self.circular = self._g_index_column or any(record["index"] >= MMBENCH_OFFSET for record, _ in self._rows)
    self._check_indices()

  def _error(self, line: int, field: str, message: str) -> ValueError:
    return ValueError(f"{self._path}, line {line}, {field!r}: {message}")

  def _integer(self, row: dict[str, str], field: str, line: int) -> int:
    try:
      return int(row[field])
    except ValueError:
      raise self._error(line, field, f"{row[field]!r} is not an integer") from None

  def _record(self, row: dict[str, str], line: int) -> tuple[dict, str]:
    def cell(field: str) -> str:
      return "" if row.get(field, "") in PANDAS_NA else row[field]

    for field in ("question", "answer", "image"):
      if not cell(field):
        raise self._error(line, field, "empty")
    index = self._integer(row, "index", line)
    g_index = self._integer(row, "g_index", line) if "g_index" in row else index % MMBENCH_OFFSET
    options = {letter: row[letter] for letter in self._letters if cell(letter)}
    if len(options) < 2:
      empty = next(letter for letter in string.ascii_uppercase if letter not in options)
      raise self._error(line, empty, "empty; a question needs at least two options")
    if row["answer"] not in options:
      raise self._error(line, "answer", f"{row['answer']!r} is not one of the option letters "
                                        f"{', '.join(options)}")
    record = {"index": index, "g_index": g_index, "question": row["question"], "hint": cell("hint"),
              "options": options, "answer": row["answer"], "category": cell("category"),
              "l2_category": cell("l2-category"), "line": line}
    return record, row["image"]

  def _check_indices(self) -> None:
    """Indices unique; image references name a row holding an image; every copy's question is in the file."""
    self._by_index = {}
    for record, _ in self._rows:
      if record["index"] in self._by_index:
        first = self._rows[self._by_index[record["index"]]][0]["line"]
        raise self._error(record["line"], "index", f"{record['index']} is also the index of line {first}")
      self._by_index[record["index"]] = len(self._by_index)
    self._image_rows = []  # the row whose cell holds each row's image
    for record, encoded in self._rows:
      position = self._by_index[record["index"]]
      if len(encoded) <= _IMAGE_REFERENCE:  # vlmeval/dataset/image_base.py ImageBaseDataset.__init__
        position = self._by_index.get(int(encoded)) if encoded.strip().isdigit() else None
        if position is None or len(self._rows[position][1]) <= _IMAGE_REFERENCE:
          raise self._error(record["line"], "image", f"{encoded!r} is neither an image (base64, over "
                                                     f"{_IMAGE_REFERENCE} characters) nor the index of a row "
                                                     f"holding one")
      self._image_rows.append(position)
    for record, _ in self._rows:
      main = self._by_index.get(record["g_index"])
      if main is None or self._rows[main][0]["g_index"] != record["g_index"]:
        field, how = ("g_index", "its g_index") if self._g_index_column else ("index", "its index % 1e6")
        raise self._error(record["line"], field, f"a copy of question {record['g_index']} ({how}), which "
                                                 f"the file does not have as a row of its own")

  def __len__(self) -> int:
    return len(self._rows)

  def annotation(self, index: int) -> dict[str, Any]:
    record = self._rows[index][0]
    return {**record, "options": dict(record["options"])}

  def image(self, index: int) -> np.ndarray:
    """uint8[H, W, 3]; a cell that is not base64 of a PNG/JPEG raises ValueError naming the file and line."""
    record, encoded = self._rows[self._image_rows[index]]
    try:
      with Image.open(io.BytesIO(base64.b64decode(encoded))) as image:
        return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as error:
      raise self._error(record["line"], "image", f"not base64 of a PNG/JPEG ({error})") from error

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {**self.annotation(index), "image": self.image(index)}
