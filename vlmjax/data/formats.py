"""The data people already have on disk, as random-access sources for the grain pipeline.

    LlavaInstructions("llava_v1_5_mix665k.json", "images/")    # LLaVA instruction JSON + an image folder
    CocoCaptions("captions_val2017.json", "val2017/")            # COCO captions
    VqaV2("questions.json", "annotations.json", "val2014/")      # VQAv2 questions + annotations
    PopeQuestions("coco_pope_random.json", "val2014/")          # POPE yes/no probes, one JSON object a line
    MmbenchQuestions("mmbench_dev_en.tsv")                       # MMBench TSV, images inline as base64

Each source checks at construction that its files and every image it names exist (one error naming the first
missing one) and that its entries have the fields it reads (an error naming the file and the entry or line),
and decodes images with Pillow on access: a corrupt image raises there, with its path, and the pipeline skips
and counts that record. The evaluation sources (all but LlavaInstructions) also give `annotation(index)`, the
record without its image, and `image(index)`, so that a benchmark can list its questions without decoding
every image.
"""

import base64
import csv
import io
import json
import os
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
  """LLaVA-style instruction data: a JSON list of {"id", "image" (optional), "conversations": [{"from": "human" |
  "gpt", "value": ...}]} with "<image>" in the first human turn. Records: {"id", "image" (uint8[H, W, 3] or None),
  "conversation": [{"role": "user" | "assistant", "content": str}]}."""

  def __init__(self, json_path: str, image_dir: str):
    self._entries = _read_json(json_path, "the LLaVA instruction file")
    self._image_dir = image_dir
    for number, entry in enumerate(self._entries):
      if "conversations" not in entry or not isinstance(entry["conversations"], list):
        raise ValueError(f"{json_path}, entry {number}: no 'conversations' list")
    _check_images(image_dir, [entry["image"] for entry in self._entries if "image" in entry], json_path)

  def __len__(self) -> int:
    return len(self._entries)

  def __getitem__(self, index: int) -> dict[str, Any]:
    entry = self._entries[index]
    conversation = []
    for turn in entry["conversations"]:
      if turn.get("from") not in LLAVA_ROLES:
        raise ValueError(f"entry {index}: unknown speaker {turn.get('from')!r}; LLaVA turns are 'human' or 'gpt'")
      conversation.append({"role": LLAVA_ROLES[turn["from"]], "content": turn["value"]})
    image = load_image(os.path.join(self._image_dir, entry["image"])) if "image" in entry else None
    return {"id": entry.get("id", index), "image": image, "conversation": conversation}


class CocoCaptions:
  """COCO captions (`images` + `annotations` with `caption`). Records: {"image_id", "image", "captions"}."""

  def __init__(self, annotations_path: str, image_dir: str):
    data = _read_json(annotations_path, "the COCO captions file")
    annotations, images = _section(data, "annotations", annotations_path), _section(data, "images", annotations_path)
    _check_fields(annotations, ("image_id", "caption"), annotations_path, "annotation")
    _check_fields(images, ("id", "file_name"), annotations_path, "image")
    captions: dict[int, list[str]] = {}
    for annotation in annotations:
      captions.setdefault(annotation["image_id"], []).append(annotation["caption"])
    self._images = [(image["id"], image["file_name"], captions.get(image["id"], [])) for image in images]
    self._image_dir = image_dir
    _check_images(image_dir, [name for _, name, _ in self._images], annotations_path)

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


MMBENCH_COLUMNS = ("index", "question", "A", "B", "answer", "image")  # required; hint, category, C, D... optional


def _missing(value: str | None) -> bool:
  """An empty MMBench cell: pandas writes NaN as '' (or 'nan')."""
  return value is None or value.strip() == "" or value.strip().lower() == "nan"


class MmbenchQuestions:
  """MMBench as OpenCompass ships it: a TSV with a header row and columns index, question, hint, A, B, C, D
  (options left empty when a question has fewer), answer (a letter), category and image (base64 PNG/JPEG).
  Records: {"index", "question", "hint" ("" if none), "options" [str], "answer", "category", "image"}."""

  def __init__(self, tsv_path: str):
    if not os.path.isfile(tsv_path):
      raise FileNotFoundError(f"the MMBench TSV {tsv_path} does not exist")
    csv.field_size_limit(2**31 - 1)  # an image's base64 is far over csv's default cell limit of 128 KiB
    self._path = tsv_path
    self._rows = []  # (line number, record without the image, the image's base64)
    with open(tsv_path, newline="") as f:
      reader = csv.reader(f, delimiter="\t")
      header, start = next(reader, None), reader.line_num + 1
      missing = [column for column in MMBENCH_COLUMNS if header is None or column not in header]
      if missing:
        raise ValueError(f"{tsv_path}, line 1: no {missing[0]!r} column (MMBench needs "
                         f"{', '.join(MMBENCH_COLUMNS)})")
      letters = [letter for letter in "ABCDEFGHIJ" if letter in header]
      try:
        for cells in reader:
          if len(cells) != len(header):
            raise ValueError(f"{tsv_path}, line {start}: {len(cells)} fields where the header has {len(header)}")
          self._rows.append(self._record(dict(zip(header, cells)), letters, start))
          start = reader.line_num + 1
      except csv.Error as error:
        raise ValueError(f"{tsv_path}, line {start}: {error}") from error
    if not self._rows:
      raise ValueError(f"{tsv_path}: no questions")

  def _record(self, row: dict[str, str], letters: list[str], line: int) -> tuple[int, dict, str]:
    options = [row[letter] for letter in letters if not _missing(row[letter])]
    answer, allowed = row["answer"].strip(), "ABCDEFGHIJ"[:len(options)]
    if len(answer) != 1 or answer not in allowed:
      raise ValueError(f"{self._path}, line {line}: answer {row['answer']!r} is not one of the option letters "
                       f"{', '.join(allowed)}")
    record = {"index": row["index"], "question": row["question"],
              "hint": "" if _missing(row.get("hint")) else row["hint"], "options": options, "answer": answer,
              "category": "" if _missing(row.get("category")) else row["category"]}
    return line, record, row["image"]

  def __len__(self) -> int:
    return len(self._rows)

  def annotation(self, index: int) -> dict[str, Any]:
    return dict(self._rows[index][1])

  def image(self, index: int) -> np.ndarray:
    """uint8[H, W, 3]; a cell that is not base64 of a PNG/JPEG raises ValueError naming the file and line."""
    line, _, encoded = self._rows[index]
    try:
      with Image.open(io.BytesIO(base64.b64decode(encoded, validate=True))) as image:
        return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as error:
      raise ValueError(f"{self._path}, line {line}: the image is not base64 of a PNG/JPEG ({error})") from error

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {**self.annotation(index), "image": self.image(index)}
