"""experiments/sparse_eval: a trained-model sweep of the attention methods, end to end on a tiny run."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments import sparse_eval
from lcjax import train
from lcjax.config import parse_config
from lcjax.eval import retrieval
from lcjax.eval.scoring import make_scorer
from lcjax.models import attention_methods, llama
from lcjax.sharding import make_mesh
from lcjax.train.loop import write_config


def tiny_run(tmp_path):
  """A checkpoint (random params, step 5) and config.json of a tiny passkey run, as lcjax.train writes."""
  raw = dict(model=dict(vocab_size=384, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=64, max_seq_len=128),
             data=dict(task="passkey", seq_len=112, batch_size=2, data_dir=str(tmp_path / "data"),
                       options=dict(lengths=(96, 112), digits=2, num_train=4, num_validation=1, num_test=1)),
             optimizer=dict(warmup_steps=1), train=dict(num_steps=5, work_dir=str(tmp_path / "run")),
             eval=dict(tasks=("passkey",), lengths=(96, 112), depths=(0.0, 1.0), examples_per_cell=2, batch_size=4))
  cfg = parse_config(raw)
  (tmp_path / "run").mkdir()
  write_config(cfg, str(tmp_path / "run"))
  tx, _ = train.make_optimizer(cfg.optimizer, cfg.train.num_steps)
  state, _ = train.init_state(jax.random.key(3), cfg.model, tx, make_mesh(cfg.mesh), init=llama.init,
                              param_logical_axes=llama.param_logical_axes)
  ckpt = train.Checkpointer(tmp_path / "run" / "checkpoints", asynchronous=False)
  ckpt.save(5, state)
  ckpt.close()
  return cfg, state["params"]


def sweep_config(tmp_path, methods):
  c = ml_collections.ConfigDict(dict(
      run_config="", checkpoint_dir=str(tmp_path / "run"), work_dir=str(tmp_path / "out"), sparse_layers=(0, 1),
      examples_per_cell=2, fidelity_examples=3, options=dict(block_size=16, ignore_segment_ids=True), methods=methods, only=""))
  return c


def test_sweep_on_a_tiny_run(tmp_path):
  cfg, params = tiny_run(tmp_path)
  config = sweep_config(tmp_path, dict(
      quest=dict(field="budget", grid=(1, 7), fixed={}),                       # 7 blocks of 16 cover 112
      streaming=dict(field="window", grid=(8,), fixed=dict(sink_tokens=2)),
      hyper=dict(field="hyper_block_size", grid=(8,), fixed=dict(hyper_min_seq_len=32, hyper_sample_size=4))))
  results = sparse_eval.run(config)
  rows = {(r["method"], r["value"]): r for r in results["rows"]}
  assert set(rows) == {("dense", "-"), ("quest", 1), ("quest", 7), ("streaming", 8), ("hyper", 8)}
  assert results["checkpoint_step"] == 5 and results["fidelity_length"] == 112 and results["fidelity_examples"] == 3
  # The dense row is lcjax.eval's teacher-forced passkey accuracy of the run's model.
  want = retrieval.evaluate_retrieval("passkey", dataclasses.replace(cfg, eval=dataclasses.replace(
      cfg.eval, examples_per_cell=2)), params, make_scorer(llama.forward, cfg.model, make_mesh(cfg.mesh)))
  assert rows[("dense", "-")]["accuracy"] == want["accuracy"] and rows[("dense", "-")]["n"] == 8
  full = rows[("quest", 7)]
  assert full["recall"] == pytest.approx(1.0, abs=1e-6) and full["output_error"] < 1e-5
  assert full["flops_fraction"] == pytest.approx(1.0)
  assert full["accuracy"] == want["accuracy"]
  sparse = rows[("quest", 1)]
  assert 0 < sparse["flops_fraction"] < 1 and sparse["recall"] < 1 and sparse["output_error"] > 1e-4
  window = rows[("streaming", 8)]
  assert window["flops_fraction"] < sparse["flops_fraction"] + 0.5 and window["recall"] < 1
  assert np.isnan(rows[("hyper", 8)]["recall"]) and rows[("hyper", 8)]["output_error"] > 1e-4
  sparse_eval.write_outputs(results, config.work_dir)
  table = (tmp_path / "out" / "results.md").read_text()
  assert "| quest | budget=1 |" in table and "acc. @112" in table
  assert json.loads((tmp_path / "out" / "results.json").read_text())["rows"][0]["method"] == "dense"
  assert (tmp_path / "out" / "accuracy_vs_density.png").stat().st_size > 10_000


def test_capture_matches_what_the_model_attends_with(monkeypatch):
  cfg = llama.ModelConfig(vocab_size=384, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64,
                          qkv_bias=True)
  params = jax.tree.map(lambda x: x + 0.1, llama.init(jax.random.key(0), cfg))   # non-zero biases
  tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, 256)
  seen = []
  dense = attention_methods.ATTENTION_METHODS["dense"]

  def recording(q, k, v, **kwargs):
    seen.append((q, k, v))
    return dense(q, k, v, **kwargs)

  monkeypatch.setitem(attention_methods.ATTENTION_METHODS, "dense", recording)
  llama.forward(params, tokens, jnp.broadcast_to(jnp.arange(24), tokens.shape), cfg=cfg)
  captured = list(seen)
  for layer, want in enumerate(captured):
    for a, b in zip(sparse_eval.capture_qkv(params, cfg, tokens, layer), want):
      np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("change, message", [
    (dict(bogus=1), r"config has unknown keys \['bogus'\]"),
    (dict(methods=dict(nope=dict(field="budget", grid=(1,), fixed={}))), "config.methods.nope: unknown method"),
    (dict(methods=dict(quest=dict(field="budgett", grid=(1,), fixed={}))), "'budgett' is not an AttentionOptions"),
    (dict(only="hip"), r"config.only='hip' names \['hip'\]"),
])
def test_bad_sweep_config(tmp_path, change, message):
  config = sweep_config(tmp_path, dict(quest=dict(field="budget", grid=(1,), fixed={})))
  with config.unlocked():
    config.update(change)
  with pytest.raises(ValueError, match=message):
    sparse_eval.check_config(config)
