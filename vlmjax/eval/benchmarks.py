"""Benchmarks: each one a data source + prompt builder + answer extractor + metric, in one registry.

A benchmark turns its data into `Sample`s (an id, the images, one user prompt, what the metric needs), asks the
model each prompt, reads the answer out of the model's text, and scores the whole list:

    benchmark = shapes_benchmarks("test")["shapes_vqa"]
    samples = benchmark.samples(data_dir)
    results = benchmark.score(samples, answers)    # {"accuracy": ..., "accuracy/colour": ...}

The built-in ones read a split of the shapes data set: `test` (the default of `vlmjax eval`, never used to tune
the recipe) or `validation` (what training validates on); `file_benchmarks.py` reads the files people have
on disk (VQAv2-style JSON, COCO captions, POPE, MMBench), named `KIND:PATH:...`; `shapes_retrieval` is scored
from a CLIP dual tower's embeddings instead of generated text (`retrieval.py`).
"""

import collections
import dataclasses
import functools
import re
from typing import Any, Callable

import numpy as np

from vlmjax.data import shapes, shapes_tasks
from vlmjax.eval import metrics


@dataclasses.dataclass(frozen=True)
class Sample:
  id: str
  images: tuple  # uint8[H, W, 3] arrays, PIL images, or functions () -> one of those (read when asked)
  prompt: str  # the user turn's text; the images come first
  target: Any  # what the metric compares the answer with
  group: str = ""  # a sub-score key (question type, POPE split, circular question id)

  def read_images(self) -> list:
    """The images as arrays or PIL images, reading those given as functions."""
    return [image() if callable(image) else image for image in self.images]


@dataclasses.dataclass(frozen=True)
class Benchmark:
  name: str
  samples: Callable[[str], list[Sample]]  # data_dir -> samples
  score: Callable[[list[Sample], list[str]], dict[str, float]]  # (samples, raw answers) -> metrics
  max_new_tokens: int = 8
  limit: int | None = None  # default number of samples (the first ones); None: all
  # For a judge (`judge.py`): a multiple-choice sample's options in order, and the rules that place an answer
  # among them (letter or None); or an open question's reference answers.
  choices: Callable[[Sample], list[str]] | None = None
  extract: Callable[[str, list[str]], str | None] = metrics.extract_choice
  references: Callable[[Sample], list[str]] | None = None


@dataclasses.dataclass(frozen=True)
class FileKind:
  """A kind of benchmark file, named in a spec `[NAME=]KIND:ARG:ARG...` (`registry.get`)."""

  usage: str  # the arguments after 'KIND:'
  build: Callable[[str, list[str]], Benchmark]  # (name, arguments) -> the benchmark
  min_args: int
  max_args: int | None  # None: any number; otherwise the last argument keeps any further ':'
  path_args: int | None = None  # how many leading arguments are paths that must exist; None: all


SPLITS = ("test", "validation")  # the shapes splits a built-in benchmark may read; the first is the default


def _records(data_dir: str, split: str):
  source = shapes.load(data_dir, split)
  return [source[i] for i in range(len(source))]


def _shapes_vqa_samples(data_dir: str, split: str) -> list[Sample]:
  return [Sample(f"{record['image_id']}/{i}", (record["image"],), question["question"], question["answers"],
                 question["type"])
          for record in _records(data_dir, split) for i, question in enumerate(record["vqa"])]


def vqa_score(samples: list[Sample], answers: list[str]) -> dict[str, float]:
  """`accuracy` and `accuracy/<group>` (the question or answer type). The official VQA metric against 10-ish
  human answers; against a single reference (GQA-style) exact match after the VQA normalization, since the
  metric's leave-one-out would leave no reference to match."""
  scores = collections.defaultdict(list)
  for sample, answer in zip(samples, answers):
    if len(sample.target) == 1:
      score = float(metrics.normalize_vqa_answer(answer) == metrics.normalize_vqa_answer(sample.target[0]))
    else:
      score = metrics.vqa_accuracy(answer, sample.target)
    scores["accuracy"].append(score)
    if sample.group:
      scores[f"accuracy/{sample.group}"].append(score)
  return {key: float(np.mean(values)) for key, values in scores.items()}


def _shapes_caption_samples(data_dir: str, split: str) -> list[Sample]:
  return [Sample(str(record["image_id"]), (record["image"],), shapes_tasks.CAPTION_PROMPT, record["captions"])
          for record in _records(data_dir, split)]


