"""A run's directory, written by `vlmjax train` and read by evaluation, reports and `vlmjax.load`.

    workdir/config.json              the config the run used (a resumed run must match it)
    workdir/tokenizer.json, tokenizer_config.json, preprocessor_config.json   read as a Hugging Face dir is
    workdir/checkpoints/<step>/      orbax: train state + data-iterator state
    workdir/metrics.jsonl            one row per logged step; tensorboard/ and learning_curve.png beside it

Everything here reads and writes files only (no model, no training), so every layer above the models can use it.
"""

import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import traceback
from typing import Any, Callable, TypeVar

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
# The training stages, in the order a run usually chains them (`train.stages`; what each trains: train/optim.py).
STAGES = ("contrastive", "classify", "align", "finetune", "full", "lora")
LORA = "lora"
CONTRASTIVE, CLASSIFY = "contrastive", "classify"
VISION_PRETRAINING = (CONTRASTIVE, CLASSIFY)  # stages whose config section is named after them
# What `vlmjax.load` reads of a model directory besides the weights, as transformers finds them.
MODEL_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
               "chat_template.json", "preprocessor_config.json", "processor_config.json")
T = TypeVar("T")


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


def is_lora_run(config: ml_collections.ConfigDict) -> bool:
  """Whether a run's config trains LoRA adapters alone (its checkpoints hold those, its base is train.init_from). A
  checkpoint written without a training config (`vlmjax quantize`) is none."""
  return (config.get("train") or {}).get("stages") == LORA


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
# no half-written checkpoint that a restart could pick up. A finished checkpoint can still be damaged afterwards (a
# data file deleted or truncated, its metadata lost): `restore_newest` then reports it in one line and goes back to
# the newest step before it that restores, so that a resumed run, the server and evaluation go on.


class UnreadableCheckpoint(ValueError):
  """Orbax could not restore checkpoint `step`; `reason` is the error in one line (type and message)."""

  def __init__(self, step: int, reason: str):
    super().__init__(f"checkpoint {step} does not restore: {reason}")
    self.step, self.reason = step, reason


class NoReadableCheckpoint(ValueError):
  """A workdir holds checkpoints but none of them restores (each one's error is in the message)."""


def _one_line(error: BaseException, limit: int = 300) -> str:
  """'Type: message' of the error that started it all, on one line: orbax wraps TensorStore's error (which names
  the file and what is wrong with it) in one that prints the whole array spec over fifty lines."""
  while (error.__cause__ or error.__context__) is not None:
    error = error.__cause__ or error.__context__
  message = str(error).split(" [tensorstore_spec")[0].split("See full TensorStore details")[0]
  text = " ".join(f"{type(error).__name__}: {message}".split())
  return text if len(text) <= limit else text[:limit] + " ..."


def _from_reading_a_checkpoint(error: BaseException) -> bool:
  """Whether `error` (or one it was raised from) was raised in orbax's code, or is TensorStore's own error for a
  read (no traceback: 'OUT_OF_RANGE: Error reading "w/0.0" in OCDBT database ...')."""
  while error is not None:
    frames = [frame.f_code.co_filename for frame, _ in traceback.walk_tb(error.__traceback__)]
    if any(f"{os.sep}orbax{os.sep}" in name for name in frames):
      return True
    if not frames and re.match(r"[A-Z_]+: Error reading ", str(error)):
      return True
    error = error.__cause__ or error.__context__
  return False


class _DropsOrphanedReadErrors(logging.Filter):
  """Drops asyncio's "Task/Future exception was never retrieved" for the reads of a failed restore (see below)."""

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return not ("exception was never retrieved" in record.getMessage() and error is not None
                and _from_reading_a_checkpoint(error))


