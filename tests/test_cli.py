"""The `vlmjax` command, run as a user runs it (a fresh process: absl flags are process-global)."""

import subprocess
import sys

import pytest


def _vlmjax(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "vlmjax.cli", *args], capture_output=True, text=True, timeout=300)


def test_summarize_plans_a_mesh_without_allocating():
  result = _vlmjax("summarize", "--config", "configs/llava_1_5_7b.py", "--config.mesh.fsdp=-1",
                   "--config.mesh.tensor=4", "--devices", "256")
  assert result.returncode == 0, result.stderr
  out = result.stdout
  assert "mesh: data=1 x fsdp=64 x tensor=4 (256 devices)" in out
  total = next(line for line in out.splitlines() if line.startswith("total"))
  assert int(total.split()[1].replace(",", "")) == pytest.approx(7.06e9, rel=0.005)
  # Each parameter with its shape, logical axes, mesh axes and shard shape.
  row = next(line for line in out.splitlines() if line.startswith("decoder/layers/mlp/up/kernel"))
  assert row.split()[1:] == ["32", "4096", "11008", "layers", "embed", "mlp", "pipeline", "fsdp", "tensor", "32", "64",
                             "2752"]


def test_summarize_reports_a_mesh_that_does_not_fit():
  result = _vlmjax("summarize", "--config", "configs/shapes_tiny.py", "--config.mesh.data=2",
                   "--config.mesh.fsdp=2", "--devices", "8")
  assert result.returncode != 0
  assert "data=2 x fsdp=2 x tensor=1 uses 4 devices but there are 8" in result.stderr


def test_unknown_command_prints_usage():
  result = _vlmjax("frobnicate")
  assert result.returncode != 0 and "usage: vlmjax {summarize" in result.stderr
