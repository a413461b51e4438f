"""Per-layer attention methods for the no-cache (training / prefill / full-sequence) path.

A model config names one method per layer (`ModelConfig.attention`) and one set of options for
all of them (`ModelConfig.attention_options`, an `AttentionOptions`); `attention_fn_for(name)`
resolves a name. To add a method, write a function with the signature below and add it to
ATTENTION_METHODS (the config validates names against this table).

    fn(q, k, v, *, cfg, layer, segment_ids) -> out
      q [B, T, Hq, D], k and v [B, T, Hkv, D] (RoPE applied), segment_ids int32 [B, T] or None;
      cfg the ModelConfig, layer the layer index; out [B, T, Hq, D] in q.dtype.

The methods (option fields of AttentionOptions in brackets):

  dense            exact causal attention (Mistral's window when cfg.sliding_window is set).
  sliding_window   each query sees its last `window` keys, itself included [window].
  streaming        StreamingLLM's A-shape: the first `sink_tokens` keys plus the window
                   [sink_tokens (default 4), window].
  block_topk, quest, sale, hip, landmark
                   "select, then attend": a selector of lcjax.attention.selectors builds a
                   BlockLayout from this layer's q and k (causal, blocks of `block_size`),
                   keeping `budget` key blocks per query block besides the selector's sinks
                   and local window; exact attention then runs over the layout
                   [block_size, budget, sink_tokens, local_tokens]. The budget is clipped to the
                   number of key blocks of the sequence, so a budget >= ceil(T / block_size)
                   is dense attention. "landmark" scores each key block by its landmark key:
                   the landmark token's key when the model inserts landmark tokens
                   (cfg.landmark_block_size; blocks are then landmark_block_size + 1 long and
                   each ends on its landmark), else the block's mean key.
  vertical_slash   MInference [block_size, n_vertical, n_slash, last_q, sink_tokens, local_tokens].
  flexprefill      FlexPrefill [block_size, gamma, tau, sink_tokens, local_tokens].
  centroid         Squeezed Attention: k-means over the layer's keys, then clusters whose
                   estimated attention share is >= centroid_threshold
                   [block_size, centroid_clusters, centroid_threshold, kmeans_iters].
  hyper            HyperAttention (sorted LSH + sampling), causal; sequences of at most
                   hyper_min_seq_len tokens are computed exactly, as in the paper's recursion
                   [hyper_lsh_bits, hyper_block_size, hyper_sample_size, hyper_min_seq_len, seed].
  linear_elu, linear_relu, linear_favor, linear_cosformer, linear_norm_aware
                   kernelized attention, causal and chunked (Lightning-style), with the named
                   feature map [linear_chunk_size; linear_features and seed for FAVOR+]. Not an
                   approximation of softmax attention: meaningful only in a model trained with it.
  landmark_grouped landmark attention's training form (grouped softmax); needs
                   cfg.landmark_block_size (the model then inserts landmark tokens).

Selection and sampling are not differentiated (layouts are integer tables; q and k go into the
selectors through stop_gradient), so a training step with a selector trains the model under the
layout the selector picks, the exact attention over it differentiated as usual.

Methods apply to the no-cache path only. The cached path (chunked prefill and decoding, as in
generate) uses the layer's cache instead: `cache.update` then `cache.attend`
(lcjax/cache/base.py), which is dense attention over what the cache holds unless the cache
itself compresses or retrieves.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.attention import attend, masks
from lcjax.attention import hyper as hyper_lib
from lcjax.attention import landmark as landmark_lib
from lcjax.attention import linear as linear_lib
from lcjax.attention.selectors import (block_topk, centroid, flexprefill, hip, landmark, quest, sale,
                                       vertical_slash)


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
  """Options of the attention methods (module docstring says which method reads which).

  Attributes:
    block_size: query and key block of the selectors' layouts.
    budget: key blocks per query block kept by the top-k selectors (block_topk, quest, sale,
      hip, landmark), besides the blocks they always keep; clipped to the blocks there are.
    sink_tokens, local_tokens: None (each selector's own default) or the attention sinks and
      local window the selectors keep; sink_tokens is also "streaming"'s sinks (None: 4).
    window: keys each query sees in "sliding_window" and "streaming", itself included.
    n_vertical, n_slash, last_q: vertical_slash's columns, diagonals and estimating queries
      (clipped to the sequence length).
    gamma, tau: FlexPrefill's kept attention share and query-aware JS threshold, in (0, 1].
    centroid_clusters, centroid_threshold, kmeans_iters: Squeezed Attention's k-means size
      (clipped to the sequence length), kept-cluster share in (0, 1] and Lloyd iterations.
    hyper_lsh_bits, hyper_block_size, hyper_sample_size, hyper_min_seq_len: HyperAttention's
      knobs (lcjax.attention.hyper).
    linear_chunk_size: chunk of the causal linear attention; linear_features: FAVOR+'s random
      features.
    seed: the seed of HyperAttention's hashes and FAVOR+'s features (folded with the layer).
    ignore_segment_ids: hyper, linear_* and landmark_grouped (and the model's landmark-token
      switch) cannot restrict attention to segments, so they reject segment_ids unless this is
      True; then segment_ids are ignored, which is exact for unpacked right-padded rows (lcjax's
      task and eval batches: causal attention never reaches the padding) and WRONG for packed
      sequences (data.pack=True).
  """
  block_size: int = 64
  budget: int = 4
  sink_tokens: int | None = None
  local_tokens: int | None = None
  window: int = 256
  n_vertical: int = 64
  n_slash: int = 64
  last_q: int = 64
  gamma: float = 0.9
  tau: float = 0.1
  centroid_clusters: int = 16
  centroid_threshold: float = 0.01
  kmeans_iters: int = 10
  hyper_lsh_bits: int = 7
  hyper_block_size: int = 256
  hyper_sample_size: int = 256
  hyper_min_seq_len: int = 4096
  linear_chunk_size: int = 64
  linear_features: int = 64
  seed: int = 0
  ignore_segment_ids: bool = False

  def __post_init__(self):
    minimum = dict(block_size=1, budget=1, window=1, n_vertical=1, n_slash=1, last_q=1, centroid_clusters=1,
                   kmeans_iters=1, hyper_lsh_bits=1, hyper_block_size=1, hyper_sample_size=0,
                   hyper_min_seq_len=1, linear_chunk_size=1, linear_features=1, seed=0)
    for name, low in minimum.items():
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"AttentionOptions.{name}={value!r}; accepted: an int >= {low}")
    for name, low in (("sink_tokens", 0), ("local_tokens", 1)):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
        raise ValueError(f"AttentionOptions.{name}={value!r}; accepted: None or an int >= {low}")
    if not isinstance(self.ignore_segment_ids, bool):
      raise ValueError(f"AttentionOptions.ignore_segment_ids={self.ignore_segment_ids!r}; accepted: True or False")
    for name in ("gamma", "tau", "centroid_threshold"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"AttentionOptions.{name}={value!r}; accepted: a float in (0, 1]")
      object.__setattr__(self, name, float(value))


def _scale(cfg) -> float:
  return cfg.head_dim ** -0.5


def _base_mask(cfg) -> masks.Mask:
  """The dense method's mask: causal, or Mistral's sliding window when cfg.sliding_window."""
  return masks.causal() if cfg.sliding_window is None else masks.sliding_window(cfg.sliding_window - 1)


def check_no_segments(name: str, segment_ids, cfg) -> None:
  """Raises unless segment_ids is None or attention_options.ignore_segment_ids (see there)."""
  if segment_ids is not None and not cfg.attention_options.ignore_segment_ids:
    raise ValueError(f"{name} does not take segment_ids (packed sequences); accepted: segment_ids=None, "
                     "AttentionOptions.ignore_segment_ids=True for unpacked right-padded rows, or a softmax "
                     "method (dense, sliding_window, streaming, a selector)")


def dense_attention(q, k, v, *, cfg, layer: int, segment_ids=None):
  """Exact causal attention (Mistral's sliding window if cfg.sliding_window), within segments."""
  del layer
  return attend(q, k, v, mask=_base_mask(cfg), segment_ids=segment_ids, scale=_scale(cfg))


def sliding_window_attention(q, k, v, *, cfg, layer: int, segment_ids=None):
  """Each query sees its last `attention_options.window` keys, itself included."""
  del layer
  mask = masks.sliding_window(cfg.attention_options.window - 1) & _base_mask(cfg)
  return attend(q, k, v, mask=mask, segment_ids=segment_ids, scale=_scale(cfg))


def streaming_attention(q, k, v, *, cfg, layer: int, segment_ids=None):
  """StreamingLLM (Xiao et al. 2024): attention sinks plus a sliding window."""
  del layer
  o = cfg.attention_options
  sinks = 4 if o.sink_tokens is None else o.sink_tokens
  shape = masks.sliding_window(o.window - 1) if sinks == 0 else masks.sinks(sinks) | masks.sliding_window(o.window - 1)
  return attend(q, k, v, mask=shape & _base_mask(cfg), segment_ids=segment_ids, scale=_scale(cfg))


def _kept(o) -> dict:
  """The selectors' sink/local keyword arguments the options set (None: selector default)."""
  out = {}
  if o.sink_tokens is not None:
    out["sink_tokens"] = o.sink_tokens
  if o.local_tokens is not None:
    out["local_tokens"] = o.local_tokens
  return out


def _landmark_keys(k, block: int):
  """[B, ceil(T / block), Hkv, D]: the key of the last position of each block (the landmark
  token's when landmarks close blocks of block - 1 ordinary tokens; a trailing partial block,
  which has no landmark, is represented by its last key)."""
  t = k.shape[1]
  idx = np.minimum(np.arange(-(-t // block)) * block + block - 1, t - 1)
  return k[:, idx]


def select_layout(name: str, q, k, *, cfg):
  """The BlockLayout that selector method `name` picks for q, k (causal, queries = keys).

  Args:
    name: one of SELECTOR_METHODS.
    q: [B, T, Hq, D]; k: [B, T, Hkv, D]; cfg: the ModelConfig (its attention_options).
  Returns:
    BlockLayout [B, Hq] with block sizes attention_options.block_size (landmark_block_size + 1
    for "landmark" in a model with landmark tokens).
  """
  o = cfg.attention_options
  q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
  t = k.shape[1]
  block = o.block_size
  if name == "landmark" and cfg.landmark_block_size is not None:
    block = cfg.landmark_block_size + 1
  blocks = dict(block_q=block, block_kv=block)
  n_kv = -(-t // block)
  budget = min(o.budget, n_kv)
  if name in ("block_topk", "quest", "sale", "hip"):
    module = dict(block_topk=block_topk, quest=quest, sale=sale, hip=hip)[name]
    return module.select(q, k, budget, **blocks, **_kept(o))
  if name == "landmark":
    landmarks = _landmark_keys(k, block) if cfg.landmark_block_size is not None else None
    return landmark.select(q, k, budget, landmarks=landmarks, **blocks, **_kept(o))
  if name == "vertical_slash":
    return vertical_slash.select(q, k, min(o.n_vertical, t), min(o.n_slash, t), last_q=o.last_q, **blocks,
                                 **_kept(o))
  if name == "flexprefill":
    return flexprefill.select(q, k, o.gamma, tau=o.tau, **blocks, **_kept(o))
  if name == "centroid":
    centroids, assignments = centroid.kmeans(k, min(o.centroid_clusters, t), iters=o.kmeans_iters)
    return centroid.select(q, k, centroids, assignments, o.centroid_threshold, **blocks, **_kept(o))
  raise ValueError(f"selector method {name!r}; accepted: {SELECTOR_METHODS}")


def _selector_attention(name: str) -> Callable:

  def fn(q, k, v, *, cfg, layer: int, segment_ids=None):
    del layer
    layout = select_layout(name, q, k, cfg=cfg)
    return attend(q, k, v, mask=_base_mask(cfg), layout=layout, segment_ids=segment_ids, scale=_scale(cfg))

  fn.__name__ = f"{name}_attention"
  fn.__doc__ = f"Exact attention over the layout of selector {name!r} (select_layout)."
  return fn


def hyper_attention(q, k, v, *, cfg, layer: int, segment_ids=None):
  """HyperAttention (Han et al. 2024), causal; hashes seeded by (options.seed, layer)."""
  check_no_segments("attention method 'hyper'", segment_ids, cfg)
  o = cfg.attention_options
  rng = jax.random.fold_in(jax.random.key(o.seed), layer)
  return hyper_lib.hyper_attention(q, k, v, rng=rng, lsh_bits=o.hyper_lsh_bits, block_size=o.hyper_block_size,
                                   sample_size=o.hyper_sample_size, causal=True,
                                   min_seq_len=o.hyper_min_seq_len, scale=_scale(cfg))


def _feature_maps(kind: str, q, k, *, cfg, layer: int):
  o = cfg.attention_options
  if kind == "elu":
    return linear_lib.elu_plus_one(q), linear_lib.elu_plus_one(k)
  if kind == "relu":
    return linear_lib.relu(q), linear_lib.relu(k)
  if kind == "favor":
    key = jax.random.fold_in(jax.random.key(o.seed), layer)
    projection = linear_lib.orthogonal_random_features(key, o.linear_features, q.shape[-1])
    return (linear_lib.favor_plus(q, projection, is_query=True, scale=_scale(cfg)),
            linear_lib.favor_plus(k, projection, is_query=False, scale=_scale(cfg)))
  if kind == "cosformer":
    t = q.shape[1]
    positions = jnp.arange(t, dtype=jnp.int32)
    max_len = max(cfg.max_seq_len, t + 1)
    return (linear_lib.cosformer(q, positions, max_len=max_len),
            linear_lib.cosformer(k, positions, max_len=max_len))
  if kind == "norm_aware":
    return linear_lib.norm_aware(q, is_query=True), linear_lib.norm_aware(k, is_query=False)
  raise ValueError(f"linear feature map {kind!r}; accepted: {LINEAR_FEATURE_MAPS}")


def _linear_attention(kind: str) -> Callable:

  def fn(q, k, v, *, cfg, layer: int, segment_ids=None):
    check_no_segments(f"attention method 'linear_{kind}'", segment_ids, cfg)
    phi_q, phi_k = _feature_maps(kind, q, k, cfg=cfg, layer=layer)
    out = linear_lib.chunk_linear_attention(phi_q, phi_k, v, chunk_size=cfg.attention_options.linear_chunk_size)
    return out.astype(q.dtype)

  fn.__name__ = f"linear_{kind}_attention"
  fn.__doc__ = f"Causal chunked linear attention with the {kind!r} feature map (lcjax.attention.linear)."
  return fn


def landmark_grouped_attention(q, k, v, *, cfg, layer: int, segment_ids=None):
  """Landmark attention's grouped softmax over a stream with landmark tokens (Mohtashami & Jaggi 2023)."""
  del layer
  check_no_segments("attention method 'landmark_grouped'", segment_ids, cfg)
  if cfg.landmark_block_size is None:
    raise ValueError("attention method 'landmark_grouped' needs ModelConfig.landmark_block_size (an int)")
  return landmark_lib.landmark_attention(q, k, v, block_size=cfg.landmark_block_size, scale=_scale(cfg))


SELECTOR_METHODS = ("block_topk", "quest", "sale", "hip", "landmark", "vertical_slash", "flexprefill", "centroid")
LINEAR_FEATURE_MAPS = ("elu", "relu", "favor", "cosformer", "norm_aware")

ATTENTION_METHODS: dict[str, Callable] = {
    "dense": dense_attention,
    "sliding_window": sliding_window_attention,
    "streaming": streaming_attention,
    **{name: _selector_attention(name) for name in SELECTOR_METHODS},
    "hyper": hyper_attention,
    **{f"linear_{kind}": _linear_attention(kind) for kind in LINEAR_FEATURE_MAPS},
    "landmark_grouped": landmark_grouped_attention,
}

# Methods that compute softmax attention exactly over a subset of pairs (recall/density apply).
SPARSE_SOFTMAX_METHODS = ("sliding_window", "streaming") + SELECTOR_METHODS


def attention_fn_for(name: str) -> Callable:
  """The attention function registered under `name` in ATTENTION_METHODS."""
  try:
    return ATTENTION_METHODS[name]
  except KeyError:
    raise ValueError(f"attention method {name!r}; accepted: {sorted(ATTENTION_METHODS)}") from None
