"""The train state {"step", "params", "opt_state"}: its shardings and its sharded initialisation."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from lcjax.sharding import logical_to_shardings, replicated


def state_shardings(abstract_params, logical_axes, tx: optax.GradientTransformation, mesh: Mesh) -> dict:
  """NamedShardings of the train state: params by their logical axes; Adam moments like their
  params (so fsdp shards optimizer state too); counters and other scalars replicated."""
  param_sh = logical_to_shardings(logical_axes, mesh, abstract_params)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, abstract_opt, param_sh,
                                 transform_non_params=lambda _: replicated(mesh))
  return {"step": replicated(mesh), "params": param_sh, "opt_state": opt_sh}


def init_state(key, model_cfg, tx: optax.GradientTransformation, mesh: Mesh, *, init: Callable,
               param_logical_axes: Callable) -> tuple[dict, dict]:
  """Initialises params (init(key, cfg)) and optimizer state directly into their shardings.

  Returns (state, shardings).
  """
  abstract_params = jax.eval_shape(lambda k: init(k, model_cfg), key)
  shardings = state_shardings(abstract_params, param_logical_axes(model_cfg), tx, mesh)

  def make(k):
    params = init(k, model_cfg)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

  state = jax.jit(make, out_shardings=shardings)(key)
  return state, shardings


def abstract_state(model_cfg, tx: optax.GradientTransformation, mesh: Mesh, *, init: Callable,
                   param_logical_axes: Callable) -> tuple[dict, dict]:
  """ShapeDtypeStructs (with shardings) of the train state, without initialising anything: the
  target of a checkpoint restore. Returns (abstract state, shardings)."""
  abstract_params = jax.eval_shape(lambda k: init(k, model_cfg), jax.random.key(0))
  shardings = state_shardings(abstract_params, param_logical_axes(model_cfg), tx, mesh)
  abstract = jax.eval_shape(lambda p: {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": tx.init(p)},
                            abstract_params)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings), shardings
