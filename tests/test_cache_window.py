"""Sliding-window ring buffer and StreamingLLM sinks + window against a NumPy mask reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.cache import SinkWindowKVCache

B, HQ, HKV, D = 2, 4, 2, 8


def np_attention(q, k, v, allowed):
  """q [T, Hq, D], k/v [S, Hkv, D], allowed bool [T, S] -> [T, Hq, D]."""
  g = q.shape[1] // k.shape[1]
  kk, vv = np.repeat(k, g, 1), np.repeat(v, g, 1)
  s = np.einsum("thd,shd->hts", q, kk) * D ** -0.5
  s = np.where(allowed[None], s, -np.inf)
  w = np.exp(s - s.max(-1, keepdims=True))
  return np.einsum("hts,shd->thd", w / w.sum(-1, keepdims=True), vv)


@pytest.mark.parametrize("sinks,window,chunks", [(0, 5, [4, 1, 1, 4, 1, 1, 1, 3]), (2, 4, [6, 6, 1, 1, 1, 1])])
def test_ring_buffer_matches_sink_window_mask(sinks, window, chunks):
  rng = np.random.default_rng(sinks)
  t_all = sum(chunks)
  q = rng.standard_normal((B, t_all, HQ, D)).astype(np.float32)
  k, v = (rng.standard_normal((B, t_all, HKV, D)).astype(np.float32) for _ in range(2))
  cache = SinkWindowKVCache.create(B, HKV, D, window=window, sinks=sinks, max_chunk=max(chunks))
  assert cache.k.shape[1] == sinks + window + max(chunks) - 1
  i, j = np.arange(t_all)[:, None], np.arange(t_all)[None]
  allowed = (j <= i) & ((i - j < window) | (j < sinks))
  s = 0
  for n in chunks:
    cache = cache.update(k[:, s:s + n], v[:, s:s + n])
    got = np.asarray(cache.attend(q[:, s:s + n]))
    for b in range(B):
      want = np_attention(q[b, s:s + n], k[b], v[b], allowed[s:s + n])
      np.testing.assert_allclose(got[b], want, atol=1e-5, rtol=1e-5)
    s += n
  assert cache.memory_bytes() == 2 * B * cache.k.shape[1] * HKV * D * 4 + B * cache.k.shape[1] * 4 + B * 4


def test_ragged_num_new_and_jit():
  rng = np.random.default_rng(3)
  k, v = (rng.standard_normal((B, 3, HKV, D)).astype(np.float32) for _ in range(2))
  cache = SinkWindowKVCache.create(B, HKV, D, window=4, sinks=1, max_chunk=3)
  cache = jax.jit(lambda c: c.update(k, v, num_new=jnp.array([3, 1])))(cache)
  np.testing.assert_array_equal(cache.lengths, [3, 1])
  pos = np.asarray(cache.pos)
  assert sorted(pos[0][pos[0] >= 0]) == [0, 1, 2] and sorted(pos[1][pos[1] >= 0]) == [0]


def test_chunk_larger_than_max_chunk_is_an_error():
  cache = SinkWindowKVCache.create(B, HKV, D, window=4, max_chunk=2)
  with pytest.raises(ValueError, match="max_chunk"):
    cache.update(jnp.ones((B, 3, HKV, D)), jnp.ones((B, 3, HKV, D)))
  with pytest.raises(ValueError, match="window"):
    SinkWindowKVCache.create(B, HKV, D, window=0)
