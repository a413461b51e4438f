"""KV merging, ThinK channel pruning and the linear-attention state against NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.attention.linear import elu_plus_one, naive_linear_attention
from lcjax.cache import DenseKVCache, LinearStateCache, MergingKVCache, ThinKKVCache

B, HQ, HKV, D = 2, 4, 2, 8
G = HQ // HKV


def np_merge(k, v, threshold):
  """Greedy merging of consecutive similar keys for one (sequence, head): k, v [T, D]."""
  slots = []                                      # [mean k, mean v, count, last position]
  for t in range(len(k)):
    cos = k[t] @ k[t - 1] / np.linalg.norm(k[t]) / np.linalg.norm(k[t - 1]) if t else -2.0
    if slots and cos > threshold:
      mk, mv, n, _ = slots[-1]
      slots[-1] = [(mk * n + k[t]) / (n + 1), (mv * n + v[t]) / (n + 1), n + 1, t]
    else:
      slots.append([k[t], v[t], 1, t])
  return slots


def test_merging_matches_numpy_greedy_merge():
  rng = np.random.default_rng(0)
  t_all = 24
  steps = rng.standard_normal((B, t_all, HKV, D)).astype(np.float32)
  jump = rng.random((B, t_all, HKV, 1)) < 0.3                  # runs of similar keys, then a jump
  k = np.cumsum(np.where(jump, 3.0, 0.25) * steps, 1).astype(np.float32)
  v = rng.standard_normal((B, t_all, HKV, D)).astype(np.float32)
  q = rng.standard_normal((B, 1, HQ, D)).astype(np.float32)
  cache = MergingKVCache.create(B, 32, HKV, D, threshold=0.9)
  upd = jax.jit(lambda c, a, b: c.update(a, b))
  cache = upd(cache, k[:, :10], v[:, :10])
  for t in range(10, t_all):
    cache = upd(cache, k[:, t:t + 1], v[:, t:t + 1])
  out = np.asarray(cache.attend(q))
  merged_any = False
  for b in range(B):
    for h in range(HKV):
      slots = np_merge(k[b, :, h], v[b, :, h], 0.9)
      n = len(slots)
      merged_any |= n < t_all
      assert int(cache.num_slots[b, h]) == n
      np.testing.assert_allclose(cache.k[b, :n, h], np.stack([s[0] for s in slots]), atol=1e-5)
      np.testing.assert_allclose(cache.count[b, :n, h], [s[2] for s in slots])
      np.testing.assert_array_equal(cache.pos[b, :n, h], [s[3] for s in slots])
      for hq in range(h * G, (h + 1) * G):
        logit = np.stack([s[0] for s in slots]) @ q[b, 0, hq] * D ** -0.5 + np.log([s[2] for s in slots])
        w = np.exp(logit - logit.max())
        np.testing.assert_allclose(out[b, 0, hq], (w / w.sum()) @ np.stack([s[1] for s in slots]), atol=1e-5)
  assert merged_any


def test_merging_duplicates_is_exact_and_overflow_is_nan():
  rng = np.random.default_rng(1)
  k, v = (rng.standard_normal((B, 6, HKV, D)).astype(np.float32) for _ in range(2))
  k3, v3 = np.repeat(k, 3, 1), np.repeat(v, 3, 1)                     # every token three times
  q = rng.standard_normal((B, 1, HQ, D)).astype(np.float32)
  cache = MergingKVCache.create(B, 8, HKV, D, threshold=0.9999).update(k3, v3)
  assert (np.asarray(cache.num_slots) == 6).all()
  dense = DenseKVCache.create(B, 18, HKV, D).update(k3, v3)
  np.testing.assert_allclose(cache.attend(q), dense.attend(q), atol=1e-5)
  full = MergingKVCache.create(B, 4, HKV, D, threshold=0.9999).update(k, v)
  assert np.isnan(np.asarray(full.attend(q))).all()


def test_think_prunes_the_channels_of_the_paper_score():
  rng = np.random.default_rng(2)
  t_all, w, keep = 12, 4, 0.5
  q = rng.standard_normal((B, t_all, HQ, D)).astype(np.float32)
  k, v = (rng.standard_normal((B, t_all, HKV, D)).astype(np.float32) for _ in range(2))
  k[..., 1] *= 5.0
  cache = ThinKKVCache.create(B, 16, HKV, D, channel_keep=keep, obs_window=w).update(k[:, :10], v[:, :10], q=q[:, :10])
  cache = cache.update(k[:, 10:11], v[:, 10:11], q=q[:, 10:11])
  cache = cache.update(k[:, 11:], v[:, 11:], q=q[:, 11:])
  out = np.asarray(cache.attend(q[:, 11:]))
  r = int(keep * D)
  for b in range(B):
    for h in range(HKV):
      qn = np.sqrt((q[b, 10 - w:10, h * G:(h + 1) * G] ** 2).sum((0, 1)))
      kn = np.sqrt((k[b, :10, h] ** 2).sum(0))
      ch = np.sort(np.argsort(-(qn * kn))[:r])
      np.testing.assert_array_equal(cache.channels[b, h], ch)
      for hq in range(h * G, (h + 1) * G):
        s = k[b, :, h][:, ch] @ q[b, 11, hq][ch] * D ** -0.5                     # full-width scale
        wts = np.exp(s - s.max())
        np.testing.assert_allclose(out[b, 0, hq], (wts / wts.sum()) @ v[b, :, h], atol=1e-5)
  assert cache.memory_bytes() < DenseKVCache.create(B, 16, HKV, D).memory_bytes()
  with pytest.raises(ValueError, match="pass q="):
    cache.update(k[:, :1], v[:, :1])


def test_linear_state_matches_quadratic_linear_attention():
  rng = np.random.default_rng(3)
  chunks = [5, 5, 1, 1, 3]
  t_all = sum(chunks)
  q = rng.standard_normal((B, t_all, HQ, D)).astype(np.float32)
  k, v = (rng.standard_normal((B, t_all, HKV, D)).astype(np.float32) for _ in range(2))
  want = np.asarray(naive_linear_attention(elu_plus_one(jnp.asarray(q)), elu_plus_one(jnp.asarray(k)), jnp.asarray(v)))
  cache = LinearStateCache.create(B, HKV, D, max_chunk=5)
  s = 0
  for n in chunks:
    cache = cache.update(k[:, s:s + n], v[:, s:s + n])
    np.testing.assert_allclose(cache.attend(q[:, s:s + n]), want[:, s:s + n], atol=1e-5, rtol=1e-5)
    s += n
  assert cache.memory_bytes() == 4 * (B * HKV * D * D + B * HKV * D + 2 * B * 5 * HKV * D + 2 * B)
