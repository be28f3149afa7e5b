"""LoRA against full finetuning on the CPU: teaching the main job's trained model a question type it never saw.

    python tools/lora_demo.py [--base /tmp/runs/base --out /tmp/runs/lora_demo --steps 400 --seeds 1]

From a trained shapes workdir (--base, the main job's: configs/shapes_tiny.py), trains two runs on the same data,
the usual conversations with --size_questions questions of an object's size mixed into each ("What size is the red
circle?" -> "small" / "large", `shapes_scene.size_questions`), for the same steps and batch, each a `vlmjax train`
subprocess as a user runs it:

  lora      `train.stages=lora`: rank --rank adapters on every linear layer of the language model, and the
            projector (the stage's trained part), the rest frozen; AdamW at --lora_rate, the projector at --rate
  finetune  `train.stages=finetune`: the projector and the whole language model; AdamW at --rate

and evaluates the base and both runs on --split (test by default; tune on validation): the accuracy on every size
question of each image's scene (`vlm.generate`, greedy, exact match), and shapes_vqa's (`vlmjax eval`), the old
skills a run should keep. Prints the host, then one row per method: parameters trained (their count and share of
the model's), optimizer-state bytes and checkpoint bytes (both read from the run's last checkpoint: what the train
state holds, not a formula), steps, wall time of the training subprocess (compiles included) and the two
accuracies; with --seeds N each figure is the median of N runs (seeds 0..N-1) and the accuracies show their range.
Other processes on the same cores slow the wall times: the load average is printed before and after.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import roofline  # tools/roofline.py: this script's own folder is on sys.path

import vlmjax
from vlmjax import workdir as workdir_lib
from vlmjax.data import shapes, shapes_scene, shapes_tasks
from vlmjax.models import lora
from vlmjax.train.optim import TRAINABLE

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPOSITORY, "configs", "shapes_tiny.py")
METHODS = ("lora", "finetune")


def _run(command: list[str], log: str) -> None:
  """Runs a `vlmjax` command with this repository on the path, its output (progress bars) into `log`; a failure
  raises with the log's end."""
  os.makedirs(os.path.dirname(log), exist_ok=True)
  with open(log, "w") as out:
    code = subprocess.run(command, env={**os.environ, "PYTHONPATH": REPOSITORY}, stdout=out,
                          stderr=subprocess.STDOUT).returncode
  if code:
    with open(log) as f:
      raise SystemExit(f"{' '.join(command[1:])} failed ({code}); the end of {log}:\n{f.read()[-3000:]}")


def train_run(method: str, workdir: str, args, data_dir: str, seed: int) -> float:
  """Trains one run with `vlmjax train` (skipped when its workdir holds a finished run); its wall time in seconds,
  read back from a finished run's record when skipped."""
  timing = os.path.join(workdir, "lora_demo_wall_s.json")
  if os.path.exists(timing):
    with open(timing) as f:
      return json.load(f)["wall_s"]
  flags = {"train.stages": method, "train.init_from": args.base, "train.steps": args.steps,
           "train.batch_size": args.batch_size, "train.checkpoint_every": args.steps, "train.validation_questions": 0,
           "data.dir": data_dir, "data.size_questions": args.size_questions, "seed": seed,
           # AdamW for both, so that the optimizer states compare like for like (two moments per trained parameter).
           "optim.optimizer": "adamw", "optim.warmup_steps": args.warmup,
           "optim.learning_rate": args.lora_rate if method == "lora" else args.rate}
  if method == "lora":
    flags.update({"lora.rank": args.rank, "lora.alpha": 2.0 * args.rank, "optim.projector_learning_rate": args.rate})
  command = [sys.executable, "-m", "vlmjax.cli", "train", "--config", CONFIG, "--workdir", workdir,
             *(f"--config.{key}={value}" for key, value in flags.items())]
  print(" ".join(command[1:]), flush=True)
  start = time.perf_counter()
  _run(command, os.path.join(workdir, "lora_demo_train.log"))
  wall = time.perf_counter() - start
  with open(timing, "w") as f:
    json.dump({"wall_s": wall}, f)
  return wall


