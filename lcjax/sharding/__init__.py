"""Meshes, the logical-axis sharding rules, and sharding constraints for activations and caches."""
from lcjax.sharding.mesh import BATCH_AXES, MESH_AXES, batch_shards, make_mesh
from lcjax.sharding.rules import (LOGICAL_AXIS_RULES, active_mesh, batch_sharding, constrain, constrain_tree,
                                  logical_sharding, logical_to_shardings, logical_to_spec, replicated)
