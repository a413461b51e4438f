"""Evicting caches (H2O, TOVA, SnapKV, PyramidKV, RazorAttention) against NumPy re-implementations
of the papers' algorithms on random inputs: the same tokens kept, the same outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.cache import (DenseKVCache, EvictingKVCache, H2OPolicy, RazorKVCache, SnapKVPolicy,
                         TOVAPolicy, pyramid_budgets)
from lcjax.cache.snapkv import pool_by_position

B, HQ, HKV, D = 2, 4, 2, 8
G = HQ // HKV


def np_softmax(s):
  s = s - s.max(-1, keepdims=True)
  e = np.exp(s)
  return e / e.sum(-1, keepdims=True)


def np_probs(q, k, rows_pos, key_pos):
  """q [T, G, D] of one KV head's group, k [S, D]; causal by positions -> [T, S] group-mean."""
  s = np.einsum("tgd,sd->gts", q, k) * D ** -0.5
  s = np.where(key_pos[None, None, :] <= rows_pos[None, :, None], s, -np.inf)
  return np_softmax(s).mean(0)


def np_attend(q, k, v, key_pos, q_pos, bias=None):
  """q [Hq, D] single query at q_pos; k, v [S, D] for its KV head -> [D]."""
  s = k @ q * D ** -0.5
  if bias is not None:
    s = s + bias
  s = np.where(key_pos <= q_pos, s, -np.inf)
  return np_softmax(s) @ v


def data(seed, t):
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.standard_normal(s).astype(np.float32)
  return f(B, t, HQ, D) * 2.0, f(B, t, HKV, D), f(B, t, HKV, D)


def run(cache, q, k, v, prefill):
  """Prefill chunk of `prefill` tokens, then one token at a time; returns cache and outputs."""
  step = jax.jit(lambda c, a, b, qq: (lambda c2: (c2, c2.attend(qq)))(c.update(a, b, q=qq)))
  cache, out = step(cache, k[:, :prefill], v[:, :prefill], q[:, :prefill])
  outs = [out]
  for t in range(prefill, k.shape[1]):
    cache, out = step(cache, k[:, t:t + 1], v[:, t:t + 1], q[:, t:t + 1])
    outs.append(out)
  return cache, np.asarray(jnp.concatenate(outs, 1))


def kept_sets(cache):
  pos = np.asarray(cache.compress()[0].pos)
  return [[set(int(p) for p in pos[b, :, h] if p >= 0) for h in range(HKV)] for b in range(B)]


def np_h2o(q, k, budget, window, prefill):
  """H2O (Zhang et al. 2023) for one (sequence, KV head): q [T, G, D], k [T, D] -> kept positions."""
  t_all = k.shape[0]
  pos = np.arange(prefill)
  acc = dict(zip(range(prefill), np_probs(q[:prefill], k[:prefill], pos, pos).sum(0)))
  def evict(kept, now):
    while len(kept) > budget:
      cands = [p for p in kept if p < now - window]
      kept.remove(min(cands, key=lambda p: acc[p]))
  kept = list(range(prefill))
  evict(kept, prefill)
  for t in range(prefill, t_all):
    kept.append(t)
    acc[t] = 0.0
    kp = np.array(kept)
    for p, w in zip(kept, np_probs(q[t:t + 1], k[kp], np.array([t]), kp)[0]):
      acc[p] += w
    evict(kept, t + 1)
  return set(kept)


@pytest.mark.parametrize("budget,window", [(10, 3), (6, 0)])
def test_h2o_keeps_the_papers_heavy_hitters(budget, window):
  q, k, v = data(0, 24)
  cache = EvictingKVCache.create(B, HKV, D, policy=H2OPolicy(window=window), budget=budget, max_chunk=12)
  cache, _ = run(cache, q, k, v, prefill=12)
  got = kept_sets(cache)
  for b in range(B):
    for h in range(HKV):
      want = np_h2o(q[b, :, h * G:(h + 1) * G], k[b, :, h], budget, window, 12)
      assert got[b][h] == want, (b, h)


def np_tova(q, k, budget, prefill):
  """TOVA (Oren et al. 2024) with head averaging; q [T, Hq, D], k [T, Hkv, D] -> kept positions."""
  def scores(qt, kept, t):
    kp = np.array(kept)
    return np.mean([np_probs(qt[None, h * G:(h + 1) * G], k[kp, h], np.array([t]), kp)[0]
                    for h in range(HKV)], 0)
  kept = list(range(prefill))
  def evict(kept, t):
    s = scores(q[t], kept, t)
    while len(kept) > budget:   # drop the lowest
      i = int(np.argmin(s))
      kept.pop(i)
      s = np.delete(s, i)
  evict(kept, prefill - 1)
  for t in range(prefill, k.shape[0]):
    kept.append(t)
    evict(kept, t)
  return set(kept)


