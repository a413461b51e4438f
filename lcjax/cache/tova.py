"""TOVA: evict the token with the lowest attention from the current query.

Oren et al., "Transformers are Multi-State RNNs" (arXiv:2401.06104). The score is replaced at every
step by the attention of the newest query (no accumulation); the paper averages it over the heads
of a layer (average_heads=True), so every head keeps the same tokens.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lcjax.cache.evicting import EvictionPolicy


@dataclasses.dataclass(frozen=True)
class TOVAPolicy(EvictionPolicy):
  average_heads: bool = True

  def observe(self, cache, q, num_new, t):
    p = self.probs(cache, q, num_new)                         # [B, Hkv, T, C]
    last = jnp.clip(num_new - 1, 0, t - 1)
    p = jnp.take_along_axis(p, last[:, None, None, None], 2)[:, :, 0]   # newest valid query
    if self.average_heads:
      p = jnp.broadcast_to(p.mean(1, keepdims=True), p.shape)
    return jnp.moveaxis(p, 1, 2)
