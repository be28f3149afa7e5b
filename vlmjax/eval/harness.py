"""Runs benchmarks through a model with batched generation, resumably, and writes the results.

    results = evaluate(vlm, ["shapes_vqa", "shapes_pope"], out_dir="eval/", data_dir="data/")

Answers are appended to `out_dir/predictions/<benchmark>.jsonl` as they come, so a killed evaluation continues
where it stopped; results go to `{benchmark: {metric: value}}`. Retrieval benchmarks generate nothing: they are
scored from the embeddings of `clip`, a `retrieval.DualTower`.
"""

import collections
import json
import os
from typing import Callable, Sequence

import ml_collections
import tqdm

from vlmjax import api
from vlmjax import workdir as workdir_lib
from vlmjax.eval import benchmarks as benchmarks_lib
from vlmjax.eval import registry, retrieval


def _read_answers(path: str) -> dict[str, str]:
  """{sample id: answer} of an earlier, maybe killed, evaluation. A last line cut off mid-write is dropped
  (its sample is asked again); a bad line anywhere else is an error naming the file and the line."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    lines = f.read().splitlines()
  answers = {}
  for number, line in enumerate(lines, 1):
    try:
      row = json.loads(line)
      answers[row["id"]] = row["answer"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
      if number < len(lines):
        raise ValueError(f"{path}, line {number}: not a prediction row ({error})") from error
  return answers


def _conversation(sample: benchmarks_lib.Sample) -> list[dict]:
  parts = [{"type": "image"} for _ in sample.images] + [{"type": "text", "text": sample.prompt}]
  return [{"role": "user", "content": parts}]


def evaluate(vlm, names: Sequence[str], out_dir: str, data_dir: str, batch_size: int = 64,
             limits: dict[str, int | None] | None = None,
             clip: retrieval.DualTower | None = None) -> dict[str, dict[str, float]]:
  """Metrics per benchmark; per-sample predictions in out_dir/predictions/*.jsonl.

  names: built-in benchmark names or file specs (`registry.get`). vlm: what answers the prompts (`chat_batch`);
  clip: the dual tower the retrieval benchmarks need (either may be None when no benchmark needs it).
  """
  chosen = [registry.get(name) for name in names]  # unknown names and missing files fail before any work
  for benchmark in chosen:
    if isinstance(benchmark, retrieval.RetrievalBenchmark) and clip is None:
      raise ValueError(f"{benchmark.name} needs a CLIP dual tower (clip=...), and none was given")
  os.makedirs(os.path.join(out_dir, "predictions"), exist_ok=True)
  results = {}
  for benchmark in chosen:
    limit = (limits or {}).get(benchmark.name, benchmark.limit)
    if isinstance(benchmark, retrieval.RetrievalBenchmark):
      results[benchmark.name] = benchmark.run(clip, data_dir, limit)
      continue
    samples = benchmark.samples(data_dir)[:limit]
    seen = set()
    for sample in samples:
      if sample.id in seen:
        raise ValueError(f"{benchmark.name}: two samples have the id {sample.id!r}; ids key the saved answers")
      seen.add(sample.id)
    path = os.path.join(out_dir, "predictions", f"{benchmark.name}.jsonl")
    answers = _read_answers(path)
    todo = [sample for sample in samples if sample.id not in answers]
    with open(path, "a") as out, tqdm.tqdm(total=len(samples), initial=len(samples) - len(todo),
                                           desc=benchmark.name, dynamic_ncols=True) as progress:
      for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        # A full batch every time (the last one padded by repetition): one compiled shape per benchmark.
        padded = batch + [batch[-1]] * (batch_size - len(batch))
        replies = vlm.chat_batch([_conversation(s) for s in padded], [s.read_images() for s in padded],
                                 max_new_tokens=benchmark.max_new_tokens)
        for sample, reply in zip(batch, replies):
          answers[sample.id] = reply
          out.write(json.dumps({"id": sample.id, "prompt": sample.prompt, "answer": reply,
                                "target": sample.target, "group": sample.group}, default=str) + "\n")
        out.flush()
        progress.update(len(batch))
    results[benchmark.name] = benchmark.score(samples, [answers[sample.id] for sample in samples])
  return results


def training_validation(config: ml_collections.ConfigDict, workdir: str) -> Callable[[dict], dict[str, float]] | None:
  """What `vlmjax train` validates with (None when `train.validation_questions` is 0): VLM parameters -> exact-match
  accuracy, overall and per question type, on the first validation questions of shapes_vqa, answered by the
  inference code (batched greedy generation) with the tokenizer and image processor saved in the workdir."""
  count = config.train.validation_questions
  if not count:
    return None
  benchmark = benchmarks_lib.BENCHMARKS["shapes_vqa"]
  data_dir = workdir_lib.data_dir(workdir, config)

  def validate(params) -> dict[str, float]:
    vlm = api.from_trained(config, params, workdir)
    samples = benchmark.samples(data_dir)[:count]
    answers = []
    for start in range(0, len(samples), 64):
      batch = samples[start:start + 64]
      answers += vlm.generate([s.images[0] for s in batch], [s.prompt for s in batch],
                              max_new_tokens=benchmark.max_new_tokens)
    exact = collections.defaultdict(list)
    for sample, answer in zip(samples, answers):
      correct = float(answer.strip() == sample.target[0])
      exact["validation/accuracy"].append(correct)
      exact[f"validation/accuracy/{sample.group}"].append(correct)
    return {key: sum(values) / len(values) for key, values in exact.items()}
  return validate
