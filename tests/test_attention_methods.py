"""Per-layer attention methods (lcjax.models.attention_methods) and the model's landmark switch.

Each method is checked on random q/k/v against a float64 NumPy oracle of what it computes
(masked softmax over the layout the selector picked, sinks + window, linear attention), runs
through the model's forward, equals dense attention where its budget covers every key, and
rejects bad names and options with messages that list what is accepted.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.attention import landmark as landmark_lib
from lcjax.config import parse_config
from lcjax.models import ModelConfig, llama
from lcjax.models import attention_methods as am

BASE = ModelConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=128)
B, T = 2, 37    # T not a multiple of the blocks: partial last blocks everywhere
# Options under which every sparse softmax method keeps every causal pair.
COVER_ALL = am.AttentionOptions(block_size=8, budget=64, window=1024, n_vertical=1024, n_slash=1024, gamma=1.0,
                                centroid_threshold=1e-30, hyper_min_seq_len=1024)
EXACT_WHEN_COVERING = am.SPARSE_SOFTMAX_METHODS + ("hyper",)

forward = jax.jit(llama.forward, static_argnames="cfg")


def cfg_with(**kw) -> ModelConfig:
  return dataclasses.replace(BASE, **kw)


@functools.lru_cache(maxsize=None)
def params_and_tokens():
  params = llama.init(jax.random.key(0), BASE)
  # Noise on every leaf so that norms are not all ones.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  tokens = jax.random.randint(jax.random.key(2), (B, T), 0, BASE.vocab_size - 1)
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  return params, tokens, positions


def random_qkv(seed=0, t=T, hq=4, hkv=2, d=16):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  q = 1.5 * jax.random.normal(kq, (B, t, hq, d))
  return q, 1.5 * jax.random.normal(kk, (B, t, hkv, d)), jax.random.normal(kv, (B, t, hkv, d))


def np_masked_attention(q, k, v, allowed):
  """float64 oracle: softmax over allowed [B, Hq, T, T] pairs; rows with none give zeros."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  s = np.where(allowed, s, -np.inf)
  m = np.max(s, -1, keepdims=True)
  p = np.where(allowed, np.exp(s - np.where(np.isfinite(m), m, 0.0)), 0.0)
  p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
  return np.einsum("bhqk,bkhd->bqhd", p, v)


def causal_pairs(t):
  return np.tril(np.ones((t, t), bool))


def layout_pairs(layout, t):
  """Element-level [B, H, T, T] visibility of a layout's blocks."""
  visible = np.asarray(layout.block_mask()[0])
  rows = np.arange(t) // layout.block_q
  cols = np.arange(t) // layout.block_kv
  return visible[:, :, rows][:, :, :, cols]


# --- each method against its oracle, at the layer level --------------------------------------

@pytest.mark.parametrize("name", am.SELECTOR_METHODS)
def test_selector_method_is_exact_attention_over_its_layout(name):
  q, k, v = random_qkv(seed=3)
  cfg = cfg_with(head_dim=16, attention=name,
                 attention_options=am.AttentionOptions(block_size=8, budget=1, n_vertical=2, n_slash=2, last_q=8,
                                                       gamma=0.5, centroid_clusters=32, centroid_threshold=0.5,
                                                       sink_tokens=1, local_tokens=1))
  layout = am.select_layout(name, q, k, cfg=cfg)
  assert (layout.block_q, layout.block_kv) == (8, 8)
  out = am.attention_fn_for(name)(q, k, v, cfg=cfg, layer=0)
  assert out.shape == q.shape and out.dtype == q.dtype
  allowed = layout_pairs(layout, T) & causal_pairs(T)
  np.testing.assert_allclose(out, np_masked_attention(q, k, v, allowed), atol=2e-5, rtol=1e-5)
  # The budgets above drop part of the causal map, so the result is not dense attention.
  assert allowed.sum() < causal_pairs(T).sum() * allowed.shape[0] * allowed.shape[1]


def test_window_methods_against_oracle():
  q, k, v = random_qkv(seed=4)
  cfg = cfg_with(head_dim=16, attention_options=am.AttentionOptions(window=6, sink_tokens=3))
  i, j = np.arange(T)[:, None], np.arange(T)[None, :]
  window = (j <= i) & (i - j < 6)
  for name, allowed in (("sliding_window", window), ("streaming", window | ((j < 3) & (j <= i)))):
    out = am.attention_fn_for(name)(q, k, v, cfg=cfg, layer=0)
    np.testing.assert_allclose(out, np_masked_attention(q, k, v, np.broadcast_to(allowed, (B, 4, T, T))),
                               atol=2e-5, rtol=1e-5, err_msg=name)


