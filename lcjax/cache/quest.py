"""Quest: query-aware block selection from per-block min/max keys.

Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference" (ICML 2024,
arXiv:2406.10774). Each block of keys keeps the channel-wise min and max; for a query q the upper
bound of any logit in the block is sum_d max(q_d * min_d, q_d * max_d). The blocks with the largest
bounds are read exactly. Selection is per query head (the paper) or, select_per="kv_head", per
KV head from the largest bound over its GQA group (lcjax/cache/block_retrieval.py).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lcjax.cache.block_retrieval import BlockRetrievalCache, check_retrieval_args


def block_min_max(k, lengths, block_size: int):
  """(kmin, kmax) [B, nB, Hkv, D] in k's dtype (exact: a min or max of keys is one of them) over
  each block's written keys (empty blocks: 0)."""
  b, c, h, d = k.shape
  valid = (jnp.arange(c)[None] < lengths[:, None])[..., None, None]
  kb = k.reshape(b, c // block_size, block_size, h, d)
  vb = valid.reshape(b, c // block_size, block_size, 1, 1)
  kmin = jnp.where(vb, kb, jnp.inf).min(2)
  kmax = jnp.where(vb, kb, -jnp.inf).max(2)
  any_valid = vb.any(2)
  return (jnp.where(any_valid, kmin, 0).astype(k.dtype), jnp.where(any_valid, kmax, 0).astype(k.dtype))


def quest_upper_bound(q, kmin, kmax):
  """float32 [B, Hq, nB]: upper bound of q . k over each block; q [B, 1, Hq, D]."""
  b, _, hq, d = q.shape
  hkv = kmin.shape[2]
  qg = q[:, 0].astype(jnp.float32).reshape(b, hkv, hq // hkv, d)
  kmin, kmax = kmin.astype(jnp.float32)[:, :, :, None], kmax.astype(jnp.float32)[:, :, :, None]
  ub = jnp.maximum(qg[:, None] * kmin, qg[:, None] * kmax).sum(-1)
  return jnp.moveaxis(ub.reshape(b, -1, hq), 1, 2)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v", "kmin", "kmax", "lengths"],
                   meta_fields=["block_size", "top_blocks", "local_blocks", "select_per"])
@dataclasses.dataclass(frozen=True)
class QuestKVCache(BlockRetrievalCache):
  """k, v: [B, C, Hkv, D]; kmin, kmax: [B, C / block_size, Hkv, D] in k's dtype; lengths: int32 [B]."""
  k: jax.Array
  v: jax.Array
  kmin: jax.Array
  kmax: jax.Array
  lengths: jax.Array
  block_size: int
  top_blocks: int
  local_blocks: int
  select_per: str = "query_head"

  @classmethod
  def create(cls, batch: int, capacity: int, kv_heads: int, head_dim: int, *, block_size: int = 16,
             top_blocks: int = 4, local_blocks: int = 1, select_per: str = "query_head",
             dtype=jnp.float32) -> "QuestKVCache":
    check_retrieval_args(capacity, block_size, select_per)
    shape = (batch, capacity, kv_heads, head_dim)
    summary = jnp.zeros((batch, capacity // block_size, kv_heads, head_dim), dtype)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), summary, summary,
               jnp.zeros((batch,), jnp.int32), block_size, top_blocks, local_blocks, select_per)

  def summarize(self, k, lengths):
    kmin, kmax = block_min_max(k, lengths, self.block_size)
    return dict(kmin=kmin, kmax=kmax)

  def block_scores(self, q):
    return quest_upper_bound(q, self.kmin, self.kmax)

  def memory_bytes(self) -> int:
    return int(sum(x.nbytes for x in (self.k, self.v, self.kmin, self.kmax, self.lengths)))
