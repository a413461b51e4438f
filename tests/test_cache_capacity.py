"""Capacity edge cases of every policy, the caches inside generate(), and bounded prefill memory.

Issue 6: a budget larger than the capacity, or a cache that fills up, has a defined behaviour
(eviction by the policy, or a clear error / NaN), never silent corruption; compressed caches plug
into generate through make_caches; chunked prefill with an evicting cache keeps peak memory
independent of the prompt length.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.cache import POLICIES, CacheConfig, DenseKVCache, make_caches
from lcjax.models import llama
from lcjax.models.config import ModelConfig
from lcjax.models.generate import _generate, generate

B, HQ, HKV, D, CAP, CH = 2, 4, 2, 16, 32, 8
# Policies whose full cache is a normal state (ring buffer, eviction, recurrent state); every
# other policy holds every token and must flag an overflow (NaN for that sequence).
EVICTS = {"window", "streaming", "h2o", "tova", "snapkv", "pyramidkv", "razor", "linear"}


def _cfg(policy, **kw):
  base = dict(budget=16, window=4, sinks=2, obs_window=4, max_chunk=CH, bits=4, group_size=8, residual=8,
              block_size=8, top_blocks=1, retrieval_heads=((0,),))
  return CacheConfig(policy=policy, **{**base, **kw})


@pytest.mark.parametrize("policy", POLICIES)
def test_writing_past_the_capacity_evicts_or_flags_that_sequence(policy):
  rng = np.random.default_rng(0)
  t = CAP + CH
  q = jnp.asarray(rng.standard_normal((B, t, HQ, D)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((B, t, HKV, D)), jnp.float32) for _ in range(2))
  cache = make_caches(_cfg(policy), num_layers=1, kv_heads=HKV, head_dim=D, batch=B, capacity=CAP)[0]
  step = jax.jit(lambda c, a, b, qq, n: (lambda c2: (c2, c2.attend(qq)))(c.update(a, b, q=qq, num_new=n)))
  # Sequence 0 writes CAP + CH tokens; sequence 1 stops at CAP (its last chunk is padding).
  for s in range(0, t, CH):
    n = jnp.array([CH, CH if s < CAP else 0], jnp.int32)
    cache, out = step(cache, k[:, s:s + CH], v[:, s:s + CH], q[:, s:s + CH], n)
  np.testing.assert_array_equal(cache.lengths, [CAP + CH, CAP])
  out = np.asarray(out)
  if policy in EVICTS:
    assert np.isfinite(out[0]).all(), policy
  else:
    assert np.isnan(out[0]).all(), policy                   # overflowed: loud, not silently wrong
  # The sequence that stayed within the capacity is unaffected by its neighbour's overflow.
  assert np.isfinite(np.asarray(cache.attend(q[:, CAP - 1:CAP]))[1]).all(), policy


def test_dense_overflow_is_nan_and_a_padded_chunk_at_the_end_keeps_earlier_tokens():
  rng = np.random.default_rng(1)
  k, v = (rng.standard_normal((B, 16, HKV, D)).astype(np.float32) for _ in range(2))
  q = rng.standard_normal((B, 1, HQ, D)).astype(np.float32)
  cap = 12
  # 8 tokens, then a chunk of 8 of which only 4 are real: fits exactly; the 4 padding rows fall
  # past the capacity and must be dropped, not shift the write back over tokens 4..7.
  cache = DenseKVCache.create(B, cap, HKV, D).update(k[:, :8], v[:, :8])
  cache = cache.update(k[:, 8:16], v[:, 8:16], num_new=jnp.array([4, 4]))
  want = DenseKVCache.create(B, cap, HKV, D).update(k[:, :12], v[:, :12])
  np.testing.assert_array_equal(cache.k, want.k)
  np.testing.assert_allclose(cache.attend(q), want.attend(q), atol=1e-6)
  over = cache.update(k[:, :1], v[:, :1])                                   # the 13th token
  assert np.isnan(np.asarray(over.attend(q))).all()


def test_budget_above_the_capacity_is_clamped_and_keeps_everything():
  rng = np.random.default_rng(2)
  q = jnp.asarray(rng.standard_normal((B, 24, HQ, D)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((B, 24, HKV, D)), jnp.float32) for _ in range(2))
  dense = DenseKVCache.create(B, 24, HKV, D)
  for policy in ("h2o", "tova", "snapkv", "mikv"):
    cache = make_caches(_cfg(policy, budget=10_000, max_chunk=24), num_layers=1, kv_heads=HKV, head_dim=D,
                        batch=B, capacity=24)[0]
    inner = getattr(cache, "inner", cache)
    assert max(inner.budgets) == 24, policy
    got = cache.update(k, v, q=q).attend(q)
    np.testing.assert_allclose(got, dense.update(k, v).attend(q), atol=1e-5, err_msg=policy)


CFG = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=512)
LOSSLESS = {"h2o": dict(budget=32, window=2), "streaming": dict(budget=32, sinks=2),
            "snapkv": dict(budget=32, obs_window=2), "quest": dict(block_size=2, top_blocks=16),
            "razor": dict(retrieval_heads=((0, 1), (0, 1))),
            "kivi_kernel": dict(group_size=2, residual=32)}      # residual > capacity: nothing quantised


def _caches(policy, batch, capacity, chunk, **kw):
  return make_caches(CacheConfig(policy=policy, max_chunk=chunk, **kw), num_layers=CFG.n_layers,
                     kv_heads=CFG.n_kv_heads, head_dim=CFG.head_dim, batch=batch, capacity=capacity)


def test_generate_with_compressed_caches():
  params = llama.init(jax.random.key(0), CFG)
  prompts = jax.random.randint(jax.random.key(1), (2, 20), 0, CFG.vocab_size)
  lengths = jnp.array([20, 13])
  want = generate(params, CFG, prompts, lengths, 6, key=None, prefill_chunk=8)["tokens"]
  for policy, kw in LOSSLESS.items():                        # lossless settings: the dense tokens
    got = generate(params, CFG, prompts, lengths, 6, key=None, prefill_chunk=8,
                   caches=_caches(policy, 2, 26, 8, **kw))["tokens"]
    np.testing.assert_array_equal(got, want, err_msg=policy)
  # A budget below the prompt length compresses during the chunked prefill and decodes.
  got = generate(params, CFG, prompts, lengths, 6, key=None, prefill_chunk=8,
                 caches=_caches("h2o", 2, 26, 8, budget=6, window=2))
  assert got["tokens"].shape == (2, 6) and ((got["tokens"] >= 0) & (got["tokens"] < CFG.vocab_size)).all()
  with pytest.raises(ValueError, match="max_chunk"):
    generate(params, CFG, prompts, lengths, 6, key=None, prefill_chunk=16, caches=_caches("h2o", 2, 26, 8, budget=6, window=2))


def test_chunked_prefill_peak_memory_does_not_grow_with_the_prompt():
  params = llama.init(jax.random.key(0), CFG)

  def peak(policy, prompt_len):
    caches = _caches(policy, 1, prompt_len + 4, 16, budget=16, window=4)
    compiled = _generate.lower(params, jnp.zeros((1, prompt_len), jnp.int32), jnp.array([prompt_len]),
                               jax.random.key(0), caches, cfg=CFG, max_new_tokens=4, chunk=16, capacity=None,
                               temperature=0.0, top_k=None, top_p=None, stop_tokens=(), pad_id=0,
                               cache_dtype=None).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
      pytest.skip("no memory analysis on this backend")
    return analysis.temp_size_in_bytes, sum(c.memory_bytes() for c in caches)

  (h_short, hb_short), (h_long, hb_long) = peak("h2o", 64), peak("h2o", 256)
  (d_short, _), (d_long, _) = peak("dense", 64), peak("dense", 256)
  assert hb_short == hb_long                                 # the evicting cache: budget + chunk slots
  assert h_long <= 1.05 * h_short, (h_short, h_long)         # peak temp memory bounded
  assert d_long > 2 * d_short, (d_short, d_long)             # the dense cache grows with the prompt
