"""Per-token scores of a batch under the model: NLL and teacher-forced argmax correctness."""

from __future__ import annotations

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
  correct[b, t] = argmax(logits[b, t]) == targets[b, t]. Compiled once per sequence length, under
  jax.set_mesh(mesh) so that the model's activation sharding constraints apply.
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
    with jax.set_mesh(mesh):
      out = score(params, *args)
    return {k: np.asarray(jax.device_get(v)) for k, v in out.items()}

  return run


def answer_prompts(batch: dict) -> tuple[np.ndarray, np.ndarray, int]:
  """Right-padded prompts that end just before each row's answer.

  A task row's inputs are [BOS, x0, x1, ...] and targets [x0, x1, ...]; the answer is
  targets[answer_start : answer_start + answer_length], so the prompt is
  inputs[: answer_start + 1]. Returns (prompts int32 [B, P], prompt_lengths int32 [B], the
  longest answer).
  """
  starts = np.asarray(batch["answer_start"], np.int64)
  lengths = starts + 1
  prompts = np.array(batch["tokens"][:, :int(lengths.max())], np.int32)
  for b, n in enumerate(lengths):
    prompts[b, n:] = 0
  return prompts, lengths.astype(np.int32), int(np.max(batch["answer_length"]))


def make_greedy_answerer(generate: Callable, model_cfg, mesh) -> Callable[[dict, dict], np.ndarray]:
  """answer(params, batch) -> int32 [B, max answer length]: greedy decoding after each prompt.

  generate(params, cfg, prompt_tokens, prompt_lengths, max_new_tokens, key=) is lcjax.models'
  (a chunked prefill and a while_loop decode under one jit, with NamedShardings on `mesh`);
  prompts are placed batch-sharded.
  """
  sharding = batch_sharding(mesh)

  def run(params, batch):
    prompts, lengths, n_new = answer_prompts(batch)
    prompts = jax.make_array_from_process_local_data(sharding, prompts)
    lengths = jax.make_array_from_process_local_data(batch_sharding(mesh, ndim=1), lengths)
    out = generate(params, model_cfg, prompts, lengths, n_new, key=None, temperature=0.0, mesh=mesh)
    return np.asarray(jax.device_get(out["tokens"]))

  return run
