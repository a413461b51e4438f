"""Cross-layer caches: MiniCache (SLERP merge with token retention) against NumPy and through
generate(); CLA as a model option (ModelConfig.cla_share) against a NumPy forward and in generate."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.cache import CacheConfig, DenseKVCache, MiniCacheKV, cla_owner, cla_owners, make_caches
from lcjax.cache.minicache import merge_adjacent_layers, merge_layer_pair
from lcjax.models import ModelConfig, llama
from lcjax.models.generate import generate
from lcjax.models.rope import apply_rope, rope_cos_sin

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


# --- CLA as a model option (ModelConfig.cla_share) ---

CLA = ModelConfig(vocab_size=61, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=48, qkv_bias=True,
                  max_seq_len=64, cla_share=2)
LENGTHS = np.array([9, 4, 7], np.int32)
NEW = 8


@functools.lru_cache(maxsize=None)
def spread_params(cfg):
  """Random weights spread enough that greedy generations are not one repeated token."""
  p = llama.init(jax.random.key(0), cfg)
  leaves, treedef = jax.tree.flatten(p)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree.unflatten(treedef, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def prompts(vocab):
  tokens = np.asarray(jax.random.randint(jax.random.key(2), (3, LENGTHS.max()), 0, vocab))
  return np.where(np.arange(tokens.shape[1]) < LENGTHS[:, None], tokens, 0).astype(np.int32)


def test_cla_non_owner_layers_have_no_wk_wv():
  shapes = llama.param_shapes(CLA)
  assert CLA.kv_owners == (0, 0, 2, 2)
  for layer, p in enumerate(shapes["layers"]):
    has_kv = layer in (0, 2)
    assert {"wk", "wv", "bk", "bv"} <= set(p) if has_kv else not {"wk", "wv", "bk", "bv"} & set(p), layer
    assert p["wq"] == (32, 4, 8) and p["wo"] == (4, 8, 32)
  params = llama.init(jax.random.key(0), CLA)
  assert jax.tree.map(lambda x: x.shape, params) == shapes
  full = llama.param_shapes(dataclasses.replace(CLA, cla_share=1))
  count = lambda s: sum(int(np.prod(x)) for x in jax.tree.leaves(s, is_leaf=lambda x: isinstance(x, tuple)))
  assert count(full) - count(shapes) == 2 * (2 * 32 * 2 * 8 + 2 * 2 * 8)   # 2 layers x (wk, wv, bk, bv)
  with pytest.raises(ValueError, match="cla_share=0"):
    dataclasses.replace(CLA, cla_share=0)


def np_cla_forward(params, tokens, cfg):
  """The paper's CLA written out: a group's first layer computes K/V, its other layers reuse them."""
  x = np.asarray(params["embed"])[tokens]
  t = tokens.shape[1]
  cos, sin = rope_cos_sin(jnp.arange(t)[None], head_dim=cfg.head_dim, theta=cfg.rope_theta, scaling=None,
                          max_seq_len=cfg.max_seq_len)
  norm = lambda x, s: np.asarray(llama.rms_norm(jnp.asarray(x), s, cfg.norm_eps))
  causal = np.tril(np.ones((t, t), bool))
  for layer, p in enumerate(params["layers"]):
    p = {k: np.asarray(v) for k, v in p.items()}
    h = norm(x, p["attn_norm"])
    q = np.asarray(apply_rope(jnp.asarray(np.einsum("btd,dhk->bthk", h, p["wq"]) + p["bq"]), cos, sin))
    if layer % cfg.cla_share == 0:
      k = np.asarray(apply_rope(jnp.asarray(np.einsum("btd,dhk->bthk", h, p["wk"]) + p["bk"]), cos, sin))
      v = np.einsum("btd,dhk->bthk", h, p["wv"]) + p["bv"]
    rep = cfg.n_heads // cfg.n_kv_heads
    kk, vv = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, kk) / np.sqrt(cfg.head_dim)
    s = np.where(causal, s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    x = x + np.einsum("bqhd,hdm->bqm", np.einsum("bhqk,bkhd->bqhd", a, vv), p["wo"])
    h = norm(x, p["mlp_norm"])
    gate = h @ p["w_gate"]
    x = x + (gate / (1 + np.exp(-gate)) * (h @ p["w_up"])) @ p["w_down"]
  return norm(x, params["final_norm"]) @ np.asarray(params["lm_head"])


def test_cla_training_forward_matches_numpy_and_has_gradients():
  params = spread_params(CLA)
  tokens = np.asarray(jax.random.randint(jax.random.key(3), (2, 10), 0, CLA.vocab_size))
  positions = jnp.broadcast_to(jnp.arange(10), (2, 10))
  logits, none = llama.forward(params, tokens, positions, cfg=CLA)
  assert none is None
  np.testing.assert_allclose(logits, np_cla_forward(params, tokens, CLA), atol=2e-4, rtol=2e-4)

  def loss(p, cfg):
    return llama.forward(p, tokens, positions, cfg=cfg)[0].mean()

  grads = jax.grad(loss)(params, CLA)
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  remat = jax.grad(loss)(params, dataclasses.replace(CLA, remat=True))
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(remat)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_cla_generate_equals_the_no_cache_greedy_loop():
  params, toks = spread_params(CLA), prompts(CLA.vocab_size)
  out = generate(params, CLA, toks, LENGTHS, NEW, key=None, prefill_chunk=4)
  fwd = jax.jit(lambda p, t: llama.forward(p, t[None], jnp.arange(32)[None], cfg=CLA)[0][0])
  for b, n in enumerate(LENGTHS):
    sequence = list(toks[b, :n])
    for _ in range(NEW):
      padded = np.zeros(32, np.int32)
      padded[:len(sequence)] = sequence
      sequence.append(int(np.argmax(np.asarray(fwd(params, jnp.asarray(padded)))[len(sequence) - 1])))
    np.testing.assert_array_equal(np.asarray(out["tokens"][b]), sequence[n:], err_msg=f"sequence {b}")
  assert len(set(np.asarray(out["tokens"]).ravel().tolist())) > 4
  # A compressed policy from the model config: lossless settings give the same tokens, and the
  # caches generate builds are the factory's (owner layers only).
  lossless = dataclasses.replace(CLA, cache=CacheConfig(policy="streaming", budget=32, sinks=2))
  np.testing.assert_array_equal(generate(params, lossless, toks, LENGTHS, NEW, key=None, prefill_chunk=4)["tokens"],
                                out["tokens"])
  explicit = make_caches(CacheConfig(policy="streaming", budget=32, sinks=2, max_chunk=4), num_layers=4,
                         kv_heads=2, head_dim=8, batch=3, capacity=17, cla_share=2)
  np.testing.assert_array_equal(generate(params, CLA, toks, LENGTHS, NEW, key=None, prefill_chunk=4,
                                         caches=explicit)["tokens"], out["tokens"])


def test_cla_cache_memory_shrinks_by_the_share_factor():
  def total(share, policy):
    cache = CacheConfig(policy=policy, budget=8, window=2, group_size=8, residual=8)
    cfg = dataclasses.replace(CLA, cla_share=share, cache=cache)
    caches = llama.init_caches(cfg, batch=2, capacity=32, max_chunk=4)
    assert [c is None for c in caches] == [layer % share != 0 for layer in range(4)]
    return sum(c.memory_bytes() for c in caches if c is not None)
  for policy in ("dense", "h2o", "kivi"):
    assert total(1, policy) == 2 * total(2, policy) == 4 * total(4, policy), policy


def test_cla_forward_rejects_a_cache_per_layer():
  params = spread_params(CLA)
  full = llama.init_caches(dataclasses.replace(CLA, cla_share=1), 1, 8)
  with pytest.raises(ValueError, match=r"caches\[1\] is DenseKVCache.*None \(cla_share=2: layer 1 reads layer 0"):
    llama.forward(params, jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2), jnp.int32), full, cfg=CLA)
  with pytest.raises(ValueError, match=r"caches\[2\] is None; accepted: a cache"):
    llama.forward(params, jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2), jnp.int32),
                  [full[0], None, None, None], cfg=CLA)


# --- MiniCache through the model config and generate ---

MINI = dataclasses.replace(CLA, cla_share=1, cache=CacheConfig(policy="minicache", minicache_start=1,
                                                               minicache_gamma=0.2, minicache_max_retained=2))


def test_minicache_generate_equals_prefill_merge_then_decode():
  params, toks = spread_params(MINI), prompts(MINI.vocab_size)
  out = generate(params, MINI, toks, LENGTHS, NEW, key=None, return_caches=True)
  # By hand: dense prefill, merge layers (1, 2) (layer 3 is odd, stays dense), greedy decode.
  fwd = jax.jit(lambda c, t, pos, n: llama.forward(params, t, pos, c, cfg=MINI, num_new=n))
  caches = llama.init_caches(MINI, 3, capacity=toks.shape[1] + NEW)
  p = toks.shape[1]
  logits, caches = fwd(caches, toks, jnp.broadcast_to(jnp.arange(p), (3, p)), jnp.asarray(LENGTHS))
  caches = merge_adjacent_layers(caches, start_layer=1, t=0.6, gamma=0.2, max_retained=2, tail=NEW, length=p)
  assert [type(c).__name__ for c in caches] == ["DenseKVCache", "MiniCacheKV", "MiniCacheKV", "DenseKVCache"]
  logits = logits[np.arange(3), LENGTHS - 1]
  want = []
  for step in range(NEW):
    tok = jnp.argmax(logits, -1).astype(jnp.int32)
    want.append(np.asarray(tok))
    logits, caches = fwd(caches, tok[:, None], jnp.asarray(LENGTHS + step)[:, None], None)
    logits = logits[:, 0]
  np.testing.assert_array_equal(out["tokens"], np.stack(want, 1))
  dense = generate(params, dataclasses.replace(MINI, cache=CacheConfig()), toks, LENGTHS, NEW, key=None,
                   return_caches=True)
  np.testing.assert_array_equal(out["tokens"][:, 0], dense["tokens"][:, 0])   # from the prefill: unmerged
  assert (np.asarray(out["tokens"]) != np.asarray(dense["tokens"])).any()     # lossy at these settings
  assert [type(c).__name__ for c in out["caches"]] == ["DenseKVCache", "MiniCacheKV", "MiniCacheKV", "DenseKVCache"]
  merged_pair, dense_pair = (sum(c.memory_bytes() for c in r["caches"][1:3]) for r in (out, dense))
  assert merged_pair < dense_pair, (merged_pair, dense_pair)


def test_minicache_keeping_every_token_equals_dense_generate():
  cfg = dataclasses.replace(MINI, cache=CacheConfig(policy="minicache", minicache_gamma=1.0,
                                                    minicache_max_retained=16))
  params, toks = spread_params(cfg), prompts(cfg.vocab_size)
  dense = generate(params, dataclasses.replace(cfg, cache=CacheConfig()), toks, LENGTHS, NEW, key=None,
                   prefill_chunk=4)
  got = generate(params, cfg, toks, LENGTHS, NEW, key=None, prefill_chunk=4)   # merges layers 2, 3
  np.testing.assert_array_equal(got["tokens"], dense["tokens"])


def test_minicache_merged_caches_use_less_memory():
  rng = np.random.default_rng(0)
  b, c, h, d = 2, 64, 2, 32
  caches = [DenseKVCache.create(b, c, h, d).update(*(rng.standard_normal((b, 60, h, d)).astype(np.float32)
                                                     for _ in range(2))) for _ in range(4)]
  merged = merge_adjacent_layers(caches, start_layer=1, max_retained=4, tail=4)
  assert isinstance(merged[0], DenseKVCache) and isinstance(merged[3], DenseKVCache)
  assert isinstance(merged[1], MiniCacheKV) and isinstance(merged[2], MiniCacheKV)
  pair_dense = caches[1].memory_bytes() + caches[2].memory_bytes()
  pair_merged = merged[1].memory_bytes() + merged[2].memory_bytes()
  assert pair_merged < 0.7 * pair_dense, (pair_merged, pair_dense)
  with pytest.raises(ValueError, match="start_layer=3"):
    merge_adjacent_layers(caches, start_layer=3)
  with pytest.raises(ValueError, match=r"caches\[2\] is DenseKVCache\(window=4\)"):
    merge_adjacent_layers(caches[:2] + [dataclasses.replace(caches[2], window=4), caches[3]], start_layer=1)


def test_minicache_config_errors():
  base = dict(vocab_size=61, dim=32, n_heads=4, n_kv_heads=2, hidden_dim=48)
  with pytest.raises(ValueError, match="minicache.*1 layer"):
    ModelConfig(n_layers=1, cache=dict(policy="minicache"), **base)
  with pytest.raises(ValueError, match="minicache_start=3.*\\[0, 2\\]"):
    ModelConfig(n_layers=4, cache=dict(policy="minicache", minicache_start=3), **base)
  with pytest.raises(ValueError, match="cla_share=2"):
    ModelConfig(n_layers=4, cla_share=2, cache=dict(policy="minicache"), **base)
  with pytest.raises(ValueError, match="sliding_window=8.*accepted: policy 'dense'"):
    ModelConfig(n_layers=4, sliding_window=8, cache=dict(policy="h2o"), **base)
  assert CacheConfig(policy="minicache").minicache_first_layer(4) == 2
  assert CacheConfig(policy="minicache").minicache_first_layer(2) == 0
