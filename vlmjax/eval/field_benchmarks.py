"""The benchmarks the field reports, read from their official releases exactly as they ship, named by a spec
`[NAME=]KIND:ARG:ARG...` (`registry.get`) and scored by their official rules (`field_metrics.py`):

    mme:MME_DIR                   MME_Benchmark_release_version/: per subtask, `<stem>.txt` (two lines
                                  "question<TAB>Yes|No") beside its image `<stem>.jpg|png`, or in
                                  questions_answers_YN/ with the images in images/
    textvqa:JSON:IMAGE_DIR        TextVQA_0.5.1_val.json ({"data": [{question_id, question, image_id,
                                  answers}]}); images IMAGE_DIR/<image_id>.jpg (train_images/)
    gqa:JSON:IMAGE_DIR            testdev_balanced_questions.json ({qid: {imageId, question, answer, types,
                                  isBalanced}}); images IMAGE_DIR/<imageId>.jpg
    refcoco:JSONL:IMAGE_DIR[:COORDINATES]
                                  RefCOCO/+/g as Qwen-VL's and InternVL's grounding evaluations read them
                                  (refcoco_val.jsonl ...): one object a line, {"image": a path below IMAGE_DIR,
                                  "sent": the expression, "bbox": [x0, y0, x1, y1] in pixels, "width",
                                  "height"}; COORDINATES: how the model writes boxes (square, default: LLaVA-1.5's;
                                  unit; pixels — `field_metrics.box_in_pixels`)

The document benchmarks (DocVQA, ChartQA, OCRBench) are in `document_benchmarks.py`, the exams (MMMU,
ScienceQA) in `exam_benchmarks.py`; they share this module's readers (`field`, `json_entries`, `image_file`, ...).
Prompts are LLaVA-1.5's evaluation prompts. Files are read when the samples are listed; a missing field or a
malformed row is one ValueError naming the file, the row and the field, a missing image a FileNotFoundError naming
the row.
RefCOCO's own release (refs(unc).p, a pickle, with instances.json) is not read: convert it to the JSON lines
above, which the Qwen-VL and InternVL evaluations distribute.
"""

import collections
import functools
import os
from typing import Any, Callable

import numpy as np

from vlmjax.data import formats
from vlmjax.eval import field_metrics, metrics
from vlmjax.eval.benchmarks import Benchmark, FileKind, Sample, parse_box, reference_answers
from vlmjax.eval.file_benchmarks import SHORT_ANSWER

# ---------------------------------------------------------------------------------------------------------------
# Reading rows: one error naming the file, the row and the field.
# ---------------------------------------------------------------------------------------------------------------


def field(row: Any, name: str, source: str, kinds: type | tuple[type, ...] = object, expected: str = "") -> Any:
  """row[name], of one of `kinds`; else a ValueError naming the source (the file and the row) and the field."""
  if not isinstance(row, dict):
    raise ValueError(f"{source}: not a JSON object but {type(row).__name__}")
  if name not in row:
    raise ValueError(f"{source}: no {name!r}")
  if not isinstance(row[name], kinds):
    raise ValueError(f"{source}: {name!r} is {row[name]!r}, not {expected}")
  return row[name]


def texts(row: Any, name: str, source: str) -> list[str]:
  """row[name] as a non-empty list of strings (the reference answers)."""
  value = field(row, name, source, list, "a list of answers")
  if not value or not all(isinstance(text, str) for text in value):
    raise ValueError(f"{source}: {name!r} is {value!r}, not a non-empty list of strings")
  return value


def json_object(path: str, what: str) -> dict:
  """The JSON object a file holds ({question id: question} ...); invalid JSON is an error naming the file."""
  data = formats._read_json(path, what)  # the package's JSON reader, with its errors
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected a JSON object ({{id: entry}}), got {type(data).__name__}")
  return data


def json_entries(path: str, what: str, key: str | None = None) -> list:
  """The list a JSON file holds (at the top level, or under `key` of the object at its top level)."""
  data = formats._read_json(path, what)
  if key is not None:
    data = field(data, key, path, list, "a list of questions")
  if not isinstance(data, list):
    raise ValueError(f"{path}: expected a list of questions, got {type(data).__name__}")
  return data


def image_file(folder: str, name: Any, source: str) -> Callable[[], np.ndarray]:
  """A function reading the image `folder/name`, which must exist now (else FileNotFoundError naming the row)."""
  path = os.path.join(folder, str(name))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{source}: the image {path} does not exist")
  return functools.partial(formats.load_image, path)


