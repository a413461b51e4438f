"""MiniCache (cross-layer SLERP merge with token retention) against NumPy; CLA's owner map."""

import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.cache import DenseKVCache, cla_owner, cla_owners
from lcjax.cache.minicache import merge_layer_pair

B, HQ, HKV, D, CAP = 2, 4, 2, 8, 16


def np_slerp(u0, u1, t):
  om = np.arccos(np.clip(u0 @ u1, -1, 1))
  return (np.sin((1 - t) * om) * u0 + np.sin(t * om) * u1) / np.sin(om)


def test_minicache_restores_magnitude_times_slerp_direction_and_retains_distant_tokens():
  rng = np.random.default_rng(0)
  n, t, gamma = 12, 0.6, 0.3
  ka = rng.standard_normal((B, n, HKV, D)).astype(np.float32)
  kb = (ka + 0.4 * rng.standard_normal(ka.shape)).astype(np.float32) * 1.5      # similar next layer
  va = rng.standard_normal((B, n, HKV, D)).astype(np.float32)
  vb = (va + 0.4 * rng.standard_normal(va.shape)).astype(np.float32)
  ca = DenseKVCache.create(B, CAP, HKV, D).update(ka, va)
  cb = DenseKVCache.create(B, CAP, HKV, D).update(kb, vb)
  la, lb = merge_layer_pair(ca, cb, t=t, gamma=gamma, max_retained=CAP, tail=4)
  rka, rva = map(np.asarray, la.restored())
  rkb, _ = map(np.asarray, lb.restored())
  for b in range(B):
    for h in range(HKV):
      dist = {}
      for name, xa, xb in (("k", ka, kb), ("v", va, vb)):
        ua = xa[b, :, h] / np.linalg.norm(xa[b, :, h], axis=-1, keepdims=True)
        ub = xb[b, :, h] / np.linalg.norm(xb[b, :, h], axis=-1, keepdims=True)
        dist[name] = np.arccos(np.clip((ua * ub).sum(-1), -1, 1)) / np.pi
      keep = set()
      for dd in dist.values():
        keep |= set(np.nonzero(dd >= dd.max() - gamma * (dd.max() - dd.min()))[0].tolist())
      assert set(np.asarray(la.ret_pos[b, :, h])[np.asarray(la.ret_pos[b, :, h]) >= 0].tolist()) == keep
      assert 0 < len(keep) < n
      for p in range(n):
        if p in keep:
          np.testing.assert_allclose(rka[b, p, h], ka[b, p, h], atol=1e-6)
          np.testing.assert_allclose(rkb[b, p, h], kb[b, p, h], atol=1e-6)
        else:
          ua, ub = (x[b, p, h] / np.linalg.norm(x[b, p, h]) for x in (ka, kb))
          e = np_slerp(ua, ub, t)
          np.testing.assert_allclose(rka[b, p, h], np.linalg.norm(ka[b, p, h]) * e, atol=1e-5)
          np.testing.assert_allclose(rkb[b, p, h], np.linalg.norm(kb[b, p, h]) * e, atol=1e-5)
  # Decoding continues in the tail; attention equals dense attention over the restored keys.
  k1, v1 = (rng.standard_normal((B, 1, HKV, D)).astype(np.float32) for _ in range(2))
  q = rng.standard_normal((B, 1, HQ, D)).astype(np.float32)
  la = la.update(k1, v1)
  dense = DenseKVCache.create(B, CAP, HKV, D).update(jnp.concatenate([rka[:, :n], k1], 1),
                                                     jnp.concatenate([rva[:, :n], v1], 1))
  np.testing.assert_allclose(la.attend(q), dense.attend(q), atol=1e-5)
  r, tail = CAP, 4
  own = 2 * B * CAP * HKV * 4 + 2 * B * r * HKV * D * 4 + 2 * B * tail * HKV * D * 4 + 2 * B * 4
  shared = 2 * B * CAP * HKV * D * 4 + B * r * HKV * 4
  assert (la.memory_bytes(), lb.memory_bytes()) == (own + shared, own)
  full = la.update(jnp.ones((B, 4, HKV, D)), jnp.ones((B, 4, HKV, D)))       # past merged_len + tail
  assert np.isnan(np.asarray(full.attend(q))).all()


def test_cla_owner_map():
  assert cla_owners(6, 2) == (0, 0, 2, 2, 4, 4)
  assert cla_owners(5, 3) == (0, 0, 0, 3, 3)
  assert cla_owner(4, 1) == 4
  with pytest.raises(ValueError, match="share"):
    cla_owner(1, 0)
