"""SnapKV: score the prompt with an observation window of its last queries, pooled.

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation" (arXiv:2404.14469). The
attention of the last `window` prompt queries, summed over those queries and pooled along the
sequence (kernel `kernel`, max or avg pooling so that neighbours of important tokens come along),
picks the prompt tokens kept; the window itself is always kept.

Scoring happens on prefill chunks (T > 1). During decoding the paper does not compress; with a
fixed budget we keep every decoded token (score +inf, tie broken towards recent) and, once the
budget is full, drop the lowest-scored prompt tokens first and then the oldest decoded ones.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lcjax.cache.evicting import EvictionPolicy


def pool_by_position(score, pos, kernel: int, pooling: str):
  """Pools float32 score [B, C, H] along the token order given by pos (empty slots: pos < 0).

  Same as torch's max_pool1d / avg_pool1d(kernel, stride=1, padding=kernel // 2) over the tokens
  sorted by position (avg counts the padding, as torch does by default).
  """
  if kernel <= 1:
    return score
  key = jnp.where(pos >= 0, pos, jnp.iinfo(jnp.int32).max)
  order = jnp.argsort(key, axis=1)
  s = jnp.take_along_axis(jnp.where(pos >= 0, score, 0.0), order, 1)
  pad = kernel // 2
  if pooling == "max":
    pooled = jax.lax.reduce_window(s, -jnp.inf, jax.lax.max, (1, kernel, 1), (1, 1, 1),
                                   ((0, 0), (pad, pad), (0, 0)))
  elif pooling == "avg":
    pooled = jax.lax.reduce_window(s, 0.0, jax.lax.add, (1, kernel, 1), (1, 1, 1),
                                   ((0, 0), (pad, pad), (0, 0))) / kernel
  else:
    raise ValueError(f"pooling={pooling!r}; accepted: 'max', 'avg'")
  inverse = jnp.argsort(order, axis=1)
  return jnp.take_along_axis(pooled[:, :s.shape[1]], inverse, 1)


@dataclasses.dataclass(frozen=True)
class SnapKVPolicy(EvictionPolicy):
  """window: the observation window (always kept); kernel, pooling: the score pooling."""
  window: int = 8
  kernel: int = 7
  pooling: str = "max"

  def observe(self, cache, q, num_new, t):
    if t == 1:   # decoding: keep the prefill scores, new tokens kept first (see module docstring)
      is_new = cache.pos >= cache.lengths[:, None, None] - num_new[:, None, None]
      return jnp.where(is_new & (cache.pos >= 0), jnp.inf, cache.score)
    p = self.probs(cache, q, num_new)                           # [B, Hkv, T, C]
    rows = jnp.arange(t)[None, :]
    in_window = (rows >= num_new[:, None] - self.window) & (rows < num_new[:, None])
    s = jnp.moveaxis(jnp.where(in_window[:, None, :, None], p, 0.0).sum(2), 1, 2)   # [B, C, Hkv]
    # The window's own columns are excluded from pooling, as in the paper's code (they are kept).
    s = jnp.where(cache.pos >= cache.lengths[:, None, None] - self.window, 0.0, s)
    return pool_by_position(s, cache.pos, self.kernel, self.pooling)
