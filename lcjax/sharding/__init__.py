"""Meshes, logical-axis sharding rules (and, beside them, ring attention)."""
from lcjax.sharding.mesh import BATCH_AXES, MESH_AXES, batch_shards, make_mesh
from lcjax.sharding.rules import (LOGICAL_AXIS_RULES, batch_sharding, logical_to_shardings, logical_to_spec,
                                  replicated)
