"""Per-layer attention methods for the no-cache (training / full-sequence) path.

A model config names one method per layer (`ModelConfig.attention`); `attention_fn_for(name)`
resolves the name. To add a method, write a function with the signature below and add it to
ATTENTION_METHODS (the config validates names against this table).

    fn(q, k, v, *, cfg, layer, segment_ids) -> out
      q [B, T, Hq, D], k and v [B, T, Hkv, D] (RoPE applied), segment_ids int32 [B, T] or None;
      cfg the ModelConfig, layer the layer index; out [B, T, Hq, D] in q.dtype.

The cached path (prefill chunks and decoding) uses the layer's cache instead: `cache.update`
then `cache.attend` (lcjax/cache/base.py), since the cache decides how it reads.
"""

from __future__ import annotations

from typing import Callable

from lcjax.attention import attend, masks


def dense_attention(q, k, v, *, cfg, layer: int, segment_ids=None):
  """Exact causal attention (Mistral's sliding window if cfg.sliding_window), within segments."""
  del layer
  mask = masks.causal() if cfg.sliding_window is None else masks.sliding_window(cfg.sliding_window - 1)
  return attend(q, k, v, mask=mask, segment_ids=segment_ids, scale=cfg.head_dim ** -0.5)


ATTENTION_METHODS: dict[str, Callable] = {
    "dense": dense_attention,
}


def attention_fn_for(name: str) -> Callable:
  """The attention function registered under `name` in ATTENTION_METHODS."""
  try:
    return ATTENTION_METHODS[name]
  except KeyError:
    raise ValueError(f"attention method {name!r}; accepted: {sorted(ATTENTION_METHODS)}") from None
