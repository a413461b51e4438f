"""KIVIKernelCache: KIVI in the quantised decode kernel's layout, against an independent
whole-cache construction, and its kernel path (interpret mode) against its XLA path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.attention import masks
from lcjax.attention.reference import attention_reference
from lcjax.cache import CacheConfig, KIVIKernelCache, make_caches
from pallas_kernels.gpu import decode_quant

B, HQ, HKV, D, CAP, GS, RES = 2, 8, 2, 32, 128, 16, 16


def _rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _data(seed, n):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  return f(B, n, HQ, D), f(B, n, HKV, D), f(B, n, HKV, D)


def _feed(cache, k, v, chunks, q, implementation="xla"):
  """Writes k, v in chunks of the given sizes; returns the cache and the last chunk's attend."""
  s = 0
  for t in chunks:
    cache = cache.update(k[:, s:s + t], v[:, s:s + t])
    s += t
  return cache, cache.attend(q[:, s - chunks[-1]:s], implementation=implementation)


def _expected(q, k, v, length, t, bits, value_group):
  """KIVI's rule built from the whole prefix at once: positions below
  qb = min(floor((length - RES) / GS) * GS, length - t) dequantised from one quantize_kv call over
  the whole capacity, the rest at full precision; causal attention of the last t queries."""
  pad = lambda x: jnp.pad(x[:, :length], ((0, 0), (0, CAP - length), (0, 0), (0, 0)))
  kd, vd = decode_quant.dequantize_kv(decode_quant.quantize_kv(
      pad(k), pad(v), bits=bits, key_group=GS, value_group=value_group))
  qb = min(max(length - RES, 0) // GS * GS, length - t)
  old = (jnp.arange(CAP) < qb)[None, :, None, None]
  kk, vv = jnp.where(old, kd, pad(k)), jnp.where(old, vd, pad(v))
  lengths = jnp.full((B,), length, jnp.int32)
  return attention_reference(q[:, length - t:length], kk, vv, mask=masks.causal(), q_offset=lengths - t,
                             kv_valid_len=lengths)


@pytest.mark.parametrize("bits,value_group", [(8, 16), (4, 16), (4, 32)])
@pytest.mark.parametrize("chunks", [(24, 24, 1, 1), (40, 9, 1), (5, 1)])
def test_xla_path_matches_whole_cache_quantisation(bits, value_group, chunks):
  q, k, v = _data(0, CAP)
  cache = KIVIKernelCache.create(B, CAP, HKV, D, bits=bits, group_size=GS, value_group=value_group,
                                 residual=RES, max_chunk=max(chunks))
  cache, out = _feed(cache, k, v, chunks, q)
  want = _expected(q, k, v, sum(chunks), chunks[-1], bits, value_group)
  assert _rel(out, want) < 1e-5


@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_path_matches_xla_path(bits):
  """Decode steps (one and two tokens) on the Pallas kernel in interpret mode: float32 queries
  take exact dots; bf16 queries with int8 dots are within the GPU test's bound."""
  q, k, v = _data(1, CAP)
  cache = KIVIKernelCache.create(B, CAP, HKV, D, bits=bits, group_size=GS, residual=RES, max_chunk=64)
  cache, _ = _feed(cache, k, v, (64, 33), q)
  for t in (1, 2):
    qq = q[:, 97 - t:97]
    ref = cache.attend(qq, implementation="xla")
    assert cache.kernel_unsupported_reason(qq) is None
    assert _rel(cache.attend(qq, implementation="pallas"), ref) < 1e-5
    q16 = qq.astype(jnp.bfloat16)
    assert _rel(cache.attend(q16, implementation="pallas"), ref) < 3e-2


def test_jit_factory_overflow_and_errors():
  q, k, v = _data(2, CAP + 8)
  cfg = CacheConfig(policy="kivi_kernel", bits=4, group_size=GS, value_group=D, residual=RES, max_chunk=8)
  cache = make_caches(cfg, num_layers=1, kv_heads=HKV, head_dim=D, batch=B, capacity=CAP)[0]
  assert isinstance(cache, KIVIKernelCache) and cache.store.value_group == D
  step = jax.jit(lambda c, a, b_, qq, n: (lambda c2: (c2, c2.attend(qq)))(c.update(a, b_, num_new=n)))
  for s in range(0, CAP + 8, 8):                  # sequence 0 overflows, sequence 1 stops at CAP
    n = jnp.array([8, 8 if s < CAP else 0], jnp.int32)
    cache, out = step(cache, k[:, s:s + 8], v[:, s:s + 8], q[:, s:s + 8], n)
  assert np.isnan(np.asarray(out[0])).all() and np.isfinite(np.asarray(out[1])).all()
  # int4 codes, float16 key scale + zero per (group, channel), value scale + zero per token, the
  # float32 ring of residual + group + max_chunk tokens, the lengths.
  codes, key_scales = 2 * B * CAP * HKV * D // 2, 2 * B * (CAP // GS) * HKV * D * 2
  value_scales, ring = 2 * B * HKV * CAP * 2, 2 * B * (RES + GS + 8) * HKV * D * 4
  assert cache.memory_bytes() == codes + key_scales + value_scales + ring + B * 4
  with pytest.raises(ValueError, match="bits=2"):
    KIVIKernelCache.create(B, CAP, HKV, D, bits=2, group_size=GS)
  with pytest.raises(ValueError, match="value_group=24"):
    KIVIKernelCache.create(B, CAP, HKV, D, bits=4, group_size=GS, value_group=24)
  with pytest.raises(ValueError, match="group_size=48"):
    KIVIKernelCache.create(B, CAP, HKV, D, group_size=48)
  with pytest.raises(ValueError, match="max_chunk"):
    KIVIKernelCache.create(B, CAP, HKV, D, group_size=GS).update(k[:, :2], v[:, :2])
