"""Logical axis names -> mesh axes: the ONE table of sharding rules, and the functions that use it.

Parameters and activations name their dimensions with logical axes (lcjax.models'
`param_logical_axes(cfg)` gives, for every parameter, a tuple with one name or None per dim).
`LOGICAL_AXIS_RULES` maps each name to mesh axes; `logical_to_spec` turns a tuple of names into a
PartitionSpec for a given mesh and shape:

- a mesh axis of size 1 is dropped (nothing to split);
- a dimension whose size the mesh axes don't divide is left unsplit (replicated) rather than
  failing, e.g. kv_heads=1 (MQA) on tensor=2;
- a mesh axis already used by an earlier dimension of the same array is not used again.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# logical axis -> mesh axes (a tuple: split over their product, in order), or () for replicated.
LOGICAL_AXIS_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", ()),
    ("kv_seq", ()),
    ("embed", ("fsdp",)),
    ("vocab", ("tensor",)),
    ("heads", ("tensor",)),
    ("q_heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("head_dim", ()),
    ("mlp", ("tensor",)),
    ("layers", ()),
    ("norm", ()),
)

Logical = Sequence[str | None]


def is_logical_axes(x: Any) -> bool:
  """True for a leaf of a logical-axes tree: a tuple of axis names / None (or a PartitionSpec)."""
  return isinstance(x, (tuple, P)) and all(a is None or isinstance(a, str) for a in x)


def mesh_axes_for(name: str | None, rules=LOGICAL_AXIS_RULES) -> tuple[str, ...]:
  if name is None:
    return ()
  table = dict(rules)
  if name not in table:
    raise ValueError(f"logical axis {name!r} has no sharding rule; accepted: None or one of {sorted(table)} "
                     f"(add it to LOGICAL_AXIS_RULES in lcjax/sharding/rules.py)")
  return tuple(table[name])


def logical_to_spec(logical: Logical, mesh: Mesh, shape: Sequence[int] | None = None,
                    rules=LOGICAL_AXIS_RULES) -> P:
  """A tuple of logical axis names (one per dim) -> PartitionSpec on `mesh` (see module doc)."""
  if shape is not None and len(shape) != len(logical):
    raise ValueError(f"logical axes {tuple(logical)} name {len(logical)} dims but the array has shape {tuple(shape)}")
  used: set[str] = set()
  spec = []
  for dim, name in enumerate(logical):
    axes = []
    size = 1
    for axis in mesh_axes_for(name, rules):
      n = mesh.shape[axis]
      if n == 1 or axis in used:
        continue
      if shape is not None and shape[dim] % (size * n):
        continue
      axes.append(axis)
      size *= n
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return P(*spec)


def logical_to_shardings(logical_tree: Any, mesh: Mesh, shapes_tree: Any = None,
                         rules=LOGICAL_AXIS_RULES) -> Any:
  """A tree of logical-axes tuples (e.g. param_logical_axes(cfg)) -> tree of NamedShardings.

  shapes_tree: a tree of arrays / ShapeDtypeStructs with the same structure (e.g. the params or
  jax.eval_shape of init), so that dims the mesh does not divide stay unsplit.
  """
  if shapes_tree is None:
    return jax.tree.map(lambda la: NamedSharding(mesh, logical_to_spec(la, mesh, rules=rules)),
                        logical_tree, is_leaf=is_logical_axes)
  return jax.tree.map(lambda la, x: NamedSharding(mesh, logical_to_spec(la, mesh, np.shape(x), rules)),
                      logical_tree, shapes_tree, is_leaf=is_logical_axes)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Sharding of a [batch, ...] input: batch over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), mesh))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
