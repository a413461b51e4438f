"""The device mesh: named axes (data, fsdp, tensor) built from config.mesh."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

MESH_AXES = ("data", "fsdp", "tensor")
# Axes that split the batch; their product must divide every (micro-)batch.
BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """A Mesh of shape (mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor) over the first devices.

  Args:
    mesh_cfg: lcjax.config.MeshConfig (anything with int fields data, fsdp, tensor).
    devices: devices to use (default jax.devices(), i.e. all processes' devices).
  Raises:
    ValueError if the mesh needs more devices than there are.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = (mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor)
  size = int(np.prod(shape))
  if size > len(devices):
    raise ValueError(f"config.mesh: data x fsdp x tensor = {' x '.join(map(str, shape))} = {size} devices, "
                     f"but only {len(devices)} are available; accepted: a product <= {len(devices)}")
  return Mesh(np.asarray(devices[:size], dtype=object).reshape(shape), MESH_AXES)


def batch_shards(mesh: Mesh) -> int:
  """How many ways the batch dimension is split on this mesh."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