def test_tova_keeps_the_tokens_the_newest_query_attends_to():
  q, k, v = data(1, 20)
  cache = EvictingKVCache.create(B, HKV, D, policy=TOVAPolicy(), budget=7, max_chunk=10)
  cache, _ = run(cache, q, k, v, prefill=10)
  got = kept_sets(cache)
  for b in range(B):
    want = np_tova(q[b], k[b], 7, 10)
    assert got[b][0] == want and got[b][1] == want


def np_pool(x, kernel, kind):
  pad = kernel // 2
  xp = np.pad(x, pad, constant_values=(-np.inf if kind == "max" else 0.0))
  win = np.lib.stride_tricks.sliding_window_view(xp, kernel)[:len(x)]
  return win.max(-1) if kind == "max" else win.sum(-1) / kernel


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_snapkv_selects_like_the_papers_code(pooling):
  w, kernel, budget, length = 4, 5, 10, 24
  q, k, v = data(2, length)
  cache = EvictingKVCache.create(B, HKV, D, policy=SnapKVPolicy(window=w, kernel=kernel, pooling=pooling),
                                 budget=budget, max_chunk=length)
  cache, _ = run(cache, q, k, v, prefill=length)
  got = kept_sets(cache)
  for b in range(B):
    for h in range(HKV):
      pos = np.arange(length)
      attn = np_probs(q[b, -w:, h * G:(h + 1) * G], k[b, :, h], pos[-w:], pos)     # [w, L]
      s = np_pool(attn[:, :-w].sum(0), kernel, pooling)
      window = set(range(length - w, length))
      assert window <= got[b][h] and len(got[b][h]) == budget
      # Max pooling makes ties; any tie order is the paper's (torch.topk), so compare scores.
      ours = sorted(s[sorted(got[b][h] - window)])
      np.testing.assert_allclose(ours, np.sort(s)[-(budget - w):], rtol=1e-6)


def test_snapkv_pooling_follows_positions_not_slots():
  rng = np.random.default_rng(3)
  s = rng.random((1, 9, 1)).astype(np.float32)
  perm = rng.permutation(9)
  pos = np.where(np.arange(9) < 7, perm, -1)[None, :, None].astype(np.int32)       # 2 empty slots
  got = np.asarray(pool_by_position(jnp.asarray(s), jnp.asarray(pos), 3, "max"))[0, :, 0]
  order = np.argsort(pos[0, :7, 0])                   # neighbours are the next kept positions
  want = np.empty(7)
  want[order] = np_pool(s[0, order, 0], 3, "max")
  np.testing.assert_allclose(got[:7], want, rtol=0, atol=0)


def test_snapkv_decoding_keeps_new_tokens_and_drops_low_scored_prompt_tokens():
  q, k, v = data(4, 20)
  cache = EvictingKVCache.create(B, HKV, D, policy=SnapKVPolicy(window=2, kernel=3), budget=8, max_chunk=12)
  c12, _ = run(cache, q[:, :12], k[:, :12], v[:, :12], prefill=12)
  prompt_kept = kept_sets(c12)
  c20, _ = run(cache, q, k, v, prefill=12)
  got = kept_sets(c20)
  for b in range(B):
    for h in range(HKV):
      assert set(range(12, 20)) <= got[b][h] | set(range(12, 13))   # newest decoded tokens kept
      assert got[b][h] - set(range(12, 20)) <= prompt_kept[b][h]


def test_budget_at_least_the_length_equals_dense():
  q, k, v = data(5, 16)
  dense, want = run(DenseKVCache.create(B, 16, HKV, D), q, k, v, prefill=8)
  for policy in (H2OPolicy(window=2), TOVAPolicy(), SnapKVPolicy(window=2)):
    cache = EvictingKVCache.create(B, HKV, D, policy=policy, budget=16, max_chunk=8)
    _, got = run(cache, q, k, v, prefill=8)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_per_head_budgets_and_memory():
  q, k, v = data(6, 18)
  cache = EvictingKVCache.create(B, HKV, D, policy=H2OPolicy(window=2), budget=(4, 9), max_chunk=6)
  cache, _ = run(cache, q, k, v, prefill=6)
  got = kept_sets(cache)
  for b in range(B):
    assert len(got[b][0]) == 4 and len(got[b][1]) == 9
    for h, budget in ((0, 4), (1, 9)):
      assert got[b][h] == np_h2o(q[b, :, h * G:(h + 1) * G], k[b, :, h], budget, 2, 6)
  per_slot = 2 * D * 4 + 8
  assert cache.memory_bytes() == B * ((4 + 6) + (9 + 6)) * per_slot + B * 4
  assert cache.allocated_bytes() > cache.memory_bytes()


