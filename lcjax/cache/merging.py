"""Merging of similar adjacent keys (KVMerger / CHELSEA style).

Wang et al., "Model Tells You Where to Merge: Adaptive KV Cache Merging for LLMs on Long-Context
Tasks" (KVMerger, arXiv:2407.08454) and Hu et al., "Efficient Long-Context Inference with
Chunked Clustering of Key Similarity" (CHELSEA, arXiv:2506.11418): consecutive keys are often
nearly parallel, so runs of similar keys can share one slot.

Rule here (greedy, in token order, per KV head): a new token joins the previous slot when the
cosine similarity of its key with the previous token's key exceeds `threshold`; the slot keeps
the count-weighted mean of its keys and values and its count n, and attention adds log(n) to the
slot's logit, so that a run of n identical tokens is represented exactly. (KVMerger weights the
merged tokens with a Gaussian kernel around a pivot token; the mean is the uniform case.) A slot's
position is that of its last token: no query sees a slot before all its tokens exist.
Capacity: more slots than `capacity` cannot be stored: those sequences' outputs become NaN.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lcjax.cache.slots import attend_slots, resolve_num_new, slot_visibility


def cosine(a, b):
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return (a * b).sum(-1) / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-12)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["k", "v", "count", "pos", "num_slots", "last_key", "overflow", "lengths"],
                   meta_fields=["threshold"])
@dataclasses.dataclass(frozen=True)
class MergingKVCache:
  """k, v: float32 [B, C, Hkv, D] slot means; count: float32 [B, C, Hkv]; pos: int32 [B, C, Hkv]
  (-1 empty); num_slots: int32 [B, Hkv]; last_key: [B, Hkv, D] previous raw key; overflow: bool [B]."""
  k: jax.Array
  v: jax.Array
  count: jax.Array
  pos: jax.Array
  num_slots: jax.Array
  last_key: jax.Array
  overflow: jax.Array
  lengths: jax.Array
  threshold: float

  @classmethod
  def create(cls, batch: int, capacity: int, kv_heads: int, head_dim: int, *, threshold: float = 0.9,
             dtype=jnp.float32) -> "MergingKVCache":
    if not -1.0 <= threshold <= 1.0:
      raise ValueError(f"threshold={threshold}: a cosine similarity, must be in [-1, 1]")
    shape = (batch, capacity, kv_heads)
    return cls(jnp.zeros(shape + (head_dim,), dtype), jnp.zeros(shape + (head_dim,), dtype),
               jnp.zeros(shape, jnp.float32), jnp.full(shape, -1, jnp.int32),
               jnp.zeros((batch, kv_heads), jnp.int32), jnp.zeros((batch, kv_heads, head_dim), dtype),
               jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.int32), float(threshold))

  def update(self, k_new, v_new, *, q=None, num_new=None) -> "MergingKVCache":
    del q
    b, t, h, _ = k_new.shape
    num_new = resolve_num_new(self.lengths, t, num_new)
    cap = self.k.shape[1]
    bi, hi = jnp.arange(b)[:, None], jnp.arange(h)[None, :]

    def step(c, xs):
      kt, vt, i = xs                                                # [B, H, D], [B, H, D], ()
      valid = (i < num_new)[:, None]                                # [B, 1]
      merge = (c.num_slots > 0) & (cosine(kt, c.last_key) > self.threshold) & valid
      slot = jnp.where(merge, c.num_slots - 1, c.num_slots)         # [B, H]
      n_old = jnp.where(merge, c.count[bi, jnp.clip(slot, 0, cap - 1), hi], 0.0)
      n = n_old + 1.0
      mix = lambda old, new: ((old[bi, jnp.clip(slot, 0, cap - 1), hi].astype(jnp.float32) * n_old[..., None]
                               + new.astype(jnp.float32)) / n[..., None])
      idx = jnp.where(valid & (slot < cap), slot, cap)              # cap: dropped write
      put = lambda buf, x: buf.at[bi, idx, hi].set(x.astype(buf.dtype), mode="drop")
      new_slots = c.num_slots + (valid & ~merge)
      return dataclasses.replace(
          c, k=put(c.k, mix(c.k, kt)), v=put(c.v, mix(c.v, vt)), count=put(c.count, n),
          pos=put(c.pos, jnp.broadcast_to((c.lengths + i)[:, None], (b, h))), num_slots=new_slots,
          last_key=jnp.where(valid[..., None], kt, c.last_key),
          overflow=c.overflow | (new_slots > cap).any(1)), None

    c, _ = jax.lax.scan(step, self, (jnp.moveaxis(k_new, 1, 0), jnp.moveaxis(v_new, 1, 0), jnp.arange(t)))
    return dataclasses.replace(c, lengths=self.lengths + num_new)

  def attend(self, q, *, scale: float | None = None, implementation: str = "xla"):
    bias = jnp.moveaxis(jnp.log(jnp.maximum(self.count, 1.0)), 1, 2)               # [B, Hkv, C]
    visible = slot_visibility(jnp.moveaxis(self.pos, 1, 2), q_heads=q.shape[2])
    return attend_slots(q, self.k, self.v, visible, self.lengths, scale=scale, logit_bias=bias,
                        poison=self.overflow, implementation=implementation)

  def memory_bytes(self) -> int:
    return int(sum(x.nbytes for x in (self.k, self.v, self.count, self.pos, self.num_slots, self.last_key,
                                      self.lengths)) + self.overflow.size)
