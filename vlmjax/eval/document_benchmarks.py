"""The document and text-reading benchmarks the field reports, read from their official releases as they ship
(the rest are in `field_benchmarks.py`, which also holds the row readers used here):

    docvqa:JSON:IMAGE_DIR               DocVQA val_v1.0.json ({"data": [{questionId, question, image, answers}]});
                                        `image` ("documents/xxx.png") below IMAGE_DIR; ANLS (threshold 0.5)
    chartqa:JSON[:JSON...]:IMAGE_DIR    ChartQA test_human.json / test_augmented.json ([{imgname, query,
                                        label}]), images IMAGE_DIR/<imgname> (test/png/); the split (human,
                                        augmented) from each file's name; relaxed accuracy (5%)
    ocrbench:JSON:IMAGE_DIR             OCRBench.json ([{dataset_name, id, image_path, question, answers (a string
                                        or a list), type}]), images IMAGE_DIR/<image_path>; OCRBench's score
                                        (of 1000), per type

Prompts: the question, then "Answer the question using a single word or phrase." (LLaVA-1.5's short-answer
prompt, which OCRBench's own LLaVA-1.5 script uses). Answers are stripped of surrounding whitespace before
scoring, as LLaVA's scripts strip what the model writes.
"""

import collections
import os

from vlmjax.eval import field_metrics
from vlmjax.eval.benchmarks import Benchmark, FileKind, Sample, reference_answers
from vlmjax.eval.field_benchmarks import averages, field, image_file, json_entries, short_answer_samples, texts
from vlmjax.eval.file_benchmarks import SHORT_ANSWER


def _docvqa(name: str, args: list[str]) -> Benchmark:
  path, image_dir = args

  def samples(data_dir: str) -> list[Sample]:
    return short_answer_samples(path, "the DocVQA file", image_dir, "questionId",
                                lambda entry, source: field(entry, "image", source, str, "an image path"))

  def score(samples: list[Sample], answers: list[str]) -> dict[str, float]:
    return {"anls": sum(field_metrics.anls(answer.strip(), list(s.target)) for s, answer in zip(samples, answers))
                    / len(samples)}
  return Benchmark(name, samples, score, max_new_tokens=32, references=reference_answers)


CHARTQA_SPLITS = ("human", "augmented")


def chartqa_splits(name: str, files: list[str]) -> list[str]:
  """The ChartQA split each file holds, from its name (test_human.json -> human; else the name itself); two files
  of one split are an error."""
  stems = [os.path.splitext(os.path.basename(path))[0] for path in files]
  splits = [next((split for split in CHARTQA_SPLITS if split in stem.lower()), stem) for stem in stems]
  repeated = [split for split, count in collections.Counter(splits).items() if count > 1]
  if repeated:
    raise ValueError(f"benchmark {name!r}: {', '.join(files)} are not one file a split: two are ChartQA split "
                     f"{repeated[0]!r}")
  return splits


def _chartqa(name: str, args: list[str]) -> Benchmark:
  *files, image_dir = args
  splits = chartqa_splits(name, files)

  def samples(data_dir: str) -> list[Sample]:
    out = []
    for path, split in zip(files, splits):
      for number, entry in enumerate(json_entries(path, "the ChartQA file")):
        source = f"{path}, entry {number}"
        query = field(entry, "query", source, str, "a string")
        label = field(entry, "label", source, (str, int, float), "the answer")
        out.append(Sample(f"{split}/{number}", (image_file(image_dir, field(entry, "imgname", source, str,
                                                                             "an image file name"), source),),
                          f"{query}\n{SHORT_ANSWER}", str(label), split))
    return out

  def score(samples: list[Sample], answers: list[str]) -> dict[str, float]:
    """`relaxed_accuracy` overall and per split (ChartQA reports the mean of the two splits' equal halves)."""
    right = [float(field_metrics.relaxed_correctness(s.target, answer.strip())) for s, answer in zip(samples,
                                                                                                     answers)]
    return averages("relaxed_accuracy", right, [(s.group,) for s in samples])
  return Benchmark(name, samples, score, max_new_tokens=16)


OCRBENCH_FIELDS = ("dataset_name", "id", "image_path", "question", "answers", "type")


def _ocrbench(name: str, args: list[str]) -> Benchmark:
  path, image_dir = args

  def samples(data_dir: str) -> list[Sample]:
    out = []
    for number, entry in enumerate(json_entries(path, "the OCRBench file")):
      source = f"{path}, entry {number}"
      dataset_name, question, kind = (field(entry, key, source, str, "a string")
                                      for key in ("dataset_name", "question", "type"))
      field(entry, "id", source)
      answers = [field(entry, "answers", source, (str, list), "an answer or a list of answers")]
      if isinstance(answers[0], list):
        answers = texts(entry, "answers", source)
      image = image_file(image_dir, field(entry, "image_path", source, str, "an image path"), source)
      # Sample ids are the entries' places: OCRBench's `id` repeats across its source data sets.
      out.append(Sample(str(number), (image,), f"{question}\n{SHORT_ANSWER}",
                        (answers[0], tuple(answers), dataset_name), kind))
    return out

  def score(samples: list[Sample], answers: list[str]) -> dict[str, float]:
    correct = [field_metrics.ocrbench_correct(answer, list(s.target[1]), s.target[2])
               for s, answer in zip(samples, answers)]
    return field_metrics.ocrbench_scores([s.group for s in samples], correct)
  return Benchmark(name, samples, score, max_new_tokens=128)


KINDS: dict[str, FileKind] = {
    "docvqa": FileKind("JSON:IMAGE_DIR", _docvqa, 2, 2),
    "chartqa": FileKind("JSON[:JSON...]:IMAGE_DIR", _chartqa, 2, None),
    "ocrbench": FileKind("JSON:IMAGE_DIR", _ocrbench, 2, 2),
}
