"""Selectors: kept blocks, budgets, planted answers, Quest bounds, line-to-block conversion, errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.attention import attend, masks
from lcjax.attention.selectors import (block_topk, centroid, common, flexprefill, hip, landmark, quest, sale,
                                       vertical_slash)

B, TQ, TK, HQ, HKV, D, BLOCK = 2, 40, 64, 4, 2, 16, 8
N_KV = TK // BLOCK
PLANT_BLOCK = 2                          # key block 2 = keys 16..23


def random_qk(seed=0):
  kq, kk = jax.random.split(jax.random.key(seed))
  return jax.random.normal(kq, (B, TQ, HQ, D)), jax.random.normal(kk, (B, TK, HKV, D))


def planted_qk(seed=0, strength=8.0):
  """Every query shares a direction with the keys of a bump centred on block PLANT_BLOCK.

  A smooth bump rather than a lone block: HiP's tree search scores a span by its middle key, so
  it relies (as the paper says) on attention scores varying smoothly along the keys.
  """
  q, k = random_qk(seed)
  u = jax.random.normal(jax.random.key(99), (D,))
  u = u / jnp.linalg.norm(u)
  centre = PLANT_BLOCK * BLOCK + BLOCK / 2
  bump = jnp.exp(-((jnp.arange(TK) - centre) / BLOCK) ** 2)
  k = k + (strength * 3 * bump)[None, :, None, None] * u
  return q + strength * u, k


def centroid_select(q, k, budget, **kw):
  c, a = centroid.kmeans(k, 6, iters=8)
  return centroid.select(q, k, c, a, 0.5 / budget, **kw)


# name -> (select(q, k, budget, block sizes), sink_tokens, local_tokens, is a top-k with a block budget)
SELECTORS = {
    "block_topk": (block_topk.select, 1, 1, True),
    "quest": (quest.select, 0, 1, True),
    "landmark": (landmark.select, 0, 1, True),
    "sale": (sale.select, 1, 1, True),
    "hip": (hip.select, 4, 1, True),
    "vertical_slash": (lambda q, k, b, **kw: vertical_slash.select(q, k, 4 * b, 4 * b, last_q=16, sink_tokens=4,
                                                                 local_tokens=8, **kw), 4, 8, False),
    "flexprefill": (lambda q, k, b, **kw: flexprefill.select(q, k, 0.5 + 0.1 * b, **kw), 1, 1, False),
    "centroid": (centroid_select, 0, 1, False),
}


@functools.cache
def selected(name, budget, planted=False):
  select = SELECTORS[name][0]
  q, k = planted_qk() if planted else random_qk()
  return select(q, k, budget, block_q=BLOCK, block_kv=BLOCK)


@pytest.mark.parametrize("name", SELECTORS)
def test_keeps_required_blocks_and_respects_causality_and_budget(name):
  _, sinks, local, has_budget = SELECTORS[name]
  layout = selected(name, 2)
  visible = np.asarray(layout.block_mask()[0])
  assert visible.shape == (B, HQ, TQ // BLOCK, N_KV)
  allowed, full, kept = common.base_tables(TQ, TK, BLOCK, BLOCK, True, sinks, local)
  assert (visible >= kept).all(), "a block the method always keeps is missing"
  assert (visible <= allowed).all(), "a block in the causal future was selected"
  np.testing.assert_array_equal(np.asarray(layout.block_mask()[1]), visible & full)
  if has_budget:
    assert (visible.sum(-1) <= kept.sum(-1) + 2).all()


@pytest.mark.parametrize("name", SELECTORS)
def test_finds_the_planted_block(name):
  visible = np.asarray(selected(name, 1, planted=True).block_mask()[0])
  # Every query block (positions 24..63) can see the planted keys 16..23.
  assert visible[:, :, :, PLANT_BLOCK].all(), f"{name} missed the planted block"
  control = np.asarray(selected(name, 1).block_mask()[0])
  assert not control[:, :, :, PLANT_BLOCK].all(), "the block is selected even without the plant"


@pytest.mark.parametrize("name", ["block_topk", "quest", "landmark", "sale", "hip"])
def test_full_budget_is_dense_causal_attention(name):
  q, k = random_qk(3)
  v = jax.random.normal(jax.random.key(4), k.shape)
  layout = SELECTORS[name][0](q, k, N_KV, block_q=BLOCK, block_kv=BLOCK)
  kwargs = dict(mask=masks.causal(), q_offset=TK - TQ, implementation="xla")
  np.testing.assert_allclose(attend(q, k, v, layout=layout, **kwargs), attend(q, k, v, **kwargs), atol=1e-6)


@pytest.mark.parametrize("name", ["block_topk", "quest", "sale"])
def test_selectors_are_jittable(name):
  q, k = random_qk(5)
  select = SELECTORS[name][0]
  eager = select(q, k, 3, block_q=BLOCK, block_kv=BLOCK)
  traced = jax.jit(lambda q, k: select(q, k, 3, block_q=BLOCK, block_kv=BLOCK))(q, k)
  np.testing.assert_array_equal(eager.block_mask()[0], traced.block_mask()[0])


def test_quest_bounds_upper_bound_the_true_block_max():
  q, k = random_qk(6)
  k = k[:, :61]                                                      # a partial last block
  bounds = np.asarray(quest.block_bounds(q, k, BLOCK))              # [B, Hq, Tq, nK]
  logits = np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64), np.repeat(np.asarray(k, np.float64), 2, 2))
  true_max = np.stack([logits[..., j * BLOCK:(j + 1) * BLOCK].max(-1) for j in range(bounds.shape[-1])], -1)
  assert (bounds >= true_max - 1e-4).all()
  assert (bounds - true_max).mean() > 0.1                           # an upper bound, not the true max


def test_lines_to_blocks_matches_elementwise_conversion():
  rng = np.random.default_rng(0)
  columns = rng.random((1, 1, TK)) < 0.05
  diagonals = rng.random((1, 1, TK)) < 0.05
  got = common.columns_and_diagonals_to_blocks(jnp.asarray(columns), jnp.asarray(diagonals), q_len=TQ, kv_len=TK,
                                               block_q=BLOCK, block_kv=BLOCK)
  qpos, kpos = np.arange(TK - TQ, TK)[:, None], np.arange(TK)[None, :]
  offset = qpos - kpos
  lines = (columns[0, 0][kpos] | np.where(offset >= 0, diagonals[0, 0][np.clip(offset, 0, TK - 1)], False))
  lines = np.broadcast_to(lines, (TQ, TK)) & (kpos <= qpos)
  want = lines.reshape(TQ // BLOCK, BLOCK, N_KV, BLOCK).any((1, 3))
  allowed = np.asarray(common.base_tables(TQ, TK, BLOCK, BLOCK, True, 0, 1)[0])
  np.testing.assert_array_equal(np.asarray(got)[0, 0] & allowed, want)


def test_vertical_slash_line_scores_sum_the_estimated_attention():
  q, k = random_qk(7)
  vertical, slash = vertical_slash.line_scores(q, k, last_q=8, scale=0.25)
  np.testing.assert_allclose(vertical.sum(-1), 8, rtol=1e-5)        # each of the 8 rows sums to one
  np.testing.assert_allclose(slash.sum(-1), 8, rtol=1e-5)


def test_flexprefill_tau_decides_the_pattern():
  q, k = random_qk(8)
  _, always = flexprefill.select(q, k, 0.9, tau=1.0, block_q=BLOCK, block_kv=BLOCK, return_choice=True)
  _, never = flexprefill.select(q, k, 0.9, tau=1e-6, block_q=BLOCK, block_kv=BLOCK, return_choice=True)
  assert np.asarray(always).all() and not np.asarray(never).any()


def test_kmeans_recovers_separated_clusters():
  centers = 10 * jax.random.normal(jax.random.key(1), (3, D))
  labels = jnp.arange(TK) % 3
  k = (centers[labels] + 0.1 * jax.random.normal(jax.random.key(2), (TK, D)))[None, :, None, :]
  cents, assign = centroid.kmeans(k, 3, iters=10)
  assign = np.asarray(assign[0, 0])
  for c in range(3):                                  # same partition up to a permutation of labels
    assert len(set(assign[np.asarray(labels) == c])) == 1
  assert len(set(assign)) == 3


def test_sale_int4_estimate_is_close():
  q, k = random_qk(9)
  est = sale.estimated_logits(q, k, 1.0)
  exact = jnp.einsum("bqhd,bkhd->bhqk", q, jnp.repeat(k, 2, 2))
  assert float(jnp.abs(est - exact).mean() / jnp.abs(exact).mean()) < 0.15


@pytest.mark.parametrize("call,match", [
    (lambda q, k: block_topk.select(q, k, 0), "budget"),
    (lambda q, k: quest.select(q, k, N_KV + 1, block_kv=BLOCK), "budget"),
    (lambda q, k: hip.select(q, k, jnp.int32(2)), "budget"),
    (lambda q, k: landmark.select(q, k, 1, landmarks=jnp.zeros((B, 3, HKV, D))), "landmarks"),
    (lambda q, k: vertical_slash.select(q, k, 0, 4), "n_vertical"),
    (lambda q, k: flexprefill.select(q, k, 1.5), "gamma"),
    (lambda q, k: flexprefill.select(q, k, 0.9, tau=0.0), "tau"),
    (lambda q, k: centroid.kmeans(k, 0), "num_clusters"),
    (lambda q, k: centroid.select(q, k, jnp.zeros((B, HKV, 4, D)), jnp.zeros((B, HKV, TK), jnp.int32), 0.0), "threshold"),
    (lambda q, k: sale.select(q, k, 2, block_q=3.0), "block_q"),
    (lambda q, k: block_topk.select(jnp.concatenate([q, q], 1), k, 1), "q_len"),
])
def test_bad_arguments_are_named(call, match):
  q, k = random_qk()
  with pytest.raises(ValueError, match=match):
    call(q, k)


def _causal_blocks_and_diagonal():
  """NumPy [nQ, nK] tables: causally visible blocks, and the blocks holding each query's own key."""
  qpos = np.arange(TK - TQ, TK)
  allowed = np.zeros((TQ // BLOCK, N_KV), bool)
  diagonal = np.zeros_like(allowed)
  for t, pos in enumerate(qpos):
    allowed[t // BLOCK, :pos // BLOCK + 1] = True
    diagonal[t // BLOCK, pos // BLOCK] = True
  return allowed, diagonal


def test_flexprefill_query_aware_keeps_the_fewest_blocks_reaching_gamma():
  q, k = random_qk(10)
  gamma = 0.6
  layout = flexprefill.select(q, k, gamma, tau=1.0, block_q=BLOCK, block_kv=BLOCK)   # tau=1: query-aware
  qn, kn = np.asarray(q, np.float64), np.repeat(np.asarray(k, np.float64), 2, 2)
  pooled_q = qn.reshape(B, TQ // BLOCK, BLOCK, HQ, D).mean(2)
  pooled_k = kn.reshape(B, N_KV, BLOCK, HQ, D).mean(2)
  allowed, diagonal = _causal_blocks_and_diagonal()
  logits = np.where(allowed, np.einsum("bihd,bjhd->bhij", pooled_q, pooled_k) * D ** -0.5, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  order = np.argsort(-probs, -1)
  ranked = np.take_along_axis(probs, order, -1)
  keep_ranked = (np.cumsum(ranked, -1) - ranked < gamma) & (ranked > 0)
  want = np.zeros_like(keep_ranked)
  np.put_along_axis(want, order, keep_ranked, -1)
  want |= diagonal
  want[..., 0] = True                                               # the sink block
  np.testing.assert_array_equal(np.asarray(layout.block_mask()[0]), want)


def test_centroid_selection_matches_numpy():
  q, k = planted_qk(11, strength=2.0)
  cents, assign = centroid.kmeans(k, 5, iters=6)
  threshold = 0.2
  layout = centroid.select(q, k, cents, assign, threshold, block_q=BLOCK, block_kv=BLOCK)
  cn, an = np.asarray(cents, np.float64), np.asarray(assign)
  counts = np.stack([(an == c).sum(-1) for c in range(5)], -1)                       # [B, Hkv, C]
  logits = np.einsum("bqhd,bhcd->bhqc", np.asarray(q, np.float64), np.repeat(cn, 2, 1)) * D ** -0.5
  logits = np.where(np.repeat(counts, 2, 1)[:, :, None] > 0,
                    logits + np.log(np.maximum(np.repeat(counts, 2, 1), 1))[:, :, None], -np.inf)
  share = np.exp(logits - logits.max(-1, keepdims=True))
  share /= share.sum(-1, keepdims=True)
  kept = share.reshape(B, HQ, TQ // BLOCK, BLOCK, 5).max(3) >= threshold             # [B, Hq, nQ, C]
  member = np.stack([(an == c).reshape(B, HKV, N_KV, BLOCK).any(-1) for c in range(5)], 2)   # [B, Hkv, C, nK]
  visible = np.einsum("bhic,bhcj->bhij", kept.astype(int), np.repeat(member, 2, 1).astype(int)) > 0
  allowed, diagonal = _causal_blocks_and_diagonal()
  assert 0 < kept.mean() < 1                                           # the threshold bites
  np.testing.assert_array_equal(np.asarray(layout.block_mask()[0]), (visible & allowed) | diagonal)


# --- top-k selectors against float64 NumPy oracles: odd lengths, unequal blocks, GQA ---------

def _np_block_tables(q_len, kv_len, bq, bk, sinks, local):
  """NumPy [nQ, nK] (causally visible, always kept) blocks; queries are the last q_len keys."""
  qpos = np.arange(kv_len - q_len, kv_len)[:, None]
  kpos = np.arange(kv_len)[None, :]
  causal = kpos <= qpos
  keep = causal & ((kpos < sinks) | (kpos > qpos - local))
  n_q, n_k = -(-q_len // bq), -(-kv_len // bk)
  reduce = lambda m: np.array([[m[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk].any() for j in range(n_k)]
                               for i in range(n_q)])
  return reduce(causal), reduce(keep)


def _np_block_scores(name, q, k, bq, bk):
  """float64 [B, Hq, nQ, nK] block scores of each top-k selector, from its paper's formula."""
  q = np.asarray(q, np.float64)
  k = np.repeat(np.asarray(k, np.float64), q.shape[2] // k.shape[2], axis=2)
  q_len, kv_len, d = q.shape[1], k.shape[1], q.shape[3]
  n_q, n_k = -(-q_len // bq), -(-kv_len // bk)
  qb = [q[:, i * bq:(i + 1) * bq] for i in range(n_q)]            # [B, rows, H, D] (valid rows only)
  kb = [k[:, j * bk:(j + 1) * bk] for j in range(n_k)]
  out = np.zeros((q.shape[0], q.shape[2], n_q, n_k))
  if name == "sale":                                                # int4 q, k; softmax; block mass
    def quant(x):                                                   # symmetric per (token, head)
      step = np.abs(x).max(-1, keepdims=True) / 7
      step = np.where(step > 0, step, 1.0)
      return np.clip(np.round(x / step), -7, 7) * step
    logits = np.einsum("bqhd,bkhd->bhqk", quant(q), quant(k)) * d ** -0.5
    qpos = np.arange(kv_len - q_len, kv_len)[:, None]
    logits = np.where(np.arange(kv_len)[None, :] <= qpos, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
  for i in range(n_q):
    for j in range(n_k):
      if name == "block_topk":
        out[:, :, i, j] = np.einsum("bhd,bhd->bh", qb[i].mean(1), kb[j].mean(1))
      elif name == "landmark":                                      # mean key of the block
        out[:, :, i, j] = np.einsum("bqhd,bhd->bhq", qb[i], kb[j].mean(1)).max(-1)
      elif name == "quest":
        lo, hi = kb[j].min(1)[:, None], kb[j].max(1)[:, None]       # [B, 1, H, D]
        out[:, :, i, j] = np.maximum(qb[i] * lo, qb[i] * hi).sum(-1).max(1)
      else:
        out[:, :, i, j] = p[:, :, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk].sum(-1).max(-1)
  return out


@pytest.mark.parametrize("name,sinks,local", [("block_topk", 3, 5), ("quest", 0, 1), ("landmark", 2, 4),
                                              ("sale", 1, 1)])
@pytest.mark.parametrize("q_len,kv_len,bq,bk,budget", [(29, 45, 6, 7, 2), (13, 31, 4, 3, 1), (17, 50, 5, 4, 3)])
def test_topk_selectors_match_numpy_oracle(name, sinks, local, q_len, kv_len, bq, bk, budget):
  kq, kk, kv = jax.random.split(jax.random.key(q_len * 100 + kv_len), 3)
  q = jax.random.normal(kq, (2, q_len, 4, 8))
  k = jax.random.normal(kk, (2, kv_len, 2, 8))
  v = jax.random.normal(kv, (2, kv_len, 2, 8))
  select = SELECTORS[name][0]
  layout = select(q, k, budget, block_q=bq, block_kv=bk, sink_tokens=sinks, local_tokens=local)
  allowed, kept = _np_block_tables(q_len, kv_len, bq, bk, sinks, local)
  scores = np.where(allowed & ~kept, _np_block_scores(name, q, k, bq, bk), -np.inf)
  order = np.argsort(-scores, -1, kind="stable")
  ranked = np.take_along_axis(scores, order, -1)
  contested = np.isfinite(ranked[..., budget])                      # rows where the budget bites
  with np.errstate(invalid="ignore"):
    gap = ranked[..., budget - 1] - ranked[..., budget]
  assert (gap[contested] > 1e-4).all(), "near-tie at the budget boundary: pick another seed"
  assert contested.any(), "the budget never bites: the test would not check the ranking"
  chosen = np.zeros(scores.shape, bool)
  np.put_along_axis(chosen, order[..., :budget], np.isfinite(ranked[..., :budget]), -1)
  want = chosen | kept
  np.testing.assert_array_equal(np.asarray(layout.block_mask()[0]), want)
  # Exact causal attention over the layout (the `full` flags must not leak the future).
  out = attend(q, k, v, mask=masks.causal(), layout=layout, q_offset=kv_len - q_len, implementation="xla")
  rows, cols = np.arange(q_len) // bq, np.arange(kv_len) // bk
  pairs = want[:, :, rows][:, :, :, cols] & (np.arange(kv_len)[None, :] <= np.arange(kv_len - q_len, kv_len)[:, None])
  qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
  s = np.where(pairs, np.einsum("bqhd,bkhd->bhqk", qn, np.repeat(kn, 2, 2)) * 8 ** -0.5, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(out, np.einsum("bhqk,bkhd->bqhd", p, np.repeat(vn, 2, 2)), atol=2e-5)


def test_hip_is_subquadratic():
  """HiP never forms a [Tq, Tk] score map: its largest array is O(T * budget * D), not O(T^2)."""
  t, blk = 2048, 16
  q = jax.ShapeDtypeStruct((1, t, 2, 16), jnp.float32)
  k = jax.ShapeDtypeStruct((1, t, 1, 16), jnp.float32)
  jaxpr = jax.make_jaxpr(lambda q, k: hip.select(q, k, 4, block_q=blk, block_kv=blk))(q, k).jaxpr
  largest = max(int(np.prod(v.aval.shape)) for eqn in jaxpr.eqns for v in eqn.outvars)
  assert largest < t * t // 16, largest
  # block_topk is O(T^2 / block^2) too; quest's bounds [B, Hq, Tq, nK] are O(T^2 / block): both below T^2.
  dense = jax.make_jaxpr(lambda q, k: sale.select(q, k, 4, block_q=blk, block_kv=blk))(q, k).jaxpr
  assert max(int(np.prod(v.aval.shape)) for eqn in dense.eqns for v in eqn.outvars) >= t * t   # the check bites


@pytest.mark.parametrize("select", [block_topk.select, quest.select, hip.select, sale.select, landmark.select])
@pytest.mark.parametrize("kwargs,match", [(dict(sink_tokens=-1), "sink_tokens=-1"),
                                          (dict(local_tokens=0), "local_tokens=0")])
def test_bad_sinks_and_window_are_named(select, kwargs, match):
  q, k = random_qk()
  with pytest.raises(ValueError, match=match):
    select(q, k, 1, block_q=BLOCK, block_kv=BLOCK, **kwargs)