def _quiet_the_aftermath_of_failed_restores() -> None:
  """Keeps a reported failure to one line. When a restore fails, orbax closes its event loop with TensorStore reads
  still in flight, and what they leave behind prints tracebacks, at times before the restore's own error has
  reached us: each read that finishes calls call_soon_threadsafe on the closed loop ("Event loop is closed",
  through sys.unraisablehook), the coroutines dropped mid-read report through the same hook, and the tasks and
  futures of the reads that failed too are logged by asyncio as "exception was never retrieved" when collected.
  Installed before the first restore (not after a failure, which would race with those reads), the hook drops
  the first two kinds and passes anything else on to the hook before it; a filter on asyncio's logger drops the
  third when the error came from reading a checkpoint."""
  if getattr(sys.unraisablehook, "vlmjax_quiets_restores", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    frames = [frame.f_code.co_name for frame, _ in traceback.walk_tb(unraisable.exc_traceback)]
    closed_loop = isinstance(unraisable.exc_value, RuntimeError) and "call_soon_threadsafe" in frames
    code = getattr(unraisable.object, "cr_code", None)
    dropped_read = code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename
    if not (closed_loop or dropped_read):
      previous(unraisable)

  hook.vlmjax_quiets_restores = True
  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(_DropsOrphanedReadErrors())


def _on_every_process(ok: bool) -> bool:
  """Whether `ok` holds on every process: the processes of a multi-host run each read their own shards, so one may
  find a damaged file that the others never open, and they must all go back to the same step."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils

  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


class Checkpointer:
  """Periodic and final checkpoints of a run, keeping the newest `keep`."""

  def __init__(self, workdir: str, keep: int = 2, asynchronous: bool = True):
    self._workdir = workdir
    self._directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=asynchronous,
                                           create=True)
    self._manager = ocp.CheckpointManager(self._directory, item_names=("state", "data"), options=options)

  def steps(self) -> list[int]:
    """The steps of the checkpoints, newest first: those orbax lists, and any other step folder (one orbax no longer
    recognizes as finished, e.g. on a file system where it looks for a commit marker that was lost), which then
    fails to restore and is reported instead of being passed over in silence."""
    on_disk = {int(name) for name in os.listdir(self._directory) if name.isdigit()} if os.path.isdir(
        self._directory) else set()
    return sorted(set(self._manager.all_steps()) | on_disk, reverse=True)

  def latest_step(self) -> int | None:
    """The newest step, restorable or not (`restore_newest` and the methods on it skip a damaged one)."""
    return next(iter(self.steps()), None)

  def save(self, step: int, state: Any, data_state: dict) -> None:
    """Starts saving (returns before the write ends when asynchronous); `wait` blocks until it is on disk."""
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                                     data=ocp.args.JsonSave(data_state)), force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """(the train state with the shardings of `abstract_state`'s ShapeDtypeStructs, the data state); a checkpoint
    that does not restore raises UnreadableCheckpoint."""
    restored = self._restore(step, ocp.args.Composite(state=_restore_args(abstract_state),
                                                      data=ocp.args.JsonRestore()))
    return restored.state, restored.data

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """Only the model parameters of a checkpoint (no optimizer state is read); UnreadableCheckpoint if it does
    not restore."""
    restored = self._restore(step, ocp.args.Composite(state=_restore_args({"params": abstract_params},
                                                                          partial=True)))
    return restored.state["params"]

  def _restore(self, step: int, args: ocp.args.Composite):
    _quiet_the_aftermath_of_failed_restores()
    try:
      return self._manager.restore(step, args=args)
    except Exception as error:  # orbax and TensorStore raise plain Exceptions, ValueErrors, FileNotFoundErrors...
      raise UnreadableCheckpoint(step, _one_line(error)) from error

  def restore_newest(self, restore: Callable[[int], T], set_aside: bool = False) -> tuple[int, T] | None:
    """(step, restore(step)) for the newest step whose `restore` does not raise UnreadableCheckpoint (`restore`
    calls `restore`/`restore_params` with what the caller needs from the step); None if there is no checkpoint.

    Each step that does not restore is logged (a warning: the step and the error in one line), and so is the step
    used instead. set_aside: also rename each such step's folder to checkpoints/<step>.corrupt (process 0), out
    of orbax's sight, so that a resumed run can save that step again (orbax refuses to save a step whose folder
    exists); what was in it is kept for a look, not deleted. Raises NoReadableCheckpoint, naming the workdir and
    each step's error, when no step restores.
    """
    failures = []
    for step in self.steps():
      try:
        result, ok = restore(step), True
      except UnreadableCheckpoint as error:
        result, ok, reason = None, False, error.reason
      if not _on_every_process(ok):
        failures.append((step, reason if not ok else "it does not restore on another process"))
        logging.warning("%s: checkpoint %d does not restore, skipped: %s", self._workdir, step, failures[-1][1])
        continue
      if failures:
        logging.warning("%s: using checkpoint %d, the newest one that restores", self._workdir, step)
        if set_aside:
          self._set_aside([bad for bad, _ in failures])
      return step, result
    if failures:
      raise NoReadableCheckpoint(f"no checkpoint of {self._workdir} restores:\n  " + "\n  ".join(
          f"step {step}: {reason}" for step, reason in failures))
    return None

  def restore_latest_params(self, abstract_params: Any) -> tuple[int, Any] | None:
    """(step, parameters) of the newest checkpoint whose parameters restore (`restore_newest`); None if none."""
    return self.restore_newest(lambda step: self.restore_params(step, abstract_params))

  def _set_aside(self, steps: list[int]) -> None:
    if jax.process_index() == 0:
      for step in steps:
        path = os.path.join(self._directory, str(step))
        if os.path.exists(path):
          aside = f"{path}.corrupt"
          shutil.rmtree(aside, ignore_errors=True)  # an older copy of the same step, damaged before
          os.rename(path, aside)
          logging.warning("%s: damaged checkpoint %d set aside as %s", self._workdir, step, aside)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("vlmjax: damaged checkpoints set aside")
    self._manager.reload()  # forget the steps set aside: saving them again is allowed

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
      # Imported here: tensorboardX imports PyTorch where it is installed (a second or more), which everything else
      # that imports vlmjax (the CLI, serving, evaluation) does not need.
      from tensorboardX import SummaryWriter
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
