"""Quest (per-block min/max bounds) and the landmark block store against NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.cache import DenseKVCache, LandmarkKVCache, QuestKVCache

B, HQ, HKV, D = 2, 4, 2, 8
CAP, BS = 48, 4


def np_block_attention(q, k, v, t, blocks, block_size):
  """One query q [D] at position t over the tokens of `blocks` (positions <= t) -> [D]."""
  idx = np.array([p for n in sorted(blocks) for p in range(n * block_size, (n + 1) * block_size) if p <= t])
  s = k[idx] @ q * D ** -0.5
  w = np.exp(s - s.max())
  return (w / w.sum()) @ v[idx]


def np_select(scores, t, top, local):
  """Blocks read by a query at position t: `local` most recent plus the `top` best others."""
  last = t // BS
  loc = set(range(max(last - local + 1, 0), last + 1))
  others = [n for n in np.argsort(-scores) if n <= last and n not in loc]
  return loc | set(int(n) for n in others[:top])


def np_quest_scores(q, k, t):
  n_blocks = t // BS + 1
  out = np.full(CAP // BS, -np.inf)
  for n in range(n_blocks):
    kb = k[n * BS:min((n + 1) * BS, t + 1)]
    out[n] = np.maximum(q * kb.min(0), q * kb.max(0)).sum()
  return out


def np_landmark_scores(q, k, t):
  out = np.full(CAP // BS, -np.inf)
  for n in range(t // BS + 1):
    out[n] = q @ k[n * BS:min((n + 1) * BS, t + 1)].mean(0)
  return out


@pytest.mark.parametrize("cls,np_scores", [(QuestKVCache, np_quest_scores), (LandmarkKVCache, np_landmark_scores)])
def test_block_selection_and_attention_match_numpy(cls, np_scores):
  rng = np.random.default_rng(0)
  t_all, top, local = 30, 2, 1
  q = rng.standard_normal((B, t_all, HQ, D)).astype(np.float32) * 2
  k, v = (rng.standard_normal((B, t_all, HKV, D)).astype(np.float32) for _ in range(2))
  cache = cls.create(B, CAP, HKV, D, block_size=BS, top_blocks=top, local_blocks=local)
  dense = DenseKVCache.create(B, CAP, HKV, D)
  cache, dense = cache.update(k[:, :20], v[:, :20]), dense.update(k[:, :20], v[:, :20])
  np.testing.assert_allclose(cache.attend(q[:, :20]), dense.attend(q[:, :20]), atol=1e-6)  # prefill: dense
  step = jax.jit(lambda c, a, b, qq: (lambda c2: (c2, c2.attend(qq), c2.selected_blocks(qq)))(c.update(a, b)))
  for t in range(20, t_all):
    cache, out, chosen = step(cache, k[:, t:t + 1], v[:, t:t + 1], q[:, t:t + 1])
    for b in range(B):
      for hq in range(HQ):
        h = hq // (HQ // HKV)
        want_blocks = np_select(np_scores(q[b, t, hq], k[b, :, h], t), t, top, local)
        assert set(np.nonzero(np.asarray(chosen[b, hq]))[0].tolist()) == want_blocks, (t, b, hq)
        want = np_block_attention(q[b, t, hq], k[b, :, h], v[b, :, h], t, want_blocks, BS)
        np.testing.assert_allclose(out[b, 0, hq], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls,np_scores", [(QuestKVCache, np_quest_scores), (LandmarkKVCache, np_landmark_scores)])
def test_kv_head_selection_shares_the_group_best_blocks(cls, np_scores):
  # select_per="kv_head": one block set per KV head, by the largest score over its query heads.
  rng = np.random.default_rng(3)
  t, top, local, group = 29, 2, 1, HQ // HKV
  q = rng.standard_normal((B, 1, HQ, D)).astype(np.float32) * 2
  k, v = (rng.standard_normal((B, t + 1, HKV, D)).astype(np.float32) for _ in range(2))
  cache = cls.create(B, CAP, HKV, D, block_size=BS, top_blocks=top, local_blocks=local,
                     select_per="kv_head").update(k, v)
  chosen, out = cache.selected_blocks(q), cache.attend(q)
  assert chosen.shape == (B, HKV, CAP // BS)
  for b in range(B):
    for h in range(HKV):
      heads = range(h * group, (h + 1) * group)
      scores = np.max([np_scores(q[b, 0, hq], k[b, :, h], t) for hq in heads], axis=0)
      want_blocks = np_select(scores, t, top, local)
      assert set(np.nonzero(np.asarray(chosen[b, h]))[0].tolist()) == want_blocks, (b, h)
      for hq in heads:
        want = np_block_attention(q[b, 0, hq], k[b, :, h], v[b, :, h], t, want_blocks, BS)
        np.testing.assert_allclose(out[b, 0, hq], want, atol=1e-5, rtol=1e-5)


def test_block_lists_are_ascending_padded_and_match_the_mask():
  from lcjax.cache.block_retrieval import lists_to_mask, select_block_lists
  rng = np.random.default_rng(2)
  nb, top, local = 12, 3, 2
  scores = jnp.asarray(rng.standard_normal((4, 2, nb)), jnp.float32)
  lengths = jnp.array([45, 9, 1, 0])  # 12, 3, 1 and 0 written blocks of 4
  idx, cnt = select_block_lists(scores, lengths, BS, top, local)
  assert idx.shape == (4, 2, top + local)
  np.testing.assert_array_equal(cnt, [[5, 5], [3, 3], [1, 1], [0, 0]])
  mask = lists_to_mask(idx, cnt, nb)
  for b, n_written in enumerate([12, 3, 1, 0]):
    for h in range(2):
      c = int(cnt[b, h])
      row = np.asarray(idx[b, h])
      assert np.all(np.diff(row[:c]) > 0) and np.all(row[c:] == (row[c - 1] if c else row[c:]))
      if n_written:
        want = np_select(np.where(np.arange(nb) < n_written, np.asarray(scores[b, h]), -np.inf),
                         int(lengths[b]) - 1, top, local)
        assert set(row[:c].tolist()) == want, (b, h)
      assert set(np.nonzero(np.asarray(mask[b, h]))[0].tolist()) == set(row[:c].tolist())


def test_quest_reads_everything_when_top_blocks_cover_the_sequence():
  rng = np.random.default_rng(1)
  q = rng.standard_normal((B, 1, HQ, D)).astype(np.float32)
  k, v = (rng.standard_normal((B, 17, HKV, D)).astype(np.float32) for _ in range(2))
  cache = QuestKVCache.create(B, CAP, HKV, D, block_size=BS, top_blocks=CAP // BS).update(k, v)
  dense = DenseKVCache.create(B, CAP, HKV, D).update(k, v)
  np.testing.assert_allclose(cache.attend(q), dense.attend(q), atol=1e-6)
  assert cache.memory_bytes() == dense.memory_bytes() + 2 * B * (CAP // BS) * HKV * D * 4


def test_capacity_errors():
  with pytest.raises(ValueError, match="block_size"):
    QuestKVCache.create(B, 30, HKV, D, block_size=BS)
  with pytest.raises(ValueError, match="select_per='group'.*accepted"):
    LandmarkKVCache.create(B, CAP, HKV, D, block_size=BS, select_per="group")
  rng = np.random.default_rng(2)
  k = rng.standard_normal((B, 8, HKV, D)).astype(np.float32)
  cache = LandmarkKVCache.create(B, 8, HKV, D, block_size=BS).update(k, k)
  cache = cache.update(k[:, :1], k[:, :1])                     # the 9th token does not fit
  assert np.isnan(np.asarray(cache.attend(jnp.ones((B, 1, HQ, D))))).all()