def test_linear_elu_against_oracle():
  q, k, v = random_qkv(seed=5)
  cfg = cfg_with(head_dim=16, attention_options=am.AttentionOptions(linear_chunk_size=8))
  out = am.attention_fn_for("linear_elu")(q, k, v, cfg=cfg, layer=0)
  phi = lambda x: np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))
  pq, pk = phi(np.asarray(q, np.float64)), np.repeat(phi(np.asarray(k, np.float64)), 2, axis=2)
  vv = np.repeat(np.asarray(v, np.float64), 2, axis=2)
  w = np.einsum("bqhf,bkhf->bhqk", pq, pk) * causal_pairs(T)
  want = np.einsum("bhqk,bkhd->bqhd", w, vv) / (w.sum(-1).transpose(0, 2, 1)[..., None] + 1e-6)
  np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-4)


# --- through the model ------------------------------------------------------------------------

@pytest.mark.parametrize("name", EXACT_WHEN_COVERING)
def test_covering_budget_equals_dense_forward(name):
  params, tokens, positions = params_and_tokens()
  dense, _ = forward(params, tokens, positions, cfg=BASE)
  out, _ = forward(params, tokens, positions, cfg=cfg_with(attention=name, attention_options=COVER_ALL))
  assert out.shape == (B, T, BASE.vocab_size)
  np.testing.assert_allclose(out, dense, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["linear_relu", "linear_favor", "linear_cosformer", "linear_norm_aware",
                                  "landmark_grouped"])
def test_other_methods_run_through_forward(name):
  params, tokens, positions = params_and_tokens()
  extra = dict(landmark_block_size=8, landmark_token_id=60) if name == "landmark_grouped" else {}
  cfg = cfg_with(attention=("dense", name), attention_options=am.AttentionOptions(linear_chunk_size=8), **extra)
  out, _ = forward(params, tokens, positions, cfg=cfg)
  assert out.shape == (B, T, BASE.vocab_size)
  assert bool(jnp.all(jnp.isfinite(out)))
  dense, _ = forward(params, tokens, positions, cfg=cfg_with(**extra))
  assert float(jnp.max(jnp.abs(out - dense))) > 1e-3   # a different attention, not silently dense


def test_per_layer_table_mixes_methods():
  """Layer 0 dense and layer 1 sparse: equals the model whose layer 1 alone is sparse, and
  differs from both all-dense and all-sparse."""
  params, tokens, positions = params_and_tokens()
  opts = am.AttentionOptions(block_size=8, budget=1)
  mixed, _ = forward(params, tokens, positions, cfg=cfg_with(attention=("dense", "block_topk"), attention_options=opts))
  sparse, _ = forward(params, tokens, positions, cfg=cfg_with(attention="block_topk", attention_options=opts))
  dense, _ = forward(params, tokens, positions, cfg=BASE)
  assert float(jnp.max(jnp.abs(mixed - dense))) > 1e-4
  assert float(jnp.max(jnp.abs(mixed - sparse))) > 1e-4