def caption_score(samples: list[Sample], answers: list[str]) -> dict[str, float]:
  refs = metrics.ptb_tokenize({sample.id: list(sample.target) for sample in samples})
  preds = metrics.ptb_tokenize({sample.id: answer for sample, answer in zip(samples, answers)})
  scores = dict(zip(("bleu1", "bleu2", "bleu3", "bleu4"), metrics.bleu(refs, preds)))
  return {**scores, "cider": metrics.cider(refs, preds)}


def _shapes_pope_samples(data_dir: str, split: str) -> list[Sample]:
  return [Sample(f"{record['image_id']}/{i}", (record["image"],), probe["question"], probe["answer"],
                 probe["setting"])
          for record in _records(data_dir, split) for i, probe in enumerate(record["pope"])]


def pope_score(samples: list[Sample], answers: list[str]) -> dict[str, float]:
  return metrics.pope_by_split(answers, [s.target for s in samples], [s.group for s in samples])


def _shapes_mc_samples(data_dir: str, split: str) -> list[Sample]:
  """Every question once per rotation of its options (CircularEval); the group is the question's id."""
  samples = []
  for record in _records(data_dir, split):
    for i, question in enumerate(record["multiple_choice"]):
      for rotation, (options, answer) in enumerate(metrics.circular_rotations(question["options"],
                                                                              question["answer"])):
        prompt = shapes_tasks.multiple_choice_prompt(question["question"], options)
        samples.append(Sample(f"{record['image_id']}/{i}/{rotation}", (record["image"],), prompt,
                              (answer, tuple(options)), f"{record['image_id']}/{i}"))
  return samples


def multiple_choice_score(samples: list[Sample], answers: list[str]) -> dict[str, float]:
  """CircularEval `accuracy`, and `unplaced`: the answers no rule (`metrics.extract_choice`) places among the
  options, which count as wrong."""
  choices = [metrics.extract_choice(answer, list(sample.target[1])) for sample, answer in zip(samples, answers)]
  return {"accuracy": metrics.circular_accuracy([s.group for s in samples], choices,
                                                [s.target[0] for s in samples]),
          "unplaced": float(sum(choice is None for choice in choices))}


def option_texts(sample: Sample) -> list[str]:
  """A multiple-choice sample's options (its target: (answer letter, options, ...))."""
  return list(sample.target[1])


def reference_answers(sample: Sample) -> list[str]:
  """An open question's reference answers (its target)."""
  return list(sample.target)


def _shapes_grounding_samples(data_dir: str, split: str) -> list[Sample]:
  return [Sample(f"{record['image_id']}/{i}", (record["image"],), shapes_tasks.grounding_prompt(ref["expression"]),
                 tuple(ref["box"]))
          for record in _records(data_dir, split) for i, ref in enumerate(record["grounding"])]


_BOX = re.compile(r"\[?\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)")


def parse_box(text: str) -> tuple[float, float, float, float] | None:
  """The first '[x0, y0, x1, y1]' in a model's answer, or None."""
  match = _BOX.search(text)
  return None if match is None else tuple(float(v) for v in match.groups())


def grounding_score(samples: list[Sample], answers: list[str]) -> dict[str, float]:
  boxes = [parse_box(answer) or (0.0, 0.0, 0.0, 0.0) for answer in answers]
  return {"accuracy": metrics.grounding_accuracy(np.asarray(boxes), np.asarray([s.target for s in samples]))}


def shapes_benchmarks(split: str) -> dict[str, Benchmark]:
  """The built-in benchmarks, by name, over the shapes data set's `split` (one of SPLITS)."""
  if split not in SPLITS:
    raise ValueError(f"the shapes benchmarks read split {' or '.join(SPLITS)}, not {split!r}")
  of = lambda samples: functools.partial(samples, split=split)
  return {
      "shapes_vqa": Benchmark("shapes_vqa", of(_shapes_vqa_samples), vqa_score, max_new_tokens=6,
                              references=reference_answers),
      "shapes_caption": Benchmark("shapes_caption", of(_shapes_caption_samples), caption_score, max_new_tokens=40,
                                  limit=200),
      "shapes_pope": Benchmark("shapes_pope", of(_shapes_pope_samples), pope_score, max_new_tokens=4, limit=1500),
      "shapes_mc": Benchmark("shapes_mc", of(_shapes_mc_samples), multiple_choice_score, max_new_tokens=4,
                             limit=1200, choices=option_texts),
      "shapes_grounding": Benchmark("shapes_grounding", of(_shapes_grounding_samples), grounding_score,
                                    max_new_tokens=20, limit=300),
  }


NAMES = tuple(shapes_benchmarks(SPLITS[0]))  # the built-in benchmarks' names
