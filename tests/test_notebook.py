"""docs/quickstart.ipynb executed top to bottom in a Jupyter kernel, as a user runs it, with a few training steps,
images and questions (the notebook's VLMJAX_NOTEBOOK_* settings): every cell must run and draw its pictures.

The stored copy's outputs are checked too: it reads on GitHub without running, so it must hold a top-to-bottom
run's outputs (refresh them by executing the notebook and saving it, see the notebook's first cell).
"""

import os
import pathlib

import nbclient
import nbformat

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "quickstart.ipynb"
# The cells whose outputs are pictures: the data grid, the learning curve, the test images, the attention map,
# the per-head maps, the patch classes.
PICTURES = 6


def _pictures(cell) -> int:
  return sum("image/png" in output.get("data", {}) for output in cell.get("outputs", []))


def _code_cells(notebook) -> list:
  return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_the_stored_notebook_holds_a_top_to_bottom_run():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  cells = _code_cells(notebook)
  assert [cell.execution_count for cell in cells] == list(range(1, len(cells) + 1)), (
      "docs/quickstart.ipynb's stored outputs are not one top-to-bottom run: execute it and save it")
  assert not [output for cell in cells for output in cell.outputs if output.output_type == "error"]
  assert sum(_pictures(cell) for cell in cells) >= PICTURES


def test_the_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  # The kernel inherits this environment: the checkout's vlmjax (not another installed copy), one CPU device (the
  # tests' 8 fake devices would split the notebook's batch 8 ways), and the short settings.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
  monkeypatch.setenv("XLA_FLAGS", " ".join(flag for flag in os.environ.get("XLA_FLAGS", "").split()
                                           if "device_count" not in flag))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  for name, value in dict(STEPS="10", IMAGES="64", QUESTIONS="8", DIR=str(tmp_path)).items():
    monkeypatch.setenv(f"VLMJAX_NOTEBOOK_{name}", value)
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  for cell in _code_cells(notebook):
    cell.outputs, cell.execution_count = [], None
  # Fails with the cell's source and traceback on the first error (nbclient.exceptions.CellExecutionError).
  nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
  cells = _code_cells(notebook)
  assert all(cell.execution_count for cell in cells), "a cell did not run"
  assert not [output for cell in cells for output in cell.outputs if output.output_type == "error"]
  drawn = [cell.source.splitlines()[0] for cell in cells if _pictures(cell)]
  assert len(drawn) >= PICTURES, f"only these cells drew a picture: {drawn}"
  assert (tmp_path / "tiny-llava" / "config.json").exists()
