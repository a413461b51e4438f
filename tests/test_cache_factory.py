"""CacheConfig + make_caches: every policy builds, runs under jit, and reports its memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.cache import POLICIES, CacheConfig, DenseKVCache, EvictingKVCache, make_caches, pyramid_budgets
from lcjax.cache.factory import layer_budget

B, HQ, HKV, D, L, CAP = 2, 4, 2, 16, 2, 64


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_prefills_decodes_and_saves_memory(policy):
  cfg = CacheConfig(policy=policy, budget=16, window=4, sinks=2, obs_window=4, max_chunk=8, bits=4,
                    group_size=8, residual=8, block_size=8, top_blocks=1, retrieval_heads=((0,), ()))
  caches = make_caches(cfg, num_layers=L, kv_heads=HKV, head_dim=D, batch=B, capacity=CAP)
  assert len(caches) == L
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((B, 40, HQ, D)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((B, 40, HKV, D)), jnp.float32) for _ in range(2))
  step = jax.jit(lambda c, a, b, qq: (lambda c2: (c2, c2.attend(qq)))(c.update(a, b, q=qq)))
  c = caches[1]
  for s in range(0, 32, 8):                                           # chunked prefill
    c, out = step(c, k[:, s:s + 8], v[:, s:s + 8], q[:, s:s + 8])
  for s in range(32, 40):                                             # decode
    c, out = step(c, k[:, s:s + 1], v[:, s:s + 1], q[:, s:s + 1])
  assert out.shape == (B, 1, HQ, D) and np.isfinite(np.asarray(out)).all()
  np.testing.assert_array_equal(c.lengths, [40, 40])
  dense = DenseKVCache.create(B, CAP, HKV, D).memory_bytes()
  if policy in ("window", "streaming", "h2o", "tova", "snapkv", "pyramidkv", "think", "kivi", "linear"):
    assert c.memory_bytes() < dense, (policy, c.memory_bytes(), dense)


def test_budgets_per_layer_per_head_schedule_and_clamp():
  cfg = CacheConfig(policy="h2o", budget=32, window=4)
  assert layer_budget(cfg, 0, 4, HKV, capacity=20) == 20                       # clamped to capacity
  cfg = CacheConfig(policy="h2o", layer_budgets=(8, 12), window=4)
  assert [layer_budget(cfg, l, 2, HKV, CAP) for l in range(2)] == [8, 12]
  cfg = CacheConfig(policy="h2o", head_budgets=((8, 16), (4, 6)), window=2)
  caches = make_caches(cfg, num_layers=2, kv_heads=HKV, head_dim=D, batch=B, capacity=CAP)
  assert caches[0].budgets == (8, 16) and caches[1].budgets == (4, 6)
  cfg = CacheConfig(policy="pyramidkv", budget=32, obs_window=4, sinks=0)
  got = [layer_budget(cfg, l, 4, HKV, CAP) for l in range(4)]
  assert got == list(pyramid_budgets(32, 4, minimum=4))
  with pytest.raises(ValueError, match="layer_budgets"):
    layer_budget(CacheConfig(layer_budgets=(1,)), 0, 2, HKV, CAP)


def test_config_errors_and_cla():
  with pytest.raises(ValueError, match="policy"):
    CacheConfig(policy="nope")
  with pytest.raises(ValueError, match="budget"):
    CacheConfig(budget=0)
  with pytest.raises(ValueError, match="channel_keep"):
    CacheConfig(channel_keep=0.0)
  cfg = CacheConfig(policy="h2o", layer_budgets=(8, 9, 10, 11), window=2)
  caches = make_caches(cfg, num_layers=4, kv_heads=HKV, head_dim=D, batch=B, capacity=CAP, cla_share=2)
  assert [c is None for c in caches] == [False, True, False, True]
  assert [c.budgets[0] for c in caches if c is not None] == [8, 10]          # the owner layer's budget
  with pytest.raises(ValueError, match="cla_share=0"):
    make_caches(CacheConfig(), num_layers=4, kv_heads=HKV, head_dim=D, batch=B, capacity=CAP, cla_share=0)
  assert isinstance(make_caches(CacheConfig(policy="minicache"), num_layers=2, kv_heads=HKV, head_dim=D, batch=B,
                                capacity=CAP)[1], DenseKVCache)               # merged by generate later
  assert isinstance(make_caches(CacheConfig(policy="tova", budget=8, window=0), num_layers=1, kv_heads=HKV,
                                head_dim=D, batch=B, capacity=CAP)[0], EvictingKVCache)
