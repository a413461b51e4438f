"""The Llama-family decoder (Llama, Mistral, Qwen2) as pure functions over a nested-dict pytree.

Parameters (shapes; logical axis names from `param_logical_axes` in brackets):

  embed        [vocab, dim]                  ("vocab", "embed")
  layers[i]    attn_norm [dim]               ("embed",)
               wq [dim, n_heads, head_dim]   ("embed", "q_heads", "head_dim")
               wk, wv [dim, n_kv_heads, head_dim]   ("embed", "kv_heads", "head_dim")
               wo [n_heads, head_dim, dim]   ("q_heads", "head_dim", "embed")
               bq [n_heads, head_dim], bk, bv [n_kv_heads, head_dim]   (only with qkv_bias)
               mlp_norm [dim]                ("embed",)
               w_gate, w_up [dim, hidden]    ("embed", "mlp")
               w_down [hidden, dim]          ("mlp", "embed")
  final_norm   [dim]                         ("embed",)
  lm_head      [dim, vocab]                  ("embed", "vocab")   (absent with tie_embeddings)

With cross-layer attention (cfg.cla_share > 1) only the first layer of each group of cla_share
layers (cfg.kv_owners) has wk, wv (bk, bv); the group's other layers use the keys and values it
computes, and, when decoding, read its cache (their entry of `caches` is None).

Parameters are stored in cfg.param_dtype and cast to cfg.dtype where used; RMSNorm statistics,
RoPE and logits are float32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lcjax.attention import landmark as landmark_lib
from lcjax.cache.dense import DenseKVCache
from lcjax.cache.factory import make_caches
from lcjax.models.attention_methods import attention_fn_for, check_no_segments
from lcjax.models.config import ModelConfig
from lcjax.models.rope import apply_rope, rope_cos_sin
from lcjax.sharding import constrain

# Logical axes of the main activations. forward applies them as sharding constraints through
# lcjax.sharding's rules table, on the mesh set with `jax.set_mesh(mesh)` (jit_train_step and
# generate(mesh=...) set it); with no mesh set, or a one-device mesh, they are no-ops.
ACTIVATION_AXES = {
    "hidden": ("batch", "seq", "embed"),             # the residual stream x [B, T, dim]
    "q": ("batch", "seq", "q_heads", "head_dim"),     # q and the attention output [B, T, Hq, D]
    "kv": ("batch", "seq", "kv_heads", "head_dim"),   # k, v [B, T, Hkv, D]
    "mlp": ("batch", "seq", "mlp"),                   # SwiGLU's gated inner activations [B, T, hidden]
    "logits": ("batch", "seq", "vocab"),              # [B, T, vocab]
}


def _constrain(x, kind: str):
  """x with the sharding constraint of ACTIVATION_AXES[kind] (identity without an active mesh)."""
  return constrain(x, ACTIVATION_AXES[kind])


def _layer_axes(cfg: ModelConfig, layer: int) -> dict:
  axes = {
      "attn_norm": ("embed",),
      "wq": ("embed", "q_heads", "head_dim"),
      "wk": ("embed", "kv_heads", "head_dim"),
      "wv": ("embed", "kv_heads", "head_dim"),
      "wo": ("q_heads", "head_dim", "embed"),
      "mlp_norm": ("embed",),
      "w_gate": ("embed", "mlp"),
      "w_up": ("embed", "mlp"),
      "w_down": ("mlp", "embed"),
  }
  if cfg.qkv_bias:
    axes.update(bq=("q_heads", "head_dim"), bk=("kv_heads", "head_dim"), bv=("kv_heads", "head_dim"))
  if cfg.kv_owners[layer] != layer:   # CLA: this layer uses its group's first layer's K/V
    for name in ("wk", "wv", "bk", "bv"):
      axes.pop(name, None)
  return axes


def param_logical_axes(cfg: ModelConfig) -> dict:
  """The params pytree's structure with a tuple of logical axis names in place of each array."""
  axes = {"embed": ("vocab", "embed"), "layers": [_layer_axes(cfg, i) for i in range(cfg.n_layers)],
          "final_norm": ("embed",)}
  if not cfg.tie_embeddings:
    axes["lm_head"] = ("embed", "vocab")
  return axes


