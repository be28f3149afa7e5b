"""Checkpoints with orbax: the train state and the data iterator's state, saved together, asynchronously.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed mid-save
leaves no half-written checkpoint that a restart could pick up; `latest_step` only sees finished ones.

    workdir/checkpoints/<step>/{state, data}
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


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
