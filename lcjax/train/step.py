"""The train step: masked next-token cross-entropy, gradient accumulation by scan, AdamW update.

A batch is a dict of int arrays [B, T]: tokens, targets, loss_mask (0/1 or float weights),
segment_ids, positions (lcjax.data's training batches). The train state is a dict
{"step": int32 [], "params": pytree, "opt_state": optax state}.

Gradient accumulation: the global batch [B, T] is split into `accum` micro-batches of B / accum
rows, scanned one after the other; the gradient is the sum of their masked loss sums divided by
the global count of loss tokens, so the result equals the full-batch step (up to float rounding)
for any accum.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def loss_sums(params, batch, *, forward: Callable, model_cfg) -> tuple[jax.Array, dict]:
  """Sum over loss tokens of -log p(target), and counts (float32 scalars).

  forward(params, tokens, positions, caches, cfg=, segment_ids=) -> (logits [B, T, V], caches).
  """
  logits, _ = forward(params, batch["tokens"], batch["positions"], None, cfg=model_cfg,
                      segment_ids=batch["segment_ids"])
  logits = logits.astype(jnp.float32)
  weights = batch["loss_mask"].astype(jnp.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
  loss_sum = jnp.sum(nll * weights)
  return loss_sum, {"loss_sum": loss_sum, "weight": jnp.sum(weights), "correct": jnp.sum(correct * weights)}


def split_micro_batches(batch: dict, accum: int) -> dict:
  """[B, T] -> [accum, B / accum, T]; rows are interleaved so that each device keeps its rows."""
  def split(x):
    b = x.shape[0]
    return x.reshape(b // accum, accum, *x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, batch)


def grads_and_metrics(params, batch: dict, *, forward: Callable, model_cfg, accum: int = 1):
  """Gradient of the mean masked loss over the whole batch, and metrics sums."""
  grad_fn = jax.grad(functools.partial(loss_sums, forward=forward, model_cfg=model_cfg), has_aux=True)
  micro = split_micro_batches(batch, accum)

  def body(carry, mb):
    g_acc, m_acc = carry
    g, m = grad_fn(params, mb)
    return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, m_acc, m)), None

  zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  zeros_m = {k: jnp.zeros((), jnp.float32) for k in ("loss_sum", "weight", "correct")}
  (g_sum, m_sum), _ = jax.lax.scan(body, (zeros_g, zeros_m), micro)
  denom = jnp.maximum(m_sum["weight"], 1.0)
  grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), g_sum, params)
  metrics = {"loss": m_sum["loss_sum"] / denom, "token_accuracy": m_sum["correct"] / denom,
             "loss_tokens": m_sum["weight"]}
  return grads, metrics


def train_step(state: dict, batch: dict, *, forward: Callable, model_cfg, tx: optax.GradientTransformation,
               schedule: Callable, accum: int = 1) -> tuple[dict, dict]:
  """One optimizer step on one global batch. Pure; jit it with lcjax.train.jit_train_step."""
  grads, metrics = grads_and_metrics(state["params"], batch, forward=forward, model_cfg=model_cfg,
                                     accum=accum)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads), learning_rate=schedule(state["step"]))
  return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics


def jit_train_step(step_fn: Callable, state_shardings: Any, batch_sharding: Any, metrics_sharding: Any):
  """jax.jit of step_fn(state, batch) with NamedShardings; the old state's buffers are donated.

  The returned step runs under jax.set_mesh(batch_sharding.mesh), so that the model's activation
  sharding constraints (lcjax.sharding.constrain) apply on that mesh.
  """
  batch_shardings = {k: batch_sharding for k in BATCH_KEYS}
  jitted = jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, metrics_sharding), donate_argnums=0)
  mesh = batch_sharding.mesh

  def step(state, batch):
    with jax.set_mesh(mesh):
      return jitted(state, batch)

  return step
