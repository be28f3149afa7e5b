"""Reports: a Markdown page comparing evaluation runs, with plots and a picture grid of answers.

    write_report(["runs/a", "runs/b"], "report.md")      # or: vlmjax report runs/a runs/b --out report.md

A run is a folder holding the `results.json` that `vlmjax eval --out DIR/results.json` writes, and optionally
what sits beside it: `predictions/<benchmark>.jsonl` (for the picture grid) and, in a training workdir,
`metrics.jsonl` (learning curves) and `config.json` (where its shapes data set is). The page has a summary
table (one headline metric per benchmark), a table of every metric per benchmark, and the plots: accuracy by
question type, POPE precision and recall per split, learning curves, and sample images with question,
reference and each run's prediction. Images go into `<report name>_files/` beside the page.
"""

import collections
import json
import os
import textwrap
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from vlmjax import workdir as workdir_lib  # noqa: E402
from vlmjax.eval import answer_cache, benchmarks, compare, registry  # noqa: E402

HEADLINE = ("f1", "accuracy", "cider", "r@1")  # the first a benchmark has is its summary metric
RESULTS_FILE = "results.json"


def read_results(run_dir: str) -> dict[str, dict[str, float]]:
  """{benchmark: {metric: value}} of a run folder's results.json."""
  path = os.path.join(run_dir, RESULTS_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist: a run folder holds the {RESULTS_FILE} of `vlmjax eval --out`")
  return read_results_file(path)


def read_results_file(path: str) -> dict[str, dict[str, float]]:
  """{benchmark: {metric: value}} of a results.json file, checked."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist")
  with open(path) as f:
    try:
      results = json.load(f)
    except json.JSONDecodeError as error:
      raise ValueError(f"{path}: not valid JSON ({error})") from error
  if not isinstance(results, dict) or not all(
      isinstance(m, dict) and all(isinstance(v, (int, float)) for v in m.values()) for m in results.values()):
    raise ValueError(f"{path}: expected {{benchmark: {{metric: number}}}}")
  return results


def _labels(run_dirs: Sequence[str]) -> list[str]:
  """Each run's folder name, or its path where two names clash."""
  names = [os.path.basename(os.path.normpath(path)) for path in run_dirs]
  return [name if names.count(name) == 1 else path for name, path in zip(names, run_dirs)]


def _table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _value(results: dict, benchmark: str, metric: str) -> str:
  value = results.get(benchmark, {}).get(metric)
  return "–" if value is None else f"{value:.4f}"


def _bars(axes, groups: list[str], values: dict[str, list[float]], title: str) -> None:
  """Grouped bars: one group per x label, one bar per run (values {run: [value per group]})."""
  width = 0.8 / max(len(values), 1)
  for i, (label, row) in enumerate(values.items()):
    axes.bar(np.arange(len(groups)) + i * width, row, width, label=label)
  axes.set_xticks(np.arange(len(groups)) + width * (len(values) - 1) / 2, groups, rotation=30, ha="right")
  axes.set(ylim=(0, 1.05), title=title)
  axes.grid(axis="y", alpha=0.3)
  axes.legend(fontsize=8)


def _plot_panels(panels: list[tuple[str, list[str], dict[str, list[float]]]], out_png: str) -> None:
  """One axes of grouped bars per panel (title, groups, {run: values})."""
  figure, axes = plt.subplots(1, len(panels), figsize=(1 + 5 * len(panels), 4), squeeze=False)
  for panel_axes, (title, groups, values) in zip(axes[0], panels):
    _bars(panel_axes, groups, values, title)
  figure.tight_layout()
  figure.savefig(out_png, dpi=100)
  plt.close(figure)


def _by_type_panels(results: dict[str, dict], benchmarks: list[str]) -> list:
  """Per benchmark with `accuracy/<type>` keys: (benchmark, types, {run: accuracies})."""
  panels = []
  for benchmark in benchmarks:
    types = sorted({key.removeprefix("accuracy/") for run in results.values()
                    for key in run.get(benchmark, {}) if key.startswith("accuracy/")})
    if types:
      panels.append((f"{benchmark}: accuracy by question type", types, {
          label: [run[benchmark].get(f"accuracy/{t}", np.nan) for t in types]
          for label, run in results.items() if benchmark in run}))
  return panels


def _pope_panels(results: dict[str, dict], benchmarks: list[str]) -> list:
  """Per benchmark with `<split>/precision` keys: (benchmark, ['random precision', ...], {run: values})."""
  panels = []
  for benchmark in benchmarks:
    splits = sorted({key.split("/")[0] for run in results.values() for key in run.get(benchmark, {})
                     if key.endswith("/precision")})
    if splits:
      groups = [f"{split} {metric}" for split in splits for metric in ("precision", "recall")]
      panels.append((f"{benchmark}: precision and recall per split", groups, {
          label: [run[benchmark].get(group.replace(" ", "/"), np.nan) for group in groups]
          for label, run in results.items() if benchmark in run}))
  return panels


def _reference(target) -> str:
  """The reference answer to show: the most common human answer, a POPE label, the correct option letter..."""
  if isinstance(target, str):
    return target
  if isinstance(target, (list, tuple)) and target and all(isinstance(t, str) for t in target):
    return collections.Counter(target).most_common(1)[0][0]
  if isinstance(target, tuple) and target and isinstance(target[0], str):
    return target[0]
  return str(list(target)) if isinstance(target, (list, tuple)) else str(target)


def _read_predictions(path: str) -> dict[str, str]:
  """{sample id: answer} of a predictions JSONL (a line cut off by a kill is skipped)."""
  answers = {}
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
        answers[row["id"]] = row["answer"]
      except (json.JSONDecodeError, KeyError, TypeError):
        continue
  return answers


def _grid_benchmark(run_dirs: Sequence[str]) -> str | None:
  """The first built-in (shapes) benchmark the first run has predictions for."""
  return next((name for name in benchmarks.NAMES
               if os.path.isfile(os.path.join(run_dirs[0], "predictions", f"{name}.jsonl"))), None)


def _predictions_split(run_dir: str, benchmark_name: str) -> str:
  """The shapes split a run's answers to a built-in benchmark came from (its predictions' fingerprint)."""
  found = answer_cache.fingerprint_of(os.path.join(run_dir, "predictions", f"{benchmark_name}.jsonl"))
  return (found or {}).get("split") or benchmarks.SPLITS[0]


def plot_samples(benchmark_name: str, data_dir: str, runs: dict[str, str], out_png: str, count: int = 8,
                 columns: int = 4) -> None:
  """A grid of `count` samples that the first run answered, spread evenly over the benchmark: the image, the
  question, the reference and each run's prediction (runs {label: folder with predictions/<benchmark>.jsonl})."""
  answers = {label: _read_predictions(os.path.join(path, "predictions", f"{benchmark_name}.jsonl"))
             for label, path in runs.items()}
  first = answers[next(iter(runs))]
  split = _predictions_split(next(iter(runs.values())), benchmark_name)
  samples = [s for s in registry.get(benchmark_name, split).samples(data_dir) if s.id in first]
  samples = samples[::max(1, len(samples) // count)][:count]
  if not samples:
    raise ValueError(f"none of the {benchmark_name} predictions of {next(iter(runs))} matches a sample in "
                     f"{data_dir}")
  texts = []
  for sample in samples:
    lines = [f"Q: {sample.prompt}", f"reference: {_reference(sample.target)}"]
    lines += [f"{label}: {answers[label].get(sample.id, '–')}" for label in runs]
    texts.append("\n".join(textwrap.fill(line, 38) for line in lines))
  rows = -(-len(samples) // columns)
  text_height = 0.16 * max(text.count("\n") + 1 for text in texts)
  figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, rows * (2.8 + text_height)), squeeze=False)
  for cell in axes.flat:
    cell.axis("off")
  for cell, sample, text in zip(axes.flat, samples, texts):
    cell.imshow(np.asarray(sample.read_images()[0]))
    cell.text(0, -0.04, text, transform=cell.transAxes, va="top", fontsize=7, family="monospace")
  figure.tight_layout()
  figure.savefig(out_png, dpi=100)
  plt.close(figure)


def _data_dir(run_dir: str) -> str | None:
  """Where a training workdir's shapes data set is (its config's data.dir, else <workdir>/data)."""
  if not os.path.isfile(os.path.join(run_dir, workdir_lib.CONFIG_FILE)):
    return None
  return workdir_lib.data_dir(run_dir)


def _against_baseline(results: dict[str, dict], baseline: dict) -> list[list[str]]:
  """Rows [benchmark, metric, baseline value, each run's value and change] for every metric of the baseline and
  the runs."""
  keys = dict.fromkeys((benchmark, metric) for run in results.values()
                       for benchmark, metric, _, _ in compare.deltas(run, baseline))
  rows = []
  for benchmark, metric in keys:
    old = baseline.get(benchmark, {}).get(metric)
    cells = []
    for run in results.values():
      new = run.get(benchmark, {}).get(metric)
      cells.append("–" if new is None else f"{new:.4f}" if old is None else f"{new:.4f} ({new - old:+.4f})")
    rows.append([benchmark, metric, _value(baseline, benchmark, metric), *cells])
  return rows


def write_report(run_dirs: Sequence[str], out_md: str, data_dir: str | None = None, grid_samples: int = 8,
                 baseline: str | None = None) -> None:
  """The Markdown report comparing `run_dirs` at out_md, its images in `<out_md without .md>_files/`.

  data_dir: the shapes data set for the picture grid (default: the first run's, if it is a training workdir).
  baseline: a results.json; the page then shows every metric's change against it.
  """
  if not run_dirs:
    raise ValueError("a report needs at least one run folder")
  labels = _labels(run_dirs)
  results = {label: read_results(path) for label, path in zip(labels, run_dirs)}
  benchmarks = list(dict.fromkeys(name for run in results.values() for name in run))
  files_dir = os.path.splitext(out_md)[0] + "_files"
  os.makedirs(files_dir, exist_ok=True)
  link = lambda name: f"{os.path.basename(files_dir)}/{name}"

  page = ["# Evaluation report", "", _table(["run", "folder"], [[l, p] for l, p in zip(labels, run_dirs)]), "",
          "## Summary", ""]
  summary = []
  for benchmark in benchmarks:
    metrics = {key for run in results.values() for key in run.get(benchmark, {})}
    metric = next((m for m in HEADLINE if m in metrics), None) or min(metrics, default="–")
    summary.append([benchmark, metric] + [_value(run, benchmark, metric) for run in results.values()])
  page += [_table(["benchmark", "metric", *labels], summary), ""]
  if baseline is not None:
    rows = _against_baseline(results, read_results_file(baseline))
    page += [f"## Against the baseline ({baseline})", "", _table(["benchmark", "metric", "baseline", *labels], rows),
             ""]
  for benchmark in benchmarks:
    metrics = sorted({key for run in results.values() for key in run.get(benchmark, {})},
                     key=lambda key: ("/" in key, key))  # overall metrics first, then per type / split
    rows = [[metric] + [_value(run, benchmark, metric) for run in results.values()] for metric in metrics]
    page += [f"## {benchmark}", "", _table(["metric", *labels], rows), ""]

  page += ["## Plots", ""]
  plots = (("accuracy_by_type.png", "Accuracy by question type", _by_type_panels(results, benchmarks)),
           ("pope.png", "POPE precision and recall per split", _pope_panels(results, benchmarks)))
  for name, title, panels in plots:
    if panels:
      _plot_panels(panels, os.path.join(files_dir, name))
      page += [f"![{title}]({link(name)})", ""]
  trained = {label: path for label, path in zip(labels, run_dirs)
             if os.path.isfile(os.path.join(path, workdir_lib.METRICS_FILE))}
  if trained:
    workdir_lib.plot_learning_curves(trained, os.path.join(files_dir, "learning_curves.png"))
    page += [f"![Learning curves]({link('learning_curves.png')})", ""]

  grid_benchmark, data_dir = _grid_benchmark(run_dirs), data_dir or _data_dir(run_dirs[0])
  if grid_benchmark and data_dir:
    plot_samples(grid_benchmark, data_dir, dict(zip(labels, run_dirs)), os.path.join(files_dir, "samples.png"),
                 grid_samples)
    page += [f"## Samples ({grid_benchmark})", "", f"![Samples]({link('samples.png')})", ""]
  else:
    page += ["No picture grid: it needs a built-in benchmark's predictions in the first run and the shapes data "
             "set (--data_dir, or a training workdir as the first run).", ""]
  with open(out_md, "w") as f:
    f.write("\n".join(page))