def averages(name: str, scores: list[float], groups: list[tuple[str, ...]]) -> dict[str, float]:
  """`name`: the mean score; `name/<group>`: the mean over the samples of each group (a sample may be in several)."""
  by_group = collections.defaultdict(list)
  for score, sample_groups in zip(scores, groups):
    for group in sample_groups:
      by_group[group].append(score)
  return {name: float(np.mean(scores)), **{f"{name}/{group}": float(np.mean(values))
                                           for group, values in sorted(by_group.items())}}


# ---------------------------------------------------------------------------------------------------------------
# MME.
# ---------------------------------------------------------------------------------------------------------------

MME_IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")


def mme_prompt(question: str) -> str:
  """LLaVA-1.5's MME prompt (llava_mme.jsonl; its convert_answer_to_mme.py undoes it): the question without its
  " Please answer yes or no.", then the short-answer instruction."""
  return f"{question.strip().replace(' Please answer yes or no.', '')}\n{SHORT_ANSWER}"


def _mme_samples(root: str) -> list[Sample]:
  samples = []
  for subtask in (name for names in field_metrics.MME_SUBTASKS.values() for name in names):
    folder = os.path.join(root, subtask)
    if not os.path.isdir(folder):
      continue
    split = all(os.path.isdir(os.path.join(folder, sub)) for sub in ("images", "questions_answers_YN"))
    text_dir, image_dir = (os.path.join(folder, "questions_answers_YN"), os.path.join(folder, "images")) if split \
        else (folder, folder)
    for name in sorted(name for name in os.listdir(text_dir) if name.endswith(".txt")):
      path, stem = os.path.join(text_dir, name), name[:-len(".txt")]
      image = next((os.path.join(image_dir, stem + suffix) for suffix in MME_IMAGE_SUFFIXES
                    if os.path.isfile(os.path.join(image_dir, stem + suffix))), None)
      if image is None:
        raise FileNotFoundError(f"{path}: its image {stem}.jpg or {stem}.png is not in {image_dir}")
      with open(path, encoding="utf-8") as f:
        lines = [(number, line.rstrip("\r\n")) for number, line in enumerate(f, 1) if line.strip()]
      if len(lines) != 2:
        raise ValueError(f"{path}: {len(lines)} questions; MME asks two about each image (acc+ pairs them)")
      for number, line in lines:
        question, tab, answer = line.partition("\t")
        if not tab or answer.strip().lower() not in ("yes", "no"):
          raise ValueError(f"{path}, line {number}: the answer field is {answer!r}; an MME line is "
                           f"'question<TAB>Yes' or 'question<TAB>No'")
        samples.append(Sample(f"{subtask}/{stem}/{number}", (functools.partial(formats.load_image, image),),
                              mme_prompt(question), answer.strip().lower(), f"{subtask}/{stem}"))
  if not samples:
    raise ValueError(f"{root}: no MME subtask folder with questions (MME's are "
                     f"{', '.join(name for names in field_metrics.MME_SUBTASKS.values() for name in names)})")
  return samples


def _mme_score(samples: list[Sample], answers: list[str]) -> dict[str, float]:
  return field_metrics.mme_scores([s.group.partition("/")[0] for s in samples], [s.group for s in samples],
                                  answers, [s.target for s in samples])


def _mme(name: str, args: list[str]) -> Benchmark:
  (root,) = args
  return Benchmark(name, lambda data_dir: _mme_samples(root), _mme_score, max_new_tokens=8)


# ---------------------------------------------------------------------------------------------------------------
# TextVQA (and DocVQA's reader) and GQA.
# ---------------------------------------------------------------------------------------------------------------


def short_answer_samples(path: str, what: str, image_dir: str, id_key: str,
                         image_name: Callable[[dict, str], str]) -> list[Sample]:
  """The questions of a {"data": [{<id_key>, "question", "answers", ...}]} file (TextVQA's, DocVQA's), asked for
  a short answer; image_name(entry, source): the entry's image file below image_dir."""
  out = []
  for number, entry in enumerate(json_entries(path, what, "data")):
    source = f"{path}, entry {number}"
    question_id = field(entry, id_key, source, (int, str), "an id")
    question = field(entry, "question", source, str, "a string")
    image = image_file(image_dir, image_name(entry, source), source)
    out.append(Sample(str(question_id), (image,), f"{question}\n{SHORT_ANSWER}", tuple(texts(entry, "answers",
                                                                                             source))))
  return out


def _textvqa(name: str, args: list[str]) -> Benchmark:
  path, image_dir = args

  def samples(data_dir: str) -> list[Sample]:
    return short_answer_samples(path, "the TextVQA file", image_dir, "question_id",
                                lambda entry, source: f"{field(entry, 'image_id', source, str, 'an image id')}.jpg")
  return Benchmark(name, samples, _textvqa_score, max_new_tokens=16, references=reference_answers)


