"""The data people already have on disk, as random-access sources for the grain pipeline.

    LlavaInstructions("llava_v1_5_mix665k.json", "images/")    # LLaVA instruction JSON + an image folder
    CocoCaptions("captions_val2017.json", "val2017/")            # COCO captions
    VqaV2("questions.json", "annotations.json", "val2014/")      # VQAv2 questions + annotations

Each source checks at construction that its files and every image it names exist (one error naming the first
missing one), and decodes images with Pillow on access: a corrupt image raises there, with its path, and the
pipeline skips and counts that record.
"""

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
    captions: dict[int, list[str]] = {}
    for annotation in data["annotations"]:
      captions.setdefault(annotation["image_id"], []).append(annotation["caption"])
    self._images = [(image["id"], image["file_name"], captions.get(image["id"], [])) for image in data["images"]]
    self._image_dir = image_dir
    _check_images(image_dir, [name for _, name, _ in self._images], annotations_path)

  def __len__(self) -> int:
    return len(self._images)

  def __getitem__(self, index: int) -> dict[str, Any]:
    image_id, name, captions = self._images[index]
    return {"image_id": image_id, "image": load_image(os.path.join(self._image_dir, name)), "captions": captions}


class VqaV2:
  """VQAv2 questions + annotations (10 answers each); images named COCO-style from the image id (or by a
  `file_name` pattern such as "COCO_val2014_{image_id:012d}.jpg"). Records: {"question_id", "image", "question",
  "answers", "question_type", "answer_type"}."""

  def __init__(self, questions_path: str, annotations_path: str, image_dir: str,
               file_name: str = "COCO_val2014_{image_id:012d}.jpg"):
    questions = _read_json(questions_path, "the VQAv2 questions file")["questions"]
    annotations = {a["question_id"]: a for a in _read_json(annotations_path, "the VQAv2 annotations file")
                   ["annotations"]}
    missing = [q["question_id"] for q in questions if q["question_id"] not in annotations]
    if missing:
      raise ValueError(f"{annotations_path} has no annotation for question {missing[0]} of {questions_path}")
    self._rows = [(q, annotations[q["question_id"]]) for q in questions]
    self._image_dir = image_dir
    self._file_name = file_name
    _check_images(image_dir, sorted({file_name.format(image_id=q["image_id"]) for q in questions}), questions_path)

  def __len__(self) -> int:
    return len(self._rows)

  def __getitem__(self, index: int) -> dict[str, Any]:
    question, annotation = self._rows[index]
    path = os.path.join(self._image_dir, self._file_name.format(image_id=question["image_id"]))
    return {"question_id": question["question_id"], "image": load_image(path), "question": question["question"],
            "answers": [a["answer"] for a in annotation["answers"]],
            "question_type": annotation.get("question_type", ""), "answer_type": annotation.get("answer_type", "")}
