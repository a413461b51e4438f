"""Per-token scores of a batch under the model: NLL and teacher-forced argmax correctness."""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lcjax.sharding import batch_sharding

SCORED_KEYS = ("tokens", "targets", "positions", "segment_ids")


def make_scorer(forward: Callable, model_cfg, mesh) -> Callable[[dict, dict], dict[str, np.ndarray]]:
  """score(params, batch) -> {"nll": float32 [B, T], "correct": bool [B, T]} as numpy.

  One forward pass with the true inputs (teacher forcing): nll[b, t] = -log p(targets[b, t]) and
  correct[b, t] = argmax(logits[b, t]) == targets[b, t]. Compiled once per sequence length.
  """

  @jax.jit
  def score(params, tokens, targets, positions, segment_ids):
    logits, _ = forward(params, tokens, positions, None, cfg=model_cfg, segment_ids=segment_ids)
    logits = logits.astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return {"nll": nll, "correct": jnp.argmax(logits, -1) == targets}

  sharding = batch_sharding(mesh)

  def run(params, batch):
    args = [jax.make_array_from_process_local_data(sharding, np.asarray(batch[k], np.int32)) for k in SCORED_KEYS]
    out = score(params, *args)
    return {k: np.asarray(jax.device_get(v)) for k, v in out.items()}

  return run
