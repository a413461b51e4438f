"""The functional decoder: config validation, parameter axes, caches vs. no caches, packing, RoPE."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.models import ModelConfig, llama, rope

CFG = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, qkv_bias=True,
                  rope_scaling=rope.Llama3Scaling(4.0, original_max_position_embeddings=16), max_seq_len=64)
WINDOWED = dataclasses.replace(CFG, sliding_window=5, qkv_bias=False, tie_embeddings=True, n_kv_heads=1)
CLA = dataclasses.replace(CFG, n_layers=3, cla_share=2)   # layers 0, 1 share layer 0's K/V; layer 2 its own


def init_shapes(cfg):
  return jax.eval_shape(functools.partial(llama.init, cfg=cfg), jax.random.key(0))


@functools.partial(jax.jit, static_argnums=1)
def _random_params(key, cfg):
  init_key, noise_key = jax.random.split(key)
  leaves, treedef = jax.tree.flatten(llama.init(init_key, cfg))
  keys = jax.random.split(noise_key, len(leaves))
  return jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def random_params(cfg, seed=0):
  """init() plus noise on every leaf, so norms and biases are not trivially ones and zeros."""
  return _random_params(jax.random.key(seed), cfg)


def arange_positions(batch, length, start=0):
  return jnp.broadcast_to(jnp.arange(start, start + length, dtype=jnp.int32), (batch, length))


forward = jax.jit(llama.forward, static_argnames="cfg")


# --- Config ---

@pytest.mark.parametrize("kwargs, pattern", [
    (dict(n_heads=6, n_kv_heads=4), "n_heads=6 must be a multiple of n_kv_heads=4"),
    (dict(dim=30, n_heads=4), "dim=30 is not divisible by n_heads=4"),
    (dict(head_dim=7), "head_dim=7"),
    (dict(attention=("dense", "nonexistent")), "attention contains 'nonexistent'"),
    (dict(attention=("dense",) * 3), "attention has 3 entries"),
    (dict(dtype="int8"), "dtype='int8'"),
    (dict(sliding_window=0), "sliding_window=0"),
    (dict(vocab_size=0), "vocab_size=0"),
    (dict(rope_scaling={"factor": 2}), "rope_scaling="),
    (dict(cla_share=0), "cla_share=0"),
    (dict(cache={"polic": "h2o"}), r"cache has unknown keys \['polic'\]"),
    (dict(cache={"policy": "nope"}), "cache.policy='nope'"),
])
def test_config_rejects_bad_values(kwargs, pattern):
  base = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48)
  with pytest.raises(ValueError, match=pattern):
    ModelConfig(**{**base, **kwargs})


def test_config_defaults_and_hashable():
  assert CFG.head_dim == 8 and CFG.layer_attention == ("dense", "dense")
  assert dataclasses.replace(CFG, attention=["dense", "dense"]).attention == ("dense", "dense")
  assert hash(CFG) == hash(dataclasses.replace(CFG))
  with pytest.raises(ValueError, match="Llama3Scaling.high_freq_factor"):
    rope.Llama3Scaling(8.0, low_freq_factor=4.0, high_freq_factor=1.0)


# --- Parameters ---

@pytest.mark.parametrize("cfg", [CFG, WINDOWED, CLA])
def test_param_logical_axes_match_params(cfg):
  params = init_shapes(cfg)
  axes = llama.param_logical_axes(cfg)
  is_axes = lambda x: isinstance(x, tuple)
  assert jax.tree.structure(params) == jax.tree.structure(axes, is_leaf=is_axes)
  for x, names in zip(jax.tree.leaves(params), jax.tree.leaves(axes, is_leaf=is_axes)):
    assert x.ndim == len(names) and x.dtype == jnp.float32
  assert ("lm_head" in params) == (not cfg.tie_embeddings)
  assert ("bq" in params["layers"][0]) == cfg.qkv_bias


def test_param_dtype():
  params = init_shapes(dataclasses.replace(CFG, param_dtype="bfloat16"))
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}


# --- Forward: caches against no caches ---

@pytest.mark.parametrize("cfg", [CFG, WINDOWED, CLA], ids=["gqa_bias_llama3", "mqa_window_tied", "cla_share2"])
def test_chunked_prefill_and_decode_equal_full_forward(cfg):
  params = random_params(cfg)
  batch, length = 2, 14
  tokens = jax.random.randint(jax.random.key(3), (batch, length), 0, cfg.vocab_size)
  full, none = forward(params, tokens, arange_positions(batch, length), cfg=cfg)
  assert none is None and full.shape == (batch, length, cfg.vocab_size) and full.dtype == jnp.float32
  caches = llama.init_caches(cfg, batch, capacity=16)
  pieces, start = [], 0
  for size in (6, 1, 1, 6):      # a prefill chunk, single-token decode steps, another chunk
    logits, caches = forward(params, tokens[:, start:start + size], arange_positions(batch, size, start), caches,
                             cfg=cfg)
    pieces.append(logits)
    start += size
  np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=2e-5, rtol=0)
  assert [int(n) for n in caches[0].lengths] == [length, length]


def test_right_padded_chunks_equal_unpadded():
  """num_new: sequences of one batch advance by different amounts within a chunk."""
  cfg = WINDOWED
  params = random_params(cfg, seed=5)
  tokens = jax.random.randint(jax.random.key(6), (2, 14), 0, cfg.vocab_size)
  full, _ = forward(params, tokens, arange_positions(2, 14), cfg=cfg)
  caches = llama.init_caches(cfg, 2, capacity=16)
  # Sequence 0 writes 5 + 5 + 4 tokens, sequence 1 writes 2 + 6 + 6 (the rest of each chunk is padding).
  lengths = np.zeros(2, np.int32)
  got = [[], []]
  for num_new in ([5, 2], [5, 6], [4, 6]):
    chunk = np.zeros((2, 6), np.int32)
    pos = np.zeros((2, 6), np.int32)
    for b in range(2):
      chunk[b, :num_new[b]] = tokens[b, lengths[b]:lengths[b] + num_new[b]]
      pos[b, :num_new[b]] = np.arange(lengths[b], lengths[b] + num_new[b])
    logits, caches = forward(params, jnp.asarray(chunk), jnp.asarray(pos), caches, cfg=cfg,
                             num_new=jnp.asarray(num_new, jnp.int32))
    for b in range(2):
      got[b].append(np.asarray(logits[b, :num_new[b]]))
    lengths += num_new
  for b in range(2):
    np.testing.assert_allclose(np.concatenate(got[b]), full[b], atol=2e-5, rtol=0)


def test_packed_segments_do_not_leak():
  cfg = CFG
  params = random_params(cfg, seed=7)
  doc_a = jax.random.randint(jax.random.key(8), (5,), 0, cfg.vocab_size)
  doc_b = jax.random.randint(jax.random.key(9), (9,), 0, cfg.vocab_size)
  junk = jax.random.randint(jax.random.key(10), (9,), 0, cfg.vocab_size)
  positions = arange_positions(2, 14)
  # Each document alone at the start of a row (causal: the junk after it does not matter).
  alone, _ = forward(params, jnp.stack([jnp.concatenate([doc_a, junk]), jnp.concatenate([doc_b, junk[:5]])]),
                     positions, cfg=cfg)
  packed = jnp.broadcast_to(jnp.concatenate([doc_a, doc_b]), (2, 14))
  packed_positions = jnp.broadcast_to(jnp.concatenate([jnp.arange(5), jnp.arange(9)]), (2, 14)).astype(jnp.int32)
  segments = jnp.asarray([[1] * 5 + [2] * 9] * 2, jnp.int32)
  logits, _ = forward(params, packed, packed_positions, cfg=cfg, segment_ids=segments)
  np.testing.assert_allclose(logits[0, :5], alone[0, :5], atol=2e-5, rtol=0)
  np.testing.assert_allclose(logits[0, 5:], alone[1, :9], atol=2e-5, rtol=0)
  # Without the segment ids the second document does see the first (the test can fail).
  leaky, _ = forward(params, packed, packed_positions, cfg=cfg)
  assert np.abs(np.asarray(leaky[0, 5:]) - np.asarray(alone[1, :9])).max() > 1e-2


def test_sliding_window_limits_the_receptive_field():
  cfg = WINDOWED
  params = random_params(cfg, seed=11)
  tokens = jax.random.randint(jax.random.key(12), (2, 14), 0, cfg.vocab_size)
  changed = tokens.at[:, 2].set((tokens[:, 2] + 1) % cfg.vocab_size)
  a, _ = forward(params, tokens, arange_positions(2, 14), cfg=cfg)
  b, _ = forward(params, changed, arange_positions(2, 14), cfg=cfg)
  diff = np.abs(np.asarray(a - b)).max(-1)[0]
  # Window 5, two layers: token 2 reaches queries 2..6 after one layer and 2..10 after two.
  assert (diff[:2] == 0).all() and (diff[2:11] > 1e-4).all() and (diff[11:] == 0).all()


def test_bfloat16_compute_is_close_to_float32():
  params = random_params(CFG)
  tokens = jax.random.randint(jax.random.key(13), (2, 14), 0, CFG.vocab_size)
  ref, _ = forward(params, tokens, arange_positions(2, 14), cfg=CFG)
  low, _ = forward(params, tokens, arange_positions(2, 14), cfg=dataclasses.replace(CFG, dtype="bfloat16"))
  assert low.dtype == jnp.float32
  assert np.abs(np.asarray(low - ref)).mean() < 0.05 * np.abs(np.asarray(ref)).mean()


def test_remat_gives_the_same_gradients():
  cfg = dataclasses.replace(CFG, n_layers=1)
  params = random_params(cfg)
  tokens = jax.random.randint(jax.random.key(14), (2, 8), 0, CFG.vocab_size)

  def loss(p, cfg):
    logits, _ = llama.forward(p, tokens, arange_positions(2, 8), cfg=cfg)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  g_plain = grad(params, cfg)
  g_remat = grad(params, dataclasses.replace(cfg, remat=True))
  for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
  assert all(np.isfinite(x).all() and np.abs(x).max() > 0 for x in jax.tree.leaves(g_plain))


def test_forward_rejects_bad_inputs():
  params = random_params(CFG)
  tokens = jnp.zeros((2, 4), jnp.int32)
  with pytest.raises(ValueError, match="positions shape"):
    llama.forward(params, tokens, jnp.zeros((2, 3), jnp.int32), cfg=CFG)
  with pytest.raises(ValueError, match="caches has 1 entries"):
    llama.forward(params, tokens, arange_positions(2, 4), llama.init_caches(CFG, 2, 8)[:1], cfg=CFG)
  with pytest.raises(ValueError, match="num_new"):
    llama.forward(params, tokens, arange_positions(2, 4), cfg=CFG, num_new=jnp.ones(2, jnp.int32))


# --- RoPE ---

def test_rope_matches_complex_rotation_and_is_relative():
  head_dim = 16
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, head_dim))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, head_dim))
  cos_sin = functools.partial(rope.rope_cos_sin, head_dim=head_dim, theta=500.0, scaling=None, max_seq_len=64)

  def rotated(x, pos):
    cos, sin = cos_sin(jnp.full((1, 1), pos, jnp.int32))
    return rope.apply_rope(x, cos, sin)[0, 0, 0]

  # rotate_half convention: (x[:d/2] + i x[d/2:]) * exp(i pos theta^(-2j/d)).
  inv_freq = 500.0 ** (-np.arange(0, head_dim, 2) / head_dim)
  z = (np.asarray(q[0, 0, 0, :8]) + 1j * np.asarray(q[0, 0, 0, 8:])) * np.exp(1j * 7 * inv_freq)
  np.testing.assert_allclose(rotated(q, 7), np.concatenate([z.real, z.imag]), atol=1e-5)
  dots = [float(rotated(q, m) @ rotated(k, m - 3)) for m in (3, 10, 40)]
  np.testing.assert_allclose(dots, dots[0], atol=1e-4)


def test_yarn_attention_factor_scales_cos_and_sin():
  scaling = rope.YarnScaling(8.0, original_max_position_embeddings=32)
  cos, sin = rope.rope_cos_sin(arange_positions(1, 5), head_dim=16, theta=1e4, scaling=scaling, max_seq_len=128)
  np.testing.assert_allclose(cos ** 2 + sin ** 2, (0.1 * np.log(8.0) + 1) ** 2, rtol=1e-5)


def test_dynamic_ntk_only_changes_past_max_seq_len():
  scaling = rope.DynamicNTKScaling(2.0)
  kw = dict(head_dim=16, theta=1e4, max_seq_len=32)
  short_dyn = rope.rope_cos_sin(arange_positions(1, 32), scaling=scaling, **kw)
  short_plain = rope.rope_cos_sin(arange_positions(1, 32), scaling=None, **kw)
  np.testing.assert_allclose(short_dyn, short_plain, atol=1e-6)
  long_dyn = rope.rope_cos_sin(arange_positions(1, 40), scaling=scaling, **kw)
  long_plain = rope.rope_cos_sin(arange_positions(1, 40), scaling=None, **kw)
  assert np.abs(np.asarray(long_dyn[0]) - np.asarray(long_plain[0])).max() > 1e-3
