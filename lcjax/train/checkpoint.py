"""Orbax checkpoints of the train state AND the grain data iterator's position.

    ckpt = Checkpointer(work_dir / "checkpoints", keep=3, asynchronous=True)
    restored = ckpt.restore_latest(abstract_state, data_iter)   # None when the dir is empty
    ckpt.save(step, state, data_iter)                           # returns at once if async
    ckpt.close()                                                # waits for pending saves

A checkpoint directory <step>/ holds "state" (params, optimizer state, step; sharded arrays via
orbax's StandardCheckpointHandler) and "data" (the iterator state as JSON via grain's handler).
Orbax writes into a temporary directory and renames it when complete, so a run killed mid-save
leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3, asynchronous: bool = True):
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=asynchronous,
                                           create=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: dict, data_iter=None, *, force: bool = True) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state: dict, data_iter=None) -> dict:
    """Restores the state at `step` into abstract_state's shapes/dtypes/shardings; sets data_iter's
    position in place."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def restore_latest(self, abstract_state: dict, data_iter=None) -> dict | None:
    step = self.latest_step()
    return None if step is None else self.restore(step, abstract_state, data_iter)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(state: dict) -> dict:
  """ShapeDtypeStructs (with shardings) of a state, the target of a restore."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