def test_attend_reads_exactly_the_kept_tokens():
  q, k, v = data(7, 14)
  cache = EvictingKVCache.create(B, HKV, D, policy=H2OPolicy(window=2), budget=5, max_chunk=8)
  cache, outs = run(cache, q, k, v, prefill=8)
  kept = [[sorted(x) for x in row] for row in kept_sets(cache)]
  # The last step attended the cache as it was after its update: budget tokens plus the new one.
  pos = np.asarray(cache.pos)
  for b in range(B):
    for hq in range(HQ):
      h = hq // G
      slots = [c for c in range(pos.shape[1]) if pos[b, c, h] >= 0]
      kp = pos[b, slots, h]
      want = np_attend(q[b, -1, hq], k[b, kp, h], v[b, kp, h], kp, 13)
      np.testing.assert_allclose(outs[b, -1, hq], want, atol=1e-5, rtol=1e-5)
  assert all(len(x) == 5 for row in kept for x in row)


def test_bad_arguments_are_value_errors():
  with pytest.raises(ValueError, match="sinks"):
    EvictingKVCache.create(B, HKV, D, policy=H2OPolicy(sinks=2, window=4), budget=5)
  with pytest.raises(ValueError, match="per KV head"):
    EvictingKVCache.create(B, HKV, D, policy=H2OPolicy(), budget=(4, 4, 4))
  cache = EvictingKVCache.create(B, HKV, D, policy=H2OPolicy(), budget=4, max_chunk=2)
  q, k, v = data(8, 3)
  with pytest.raises(ValueError, match="max_chunk"):
    cache.update(k, v, q=q)
  with pytest.raises(ValueError, match="pass q="):
    cache.update(k[:, :1], v[:, :1])


def test_pyramid_budgets_follow_the_papers_schedule():
  got = pyramid_budgets(64, 8, beta=20)
  total = 64 * 8
  top = total / (20 * 8)
  bottom = 2 * total / 8 - top
  assert got == tuple(int(bottom - (bottom - top) * l / 7) for l in range(8))
  assert all(a >= b for a, b in zip(got, got[1:])) and abs(sum(got) - total) <= 8
  assert min(pyramid_budgets(64, 8, beta=20, minimum=10)) == 10


def test_razor_keeps_retrieval_heads_whole_and_compensates_the_others():
  q, k, v = data(9, 16)
  sinks, window = 2, 3
  cache = RazorKVCache.create(B, HKV, D, capacity=16, sinks=sinks, window=window, retrieval_heads=(1,), max_chunk=8)
  _, outs = run(cache, q, k, v, prefill=8)
  for b in range(B):
    for t in (12, 15):                      # decode steps: cache holds sinks + window, plus the new token
      for hq in range(HQ):
        h = hq // G
        if h == 1:
          kp = np.arange(t + 1)
          want = np_attend(q[b, t, hq], k[b, kp, h], v[b, kp, h], kp, t)
        else:
          kept = np.array(sorted(set(range(sinks)) | set(range(t - window, t + 1))))
          dropped = np.setdiff1d(np.arange(t), kept)
          kk = np.concatenate([k[b, kept, h], k[b, dropped, h].mean(0, keepdims=True)])
          vv = np.concatenate([v[b, kept, h], v[b, dropped, h].mean(0, keepdims=True)])
          want = np_attend(q[b, t, hq], kk, vv, np.append(kept, 0), t)
        np.testing.assert_allclose(outs[b, t, hq], want, atol=1e-5, rtol=1e-5)


def test_ragged_prefill_scores_real_queries_at_their_positions():
  # Sequence 1 writes only 9 of the 12 prefill tokens (num_new); the model passes q unshifted.
  q, k, v = data(10, 16)
  cache = EvictingKVCache.create(B, HKV, D, policy=H2OPolicy(window=2), budget=6, max_chunk=12)
  cache = cache.update(k[:, :12], v[:, :12], q=q[:, :12], num_new=jnp.array([12, 9]))
  for t in range(12, 16):
    cache = cache.update(k[:, t:t + 1], v[:, t:t + 1], q=q[:, t:t + 1])
  got = kept_sets(cache)
  idx = {0: np.arange(16), 1: np.r_[0:9, 12:16]}          # the tokens each sequence really wrote
  for b in range(B):
    for h in range(HKV):
      want = np_h2o(q[b, idx[b], h * G:(h + 1) * G], k[b, idx[b], h], 6, 2, 12 if b == 0 else 9)
      assert got[b][h] == want, (b, h)
