"""Benchmarks from the files people have on disk, named by a spec `[NAME=]KIND:ARG:ARG...`:

    vqav2:QUESTIONS_JSON:ANNOTATIONS_JSON:IMAGE_DIR[:FILE_NAME_PATTERN]
        VQAv2-style questions + annotations (TextVQA or GQA put in that form), the VQA metric per answer type;
        images named by the pattern from each question's image_id (default COCO_val2014_{image_id:012d}.jpg)
    coco_captions:CAPTIONS_JSON:IMAGE_DIR      COCO captions JSON: BLEU-1..4 and CIDEr-D
    pope:JSONL[:JSONL...]:IMAGE_DIR            POPE question files, one split each (random / popular /
                                               adversarial, read from the file name): per-split POPE scores

    registry.get("textvqa=vqav2:textvqa_questions.json:textvqa_annotations.json:train_images:{image_id}.jpg")

The name (default: the kind) keys results.json and the predictions file, so two files of one kind need two
names. Paths may not contain ':' or ','; the file-name pattern, last, may contain ':'. Prompts follow LLaVA's
evaluation scripts. The paths are checked when the spec is parsed; the files are read when the samples are
listed (a malformed file's error names the file and the entry or line), and images when the model is asked.
MMBench files (`mmbench:TSV`) have their own module, `mmbench.py`.
"""

import functools
import os

from vlmjax.data import formats
from vlmjax.eval.benchmarks import (Benchmark, FileKind, Sample, caption_score, pope_score, reference_answers,
                                     vqa_score)

SHORT_ANSWER = "Answer the question using a single word or phrase."
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
POPE_SPLITS = ("random", "popular", "adversarial")


def _vqav2(name: str, args: list[str]) -> Benchmark:
  questions, annotations, image_dir, *file_name = args

  def samples(data_dir: str) -> list[Sample]:
    del data_dir
    source = formats.VqaV2(questions, annotations, image_dir, *file_name)
    rows = [source.annotation(i) for i in range(len(source))]
    return [Sample(str(row["question_id"]), (functools.partial(source.image, i),),
                   f"{row['question']}\n{SHORT_ANSWER}", row["answers"], row["answer_type"])
            for i, row in enumerate(rows)]
  return Benchmark(name, samples, vqa_score, max_new_tokens=16, references=reference_answers)


def _coco_captions(name: str, args: list[str]) -> Benchmark:
  captions, image_dir = args

  def samples(data_dir: str) -> list[Sample]:
    del data_dir
    source = formats.CocoCaptions(captions, image_dir)
    rows = [source.annotation(i) for i in range(len(source))]
    return [Sample(str(row["image_id"]), (functools.partial(source.image, i),), CAPTION_PROMPT, row["captions"])
            for i, row in enumerate(rows) if row["captions"]]
  return Benchmark(name, samples, caption_score, max_new_tokens=48)


def pope_split(path: str) -> str:
  """The POPE split a question file holds, from its name (coco_pope_adversarial.json -> adversarial); a name
  without one is its own split (the file name without extension)."""
  stem = os.path.splitext(os.path.basename(path))[0]
  return next((split for split in POPE_SPLITS if split in stem.lower()), stem)


def _pope(name: str, args: list[str]) -> Benchmark:
  *files, image_dir = args
  splits = [pope_split(path) for path in files]
  for i, split in enumerate(splits):
    if split in splits[:i]:
      raise ValueError(f"benchmark {name!r}: {files[splits.index(split)]} and {files[i]} are both POPE split "
                       f"{split!r}; give each split once")

  def samples(data_dir: str) -> list[Sample]:
    del data_dir
    out = []
    for path, split in zip(files, splits):
      source = formats.PopeQuestions(path, image_dir)
      for i in range(len(source)):
        row = source.annotation(i)
        out.append(Sample(f"{split}/{row['question_id']}", (functools.partial(source.image, i),),
                          f"{row['question']}\n{SHORT_ANSWER}", row["label"], split))
    return out
  return Benchmark(name, samples, pope_score, max_new_tokens=8)


KINDS: dict[str, FileKind] = {
    "vqav2": FileKind("QUESTIONS_JSON:ANNOTATIONS_JSON:IMAGE_DIR[:FILE_NAME_PATTERN]", _vqav2, 3, 4, 3),
    "coco_captions": FileKind("CAPTIONS_JSON:IMAGE_DIR", _coco_captions, 2, 2),
    "pope": FileKind("JSONL[:JSONL...]:IMAGE_DIR", _pope, 2, None),
}
