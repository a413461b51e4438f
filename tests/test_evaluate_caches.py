"""experiments/evaluate_caches end to end on a tiny run: policies through the cached scoring path."""
import json

import jax
import ml_collections
import numpy as np
import pytest

from experiments import evaluate_caches
from lcjax import train
from lcjax.config import parse_config
from lcjax.eval import retrieval
from lcjax.eval.scoring import make_scorer
from lcjax.models import llama
from lcjax.sharding import make_mesh


def tiny_experiment(tmp_path):
  return dict(model=dict(vocab_size=384, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                         max_seq_len=128),
              data=dict(task="passkey", seq_len=112, batch_size=2, data_dir=str(tmp_path / "data"),
                        options=dict(lengths=(96, 112), digits=2, num_train=4, num_validation=1, num_test=1)),
              optimizer=dict(warmup_steps=1), train=dict(num_steps=3, work_dir=str(tmp_path / "run")),
              eval=dict(tasks=("passkey",), lengths=(96, 112), depths=(0.0, 1.0), examples_per_cell=2,
                        batch_size=4))


def save_checkpoint(cfg, work_dir):
  tx, _ = train.make_optimizer(cfg.optimizer, cfg.train.num_steps)
  state, _ = train.init_state(jax.random.key(3), cfg.model, tx, make_mesh(cfg.mesh), init=llama.init,
                              param_logical_axes=llama.param_logical_axes)
  ckpt = train.Checkpointer(work_dir / "checkpoints", asynchronous=False)
  ckpt.save(3, state)
  ckpt.close()
  return state["params"]


def test_policies_through_the_cached_path(tmp_path):
  raw = tiny_experiment(tmp_path)
  cfg = parse_config(raw)
  params = save_checkpoint(cfg, tmp_path / "run")
  config = ml_collections.ConfigDict(dict(
      experiment=raw, checkpoint_dir=str(tmp_path / "run"), train_if_missing=False, work_dir=str(tmp_path / "out"),
      chunk=16, examples_per_cell=2, perplexity_examples=2, decode_steps=3, decode_tail=16, only="",
      retrieval_head_probe=dict(induction_fraction=0.25, echo_fraction=0.0, probe_len=16, batch=2, low=0, high=256),
      policies=dict(dense=("policy", ("dense",), dict()), kivi=("bits", (8,), dict(group_size=16, residual=16)),
                    h2o=("budget", (32,), dict(window=8)),
                    razor=("window", (12,), dict(sinks=4, retrieval_heads="detect")))))
  rows = evaluate_caches.run(config)
  by_policy = {r["policy"]: r for r in rows}
  assert set(by_policy) == {"dense", "kivi", "h2o", "razor"}
  dense = by_policy["dense"]
  # Through a dense cache the teacher-forced passkey text scores as the model without caches does.
  uncached = evaluate_caches.InDomainNLL(make_scorer(llama.forward, cfg.model, make_mesh(cfg.mesh)))
  eval_cfg = evaluate_caches.dataclasses.replace(cfg, eval=evaluate_caches.dataclasses.replace(
      cfg.eval, examples_per_cell=2, perplexity_examples=2))
  want = retrieval.evaluate_retrieval("passkey", eval_cfg, params, uncached)
  assert dense["passkey"]["accuracy"] == want["accuracy"]
  assert dense["perplexity"]["passkey_text_perplexity"] == pytest.approx(uncached.perplexity, rel=1e-4)
  assert dense["memory_vs_dense"] == 1.0
  kivi, h2o = by_policy["kivi"], by_policy["h2o"]
  # (int8 codes, fp16 scales per 16, a float32 residual of 16 tokens: 0.74 of float32 here)
  assert kivi["memory_vs_dense"] < 0.8 and h2o["memory_vs_dense"] < 1.0
  # int8 keys and values barely move the perplexity.
  assert kivi["perplexity"]["passkey_text_perplexity"] == pytest.approx(
      dense["perplexity"]["passkey_text_perplexity"], rel=2e-2)
  heads = by_policy["razor"]["cache_config"]["retrieval_heads"]
  assert len(heads) == 2 and sum(len(h) for h in heads) == 1      # ceil(0.25 * 2 layers * 2 KV heads)
  out = tmp_path / "out"
  assert "| kivi | bits=8 |" in (out / "results.md").read_text()
  assert len(json.loads((out / "results.json").read_text())["rows"]) == 4
  assert (out / "heatmaps.png").stat().st_size > 10_000
  assert all(np.isfinite(r["decode_ms"]) for r in rows)


def test_unknown_keys_and_policies_are_named(tmp_path):
  config = ml_collections.ConfigDict(dict(experiment=tiny_experiment(tmp_path), bogus=1))
  with pytest.raises(ValueError, match=r"unknown keys \['bogus'\]"):
    evaluate_caches.run(config)