def _textvqa_score(samples: list[Sample], answers: list[str]) -> dict[str, float]:
  return {"accuracy": float(np.mean([field_metrics.textvqa_accuracy(answer, list(s.target))
                                     for s, answer in zip(samples, answers)]))}


def _gqa(name: str, args: list[str]) -> Benchmark:
  path, image_dir = args

  def samples(data_dir: str) -> list[Sample]:
    questions = json_object(path, "the GQA questions file")
    out = []
    for question_id, entry in questions.items():
      source = f"{path}, question {question_id!r}"
      image_id, question, answer = (field(entry, key, source, str, "a string")
                                    for key in ("imageId", "question", "answer"))
      balanced = field(entry, "isBalanced", source, bool, "true or false") if "isBalanced" in entry else True
      if not balanced:
        continue  # eval.py scores the balanced questions only
      groups = ()
      if "types" in entry:
        types = field(entry, "types", source, dict, "an object")
        structural, semantic = (field(types, key, f"{source}, 'types'", str, "a string")
                                for key in ("structural", "semantic"))
        groups = ("open" if structural == "query" else "binary", f"structural/{structural}", f"semantic/{semantic}")
      out.append(Sample(str(question_id), (image_file(image_dir, f"{image_id}.jpg", source),),
                        f"{question}\n{SHORT_ANSWER}", (answer, groups)))
    return out
  return Benchmark(name, samples, _gqa_score, max_new_tokens=16, references=lambda sample: [sample.target[0]])


def _gqa_score(samples: list[Sample], answers: list[str]) -> dict[str, float]:
  """eval.py's accuracy (exact match), overall, `accuracy/binary` and `accuracy/open` (open: structural type
  'query'), and per structural and semantic type."""
  right = [float(field_metrics.gqa_prediction(answer) == s.target[0]) for s, answer in zip(samples, answers)]
  return averages("accuracy", right, [s.target[1] for s in samples])


# ---------------------------------------------------------------------------------------------------------------
# RefCOCO-style grounding.
# ---------------------------------------------------------------------------------------------------------------

REFCOCO_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: {}."  # LLaVA-1.5
REFCOCO_FIELDS = ("image", "sent", "bbox", "width", "height")


def _refcoco(name: str, args: list[str]) -> Benchmark:
  path, image_dir, *rest = args
  coordinates = rest[0] if rest else "square"
  if coordinates not in field_metrics.BOX_COORDINATES:
    raise ValueError(f"benchmark {name!r}: box coordinates {coordinates!r}; use one of "
                     f"{', '.join(field_metrics.BOX_COORDINATES)}")

  def samples(data_dir: str) -> list[Sample]:
    out = []
    for number, row in formats._read_jsonl(path, "the RefCOCO file", REFCOCO_FIELDS):  # errors name the line
      source = f"{path}, line {number}"
      box = field(row, "bbox", source, list, "[x0, y0, x1, y1]")
      width, height = (field(row, key, source, (int, float), "a number of pixels") for key in ("width", "height"))
      if len(box) != 4 or not all(isinstance(value, (int, float)) for value in box):
        raise ValueError(f"{source}: 'bbox' is {box!r}, not [x0, y0, x1, y1]")
      image = image_file(image_dir, field(row, "image", source, str, "an image path"), source)
      out.append(Sample(str(number), (image,),
                        REFCOCO_PROMPT.format(field(row, "sent", source, str, "a string")),
                        (tuple(box), (width, height))))
    return out

  def score(samples: list[Sample], answers: list[str]) -> dict[str, float]:
    """accuracy@0.5: the first box in the answer ([0, 0, 0, 0] if none, as the Qwen-VL/InternVL scripts do), in
    pixels, against the reference."""
    boxes = [field_metrics.box_in_pixels(parse_box(answer) or (0.0, 0.0, 0.0, 0.0), coordinates, *s.target[1])
             for s, answer in zip(samples, answers)]
    return {"accuracy": metrics.grounding_accuracy(np.asarray(boxes), np.asarray([s.target[0] for s in samples]))}
  return Benchmark(name, samples, score, max_new_tokens=48)


KINDS: dict[str, FileKind] = {
    "mme": FileKind("MME_DIR", _mme, 1, 1),
    "textvqa": FileKind("JSON:IMAGE_DIR", _textvqa, 2, 2),
    "gqa": FileKind("JSON:IMAGE_DIR", _gqa, 2, 2),
    "refcoco": FileKind("JSONL:IMAGE_DIR[:COORDINATES]", _refcoco, 2, 3, 2),
}
