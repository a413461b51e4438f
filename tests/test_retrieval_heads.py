"""RazorAttention's retrieval-head detection (echo / induction scores on a repeated random probe)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.models import ModelConfig, init
from lcjax.models import retrieval_heads as rh
from lcjax.models.probe import layer_qkv

CFG = ModelConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64)


def _numpy_scores(q, k, length):
  """float64 re-implementation: mean attention of second-copy queries to t - L and t - L + 1."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  hq, hkv, d = q.shape[2], k.shape[2], q.shape[3]
  k = np.repeat(k, hq // hkv, axis=2)
  t = q.shape[1]
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
  logits[:, :, ~np.tril(np.ones((t, t), bool))] = -np.inf
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  echo = np.mean([probs[:, :, r, r - length] for r in range(length, t)], axis=(0, 1))
  induction = np.mean([probs[:, :, r, r - length + 1] for r in range(length, t - 1)], axis=(0, 1))
  return echo, induction


def test_scores_match_numpy_on_a_random_model():
  params = init(jax.random.key(0), CFG)
  key = jax.random.key(1)
  echo, induction = rh.retrieval_head_scores(params, CFG, key, probe_len=12, batch=2)
  assert echo.shape == induction.shape == (CFG.n_layers, CFG.n_kv_heads)
  tokens = rh.probe_tokens(key, 2, 12, 0, CFG.vocab_size)
  assert np.array_equal(np.asarray(tokens[:, :12]), np.asarray(tokens[:, 12:]))
  for layer in range(CFG.n_layers):
    q, k, _ = layer_qkv(params, CFG, tokens, layer)
    e, i = _numpy_scores(q, k, 12)
    # per KV head: the largest of its two query heads
    np.testing.assert_allclose(echo[layer], e.reshape(2, 2).max(1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(induction[layer], i.reshape(2, 2).max(1), rtol=1e-4, atol=1e-6)


def test_planted_echo_and_induction_heads_score_highest():
  # Head 0 matches a query to the keys of the same probe position (echo: t - L, and t itself);
  # head 1's keys carry the previous position's code (induction: t - L + 1); head 2 is random.
  length, t, d = 8, 16, 16
  code = lambda pos: 12.0 * jax.nn.one_hot(pos % length, d)
  pos = jnp.arange(t)
  q = jnp.stack([code(pos), code(pos), jax.random.normal(jax.random.key(0), (t, d))], axis=1)[None]
  k = jnp.stack([code(pos), code(pos - 1), jax.random.normal(jax.random.key(1), (t, d))], axis=1)[None]
  echo, induction = map(np.asarray, rh._copy_scores(q, k))
  assert echo[0] > 0.45 and induction[1] > 0.9            # echo shares its weight with t itself
  assert echo[1] < 0.05 and induction[0] < 0.05 and max(echo[2], induction[2]) < 0.5
  scores = np.asarray(induction)[None]
  assert rh.top_heads(scores, 1 / 3) == {(0, 1)}


def test_find_retrieval_heads_takes_the_top_fractions():
  params = init(jax.random.key(2), CFG)
  key = jax.random.key(3)
  echo, induction = rh.retrieval_head_scores(params, CFG, key, probe_len=10, batch=2)
  heads = rh.find_retrieval_heads(params, CFG, key, induction_fraction=0.3, echo_fraction=0.1,
                                  probe_len=10, batch=2)
  assert len(heads) == CFG.n_layers and all(h == tuple(sorted(h)) for h in heads)
  chosen = {(layer, h) for layer, hs in enumerate(heads) for h in hs}
  n = CFG.n_layers * CFG.n_kv_heads
  assert max(math.ceil(0.3 * n), math.ceil(0.1 * n)) <= len(chosen) <= math.ceil(0.3 * n) + math.ceil(0.1 * n)
  best_induction = np.unravel_index(np.argmax(induction), induction.shape)
  best_echo = np.unravel_index(np.argmax(echo), echo.shape)
  assert tuple(map(int, best_induction)) in chosen and tuple(map(int, best_echo)) in chosen
  assert rh.find_retrieval_heads(params, CFG, key, induction_fraction=0.0, echo_fraction=0.0,
                                 probe_len=10, batch=2) == ((), (), ())


def test_bad_arguments_are_named():
  params = init(jax.random.key(0), CFG)
  with pytest.raises(ValueError, match="probe_len=1"):
    rh.retrieval_head_scores(params, CFG, jax.random.key(0), probe_len=1)
  with pytest.raises(ValueError, match="high"):
    rh.retrieval_head_scores(params, CFG, jax.random.key(0), high=CFG.vocab_size + 1)
  with pytest.raises(ValueError, match="fraction=1.5"):
    rh.top_heads(np.zeros((2, 2)), 1.5)
  with pytest.raises(ValueError, match="layer=3"):
    layer_qkv(params, CFG, jnp.zeros((1, 4), jnp.int32), 3)
