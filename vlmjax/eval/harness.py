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

Data parallel: over the processes of a `jax.distributed` job (`vlmjax/parallel/distributed.py`) each process answers
its own `batch_size` questions of every round, the answers are gathered in question order, and process 0 alone
keeps the answers files, scores and asks the judge; within a process, a model whose weights sit on a mesh with a
`data` or `fsdp` axis answers each batch split over those devices (`on_its_mesh`). Either way every question is
asked in a batch of the same shape as in one process on one device, so the answers are the same.
"""

import collections
import contextlib
import hashlib
import json
import math
import os
from typing import Callable, ContextManager, Sequence

import jax
import ml_collections
import numpy as np
import tqdm

from vlmjax import api
from vlmjax import workdir as workdir_lib
from vlmjax.eval import benchmarks as benchmarks_lib
from vlmjax.eval import answer_cache, judge as judge_lib, registry, retrieval
from vlmjax.parallel import distributed, mesh as mesh_lib


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
  (`judge.judge_answers`), its verdicts kept beside the answers. batch_size: the questions each process asks at once.
  Over several processes every process calls this with the same arguments; process 0 returns the results, the others
  an empty dict.
  """
  chosen = [registry.get(name, split) for name in names]  # unknown names and missing files fail before any work
  for benchmark in chosen:
    if isinstance(benchmark, retrieval.RetrievalBenchmark) and clip is None:
      raise ValueError(f"{benchmark.name} needs a CLIP dual tower (clip=...), and none was given")
  is_main = jax.process_index() == 0
  if is_main:
    os.makedirs(os.path.join(out_dir, "predictions"), exist_ok=True)
  results = {}
  for benchmark in chosen:
    limit = (limits or {}).get(benchmark.name, benchmark.limit)
    if isinstance(benchmark, retrieval.RetrievalBenchmark):
      if is_main:
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
    _check_every_process_asks_the_same(benchmark.name, made_by)
    answers = answer_cache.rows_made_by(path, made_by) if is_main else {}
    unanswered = distributed.broadcast_flags(np.array([sample.id not in answers for sample in samples]))
    todo = [sample for sample, flag in zip(samples, unanswered) if flag]
    answers.update(_answer_in_rounds(vlm, benchmark, todo, batch_size, path if is_main else None, len(samples)))
    if not is_main:
      continue
    scored, judged = [answers[sample.id] for sample in samples], {}
    if judge is not None:
      scored, judged = judge_lib.judge_answers(judge, benchmark, samples, scored,
                                               path.removesuffix(".jsonl") + ".judge.jsonl", made_by)
    results[benchmark.name] = {**benchmark.score(samples, scored), **judged}
  return results


def _answer_in_rounds(vlm, benchmark: benchmarks_lib.Benchmark, todo: list[benchmarks_lib.Sample], batch_size: int,
                      path: str | None, total: int) -> dict[str, str]:
  """{sample id: answer} for `todo`, asked in rounds of batch_size questions per process (process k the k-th
  batch of a round) and gathered in question order, each round appended to `path` (process 0's answers file; None on
  the others). total: the benchmark's question count, for the progress bar."""
  answers = {}
  round_size = batch_size * jax.process_count()
  with (open(path, "a") if path else contextlib.nullcontext()) as out, on_its_mesh(vlm, batch_size), tqdm.tqdm(
      total=total, initial=total - len(todo), desc=benchmark.name, dynamic_ncols=True, disable=out is None) as progress:
    for start in range(0, len(todo), round_size):
      questions = todo[start:start + round_size]
      mine = questions[jax.process_index() * batch_size:(jax.process_index() + 1) * batch_size]
      replies = distributed.gather_texts(_replies(vlm, mine, batch_size, benchmark.max_new_tokens) if mine else [])
      for sample, reply in zip(questions, replies):
        answers[sample.id] = reply
        if out is not None:
          out.write(json.dumps({"id": sample.id, "prompt": sample.prompt, "answer": reply,
                                "target": sample.target, "group": sample.group}, default=str) + "\n")
      if out is not None:
        out.flush()
      progress.update(len(questions))
  return answers


def _replies(vlm, batch: list[benchmarks_lib.Sample], batch_size: int, max_new_tokens: int) -> list[str]:
  """The model's answers to `batch` (at most batch_size questions), asked as a full batch (the last question
  repeated): one compiled shape per benchmark."""
  padded = batch + [batch[-1]] * (batch_size - len(batch))
  replies = vlm.chat_batch([_conversation(s) for s in padded], [s.read_images() for s in padded],
                           max_new_tokens=max_new_tokens)
  return replies[:len(batch)]


def _check_every_process_asks_the_same(name: str, made_by: dict) -> None:
  """ValueError on every process when some process read another model (weights, tokenizer, ...) or other questions
  than process 0: their answers would be scored as one model's."""
  model = {key: value for key, value in made_by["model"].items() if key != "source"}  # paths may differ by host
  differing = distributed.differing_processes(json.dumps({**made_by, "model": model}, sort_keys=True, default=str))
  if differing:
    raise ValueError(f"{name}: processes {differing} read another model or other questions than process 0; give "
                     f"every process the same checkpoint and benchmark files")


def on_its_mesh(vlm, batch_size: int) -> ContextManager:
  """Where `vlm`'s weights sit on a mesh with `data` or `fsdp` devices (`VLM.sharded`), the mesh and the logical
  rules (`mesh_lib.activate`): the model's activation constraints then split each batch's rows over those devices,
  the rest of the mesh sharding the weights as before. Elsewhere nothing changes (`contextlib.nullcontext`).
  ValueError when batch_size does not split evenly over them."""
  leaves = jax.tree.leaves(getattr(vlm, "params", None))
  sharding = getattr(leaves[0], "sharding", None) if leaves else None
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return contextlib.nullcontext()
  split = math.prod(sharding.mesh.shape.get(axis, 1) for axis in mesh_lib.BATCH_AXES)
  if split == 1:
    return contextlib.nullcontext()
  if batch_size % split:
    raise ValueError(f"batch size {batch_size} does not split over the mesh's {split} data x fsdp devices: make it a "
                     f"multiple of {split}")
  return mesh_lib.activate(sharding.mesh, mesh_lib.LOGICAL_RULES)


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