def _leaves(tree, path=()):
  """(path of keys, array metadata) of every leaf of an orbax metadata tree (dicts and lists; None marks an empty
  state, no array)."""
  if tree is None:
    return []
  if isinstance(tree, dict):
    return [leaf for key, value in tree.items() for leaf in _leaves(value, path + (str(key),))]
  if isinstance(tree, (list, tuple)):
    return [leaf for index, value in enumerate(tree) for leaf in _leaves(value, path + (str(index),))]
  return [(path, tree)]


def state_figures(workdir: str, stage: str) -> dict:
  """What the run's last checkpoint holds: {params: parameters in the train state, trained: those the stage
  trains, optimizer_bytes: the optimizer state's bytes, checkpoint_bytes: the checkpoint folder's bytes on disk}."""
  checkpoints = os.path.join(workdir, "checkpoints")
  directory = os.path.join(checkpoints, str(max(int(name) for name in os.listdir(checkpoints) if name.isdigit())))
  metadata = ocp.PyTreeCheckpointer().metadata(os.path.join(directory, "state"))
  tree = getattr(metadata, "item_metadata", metadata)
  tree = getattr(tree, "tree", tree)
  size = lambda leaf: math.prod(leaf.shape)
  params = _leaves(tree["params"])
  trained = [leaf for path, leaf in params if path[0] in TRAINABLE[stage] or lora.is_adapter(path)]
  on_disk = sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(directory)
                for name in names)
  return {"params": sum(size(leaf) for _, leaf in params), "trained": sum(size(leaf) for leaf in trained),
          "optimizer_bytes": sum(size(leaf) * np.dtype(leaf.dtype).itemsize for _, leaf in _leaves(tree["opt_state"])),
          "checkpoint_bytes": on_disk}


def size_samples(data_dir: str, split: str) -> list[tuple[np.ndarray, str, str]]:
  """(image, question, answer) for every size question of every image of the split (`shapes_scene.size_questions`
  of its scene, in a fixed order)."""
  source = shapes.load(data_dir, split)
  samples = []
  for index in range(len(source)):
    record = source[index]
    for question in shapes_scene.size_questions(shapes_tasks.scene_objects(record)):
      samples.append((record["image"], question["question"], question["answer"]))
  return samples


def size_accuracy(vlm, samples, batch_size: int = 64) -> float:
  """Exact-match accuracy of the greedy answers to `size_samples`."""
  correct = 0
  for start in range(0, len(samples), batch_size):
    batch = samples[start:start + batch_size]
    answers = vlm.generate([image for image, _, _ in batch], [question for _, question, _ in batch], max_new_tokens=4)
    correct += sum(answer.strip() == truth for answer, (_, _, truth) in zip(answers, batch))
  return correct / len(samples)


def vqa_accuracy(workdir: str, out_dir: str, data_dir: str, split: str) -> float:
  """shapes_vqa accuracy of `workdir`, through `vlmjax eval` (its results file kept in out_dir)."""
  results = os.path.join(out_dir, f"results_{split}.json")
  if not os.path.exists(results):
    os.makedirs(out_dir, exist_ok=True)
    _run([sys.executable, "-m", "vlmjax.cli", "eval", "--workdir", workdir, "--out", results, "--benchmarks",
          "shapes_vqa", "--split", split, "--data_dir", data_dir], os.path.join(out_dir, "eval.log"))
  with open(results) as f:
    return json.load(f)["shapes_vqa"]["accuracy"]


