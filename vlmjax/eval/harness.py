"""Runs benchmarks through a model with batched generation, resumably, and writes the results.

    results = evaluate(vlm, ["shapes_vqa", "shapes_pope"], out_dir="eval/", data_dir="data/")

Answers are appended to `out_dir/predictions/<benchmark>.jsonl` as they come, so a killed evaluation continues
where it stopped; results go to `{benchmark: {metric: value}}`. Retrieval benchmarks generate nothing: they are
scored from the embeddings of `clip`, a `retrieval.DualTower`.

Answers are tied to what made them: `predictions/<benchmark>.fingerprint.json` holds the model's fingerprint
(`VLM.fingerprint`: its source and a digest of its weights, config, tokenizer and image processor), the generation
settings and a digest of the benchmark's samples (ids, prompts, references). The same model resumes its answers;
any other model, setting or benchmark file starts the benchmark's answers afresh (the log names both models), so
an answers file never mixes two models.
"""

import collections
import hashlib
import json
import os
from typing import Callable, Sequence

import ml_collections
import tqdm

from vlmjax import api
from vlmjax import workdir as workdir_lib
from vlmjax.eval import benchmarks as benchmarks_lib
from vlmjax.eval import answer_cache, judge as judge_lib, registry, retrieval


def _conversation(sample: benchmarks_lib.Sample) -> list[dict]:
  parts = [{"type": "image"} for _ in sample.images] + [{"type": "text", "text": sample.prompt}]
  return [{"role": "user", "content": parts}]


def fingerprint(vlm, benchmark: benchmarks_lib.Benchmark, samples: list[benchmarks_lib.Sample],
                split: str | None) -> dict:
  """What the answers of `vlm` to `samples` (all of the benchmark's, before any limit) depend on."""
  digest = hashlib.sha256()
  for sample in samples:
    digest.update(json.dumps([sample.id, sample.prompt, sample.target], default=str).encode())
  return {"model": vlm.fingerprint(), "benchmark": benchmark.name, "split": split,
          "generation": {"max_new_tokens": benchmark.max_new_tokens, "temperature": 0.0},
          "samples": digest.hexdigest()[:32]}


def evaluate(vlm, names: Sequence[str], out_dir: str, data_dir: str, batch_size: int = 64,
             limits: dict[str, int | None] | None = None, clip: retrieval.DualTower | None = None,
             split: str = benchmarks_lib.SPLITS[0],
             judge: judge_lib.Judge | None = None) -> dict[str, dict[str, float]]:
  """Metrics per benchmark; per-sample predictions in out_dir/predictions/*.jsonl.

  names: built-in benchmark names or file specs (`registry.get`). vlm: what answers the prompts (`chat_batch`)
  and identifies itself (`fingerprint()`); clip: the dual tower the retrieval benchmarks need (either may be None
  when no benchmark needs it). split: the shapes data set's split the built-in benchmarks read (`test` or
  `validation`). judge: places the multiple-choice answers the rules cannot and matches open answers by meaning
  (`judge.judge_answers`), its verdicts kept beside the answers.
  """
  chosen = [registry.get(name, split) for name in names]  # unknown names and missing files fail before any work
  for benchmark in chosen:
    if isinstance(benchmark, retrieval.RetrievalBenchmark) and clip is None:
      raise ValueError(f"{benchmark.name} needs a CLIP dual tower (clip=...), and none was given")
  os.makedirs(os.path.join(out_dir, "predictions"), exist_ok=True)
  results = {}
  for benchmark in chosen:
    limit = (limits or {}).get(benchmark.name, benchmark.limit)
    if isinstance(benchmark, retrieval.RetrievalBenchmark):
      results[benchmark.name] = benchmark.run(clip, data_dir, limit, split)
      continue
    every_sample = benchmark.samples(data_dir)
    seen = set()
    for sample in every_sample:
      if sample.id in seen:
        raise ValueError(f"{benchmark.name}: two samples have the id {sample.id!r}; ids key the saved answers")
      seen.add(sample.id)
    samples = every_sample[:limit]
    path = os.path.join(out_dir, "predictions", f"{benchmark.name}.jsonl")
    built_in = benchmark.name in benchmarks_lib.NAMES
    made_by = fingerprint(vlm, benchmark, every_sample, split if built_in else None)
    answers = answer_cache.rows_made_by(path, made_by)
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
    scored, judged = [answers[sample.id] for sample in samples], {}
    if judge is not None:
      scored, judged = judge_lib.judge_answers(judge, benchmark, samples, scored,
                                               path.removesuffix(".jsonl") + ".judge.jsonl", made_by)
    results[benchmark.name] = {**benchmark.score(samples, scored), **judged}
  return results


def training_validation(config: ml_collections.ConfigDict, workdir: str) -> Callable[[dict], dict[str, float]] | None:
  """What `vlmjax train` validates with (None when `train.validation_questions` is 0): VLM parameters -> exact-match
  accuracy, overall and per question type, on the first validation questions of shapes_vqa, answered by the
  inference code (batched greedy generation) with the tokenizer and image processor saved in the workdir."""
  count = config.train.validation_questions
  if not count:
    return None
  benchmark = benchmarks_lib.shapes_benchmarks("validation")["shapes_vqa"]
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
