"""Evaluation: scoring against the model's logits, retrieval bookkeeping, perplexity buckets, plots."""
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from lcjax import models
from lcjax.config import parse_config
from lcjax.eval import evaluate
from lcjax.eval import perplexity, plots, retrieval
from lcjax.eval.scoring import answer_prompts, make_greedy_answerer, make_scorer
from lcjax.sharding import make_mesh
from lcjax.train import ModelFns


def config(tmp_path, **eval_overrides):
  ev = dict(tasks=("passkey",), lengths=(96, 112), depths=(0.0, 0.5, 1.0), examples_per_cell=3, batch_size=4,
            perplexity_task="passkey", perplexity_examples=6, position_buckets=4)
  ev.update(eval_overrides)
  return parse_config(ml_collections.ConfigDict(dict(
      model=dict(vocab_size=384, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=64, max_seq_len=128),
      data=dict(task="passkey", seq_len=96, batch_size=4, data_dir=str(tmp_path / "data"),
                options=dict(lengths=(96,), digits=2, num_train=8, num_validation=8, num_test=1)),
      train=dict(num_steps=10, work_dir=str(tmp_path / "run")),
      eval=ev)))


def test_scorer_matches_log_softmax_of_forward(tmp_path):
  cfg = config(tmp_path)
  params = models.init(jax.random.key(0), cfg.model)
  rng = np.random.default_rng(0)
  batch = {"tokens": rng.integers(0, 259, (4, 16)), "targets": rng.integers(0, 259, (4, 16)),
           "positions": np.tile(np.arange(16), (4, 1)), "segment_ids": np.ones((4, 16), np.int32)}
  out = make_scorer(models.forward, cfg.model, make_mesh(cfg.mesh))(params, batch)
  logits, _ = models.forward(params, batch["tokens"], batch["positions"], None, cfg=cfg.model,
                             segment_ids=batch["segment_ids"])
  logits = np.asarray(logits, np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  want = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  np.testing.assert_allclose(out["nll"], want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out["correct"], logits.argmax(-1) == batch["targets"])


def test_retrieval_accuracy_by_length_and_depth(tmp_path):
  """A scorer that answers right exactly when depth < 0.75 and length == 96."""
  cfg = config(tmp_path)

  def score(params, batch):
    del params
    good = (batch["depth"] < 0.75) & (batch["context_length"] == 96)
    return {"nll": np.zeros(batch["targets"].shape), "correct": np.repeat(good[:, None], batch["targets"].shape[1], 1)}

  result = retrieval.evaluate_retrieval("passkey", cfg, None, score)
  cells = {(c["length"], c["depth"]): c for c in result["cells"]}
  assert set(cells) == {(n, d) for n in (96, 112) for d in (0.0, 0.5, 1.0)}
  assert all(c["n"] == 3 for c in cells.values())
  assert [cells[(96, d)]["accuracy"] for d in (0.0, 0.5, 1.0)] == [1.0, 1.0, 0.0]
  assert [cells[(112, d)]["accuracy"] for d in (0.0, 0.5, 1.0)] == [0.0, 0.0, 0.0]
  assert result["accuracy"] == pytest.approx(2 / 6)
  assert result["chance"] == pytest.approx(1 / 90)  # 2 digits, the first one 1-9
  table = retrieval.format_table(result)
  assert "chance 0.01111" in table and "30x chance" in table


def test_mqar_per_query_accuracy(tmp_path):
  """A scorer right on the first answer position of each row only: per-query = 1 / num_kv_pairs."""
  cfg = config(tmp_path, tasks=("mqar",), lengths=(64,), examples_per_cell=5,
               task_options={"mqar": {"num_kv_pairs": 4, "vocab_size": 64}})

  def score(params, batch):
    del params
    mask = batch["loss_mask"] > 0
    first = mask & (np.cumsum(mask, axis=1) == 1)
    return {"nll": np.zeros(mask.shape), "correct": first | ~mask}

  result = retrieval.evaluate_retrieval("mqar", cfg, None, score)
  assert result["query_accuracy"] == pytest.approx(0.25)
  assert result["accuracy"] == 0.0 and result["chance"] == pytest.approx(1 / 32)


def test_perplexity_buckets_average_positions(tmp_path):
  cfg = config(tmp_path)
  seen = []

  def score(params, batch):
    del params
    t = np.arange(batch["targets"].shape[1])
    nll = np.broadcast_to(0.01 * t + batch["example_index"][:, None] % 3, batch["targets"].shape).astype(float)
    seen.append((nll, batch["valid"]))
    return {"nll": nll, "correct": np.zeros(nll.shape, bool)}

  result = perplexity.evaluate_perplexity(cfg, None, score)
  assert result["documents"] == 6 and result["tokens"] == 6 * 96
  nll = np.concatenate([n[v] for n, v in seen])
  edges = [0, 24, 48, 72, 96]
  for b, (lo, hi) in zip(result["buckets"], zip(edges[:-1], edges[1:])):
    assert (b["start"], b["end"]) == (lo, hi)
    assert b["nll"] == pytest.approx(nll[:, lo:hi].mean())
    assert b["perplexity"] == pytest.approx(np.exp(nll[:, lo:hi].mean()))
  assert result["bits_per_byte"] == pytest.approx(nll.mean() / np.log(2))


def test_evaluate_writes_results_and_plot(tmp_path):
  cfg = config(tmp_path, tasks=("passkey", "perplexity"))
  params = models.init(jax.random.key(0), cfg.model)
  os.makedirs(cfg.train.work_dir)
  with open(os.path.join(cfg.train.work_dir, "metrics.jsonl"), "w") as f:
    for step, loss in [(1, 5.0), (2, 3.0), (3, 2.5)]:
      f.write(json.dumps({"step": step, "train/loss": loss}) + "\n")
  model = ModelFns(models.init, models.forward, models.param_logical_axes)
  results = evaluate(cfg, params, model, work_dir=cfg.train.work_dir, step=3)
  assert 0.0 <= results["passkey"]["accuracy"] <= 1.0
  # Untrained byte model: perplexity near the vocabulary size, far above a trained one.
  assert 50 < results["perplexity"]["perplexity"] < 2000
  png = os.path.join(cfg.train.work_dir, "eval", "eval.png")
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  image = plots.plt.imread(png)
  assert image.shape[1] > 2 * image.shape[0]  # three panels side by side
  saved = json.load(open(os.path.join(cfg.train.work_dir, "eval", "results_step3.json")))
  assert saved["results"]["passkey"]["cells"] == results["passkey"]["cells"]


def test_bucket_edges():
  np.testing.assert_array_equal(perplexity.bucket_edges(96, 4), [0, 24, 48, 72, 96])
  np.testing.assert_array_equal(perplexity.bucket_edges(3, 8), [0, 1, 2, 3])


def passkey_batch(cfg, length=96):
  from lcjax import data as lcdata
  source = retrieval.eval_source("passkey", length, cfg, {"digits": 2})
  return next(iter(lcdata.task_eval_batches(source, seq_len=length, batch_size=4)))


def test_answer_prompts_end_before_the_answer(tmp_path):
  cfg = config(tmp_path)
  batch = passkey_batch(cfg)
  prompts, lengths, n = answer_prompts(batch)
  assert n == 2
  for b in range(4):
    s = int(batch["answer_start"][b])
    assert lengths[b] == s + 1
    np.testing.assert_array_equal(prompts[b, :s + 1], batch["tokens"][b, :s + 1])
    # The next input is the first answer digit, i.e. the target at answer_start.
    assert batch["tokens"][b, s + 1] == batch["targets"][b, s]


def test_greedy_answers_match_a_step_by_step_argmax_loop(tmp_path):
  from lcjax.models.generate import generate
  cfg = config(tmp_path, method="greedy")
  params = models.init(jax.random.key(3), cfg.model)
  batch = passkey_batch(cfg)
  got = make_greedy_answerer(generate, cfg.model, make_mesh(cfg.mesh))(params, batch)
  prompts, lengths, n = answer_prompts(batch)
  for b in range(4):
    seq = list(prompts[b, :lengths[b]])
    for _ in range(n):
      logits, _ = models.forward(params, np.asarray([seq]), np.arange(len(seq))[None], None, cfg=cfg.model)
      seq.append(int(np.argmax(logits[0, -1])))
    np.testing.assert_array_equal(got[b], seq[-n:])
  # Greedy exact match and teacher-forced exact match agree example by example.
  score = make_scorer(models.forward, cfg.model, make_mesh(cfg.mesh))
  greedy = retrieval.evaluate_retrieval("passkey", cfg, params, score,
                                        make_greedy_answerer(generate, cfg.model, make_mesh(cfg.mesh)))
  forced = retrieval.evaluate_retrieval("passkey", config(tmp_path), params, score)
  assert greedy["method"].startswith("greedy") and forced["method"].startswith("teacher_forced")
  assert [c["accuracy"] for c in greedy["cells"]] == [c["accuracy"] for c in forced["cells"]]
