"""Fidelity measures against float64 NumPy on random inputs and layouts."""
import jax
import numpy as np
import pytest

from lcjax.attention import BlockLayout, fidelity, masks, to_layout

B, TQ, TK, HQ, HKV, D = 2, 11, 17, 4, 2, 8


@pytest.fixture(scope="module")
def qkv():
  keys = jax.random.split(jax.random.key(0), 3)
  return (jax.random.normal(keys[0], (B, TQ, HQ, D)), jax.random.normal(keys[1], (B, TK, HKV, D)),
          jax.random.normal(keys[2], (B, TK, HKV, D)))


def random_layout(seed, bq=3, bk=4):
  visible = np.random.default_rng(seed).random((B, HQ, -(-TQ // bq), -(-TK // bk))) < 0.5
  visible[..., 0] = True
  return BlockLayout.from_block_mask(visible, block_q=bq, block_kv=bk, q_len=TQ, kv_len=TK), visible


def numpy_probs_and_outputs(q, k, v, allowed):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  k, v = np.repeat(k, 2, 2), np.repeat(v, 2, 2)
  s = np.where(allowed, np.einsum("bqhd,bkhd->bhqk", q, k) * D ** -0.5, -np.inf)
  m = s.max(-1, keepdims=True)
  p = np.exp(s - np.where(np.isfinite(m), m, 0))
  p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
  return p, np.einsum("bhqk,bkhd->bqhd", p, v)


def test_recall_and_error_match_numpy(qkv):
  q, k, v = qkv
  layout, visible = random_layout(1)
  causal = np.arange(TK)[None, :] <= np.arange(TQ)[:, None] + (TK - TQ)
  kept = np.repeat(np.repeat(visible, 3, 2)[:, :, :TQ], 4, 3)[..., :TK] & causal
  dense_p, dense_o = numpy_probs_and_outputs(q, k, v, causal)
  _, sparse_o = numpy_probs_and_outputs(q, k, v, kept)
  want_recall = (dense_p * kept).sum(-1).mean()
  want_error = np.linalg.norm(sparse_o - dense_o) / np.linalg.norm(dense_o)
  got = fidelity.evaluate(q, k, v, layout, mask=masks.causal())
  np.testing.assert_allclose(got["recall"], want_recall, rtol=1e-5)
  np.testing.assert_allclose(got["output_error"], want_error, rtol=1e-4)
  assert 0 < got["recall"] < 1 and got["output_error"] > 0


def test_flops_fraction_counts_pairs_in_visited_blocks():
  layout, visible = random_layout(2)
  rows = np.minimum(3, TQ - 3 * np.arange(visible.shape[2]))
  cols = np.minimum(4, TK - 4 * np.arange(visible.shape[3]))
  area = rows[:, None] * cols[None, :]
  got = fidelity.flops_fraction(layout, mask=None)
  np.testing.assert_allclose(got, np.mean((visible * area).sum((-2, -1)) / (TQ * TK)))


def test_dense_layout_is_exact(qkv):
  q, k, v = qkv
  layout = to_layout(masks.causal(), TQ, TK, 4, 4, q_offset=TK - TQ)
  got = fidelity.evaluate(q, k, v, layout, mask=masks.causal())
  np.testing.assert_allclose(got["recall"], 1.0, rtol=1e-6)
  assert got["output_error"] < 1e-6 and got["flops_fraction"] == 1.0


def test_recall_grows_with_the_layout(qkv):
  q, k, _ = qkv
  small, visible = random_layout(3)
  big = BlockLayout.from_block_mask(visible | (np.random.default_rng(4).random(visible.shape) < 0.5),
                                    block_q=3, block_kv=4, q_len=TQ, kv_len=TK)
  r_small = fidelity.attention_recall(q, k, small, mask=masks.causal())
  r_big = fidelity.attention_recall(q, k, big, mask=masks.causal())
  assert r_big >= r_small
