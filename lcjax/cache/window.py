"""Sliding-window ring buffer, and StreamingLLM's attention sinks plus window.

StreamingLLM: Xiao et al., "Efficient Streaming Language Models with Attention Sinks" (ICLR 2024,
arXiv:2309.17453). Keeping the first few tokens ("sinks") next to a window of recent tokens keeps
the softmax stable when old tokens are dropped. sinks=0 gives a plain sliding window (Mistral).

Layout: slots [0, sinks) hold positions 0 .. sinks-1 for ever; slots [sinks, sinks + ring) are a
ring indexed by (position - sinks) % ring. ring = window + max_chunk - 1, so that every query of a
chunk of up to max_chunk tokens still finds its whole window when the chunk has been written
(for decoding, max_chunk=1 and the ring is exactly the window).

Positions: each slot stores its token's original absolute position and the mask is evaluated on
those (query sees sinks and keys at distance < window). Keys are cached after RoPE, so they keep
their original rotation; the paper re-assigns positions inside the cache, which pre-rotated keys
cannot do. A full cache is the normal state: old tokens are overwritten by design (no overflow).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lcjax.cache.base import KV_AXES, tree_bytes
from lcjax.cache.slots import attend_slots, resolve_num_new, slot_visibility


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v", "pos", "lengths"],
                   meta_fields=["sinks", "window", "max_chunk"])
@dataclasses.dataclass(frozen=True)
class SinkWindowKVCache:
  """k, v: [B, sinks + ring, Hkv, D]; pos: int32 [B, sinks + ring] (-1: empty); lengths int32 [B]."""
  k: jax.Array
  v: jax.Array
  pos: jax.Array
  lengths: jax.Array
  sinks: int
  window: int
  max_chunk: int

  @classmethod
  def create(cls, batch: int, kv_heads: int, head_dim: int, *, window: int, sinks: int = 0,
             max_chunk: int = 1, dtype=jnp.float32) -> "SinkWindowKVCache":
    if window < 1:
      raise ValueError(f"window={window}: need >= 1")
    if sinks < 0 or max_chunk < 1:
      raise ValueError(f"sinks={sinks}, max_chunk={max_chunk}: need sinks >= 0 and max_chunk >= 1")
    slots = sinks + window + max_chunk - 1
    shape = (batch, slots, kv_heads, head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.full((batch, slots), -1, jnp.int32),
               jnp.zeros((batch,), jnp.int32), sinks, window, max_chunk)

  @property
  def ring(self) -> int:
    return self.k.shape[1] - self.sinks

  def update(self, k_new, v_new, *, q=None, num_new=None) -> "SinkWindowKVCache":
    """Writes k_new, v_new [B, T, Hkv, D] (T <= max_chunk, else ValueError)."""
    del q
    b, t = k_new.shape[:2]
    if t > self.max_chunk:
      raise ValueError(f"update of {t} tokens exceeds max_chunk={self.max_chunk} of this ring buffer; "
                       "create it with max_chunk >= the prefill chunk")
    num_new = resolve_num_new(self.lengths, t, num_new)
    p = self.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None]            # [B, T]
    slot = jnp.where(p < self.sinks, p, self.sinks + (p - self.sinks) % self.ring)
    # Tokens past num_new go to an out-of-range slot and are dropped by the scatter.
    slot = jnp.where(jnp.arange(t)[None] < num_new[:, None], slot, self.k.shape[1])
    rows = jnp.arange(b)[:, None]
    k = self.k.at[rows, slot].set(k_new.astype(self.k.dtype), mode="drop")
    v = self.v.at[rows, slot].set(v_new.astype(self.v.dtype), mode="drop")
    pos = self.pos.at[rows, slot].set(p, mode="drop")
    return dataclasses.replace(self, k=k, v=v, pos=pos, lengths=self.lengths + num_new)

  def attend(self, q, *, scale: float | None = None, implementation: str = "xla"):
    visible = slot_visibility(self.pos[:, None], q_heads=q.shape[2], window=self.window, sinks=self.sinks)
    return attend_slots(q, self.k, self.v, visible, self.lengths, scale=scale, implementation=implementation)

  def memory_bytes(self) -> int:
    return tree_bytes((self.k, self.v, self.pos, self.lengths))

  def logical_axes(self) -> "SinkWindowKVCache":
    """This cache's structure with logical axis names in place of its arrays (lcjax.sharding)."""
    return dataclasses.replace(self, k=KV_AXES, v=KV_AXES, pos=("batch", "cache_seq"), lengths=("batch",))
