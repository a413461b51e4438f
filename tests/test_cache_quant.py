"""Quantized caches (KIVI int8/int4/int2, GEAR low-rank residual, MiKV mixed precision) against
NumPy re-implementations on random inputs: the same codes, the same quantization error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.cache import DenseKVCache, KIVIKVCache, MiKVCache
from lcjax.cache import quant

B, HQ, HKV, D = 2, 4, 2, 16
CAP, GS = 48, 8


def np_quant(x, bits, axis):
  """KIVI's asymmetric quantization with float16 scale/zero -> dequantized float32."""
  lo, hi = x.min(axis, keepdims=True), x.max(axis, keepdims=True)
  scale = ((hi - lo) / (2 ** bits - 1)).astype(np.float16).astype(np.float32)
  zero = lo.astype(np.float16).astype(np.float32)
  codes = np.clip(np.round((x - zero) / np.where(scale > 0, scale, 1.0)), 0, 2 ** bits - 1)
  return codes * scale + zero


def np_kivi(k, v, length, bits, residual, rank=0):
  """KIVI for one sequence: keys per channel over groups of GS tokens, values per token over
  groups of GS channels, the last `residual` tokens (rounded to whole groups) in full precision."""
  qb = max(length - residual, 0) // GS * GS
  kd, vd = k[:length].copy(), v[:length].copy()
  for g0 in range(0, qb, GS):
    kg, vg = k[g0:g0 + GS], v[g0:g0 + GS]                              # [GS, H, D]
    kq = np_quant(kg, bits, 0)
    vq = np_quant(vg.reshape(GS, HKV, D // GS, GS), bits, -1).reshape(vg.shape)
    if rank:                                                           # GEAR: truncated SVD of the error
      for x, xq in ((kg, kq), (vg, vq)):
        for h in range(HKV):
          u, s, vt = np.linalg.svd(x[:, h] - xq[:, h], full_matrices=False)
          xq[:, h] += (u[:, :rank] * s[:rank]) @ vt[:rank]
    kd[g0:g0 + GS], vd[g0:g0 + GS] = kq, vq
  return kd, vd, qb


def feed(cache, k, v, chunks):
  upd = jax.jit(lambda c, a, b: c.update(a, b))
  s = 0
  for n in chunks:
    cache = upd(cache, k[:, s:s + n], v[:, s:s + n])
    s += n
  return cache


@pytest.mark.parametrize("bits,rank", [(8, 0), (4, 0), (2, 0), (4, 2)])
def test_kivi_matches_numpy_quantization(bits, rank):
  rng = np.random.default_rng(bits + rank)
  k = rng.standard_normal((B, 40, HKV, D)).astype(np.float32)
  v = rng.standard_normal((B, 40, HKV, D)).astype(np.float32)
  k[..., 3] *= 8.0                                                     # an outlier channel
  cache = KIVIKVCache.create(B, CAP, HKV, D, bits=bits, group_size=GS, residual=10, max_chunk=12, rank=rank)
  cache = feed(cache, k, v, [12, 5, 1, 1, 9, 12])
  kd, vd = map(np.asarray, cache.dequantized())
  for b in range(B):
    want_k, want_v, qb = np_kivi(k[b], v[b], 40, bits, 10, rank)
    assert int(cache.quantized_len(cache.lengths)[b]) == qb == 24
    np.testing.assert_allclose(kd[b, :40], want_k, atol=2e-5)
    np.testing.assert_allclose(vd[b, :40], want_v, atol=2e-5)
  err = np.abs(kd[:, :24] - k[:, :24]).max()
  assert 0 < err <= np.ptp(k) / (2 ** bits - 1)          # within one quantization step


def test_kivi_attend_and_memory():
  rng = np.random.default_rng(5)
  k, v = (rng.standard_normal((B, 33, HKV, D)).astype(np.float32) for _ in range(2))
  q = rng.standard_normal((B, 1, HQ, D)).astype(np.float32)
  cache = feed(KIVIKVCache.create(B, CAP, HKV, D, bits=4, group_size=GS, residual=8, max_chunk=16), k, v, [16, 16, 1])
  kd, vd = cache.dequantized(1)
  dense = DenseKVCache.create(B, CAP, HKV, D).update(kd[:, :33], vd[:, :33])
  np.testing.assert_allclose(cache.attend(q), dense.attend(q), atol=1e-5)
  bytes_codes = 2 * B * CAP * HKV * D // 2
  bytes_scales = 2 * 2 * (B * CAP // GS * HKV * D + B * CAP * HKV * D // GS)
  bytes_ring = 2 * 4 * B * (8 + GS + 16) * HKV * D
  assert cache.memory_bytes() == bytes_codes + bytes_scales + bytes_ring + 4 * B


def test_kivi_overflow_is_nan_not_silent():
  rng = np.random.default_rng(6)
  k, v = (rng.standard_normal((B, 20, HKV, D)).astype(np.float32) for _ in range(2))
  cache = feed(KIVIKVCache.create(B, 16, HKV, D, group_size=GS, residual=4, max_chunk=10), k, v, [10, 10])
  assert np.isnan(np.asarray(cache.attend(jnp.ones((B, 1, HQ, D))))).all()
  with pytest.raises(ValueError, match="group_size"):
    KIVIKVCache.create(B, 20, HKV, D, group_size=GS)
  with pytest.raises(ValueError, match="bits"):
    KIVIKVCache.create(B, CAP, HKV, D, bits=3, group_size=GS)


def test_pack_roundtrip():
  rng = np.random.default_rng(7)
  for bits in (2, 4, 8):
    codes = jnp.asarray(rng.integers(0, 2 ** bits, (3, 16)), jnp.uint8)
    packed = quant.pack(codes, bits)
    assert packed.shape == (3, 16 * bits // 8)
    np.testing.assert_array_equal(quant.unpack(packed, bits), codes)


def test_mikv_keeps_evicted_tokens_at_low_precision():
  rng = np.random.default_rng(8)
  t_all, budget = 20, 6
  q = rng.standard_normal((B, t_all, HQ, D)).astype(np.float32) * 2
  k, v = (rng.standard_normal((B, t_all, HKV, D)).astype(np.float32) for _ in range(2))
  cache = MiKVCache.create(B, CAP, HKV, D, budget=budget, window=2, bits=4, group_size=GS, max_chunk=8)
  step = jax.jit(lambda c, a, b, qq: c.update(a, b, q=qq))
  cache = step(cache, k[:, :8], v[:, :8], q[:, :8])
  for t in range(8, t_all):
    cache = step(cache, k[:, t:t + 1], v[:, t:t + 1], q[:, t:t + 1])
  held = np.asarray(cache.held)
  pos = np.asarray(cache.inner.pos)
  k_low, v_low = map(np.asarray, cache.low_precision())
  for b in range(B):
    for h in range(HKV):
      high = set(pos[b, :, h][pos[b, :, h] >= 0].tolist())
      low = set(np.nonzero(held[b, :, h])[0].tolist())
      assert high.isdisjoint(low) and high | low == set(range(t_all)), (b, h)     # no token left behind
      for p in low:
        want_k = np_quant(k[b, p, h].reshape(D // GS, GS), 4, -1).reshape(D)
        np.testing.assert_allclose(k_low[b, p, h], want_k, atol=2e-5)
        want_v = np_quant(v[b, p, h].reshape(D // GS, GS), 4, -1).reshape(D)
        np.testing.assert_allclose(v_low[b, p, h], want_v, atol=2e-5)
  # attention reads high-precision slots plus the low-precision ones: compare with NumPy.
  out = np.asarray(cache.attend(q[:, -1:]))
  for b in range(B):
    for hq in range(HQ):
      h = hq // (HQ // HKV)
      kk = np.stack([k[b, p, h] if p in set(pos[b, :, h].tolist()) else k_low[b, p, h] for p in range(t_all)])
      vv = np.stack([v[b, p, h] if p in set(pos[b, :, h].tolist()) else v_low[b, p, h] for p in range(t_all)])
      s = kk @ q[b, -1, hq] * D ** -0.5
      w = np.exp(s - s.max())
      np.testing.assert_allclose(out[b, 0, hq], (w / w.sum()) @ vv, atol=1e-5)
