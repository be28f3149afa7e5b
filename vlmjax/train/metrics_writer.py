"""Training metrics: `metrics.jsonl` (one JSON object per logged step), TensorBoard event files, and a plot of
the learning curve at the end. Only process 0 writes."""

import json
import os

from tensorboardX import SummaryWriter

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:

  def __init__(self, workdir: str, enabled: bool = True):
    self._workdir = workdir
    self._enabled = enabled
    if enabled:
      self._file = open(os.path.join(workdir, METRICS_FILE), "a")  # a resumed run appends
      self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, **values) -> None:
    """One row {step, **values}; numbers also go to TensorBoard."""
    if not self._enabled:
      return
    self._file.write(json.dumps({"step": step, **values}) + "\n")
    self._file.flush()
    for name, value in values.items():
      if isinstance(value, (int, float)):
        self._tensorboard.add_scalar(name, value, step)

  def plot(self) -> None:
    """workdir/learning_curve.png from metrics.jsonl."""
    from vlmjax.eval.report import plot_learning_curves

    plot_learning_curves({os.path.basename(os.path.normpath(self._workdir)): self._workdir},
                         os.path.join(self._workdir, "learning_curve.png"))

  def close(self) -> None:
    if self._enabled:
      self._file.close()
      self._tensorboard.close()


def read_metrics(workdir: str) -> list[dict]:
  """The rows of metrics.jsonl, the last row of each step winning (a resumed run re-logs some steps)."""
  rows = {}
  with open(os.path.join(workdir, METRICS_FILE)) as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        rows[row["step"]] = {**rows.get(row["step"], {}), **row}
  return [rows[step] for step in sorted(rows)]
