"""Reports: plots and tables comparing runs."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vlmjax.train.metrics_writer import read_metrics  # noqa: E402


def plot_learning_curves(runs: dict[str, str], out_png: str) -> None:
  """Training loss (and learning rate) against step for each run {label: workdir}."""
  figure, (loss_axes, rate_axes) = plt.subplots(1, 2, figsize=(11, 4))
  for label, workdir in runs.items():
    rows = [row for row in read_metrics(workdir) if "loss" in row]
    steps = [row["step"] for row in rows]
    loss_axes.plot(steps, [row["loss"] for row in rows], label=label)
    rate_axes.plot(steps, [row.get("learning_rate", float("nan")) for row in rows], label=label)
  loss_axes.set(xlabel="step", ylabel="training loss", yscale="log", title="learning curve")
  rate_axes.set(xlabel="step", ylabel="learning rate", title="schedule")
  for axes in (loss_axes, rate_axes):
    axes.grid(alpha=0.3)
    axes.legend()
  figure.tight_layout()
  figure.savefig(out_png, dpi=100)
  plt.close(figure)
