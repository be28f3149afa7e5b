"""A run's directory, written by `vlmjax train` and read by evaluation, reports and `vlmjax.load`.

    workdir/config.json              the config the run used (a resumed run must match it)
    workdir/tokenizer.json, tokenizer_config.json, preprocessor_config.json   read as a Hugging Face dir is
    workdir/checkpoints/<step>/      orbax: train state + data-iterator state
    workdir/metrics.jsonl            one row per logged step; tensorboard/ and learning_curve.png beside it

Everything here reads and writes files only (no model, no training), so every layer above the models can use it.
"""

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from tensorboardX import SummaryWriter

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
# The training stages, in the order a run usually chains them (`train.stages`; what each trains: train/optim.py).
STAGES = ("contrastive", "classify", "align", "finetune", "full")
CONTRASTIVE, CLASSIFY = "contrastive", "classify"
VISION_PRETRAINING = (CONTRASTIVE, CLASSIFY)  # stages whose config section is named after them
MODEL_FILES = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json")


def config_from_json(text: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(json.loads(text))


def _flatten(tree, prefix: str = "") -> dict:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def config_differences(saved: ml_collections.ConfigDict, new: ml_collections.ConfigDict) -> list[str]:
  """'key: saved -> new' for every key whose value differs (tuples and lists compare equal)."""
  normalize = lambda c: _flatten(json.loads(c.to_json_best_effort()))
  old, current = normalize(saved), normalize(new)
  return [f"{key}: {old.get(key, '<absent>')!r} -> {current.get(key, '<absent>')!r}"
          for key in sorted(set(old) | set(current)) if old.get(key) != current.get(key)]


def write_or_check_config(workdir: str, config: ml_collections.ConfigDict, allow_change: bool) -> None:
  """Writes config.json into a new workdir; in an existing one, refuses a different config unless allowed."""
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    with open(path) as f:
      differences = config_differences(config_from_json(f.read()), config)
    if differences and not allow_change:
      raise ValueError(f"{workdir} was trained with another config; these keys differ (saved -> new):\n  "
                       + "\n  ".join(differences)
                       + "\nUse another --workdir, or pass --allow_config_change to resume with the new config.")
  os.makedirs(workdir, exist_ok=True)
  temporary = path + ".tmp"
  with open(temporary, "w") as f:
    f.write(config.to_json_best_effort(indent=1))
  os.replace(temporary, path)  # atomic: never a half-written config


def copy_model_files(source_dir: str, workdir: str) -> None:
  """The tokenizer and image-processor files, so that `vlmjax.load(workdir)` reads them as from a HF dir."""
  for name in MODEL_FILES:
    source = os.path.join(source_dir, name)
    if os.path.exists(source):
      shutil.copyfile(source, os.path.join(workdir, name))


def is_workdir(path: str) -> bool:
  """A training workdir: its config.json and a checkpoints folder."""
  return os.path.exists(os.path.join(path, CONFIG_FILE)) and os.path.isdir(os.path.join(path, "checkpoints"))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir's run used."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir} has no {CONFIG_FILE}: it is neither a vlmjax workdir nor a Hugging Face "
                            f"model directory")
  with open(path) as f:
    return config_from_json(f.read())


def data_dir(workdir: str, config: ml_collections.ConfigDict | None = None) -> str:
  """Where a run's shapes data set is built and read: its config's data.dir, else <workdir>/data. config: the
  run's config (default: the one saved in the workdir)."""
  config = read_config(workdir) if config is None else config
  return config.get("data", {}).get("dir") or os.path.join(workdir, "data")


# The run's stage plan: which global step ends each stage (and so which checkpoint holds it).


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  start: int  # global step at which the stage begins
  end: int  # global step after its last update

  @property
  def steps(self) -> int:
    return self.end - self.start

  @property
  def is_contrastive(self) -> bool:
    return self.name == CONTRASTIVE

  @property
  def pretrains_vision(self) -> bool:
    """A stage that trains the vision tower inside another model (the VLM stages after it take the tower)."""
    return self.name in VISION_PRETRAINING


def parse_stages(spec: str, total_steps: int) -> list[Stage]:
  """'align:0.2,finetune:0.8' (fractions of total_steps; a lone name takes all) -> Stages, checked."""
  stages, start = [], 0
  items = [item.strip() for item in spec.split(",") if item.strip()]
  if not items:
    raise ValueError("train.stages is empty: name at least one stage, e.g. 'full'")
  for i, item in enumerate(items):
    name, _, fraction = item.partition(":")
    if name not in STAGES:
      raise ValueError(f"unknown training stage {name!r}; the stages are {list(STAGES)}")
    end = total_steps if i == len(items) - 1 else start + round(float(fraction or 1.0) * total_steps)
    if end <= start:
      raise ValueError(f"train.stages: stage {name!r} gets no steps ({item!r} of train.steps={total_steps})")
    stages.append(Stage(name, start, end))
    start = end
  return stages


# Checkpoints with orbax: the train state and the data iterator's state, saved together, asynchronously.
# Orbax writes each step into a temporary directory and renames it when complete, so a run killed mid-save leaves
# no half-written checkpoint that a restart could pick up; `latest_step` only sees finished ones.


class Checkpointer:
  """Periodic and final checkpoints of a run, keeping the newest `keep`."""

  def __init__(self, workdir: str, keep: int = 2, asynchronous: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=asynchronous,
                                           create=True)
    self._manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                          item_names=("state", "data"), options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict) -> None:
    """Starts saving (returns before the write ends when asynchronous); `wait` blocks until it is on disk."""
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                                     data=ocp.args.JsonSave(data_state)), force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """(the train state with the shardings of `abstract_state`'s ShapeDtypeStructs, the data state)."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=_restore_args(abstract_state), data=ocp.args.JsonRestore()))
    return restored.state, restored.data

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """Only the model parameters of a checkpoint (no optimizer state is read)."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=_restore_args({"params": abstract_params}, partial=True)))
    return restored.state["params"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def _restore_args(abstract: Any, partial: bool = False) -> ocp.args.PyTreeRestore:
  return ocp.args.PyTreeRestore(item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                                partial_restore=partial)


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a tree of arrays: what `restore` fills."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


# Metrics: metrics.jsonl (one JSON object per logged step), TensorBoard event files, the learning curve.


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


def plot_learning_curves(runs: dict[str, str], out_png: str) -> None:
  """Training loss (and learning rate) against step for each run {label: workdir}."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

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
