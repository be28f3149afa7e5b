"""Exams the field reports, multiple choice over one or more images, read from their official releases as they
ship, named by a spec `[NAME=]KIND:ARG:ARG...` (`registry.get`) and scored by their official rules
(`field_metrics.py`):

    mmmu:PARQUET[:PARQUET...]     MMMU's parquet files (id, question, options, answer, question_type,
                                  image_1..image_7); a folder: every validation-*.parquet below it
    scienceqa:PROBLEMS_JSON:PID_SPLITS_JSON:IMAGE_DIR[:SPLIT]
                                  problems.json + pid_splits.json; images IMAGE_DIR/<pid>/<image>, IMAGE_DIR the
                                  split's folder (images/test); SPLIT default test

Prompts are LLaVA-1.5's evaluation prompts; a missing field or a malformed row is one ValueError naming the file,
the row and the field (the readers of `field_benchmarks.py`).
"""

import ast
import functools
import glob
import io
import os
import random
import re

import numpy as np
from PIL import Image

from vlmjax.eval import field_metrics
from vlmjax.eval.benchmarks import Benchmark, FileKind, Sample
from vlmjax.eval.field_benchmarks import averages, field, image_file, json_object, texts
from vlmjax.eval.file_benchmarks import SHORT_ANSWER
from vlmjax.eval.mmbench import LETTER_ANSWER, mmbench_prompt


# ---------------------------------------------------------------------------------------------------------------
# MMMU.
# ---------------------------------------------------------------------------------------------------------------

MMMU_COLUMNS = ("id", "question", "options", "answer", "question_type")  # and image_1 ... image_7
MMMU_SEED = 42  # MMMU's eval_utils.py seeds `random` with 42 for the answers that name no option
_IMAGE_REFERENCE = re.compile(r"<image (\d+)>")


def mmmu_prompt(question: str, question_type: str, options: list[str]) -> str:
  """MMMU's own prompt for LLaVA-1.5 (configs/llava1.5.yaml, `construct_prompt`); the '<image k>' references stay
  in the text, the images come first in that order."""
  if question_type != "multiple-choice":
    return f"{question}\n\n{SHORT_ANSWER}"
  listed = "".join(f"({chr(ord('A') + i)}) {option}\n" for i, option in enumerate(options))
  return f"{question}\n\n{listed}\n{LETTER_ANSWER}"


def _decode(data: bytes, source: str) -> np.ndarray:
  try:
    with Image.open(io.BytesIO(data)) as image:
      return np.asarray(image.convert("RGB"))
  except (OSError, ValueError) as error:
    raise ValueError(f"{source}: not a decodable image ({error})") from error


def _mmmu_rows(path: str) -> list[dict]:
  import pyarrow  # here, not on top: only MMMU needs it (installed with tensorflow-datasets)
  import pyarrow.parquet
  try:
    # One thread: pyarrow 26's threaded reader sometimes aborts the interpreter at exit (about 1 run in 30 here).
    table = pyarrow.parquet.read_table(path, use_threads=False)
  except (pyarrow.ArrowException, OSError) as error:
    raise ValueError(f"{path}: not a readable parquet file ({error})") from error
  missing = [column for column in MMMU_COLUMNS if column not in table.column_names]
  if missing:
    raise ValueError(f"{path}: no {missing[0]!r} column (MMMU's files have {', '.join(MMMU_COLUMNS)}, image_1...)")
  return table.to_pylist()


def _mmmu_sample(row: dict, source: str) -> Sample:
  text = {name: field(row, name, source, str, "a string") for name in MMMU_COLUMNS}
  try:
    options = ast.literal_eval(text["options"])
  except (ValueError, SyntaxError):
    options = None
  if not isinstance(options, list) or not all(isinstance(option, str) for option in options):
    raise ValueError(f"{source}: 'options' is {text['options']!r}, not a Python list of strings")
  if text["question_type"] == "multiple-choice" and text["answer"] not in [chr(ord("A") + i)
                                                                           for i in range(len(options))]:
    raise ValueError(f"{source}: 'answer' is {text['answer']!r}, not one of its {len(options)} option letters")
  shown = sorted({int(k) for k in _IMAGE_REFERENCE.findall(" ".join([text["question"], *options]))})
  shown = shown or [k for k in range(1, 8) if row.get(f"image_{k}")]  # no reference: every image it has
  images = []
  for k in shown:
    image = row.get(f"image_{k}")
    if not isinstance(image, dict) or not isinstance(image.get("bytes"), bytes):
      raise ValueError(f"{source}: 'image_{k}' is empty, and the question shows <image {k}>")
    images.append(functools.partial(_decode, image["bytes"], f"{source}, 'image_{k}'"))
  subject = "_".join(text["id"].split("_")[1:-1])  # validation_Art_Theory_3 -> Art_Theory (main_eval_only.py)
  return Sample(text["id"], tuple(images), mmmu_prompt(text["question"], text["question_type"], options),
                (text["answer"], text["question_type"], tuple(options)), subject)