def param_shapes(cfg: ModelConfig) -> dict:
  """The params pytree's structure with the shape tuple of each array."""
  size = {"vocab": cfg.vocab_size, "embed": cfg.dim, "q_heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads,
          "head_dim": cfg.head_dim, "mlp": cfg.hidden_dim}
  return jax.tree.map(lambda names: tuple(size[n] for n in names), param_logical_axes(cfg),
                      is_leaf=lambda x: isinstance(x, tuple))


def init(key, cfg: ModelConfig) -> dict:
  """Random parameters in cfg.param_dtype.

  Matrices are normal with std 1/sqrt(fan_in); the residual-branch outputs (wo, w_down) are further
  scaled by 1/sqrt(2 n_layers); the embedding has std 0.02 (the HF initializer_range); norm scales
  are ones and biases zeros.
  """
  dtype = cfg.params_dtype
  shapes = param_shapes(cfg)
  leaves, treedef = jax.tree.flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(key, len(leaves))
  out = []
  for (path, shape), k in zip(leaves, keys):
    name = path[-1].key
    if name in ("attn_norm", "mlp_norm", "final_norm"):
      out.append(jnp.ones(shape, dtype))
    elif name in ("bq", "bk", "bv"):
      out.append(jnp.zeros(shape, dtype))
    elif name == "embed":
      out.append((0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    else:
      fan_in = shape[0] * shape[1] if name == "wo" else shape[0]
      std = fan_in ** -0.5 * ((2 * cfg.n_layers) ** -0.5 if name in ("wo", "w_down") else 1.0)
      out.append((std * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
  return jax.tree.unflatten(treedef, out)


def init_caches(cfg: ModelConfig, batch: int, capacity: int, dtype=None, max_chunk: int | None = None) -> list:
  """Empty caches of the policy cfg.cache, one per layer (None at the layers that read another
  layer's cache under CLA, cfg.cla_share), in dtype (default cfg.dtype).

  The dense policy gives DenseKVCache k, v [batch, capacity, n_kv_heads, head_dim] with
  cfg.sliding_window as the window; others come from lcjax.cache.make_caches with capacity as
  the longest sequence. max_chunk: None, or the most tokens one forward call writes (overrides
  cfg.cache.max_chunk; generate passes its prefill chunk).
  """
  dtype = cfg.compute_dtype if dtype is None else jnp.dtype(dtype)
  if cfg.cache.policy == "dense":
    return [DenseKVCache.create(batch, capacity, cfg.n_kv_heads, cfg.head_dim, dtype, window=cfg.sliding_window)
            if owner == layer else None for layer, owner in enumerate(cfg.kv_owners)]
  cache_cfg = cfg.cache if max_chunk is None else dataclasses.replace(cfg.cache, max_chunk=max_chunk)
  return make_caches(cache_cfg, num_layers=cfg.n_layers, kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                     batch=batch, capacity=capacity, dtype=dtype, cla_share=cfg.cla_share)


def rms_norm(x, scale, eps: float):
  """x [..., D] normalised in float32, scaled, returned in x.dtype (the HF LlamaRMSNorm order)."""
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return scale.astype(x.dtype) * xf.astype(x.dtype)


def _shift_rows(x, shift):
  """x [B, T, ...] with row t of sequence b moved to t + shift[b] (mod T)."""
  t = x.shape[1]
  src = (jnp.arange(t)[None, :] - shift[:, None]) % t
  return jnp.take_along_axis(x, src.reshape(src.shape + (1,) * (x.ndim - 2)), axis=1)


def _attend_cached(cache, q, num_new, scale):
  """Attends q [B, T, Hq, D] over a cache the chunk has been written to; returns out [B, T, Hq, D].

  With num_new int32 [B] only the first num_new[b] tokens of the chunk are real. The cache
  protocol places the queries at the last T positions written (lengths - T .. lengths - 1), so
  the real queries are moved to the end of the chunk for attend() and moved back afterwards.
  """
  if num_new is None:
    return cache.attend(q, scale=scale)
  shift = q.shape[1] - jnp.asarray(num_new, jnp.int32)
  out = cache.attend(_shift_rows(q, shift), scale=scale)
  return _shift_rows(out, -shift)


def _decoder_layer(p, x, cos, sin, cache, num_new, segment_ids, shared, *, cfg: ModelConfig, layer: int,
                   cached: bool):
  """One decoder layer: (x [B, T, dim], cache, shared).

  At a K/V owner layer (cfg.kv_owners[layer] == layer) `shared` comes in as None and goes out as
  what the rest of its CLA group reads: the RoPE'd (k, v) [B, T, Hkv, D] without caches, or
  the updated cache with them (cached). At the other layers it comes in as that, and `cache` is
  None.
  """
  dtype = cfg.compute_dtype
  w = lambda name: p[name].astype(dtype)
  h = rms_norm(x, p["attn_norm"], cfg.norm_eps)
  q = jnp.einsum("btd,dhk->bthk", h, w("wq"))
  if cfg.qkv_bias:
    q = q + w("bq")
  q = _constrain(apply_rope(q, cos, sin), "q")
  owner = cfg.kv_owners[layer] == layer
  if owner:
    k = jnp.einsum("btd,dhk->bthk", h, w("wk"))
    v = jnp.einsum("btd,dhk->bthk", h, w("wv"))
    if cfg.qkv_bias:
      k, v = k + w("bk"), v + w("bv")
    k, v = _constrain(apply_rope(k, cos, sin), "kv"), _constrain(v, "kv")
  if not cached:
    k, v = (k, v) if owner else shared
    attn = attention_fn_for(cfg.layer_attention[layer])(q, k, v, cfg=cfg, layer=layer, segment_ids=segment_ids)
    shared = (k, v)
  else:
    if owner:
      cache = cache.update(k, v, q=q, num_new=num_new)
      shared = cache
    attn = _attend_cached(shared, q, num_new, cfg.head_dim ** -0.5)
  attn = _constrain(attn.astype(dtype), "q")
  x = _constrain(x + jnp.einsum("bthk,hkd->btd", attn, w("wo")), "hidden")
  h = rms_norm(x, p["mlp_norm"], cfg.norm_eps)
  inner = _constrain(jax.nn.silu(h @ w("w_gate")) * (h @ w("w_up")), "mlp")
  x = _constrain(x + inner @ w("w_down"), "hidden")
  return x, cache, shared


def _validate_inputs(tokens, positions, caches, cfg, segment_ids, num_new) -> None:
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be int32 [batch, len]; got shape {tokens.shape}")
  if positions.shape != tokens.shape:
    raise ValueError(f"positions shape {positions.shape} must equal tokens shape {tokens.shape}")
  if segment_ids is not None and segment_ids.shape != tokens.shape:
    raise ValueError(f"segment_ids shape {segment_ids.shape} must equal tokens shape {tokens.shape}")
  if caches is not None:
    if len(caches) != cfg.n_layers:
      raise ValueError(f"caches has {len(caches)} entries; accepted: one per layer ({cfg.n_layers})")
    for i, (c, owner) in enumerate(zip(caches, cfg.kv_owners)):
      if (c is None) != (owner != i):
        raise ValueError(f"caches[{i}] is {'None' if c is None else type(c).__name__}; accepted: "
                         + ("a cache (this layer computes its own K/V)" if owner == i else
                            f"None (cla_share={cfg.cla_share}: layer {i} reads layer {owner}'s cache)"))
    if segment_ids is not None:
      raise ValueError("segment_ids (packed sequences) is for the no-cache path; got caches as well")
  elif num_new is not None:
    raise ValueError("num_new counts the real tokens written to caches; it needs caches")


def forward_hidden(params, tokens, positions, caches=None, *, cfg: ModelConfig, segment_ids=None, num_new=None):
  """The final-normed hidden states: (h [B, T, dim] in cfg.dtype, caches). Arguments as `forward`."""
  _validate_inputs(tokens, positions, caches, cfg, segment_ids, num_new)
  if cfg.landmark_block_size is not None:
    return _forward_hidden_landmarks(params, tokens, positions, caches, cfg=cfg, segment_ids=segment_ids)
  return _decoder_stack(params, tokens, positions, caches, cfg=cfg, segment_ids=segment_ids, num_new=num_new)


def _decoder_stack(params, tokens, positions, caches, *, cfg: ModelConfig, segment_ids, num_new):
  """Embedding, every decoder layer and the final norm: (h [B, T, dim], caches)."""
  x = _constrain(jnp.take(params["embed"], tokens, axis=0).astype(cfg.compute_dtype), "hidden")
  cos, sin = rope_cos_sin(positions, head_dim=cfg.head_dim, theta=cfg.rope_theta, scaling=cfg.rope_scaling,
                          max_seq_len=cfg.max_seq_len)
  new_caches = None if caches is None else []
  shared = None                     # what the current CLA group's owner layer computed
  for i, p in enumerate(params["layers"]):
    layer_fn = functools.partial(_decoder_layer, cfg=cfg, layer=i, cached=caches is not None)
    if cfg.remat:
      layer_fn = jax.checkpoint(layer_fn)
    if cfg.kv_owners[i] == i:
      shared = None
    x, cache, shared = layer_fn(p, x, cos, sin, None if caches is None else caches[i], num_new, segment_ids,
                                shared)
    if caches is not None:
      new_caches.append(cache)
  return rms_norm(x, params["final_norm"], cfg.norm_eps), new_caches


def _forward_hidden_landmarks(params, tokens, positions, caches, *, cfg: ModelConfig, segment_ids):
  """forward_hidden with landmark tokens (cfg.landmark_block_size): inserted after every block of
  tokens (a landmark takes the position of its block's last token), run through the layers, and
  dropped from the hidden states, which come back aligned with `tokens`. No-cache path only."""
  if caches is not None:
    raise ValueError("ModelConfig.landmark_block_size is set: landmark tokens are inserted in the no-cache "
                     "forward only; accepted: caches=None (decode such a model with landmark_block_size=None)")
  check_no_segments("ModelConfig.landmark_block_size is set: the landmark-token stream", segment_ids, cfg)
  bs = cfg.landmark_block_size
  ins = landmark_lib.insert_landmarks(tokens, block_size=bs, landmark_id=cfg.landmark_token_id,
                                      positions=positions)
  # The layers see the stream; "landmark_grouped" and "landmark" read the block size from cfg.
  h, _ = _decoder_stack(params, ins.tokens, ins.positions, None, cfg=cfg, segment_ids=None, num_new=None)
  return landmark_lib.remove_landmarks(h, block_size=bs), None


def logits_from_hidden(params, h, cfg: ModelConfig):
  """float32 logits [B, T, vocab] from final-normed hidden states h [B, T, dim]."""
  w = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
  return _constrain(jnp.einsum("btd,dv->btv", h, w.astype(cfg.compute_dtype), preferred_element_type=jnp.float32),
                    "logits")


def forward(params, tokens, positions, caches=None, *, cfg: ModelConfig, segment_ids=None, num_new=None):
  """Runs the decoder.

  Args:
    params: the pytree from `init` or `load_hf_checkpoint`.
    tokens: int32 [B, T].
    positions: int32 [B, T], the RoPE position of each token (restarting per packed segment, or
      the cache's lengths + arange(T) when decoding).
    caches: None (training / full sequences: causal attention within segment_ids, by each
      layer's attention method) or a list of per-layer caches (lcjax.cache protocol) that the
      chunk is appended to; None at the layers that read their CLA group's cache (cfg.kv_owners).
    cfg: the ModelConfig.
    segment_ids: int32 [B, T] or None: tokens attend only within their segment (packing).
    num_new: with caches, int32 [B] or None: only the first num_new[b] tokens of sequence b are
      real (right-padded chunks); the outputs at the padding are meaningless.
  With cfg.landmark_block_size set (no caches; segment_ids only as AttentionOptions.ignore_segment_ids
  allows), landmark tokens are inserted into
  the stream the layers see and removed from the outputs, which stay aligned with `tokens`.
  Returns:
    (logits float32 [B, T, vocab], updated caches or None).
  """
  h, caches = forward_hidden(params, tokens, positions, caches, cfg=cfg, segment_ids=segment_ids, num_new=num_new)
  return logits_from_hidden(params, h, cfg), caches