def _median_range(values: list[float]) -> str:
  text = f"{statistics.median(values):.3f}"
  return text if len(values) == 1 else f"{text} ({min(values):.3f}-{max(values):.3f})"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--base", default="/tmp/runs/base", help="the trained shapes workdir both runs start from")
  parser.add_argument("--out", default="/tmp/runs/lora_demo", help="where the runs' workdirs go")
  parser.add_argument("--split", default="test", choices=("test", "validation"))
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--warmup", type=int, default=20)
  parser.add_argument("--size_questions", type=int, default=2, help="size questions per view (data.size_questions)")
  # The rates of a sweep on the validation split (1e-4 / 1e-3, 3e-4 / 3e-3, 1e-3 / 1e-2 at 400 steps): the last
  # was the best of both methods (2026-12-06 lora-size in experiments/shapes_tiny/README.md).
  parser.add_argument("--rate", type=float, default=1e-3, help="AdamW's peak rate of full finetuning and of the "
                      "projector in the lora run")
  parser.add_argument("--lora_rate", type=float, default=1e-2, help="the adapters' peak rate")
  parser.add_argument("--rank", type=int, default=1, help="lora.rank (alpha is twice it)")
  parser.add_argument("--seeds", type=int, default=1, help="runs of each method, seeds 0..N-1; figures are medians")
  parser.add_argument("--methods", default=",".join(METHODS))
  args = parser.parse_args()

  base_config = workdir_lib.read_config(args.base)
  data_dir = workdir_lib.data_dir(args.base, base_config)
  print(roofline.host_description(), flush=True)
  load_before = os.getloadavg()[0]
  samples = size_samples(data_dir, args.split)
  model_params = state_figures(args.base, "finetune")["params"]  # the base's checkpoint holds the whole model
  base_vlm = vlmjax.load(args.base)
  rows = [("base (no training)", None, None, [], [size_accuracy(base_vlm, samples)],
           [vqa_accuracy(args.base, os.path.join(args.out, "base_eval"), data_dir, args.split)])]
  del base_vlm
  tag = f"s{args.steps}_b{args.batch_size}_q{args.size_questions}"
  for method in args.methods.split(","):
    name = (f"{method}_r{args.rank}_lr{args.lora_rate:g}_p{args.rate:g}" if method == "lora"
            else f"{method}_lr{args.rate:g}")
    walls, sizes, vqas, figures = [], [], [], None
    for seed in range(args.seeds):
      workdir = os.path.join(args.out, f"{name}_{tag}_seed{seed}")
      walls.append(train_run(method, workdir, args, data_dir, seed))
      figures = state_figures(workdir, method)
      sizes.append(size_accuracy(vlmjax.load(workdir), samples))
      vqas.append(vqa_accuracy(workdir, os.path.join(workdir, "eval"), data_dir, args.split))
      print(f"{workdir}: size {sizes[-1]:.3f}, shapes_vqa {vqas[-1]:.3f}, {walls[-1]:.0f} s", flush=True)
    rows.append((name, figures, args.steps, walls, sizes, vqas))

  print(f"\n{len(samples)} size questions on the {args.split} split ({sum(a == 'small' for *_, a in samples)} small); "
        f"{model_params:,} parameters in the model; batch {args.batch_size}, {args.size_questions} size questions "
        f"per view; load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
  header = ("method", "trained params", "% of model", "optimizer state", "checkpoint", "steps", "wall s",
            "size acc", "shapes_vqa acc")
  print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
  for name, figures, steps, walls, sizes, vqas in rows:
    cells = [name, "-", "-", "-", "-", "-", "-"] if figures is None else [
        name, f"{figures['trained']:,}", f"{100 * figures['trained'] / model_params:.2f}%",
        f"{figures['optimizer_bytes'] / 2**20:.2f} MiB", f"{figures['checkpoint_bytes'] / 2**20:.2f} MiB", str(steps),
        f"{statistics.median(walls):.0f}"]
    print("| " + " | ".join(cells + [_median_range(sizes), _median_range(vqas)]) + " |")


if __name__ == "__main__":
  main()
