"""Logical axis names -> mesh axes: the ONE table of sharding rules, and the functions that use it.

Parameters, activations and caches name their dimensions with logical axes, a tuple with one name
or None per dim: lcjax.models' `param_logical_axes(cfg)` for every parameter, the `constrain`
calls in llama.forward for the activations, `lcjax.cache.cache_logical_axes(cache)` for every
cache array. `LOGICAL_AXIS_RULES` maps each name to mesh axes; `logical_to_spec` turns a tuple of
names into a PartitionSpec for a given mesh and shape:

- a mesh axis of size 1 is dropped (nothing to split);
- a dimension whose size the mesh axes don't divide is left unsplit (replicated) rather than
  failing, e.g. kv_heads=1 (MQA) on tensor=2;
- a mesh axis already used by an earlier dimension of the same array is not used again;
- a Manual mesh axis (inside shard_map) is never used: the array is already per-shard there.

Activations are constrained with `constrain(x, names)`, which reads the mesh from JAX's own
context (`with jax.set_mesh(mesh):`, as jit_train_step and generate(mesh=...) do): with no mesh
set, or a one-device mesh, it is the identity, so single-device code traces exactly as before.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P

# logical axis -> mesh axes (a tuple: split over their product, in order), or () for replicated.
LOGICAL_AXIS_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", ()),
    ("kv_seq", ()),
    ("cache_seq", ()),          # KV-cache slots (capacity); replicated until sequence parallelism
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


def logical_to_spec(logical: Logical, mesh: Mesh | AbstractMesh, shape: Sequence[int] | None = None,
                    rules=LOGICAL_AXIS_RULES) -> P:
  """A tuple of logical axis names (one per dim) -> PartitionSpec on `mesh` (see module doc).

  mesh: a Mesh or an AbstractMesh (jax.sharding.get_abstract_mesh() inside jit).
  """
  if shape is not None and len(shape) != len(logical):
    raise ValueError(f"logical axes {tuple(logical)} name {len(logical)} dims but the array has shape {tuple(shape)}")
  used: set[str] = set(getattr(mesh, "manual_axes", ()))
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
  jax.eval_shape of init), so that dims the mesh does not divide stay unsplit. The result then
  has exactly shapes_tree's structure (a cache's empty-tuple fields, None entries, ...).
  """
  if shapes_tree is None:
    return jax.tree.map(lambda la: NamedSharding(mesh, logical_to_spec(la, mesh, rules=rules)),
                        logical_tree, is_leaf=is_logical_axes)
  leaves, treedef = jax.tree.flatten(shapes_tree)
  names = treedef.flatten_up_to(logical_tree)    # one logical tuple per array leaf
  return treedef.unflatten([NamedSharding(mesh, logical_to_spec(la, mesh, np.shape(x), rules))
                            for la, x in zip(names, leaves)])


def logical_sharding(logical: Logical, mesh: Mesh, shape: Sequence[int] | None = None,
                     rules=LOGICAL_AXIS_RULES) -> NamedSharding:
  """NamedSharding of one array from its logical axes (and shape, so that what can't split stays whole)."""
  return NamedSharding(mesh, logical_to_spec(logical, mesh, shape, rules))


def active_mesh() -> AbstractMesh | None:
  """The mesh set by the surrounding `jax.set_mesh(mesh)` (as seen while tracing), or None when
  there is none, it has a single device (nothing to shard) or all its axes are Manual (inside a
  shard_map over the whole mesh, where arrays are already per-device)."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or mesh.size == 1 or mesh.are_all_axes_manual else mesh


def constrain(x: jax.Array, logical: Logical, rules=LOGICAL_AXIS_RULES) -> jax.Array:
  """x with a sharding constraint from its logical axes (one name / None per dim) on the active mesh.

  The identity when no mesh (or a one-device mesh) is set with jax.set_mesh, so that unsharded
  code and CPU tests trace exactly as without it. Constraints never change values, only where
  they live (and which collectives XLA inserts).
  """
  mesh = active_mesh()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical, mesh, x.shape, rules))


def constrain_tree(tree: Any, logical_tree: Any, rules=LOGICAL_AXIS_RULES) -> Any:
  """`constrain` on every array of `tree`, with logical_tree giving a logical tuple per array
  (a prefix-compatible tree, e.g. a cache's logical_axes()); the identity without an active mesh."""
  if active_mesh() is None:
    return tree
  leaves, treedef = jax.tree.flatten(tree)
  names = treedef.flatten_up_to(logical_tree)
  return treedef.unflatten([constrain(x, la, rules) for x, la in zip(leaves, names)])


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Sharding of a [batch, ...] input: batch over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), mesh))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