def test_selector_gradients_equal_dense_when_covering():
  params, tokens, positions = params_and_tokens()

  def loss(p, cfg):
    logits, _ = llama.forward(p, tokens, positions, cfg=cfg)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  g_dense = grad(params, BASE)
  g_sparse = grad(params, cfg_with(attention="quest", attention_options=COVER_ALL))
  for a, b in zip(jax.tree.leaves(g_sparse), jax.tree.leaves(g_dense)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


# --- the landmark switch ----------------------------------------------------------------------

def test_landmark_switch_inserts_and_removes_landmarks():
  """forward with landmark_block_size = forward of the plain model on the stream with landmarks
  inserted (positions of the last token of each block), landmark rows dropped."""
  params, tokens, positions = params_and_tokens()
  cfg = cfg_with(landmark_block_size=6, landmark_token_id=60)
  out, _ = forward(params, tokens, positions, cfg=cfg)
  ins = landmark_lib.insert_landmarks(tokens, block_size=6, landmark_id=60, positions=positions)
  assert ins.tokens.shape == (B, T + T // 6)
  stream, _ = forward(params, ins.tokens, ins.positions, cfg=BASE)
  np.testing.assert_allclose(out, landmark_lib.remove_landmarks(stream, block_size=6), atol=1e-6, rtol=1e-6)
  plain, _ = forward(params, tokens, positions, cfg=BASE)
  assert float(jnp.max(jnp.abs(out - plain))) > 1e-3


def test_landmark_selector_uses_landmark_keys():
  """With landmark tokens in the stream, "landmark" selects blocks of landmark_block_size + 1 by
  the landmark tokens' keys; with every block kept it is the dense model on that stream."""
  q, k, _ = random_qkv(seed=6)
  cfg = cfg_with(head_dim=16, landmark_block_size=5, landmark_token_id=60, attention="landmark",
                 attention_options=am.AttentionOptions(budget=1))
  layout = am.select_layout("landmark", q, k, cfg=cfg)
  assert (layout.block_q, layout.block_kv) == (6, 6)
  from lcjax.attention.selectors import landmark as landmark_selector
  landmarks = k[:, np.minimum(np.arange(7) * 6 + 5, T - 1)]
  want = landmark_selector.select(q, k, 1, landmarks=landmarks, block_q=6, block_kv=6)
  np.testing.assert_array_equal(layout.block_mask()[0], want.block_mask()[0])
  params, tokens, positions = params_and_tokens()
  lm = dict(landmark_block_size=5, landmark_token_id=60)
  dense, _ = forward(params, tokens, positions, cfg=cfg_with(**lm))
  out, _ = forward(params, tokens, positions, cfg=cfg_with(attention="landmark", attention_options=COVER_ALL, **lm))
  np.testing.assert_allclose(out, dense, atol=2e-5, rtol=1e-5)


# --- errors -----------------------------------------------------------------------------------

def test_unknown_method_lists_accepted_names():
  with pytest.raises(ValueError, match="accepted: .*'block_topk'.*'dense'.*'streaming'"):
    cfg_with(attention="bogus")
  with pytest.raises(ValueError, match="attention method 'bogus'; accepted: .*'quest'"):
    am.attention_fn_for("bogus")
  with pytest.raises(ValueError, match="selector method 'dense'; accepted"):
    am.select_layout("dense", *random_qkv()[:2], cfg=BASE)


@pytest.mark.parametrize("options, field", [
    (dict(block_size=0), "AttentionOptions.block_size=0"),
    (dict(budget=1.5), "AttentionOptions.budget=1.5"),
    (dict(gamma=1.5), r"AttentionOptions.gamma=1.5; accepted: a float in \(0, 1\]"),
    (dict(sink_tokens=-1), "AttentionOptions.sink_tokens=-1"),
    (dict(ignore_segment_ids=1), "AttentionOptions.ignore_segment_ids=1; accepted: True or False"),
    (dict(bogus=3), r"attention_options has unknown keys \['bogus'\]; accepted: \['block_size'"),
])
def test_bad_options_name_the_field(options, field):
  with pytest.raises(ValueError, match=field):
    cfg_with(attention_options=options)


def test_landmark_config_errors():
  with pytest.raises(ValueError, match="landmark_grouped.*landmark_block_size"):
    cfg_with(attention="landmark_grouped")
  with pytest.raises(ValueError, match="landmark_token_id=None; accepted: an int in"):
    cfg_with(landmark_block_size=4)
  with pytest.raises(ValueError, match="landmark_token_id=61"):
    cfg_with(landmark_block_size=4, landmark_token_id=61)
  params, tokens, positions = params_and_tokens()
  cfg = cfg_with(landmark_block_size=4, landmark_token_id=60)
  with pytest.raises(ValueError, match="no-cache forward only"):
    llama.forward(params, tokens, positions, llama.init_caches(cfg, B, 64), cfg=cfg)
  with pytest.raises(ValueError, match="landmark-token stream does not take segment_ids"):
    llama.forward(params, tokens, positions, cfg=cfg, segment_ids=jnp.ones_like(tokens))


def test_methods_without_segments_reject_segment_ids_unless_told():
  q, k, v = random_qkv()
  segments = jnp.ones((B, T), jnp.int32)
  for name in ("hyper", "linear_elu"):
    with pytest.raises(ValueError, match=f"{name}.*does not take segment_ids.*ignore_segment_ids=True"):
      am.attention_fn_for(name)(q, k, v, cfg=cfg_with(head_dim=16), layer=0, segment_ids=segments)
    ignoring = cfg_with(head_dim=16, attention_options=am.AttentionOptions(ignore_segment_ids=True))
    np.testing.assert_array_equal(am.attention_fn_for(name)(q, k, v, cfg=ignoring, layer=0, segment_ids=segments),
                                  am.attention_fn_for(name)(q, k, v, cfg=ignoring, layer=0))
  params, tokens, positions = params_and_tokens()
  cfg = cfg_with(landmark_block_size=4, landmark_token_id=60,
                 attention_options=am.AttentionOptions(ignore_segment_ids=True))
  np.testing.assert_array_equal(forward(params, tokens, positions, cfg=cfg, segment_ids=jnp.ones_like(tokens))[0],
                                forward(params, tokens, positions, cfg=cfg)[0])


def test_experiment_config_builds_options():
  raw = dict(model=dict(vocab_size=384, dim=32, n_layers=2, n_heads=4, n_kv_heads=4, hidden_dim=64, max_seq_len=512,
                        attention=("dense", "quest"), attention_options=dict(block_size=16, budget=2)),
             data=dict(task="passkey", seq_len=64, batch_size=2))
  cfg = parse_config(raw)
  assert cfg.model.attention_options == am.AttentionOptions(block_size=16, budget=2)
  assert cfg.model.layer_attention == ("dense", "quest")
  hash(cfg.model)   # a static jit argument
