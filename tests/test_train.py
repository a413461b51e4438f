"""Training pieces: schedule, optimizer, accumulation, bf16 compute, and the loop's outputs."""
import functools
import glob
import os

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lcjax import models
from lcjax.config import OptimizerConfig, parse_config
from lcjax.train import (grads_and_metrics, make_optimizer, make_schedule, read_jsonl, train, train_step)
from lcjax.train.optimizer import decay_mask

MODEL = dict(vocab_size=384, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=64, max_seq_len=64)


def random_batch(seed, batch=4, seq=16):
  rng = np.random.default_rng(seed)
  return {"tokens": rng.integers(0, 259, (batch, seq)).astype(np.int32),
          "targets": rng.integers(0, 259, (batch, seq)).astype(np.int32),
          "loss_mask": (rng.random((batch, seq)) < 0.8).astype(np.float32),
          "segment_ids": np.ones((batch, seq), np.int32),
          "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1))}


def test_schedule_warmup_then_cosine():
  opt = OptimizerConfig(learning_rate=1e-3, warmup_steps=10, min_lr_ratio=0.1)
  sched = make_schedule(opt, num_steps=110)
  np.testing.assert_allclose([sched(0), sched(5), sched(10)], [0.0, 5e-4, 1e-3], rtol=1e-6)
  np.testing.assert_allclose(sched(60), 1e-4 + 0.5 * 9e-4, rtol=1e-5)  # half-way down the cosine
  np.testing.assert_allclose([sched(110), sched(500)], [1e-4, 1e-4], rtol=1e-5)
  with pytest.raises(ValueError, match="config.optimizer.warmup_steps=10"):
    make_schedule(opt, num_steps=10)


def test_weight_decay_only_on_matrices():
  cfg = models.ModelConfig(**MODEL)
  mask = decay_mask(models.init(jax.random.key(0), cfg))
  assert mask["layers"][0]["wq"] and mask["embed"] and not mask["final_norm"] and not mask["layers"][0]["attn_norm"]


def test_adamw_step_matches_optax_reference():
  """Our step = value_and_grad of the masked mean loss + optax chain, written out directly."""
  cfg = models.ModelConfig(**MODEL)
  params = models.init(jax.random.key(0), cfg)
  opt = OptimizerConfig(learning_rate=1e-2, warmup_steps=2, clip_norm=0.05)
  tx, sched = make_optimizer(opt, 10)
  batch = {k: jnp.asarray(v) for k, v in random_batch(0).items()}
  state = {"step": jnp.int32(0), "params": params, "opt_state": tx.init(params)}
  for _ in range(3):
    state, metrics = jax.jit(functools.partial(train_step, forward=models.forward, model_cfg=cfg, tx=tx,
                                               schedule=sched))(state, batch)

  import optax  # the reference: the same math without our helpers
  def loss(p):
    logits, _ = models.forward(p, batch["tokens"], batch["positions"], None, cfg=cfg, segment_ids=batch["segment_ids"])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return jnp.sum(nll * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])
  ref_tx = optax.chain(optax.clip_by_global_norm(0.05), optax.adamw(
      optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 10, 1e-3), b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
      mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))
  p, o = params, ref_tx.init(params)
  for _ in range(3):
    value, g = jax.value_and_grad(loss)(p)
    u, o = ref_tx.update(g, o, p)
    p = optax.apply_updates(p, u)
  assert int(state["step"]) == 3
  # Adam divides by sqrt(v): where a gradient is ~0 (rare byte rows of the embedding) rounding
  # differences are amplified up to ~lr; 5e-5 is 0.5% of lr = 1e-2.
  for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(p)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=5e-5)
  ours, _ = grads_and_metrics(params, batch, forward=models.forward, model_cfg=cfg)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(jax.grad(loss)(params))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6)  # |grad| up to ~0.3: f32 reordering
  np.testing.assert_allclose(metrics["loss"], value, rtol=1e-5)
  assert metrics["grad_norm"] > 0.05  # clipping was active


def test_gradient_accumulation_equals_full_batch():
  cfg = models.ModelConfig(**MODEL)
  params = models.init(jax.random.key(1), cfg)
  batch = {k: jnp.asarray(v) for k, v in random_batch(1, batch=8).items()}
  fn = lambda accum: jax.jit(functools.partial(grads_and_metrics, forward=models.forward, model_cfg=cfg,
                                               accum=accum))(params, batch)
  (g1, m1), (g4, m4) = fn(1), fn(4)
  np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6)  # |grad| up to ~0.3: f32 reordering


def test_bf16_compute_keeps_float32_params():
  cfg32 = models.ModelConfig(**MODEL)
  cfg16 = models.ModelConfig(**MODEL, dtype="bfloat16", param_dtype="float32")
  params = models.init(jax.random.key(2), cfg32)
  batch = {k: jnp.asarray(v) for k, v in random_batch(2).items()}
  tx, sched = make_optimizer(OptimizerConfig(warmup_steps=0, decay_steps=10), 10)
  outs = {}
  for name, cfg in (("f32", cfg32), ("bf16", cfg16)):
    state = {"step": jnp.int32(0), "params": params, "opt_state": tx.init(params)}
    outs[name] = jax.jit(functools.partial(train_step, forward=models.forward, model_cfg=cfg, tx=tx,
                                           schedule=sched))(state, batch)
  state16, m16 = outs["bf16"]
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state16["params"]))
  np.testing.assert_allclose(m16["loss"], outs["f32"][1]["loss"], rtol=2e-2)
  assert float(m16["loss"]) != float(outs["f32"][1]["loss"])  # really computed in bf16


def stand_in_iterator(cfg):
  """A checkpointable grain iterator of random batches (lcjax.data's format)."""
  b, t = cfg.data.batch_size, cfg.data.seq_len
  ds = grain.MapDataset.range(10**6).map(lambda i: random_batch(int(i), batch=b, seq=t))
  return iter(ds.to_iter_dataset())


def test_train_loop_writes_metrics_tensorboard_and_keeps_n_checkpoints(tmp_path):
  cfg = parse_config(ml_collections.ConfigDict(dict(
      model=MODEL, data=dict(task="passkey", seq_len=16, batch_size=4),
      optimizer=dict(learning_rate=1e-2, warmup_steps=2),
      train=dict(num_steps=12, work_dir=str(tmp_path), log_every=4, checkpoint_every=3, keep_checkpoints=2,
                 progress_bar=False),
      eval=dict(tasks=()))))
  result = train(cfg, make_train_iter=stand_in_iterator)
  assert result.start_step == 0 and int(result.state["step"]) == 12
  rows = read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in rows] == [4, 8, 12]
  assert all(np.isfinite(r["train/loss"]) and r["train/learning_rate"] > 0 for r in rows)
  assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
  assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [9, 12]
  assert (tmp_path / "config.json").exists()
  # Started again on a finished work dir: restores step 12 and trains nothing more.
  again = train(cfg, make_train_iter=stand_in_iterator)
  assert again.start_step == 12
  for a, b in zip(jax.tree.leaves(again.state["params"]), jax.tree.leaves(result.state["params"])):
    np.testing.assert_array_equal(a, b)
