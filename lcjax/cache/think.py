"""ThinK: query-driven pruning of key channels.

Xu et al., "ThinK: Thinner Key Cache by Query-Driven Pruning" (arXiv:2407.21018). Key channels
matter unequally; channel c of a head scores ||Q[:, c]|| * ||K[:, c]|| (the Frobenius norm of its
rank-one contribution Q[:, c] K[:, c]^T to the logits), with Q the observation window's queries
(the last `obs_window` queries of the prompt chunk) and K the chunk's keys. The top
`round(channel_keep * D)` channels per (sequence, KV head) are kept; queries are restricted to the
same channels, logits keep the full-width scale D ** -0.5. Values are untouched.

Here the channels are chosen at the first update (the prompt, or its first chunk) and then apply
to every key, including that chunk's own attention and the later decoded tokens; the paper prunes
the prompt's keys once its prefill is done.
Capacity: positions >= capacity cannot be stored: those sequences' outputs become NaN.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lcjax.attention import attend, masks
from lcjax.cache.dense import write_rows
from lcjax.cache.slots import resolve_num_new


def channel_scores(q_obs, k, kv_heads: int):
  """float32 [B, Hkv, D]: ||Q_c|| * ||K_c|| with the group's query heads pooled (GQA).

  q_obs: [B, W, Hq, D] (rows outside the window zeroed); k: [B, T, Hkv, D] (invalid rows zeroed).
  """
  b, w, hq, d = q_obs.shape
  qn = jnp.sqrt((q_obs.astype(jnp.float32) ** 2).reshape(b, w, kv_heads, hq // kv_heads, d).sum((1, 3)))
  kn = jnp.sqrt((k.astype(jnp.float32) ** 2).sum(1))
  return qn * kn


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v", "channels", "chosen", "lengths"],
                   meta_fields=["obs_window"])
@dataclasses.dataclass(frozen=True)
class ThinKKVCache:
  """k: [B, C, Hkv, r] pruned keys; v: [B, C, Hkv, D]; channels: int32 [B, Hkv, r] kept channels
  (ascending); chosen: bool [B] channels decided; lengths: int32 [B]."""
  k: jax.Array
  v: jax.Array
  channels: jax.Array
  chosen: jax.Array
  lengths: jax.Array
  obs_window: int

  @classmethod
  def create(cls, batch: int, capacity: int, kv_heads: int, head_dim: int, *, channel_keep: float = 0.5,
             obs_window: int = 8, dtype=jnp.float32) -> "ThinKKVCache":
    r = int(round(channel_keep * head_dim))
    if not 1 <= r <= head_dim:
      raise ValueError(f"channel_keep={channel_keep}: keeps {r} of {head_dim} channels; need at least 1")
    return cls(jnp.zeros((batch, capacity, kv_heads, r), dtype), jnp.zeros((batch, capacity, kv_heads, head_dim), dtype),
               jnp.zeros((batch, kv_heads, r), jnp.int32), jnp.zeros((batch,), bool),
               jnp.zeros((batch,), jnp.int32), obs_window)

  @property
  def head_dim(self) -> int:
    return self.v.shape[-1]

  def update(self, k_new, v_new, *, q=None, num_new=None) -> "ThinKKVCache":
    if q is None:
      raise ValueError("ThinK chooses key channels with the queries: pass q= to update()")
    b, t, h, d = k_new.shape
    num_new = resolve_num_new(self.lengths, t, num_new)
    rows = jnp.arange(t)[None, :]
    valid = rows < num_new[:, None]
    in_window = valid & (rows >= num_new[:, None] - self.obs_window)
    s = channel_scores(jnp.where(in_window[..., None, None], q, 0), jnp.where(valid[..., None, None], k_new, 0), h)
    r = self.k.shape[-1]
    top = jnp.sort(jax.lax.top_k(s, r)[1], -1).astype(jnp.int32)                  # [B, Hkv, r]
    channels = jnp.where(self.chosen[:, None, None], self.channels, top)
    k_sel = jnp.take_along_axis(k_new, channels[:, None], -1)  # [B, T, Hkv, r]
    return dataclasses.replace(self, k=write_rows(self.k, k_sel.astype(self.k.dtype), self.lengths),
                               v=write_rows(self.v, v_new.astype(self.v.dtype), self.lengths),
                               channels=channels, chosen=jnp.ones_like(self.chosen),
                               lengths=self.lengths + num_new)

  def attend(self, q, *, scale: float | None = None, implementation: str = "xla"):
    hq, hkv = q.shape[2], self.k.shape[2]
    ch = jnp.repeat(self.channels, hq // hkv, axis=1)                               # [B, Hq, r]
    q_sel = jnp.take_along_axis(q, ch[:, None], -1)
    scale = self.head_dim ** -0.5 if scale is None else scale
    out = attend(q_sel, self.k.astype(q.dtype), self.v.astype(q.dtype), mask=masks.causal(), scale=scale,
                 q_offset=self.lengths - q.shape[1], kv_valid_len=self.lengths, implementation=implementation)
    return jnp.where((self.lengths > self.k.shape[1])[:, None, None, None], jnp.nan, out)

  def memory_bytes(self) -> int:
    return int(sum(x.nbytes for x in (self.k, self.v, self.channels, self.lengths)) + self.chosen.size)
