"""The Markdown report comparing runs: its tables carry the values of the runs' results.json, and its plots and
picture grid are written as PNG files it links to."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from vlmjax.eval import registry, report

RUN_A = {
    "shapes_vqa": {"accuracy": 0.912, "accuracy/colour": 0.8, "accuracy/shape": 1.0},
    "shapes_pope": {"accuracy": 0.75, "f1": 0.7, "precision": 0.6, "recall": 0.9, "yes_ratio": 0.6,
                    "random/precision": 0.61, "random/recall": 0.91, "adversarial/precision": 0.55,
                    "adversarial/recall": 0.875},
    "shapes_caption": {"bleu4": 0.25, "cider": 1.234},
}
RUN_B = {"shapes_vqa": {"accuracy": 0.5, "accuracy/colour": 0.25, "accuracy/shape": 0.75},
         "shapes_retrieval": {"r@1": 0.125, "r@5": 0.5}}


def _write_run(path, results, predictions, metrics_rows=()):
  os.makedirs(path / "predictions")
  (path / "results.json").write_text(json.dumps(results))
  (path / "predictions" / "shapes_vqa.jsonl").write_text(
      "".join(json.dumps({"id": sample_id, "answer": answer}) + "\n" for sample_id, answer in predictions))
  if metrics_rows:
    (path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in metrics_rows))
  return str(path)


@pytest.fixture
def runs(tmp_path, tiny_shapes_dir):
  samples = registry.get("shapes_vqa").samples(tiny_shapes_dir)
  rows = [{"step": step, "loss": 3.0 / step, "learning_rate": 1e-3} for step in range(1, 6)]
  return (_write_run(tmp_path / "run_a", RUN_A, [(s.id, "red") for s in samples[:5]], rows),
          _write_run(tmp_path / "run_b", RUN_B, [(s.id, "blue") for s in samples[:3]]))


def test_the_report_carries_the_runs_values_and_writes_its_images(runs, tmp_path, tiny_shapes_dir):
  out = tmp_path / "report.md"
  report.write_report(runs, str(out), data_dir=tiny_shapes_dir, grid_samples=4)
  page = out.read_text()
  # The summary: one headline metric per benchmark, a dash where a run lacks the benchmark.
  assert "| benchmark | metric | run_a | run_b |" in page
  assert "| shapes_vqa | accuracy | 0.9120 | 0.5000 |" in page
  assert "| shapes_pope | f1 | 0.7000 | – |" in page
  assert "| shapes_caption | cider | 1.2340 | – |" in page
  assert "| shapes_retrieval | r@1 | – | 0.1250 |" in page
  # Every metric in its benchmark's table.
  assert "| accuracy/colour | 0.8000 | 0.2500 |" in page
  assert "| adversarial/recall | 0.8750 | – |" in page
  for name in ("accuracy_by_type.png", "pope.png", "learning_curves.png", "samples.png"):
    assert f"(report_files/{name})" in page
    with Image.open(tmp_path / "report_files" / name) as image:
      assert image.format == "PNG" and image.width > 300 and image.height > 200
  assert "## Samples (shapes_vqa)" in page


def test_a_run_without_results_is_named(runs, tmp_path):
  os.remove(os.path.join(runs[1], "results.json"))
  with pytest.raises(FileNotFoundError, match=r"run_b/results.json does not exist"):
    report.write_report(runs, str(tmp_path / "report.md"))
  with open(os.path.join(runs[1], "results.json"), "w") as f:
    f.write('{"shapes_vqa": {"accuracy": 0.5,}')
  with pytest.raises(ValueError, match=r"run_b/results.json: not valid JSON \(.*line 1"):
    report.write_report(runs, str(tmp_path / "report.md"))


def test_the_report_command_with_a_baseline(runs, tmp_path):
  out = tmp_path / "cli.md"
  baseline = tmp_path / "old.json"
  baseline.write_text(json.dumps({"shapes_vqa": {"accuracy": 0.75}, "gone": {"f1": 0.5}}))
  result = subprocess.run([sys.executable, "-m", "vlmjax.cli", "report", *runs, "--out", str(out), "--baseline",
                           str(baseline)], capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  page = out.read_text()
  assert "| shapes_vqa | accuracy | 0.9120 | 0.5000 |" in page
  # Each run's value and its change against the baseline; a dash where a side lacks the metric.
  assert "| benchmark | metric | baseline | run_a | run_b |" in page
  assert "| shapes_vqa | accuracy | 0.7500 | 0.9120 (+0.1620) | 0.5000 (-0.2500) |" in page
  assert "| gone | f1 | 0.5000 | – | – |" in page
  assert "| shapes_caption | cider | – | 1.2340 | – |" in page
  assert "No picture grid" in page  # no --data_dir, and the runs are not training workdirs
  result = subprocess.run([sys.executable, "-m", "vlmjax.cli", "report", "--out", str(out)], capture_output=True,
                          text=True, timeout=300)
  assert result.returncode != 0 and "usage: vlmjax report RUN_DIR [RUN_DIR ...] --out report.md" in result.stderr
