"""RazorAttention: retrieval heads keep everything; the others keep sinks + window + one
compensation token.

Tang et al., "RazorAttention: Efficient KV Cache Compression Through Retrieval Heads"
(arXiv:2407.15891). Only a few heads (echo and induction heads) retrieve from far away; every other
head is served by StreamingLLM's sinks plus a recent window. The dropped tokens are summarised by a
compensation token per head whose key and value are the means of the dropped keys and values, so
that the head still sees "the rest" as one entry.

Retrieval heads are given by the config (per layer, KV-head indices); the paper finds them with an
echo/induction score on a probe of repeated random tokens, which needs the model:
lcjax.models.retrieval_heads.find_retrieval_heads. Retrieval heads get the full sequence capacity
as budget (no eviction).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lcjax.cache.evicting import EvictingKVCache, EvictionPolicy
from lcjax.cache.slots import attend_slots, resolve_num_new, slot_visibility


@dataclasses.dataclass(frozen=True)
class RazorPolicy(EvictionPolicy):
  """No score: non-forced tokens tie, and ties keep the more recent one (so budget = sinks + window
  is exactly StreamingLLM)."""


@functools.partial(jax.tree_util.register_dataclass, data_fields=["inner", "comp_k", "comp_v", "comp_n"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class RazorKVCache:
  """inner: EvictingKVCache; comp_k, comp_v: float32 [B, Hkv, D] sums of the dropped keys/values;
  comp_n: float32 [B, Hkv] how many were dropped."""
  inner: EvictingKVCache
  comp_k: jax.Array
  comp_v: jax.Array
  comp_n: jax.Array

  @classmethod
  def create(cls, batch: int, kv_heads: int, head_dim: int, *, capacity: int, sinks: int = 4,
             window: int = 64, retrieval_heads: tuple[int, ...] = (), max_chunk: int = 1,
             dtype=jnp.float32) -> "RazorKVCache":
    bad = [h for h in retrieval_heads if not 0 <= h < kv_heads]
    if bad:
      raise ValueError(f"retrieval_heads={retrieval_heads}: indices must be in [0, {kv_heads})")
    budgets = tuple(max(capacity, sinks + window) if h in retrieval_heads else sinks + window
                    for h in range(kv_heads))
    inner = EvictingKVCache.create(batch, kv_heads, head_dim, policy=RazorPolicy(sinks, window),
                                   budget=budgets, max_chunk=max_chunk, dtype=dtype)
    z = jnp.zeros((batch, kv_heads, head_dim), jnp.float32)
    return cls(inner, z, z, jnp.zeros((batch, kv_heads), jnp.float32))

  @property
  def lengths(self):
    return self.inner.lengths

  def update(self, k_new, v_new, *, q=None, num_new=None) -> "RazorKVCache":
    num_new = resolve_num_new(self.lengths, k_new.shape[1], num_new)
    inner, evicted_pos = self.inner.compress()
    dropped = (evicted_pos >= 0)[..., None]
    # Sum the dropped tokens before the write reuses their slots.
    add = lambda x: jnp.where(dropped, x.astype(jnp.float32), 0.0).sum(1)
    comp_k, comp_v = self.comp_k + add(inner.k), self.comp_v + add(inner.v)
    return RazorKVCache(inner.write(k_new, v_new, num_new), comp_k, comp_v,
                        self.comp_n + dropped[..., 0].sum(1))

  def attend(self, q, *, scale: float | None = None, implementation: str = "xla"):
    n = jnp.maximum(self.comp_n, 1.0)[..., None]
    comp = lambda s: (s / n)[:, None].astype(self.inner.k.dtype)           # [B, 1, Hkv, D]
    k = jnp.concatenate([self.inner.k, comp(self.comp_k)], 1)
    v = jnp.concatenate([self.inner.v, comp(self.comp_v)], 1)
    # The compensation token sits at position 0: every query sees it once something was dropped.
    comp_pos = jnp.where(self.comp_n > 0, 0, -1)[:, None, :]
    pos = jnp.moveaxis(jnp.concatenate([self.inner.pos, comp_pos], 1), 1, 2)
    return attend_slots(q, k, v, slot_visibility(pos, q_heads=q.shape[2]), self.lengths, scale=scale,
                        implementation=implementation)

  def memory_bytes(self) -> int:
    b, h, d = self.comp_k.shape
    return self.inner.memory_bytes() + b * h * (2 * d * self.inner.k.dtype.itemsize + 4)