def _mmmu_score(samples: list[Sample], answers: list[str]) -> dict[str, float]:
  """Accuracy, overall and per subject: a multiple-choice answer is read with MMMU's parse_multi_choice_response
  (a random letter when it names none, drawn in sample order from a generator seeded 42), an open one with
  parse_open_response and eval_open."""
  rng = random.Random(MMMU_SEED)
  right = []
  for sample, answer in zip(samples, answers):
    gold, question_type, options = sample.target
    if question_type == "multiple-choice":
      right.append(float(field_metrics.mmmu_multiple_choice(answer, list(options), rng) == gold))
    else:
      right.append(float(field_metrics.mmmu_open_correct(field_metrics.mmmu_gold_answers(gold), answer)))
  return averages("accuracy", right, [(s.group,) for s in samples])


def _mmmu(name: str, args: list[str]) -> Benchmark:
  def samples(data_dir: str) -> list[Sample]:
    files = []
    for path in args:
      found = sorted(glob.glob(os.path.join(path, "**", "validation-*.parquet"), recursive=True)) \
          if os.path.isdir(path) else [path]
      if not found:
        raise FileNotFoundError(f"{path} holds no validation-*.parquet file (MMMU's validation split)")
      files += found
    return [_mmmu_sample(row, f"{path}, row {number}") for path in files
            for number, row in enumerate(_mmmu_rows(path))]
  return Benchmark(name, samples, _mmmu_score, max_new_tokens=64)


# ---------------------------------------------------------------------------------------------------------------
# ScienceQA.
# ---------------------------------------------------------------------------------------------------------------

SCIENCEQA_SUBJECTS = {"natural science": "natural", "social science": "social", "language science": "language"}


def scienceqa_groups(subject: str, grade: str, hint: str, image: str | None) -> tuple[str, ...]:
  """The breakdowns of ScienceQA's tools/evaluate_acc.py a problem counts in (its keys without 'acc_')."""
  groups = [SCIENCEQA_SUBJECTS.get(subject, subject)]
  groups += ["has_text"] * bool(hint) + ["has_image"] * bool(image) + ["no_context"] * (not hint and not image)
  number = grade.removeprefix("grade")
  if number.isdigit():
    groups.append("grade_1_6" if int(number) <= 6 else "grade_7_12")
  return tuple(groups)


def _scienceqa(name: str, args: list[str]) -> Benchmark:
  problems_path, splits_path, image_dir, *rest = args
  split = rest[0] if rest else "test"

  def samples(data_dir: str) -> list[Sample]:
    problems = json_object(problems_path, "the ScienceQA problems file")
    pids = field(json_object(splits_path, "the ScienceQA pid_splits file"), split, splits_path, list,
                 "a list of problem ids")
    out = []
    for pid in pids:
      if pid not in problems:
        raise ValueError(f"{splits_path}, {split!r}: problem {pid!r} is not in {problems_path}")
      source = f"{problems_path}, problem {pid!r}"
      problem = problems[pid]
      question, hint, subject, grade = (field(problem, key, source, str, "a string")
                                        for key in ("question", "hint", "subject", "grade"))
      choices = texts(problem, "choices", source)
      answer = field(problem, "answer", source, int, "an option index")
      if not 0 <= answer < len(choices):
        raise ValueError(f"{source}: 'answer' is {answer}, not an index of its {len(choices)} 'choices'")
      image = field(problem, "image", source, (str, type(None)), "a file name or null")
      images = (image_file(os.path.join(image_dir, pid), image, source),) if image else ()
      prompt = mmbench_prompt(question, f"Context: {hint}" if hint else "", choices)  # LLaVA's CQM-A prompt
      out.append(Sample(pid, images, prompt, (chr(ord("A") + answer), answer, len(choices),
                                              scienceqa_groups(subject, grade, hint, image))))
    return out
  return Benchmark(name, samples, _scienceqa_score, max_new_tokens=8)


def _scienceqa_score(samples: list[Sample], answers: list[str]) -> dict[str, float]:
  """Accuracy, overall and per ScienceQA breakdown (`accuracy/natural`, `accuracy/has_image` (LLaVA's
  'IMG-Accuracy'), `accuracy/grade_1_6` ...); an answer naming no option (LLaVA's 'FAILED') is wrong."""
  right = [float(field_metrics.scienceqa_choice(answer, s.target[2]) == s.target[1])
           for s, answer in zip(samples, answers)]
  return averages("accuracy", right, [s.target[3] for s in samples])


KINDS: dict[str, FileKind] = {
    "mmmu": FileKind("PARQUET[:PARQUET...]", _mmmu, 1, None),
    "scienceqa": FileKind("PROBLEMS_JSON:PID_SPLITS_JSON:IMAGE_DIR[:SPLIT]", _scienceqa, 3, 4, 3),
}
