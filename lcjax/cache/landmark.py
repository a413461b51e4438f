"""Landmark block store: one representative key per block, top-k blocks by q . representative.

Mohtashami & Jaggi, "Landmark Attention: Random-Access Infinite Context Length for Transformers"
(NeurIPS 2023, arXiv:2305.16300). A trained model appends a landmark token to every block and
retrieves blocks by the query's attention to the landmarks. Without landmark training, the block's
representative key here is the mean of its keys (a model trained with landmark tokens would store
its landmark keys instead); blocks are then read exactly, per query head or, select_per="kv_head",
per KV head from the largest score over its GQA group (lcjax/cache/block_retrieval.py).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lcjax.cache.block_retrieval import BlockRetrievalCache, check_retrieval_args


def block_means(k, lengths, block_size: int):
  """[B, nB, Hkv, D] in k's dtype: mean (computed in float32) of each block's written keys (empty
  blocks: 0)."""
  b, c, h, d = k.shape
  valid = (jnp.arange(c)[None] < lengths[:, None]).reshape(b, c // block_size, block_size, 1, 1)
  kb = k.astype(jnp.float32).reshape(b, c // block_size, block_size, h, d)
  return (jnp.where(valid, kb, 0.0).sum(2) / jnp.maximum(valid.sum(2), 1)).astype(k.dtype)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v", "landmarks", "lengths"],
                   meta_fields=["block_size", "top_blocks", "local_blocks", "select_per"])
@dataclasses.dataclass(frozen=True)
class LandmarkKVCache(BlockRetrievalCache):
  """k, v: [B, C, Hkv, D]; landmarks: [B, C / block_size, Hkv, D] (k's dtype); lengths: int32 [B]."""
  k: jax.Array
  v: jax.Array
  landmarks: jax.Array
  lengths: jax.Array
  block_size: int
  top_blocks: int
  local_blocks: int
  select_per: str = "query_head"

  @classmethod
  def create(cls, batch: int, capacity: int, kv_heads: int, head_dim: int, *, block_size: int = 16,
             top_blocks: int = 4, local_blocks: int = 1, select_per: str = "query_head",
             dtype=jnp.float32) -> "LandmarkKVCache":
    check_retrieval_args(capacity, block_size, select_per)
    shape = (batch, capacity, kv_heads, head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
               jnp.zeros((batch, capacity // block_size, kv_heads, head_dim), dtype),
               jnp.zeros((batch,), jnp.int32), block_size, top_blocks, local_blocks, select_per)

  def summarize(self, k, lengths):
    return dict(landmarks=block_means(k, lengths, self.block_size))

  def block_scores(self, q):
    b, _, hq, d = q.shape
    hkv = self.landmarks.shape[2]
    qg = q[:, 0].astype(jnp.float32).reshape(b, hkv, hq // hkv, d)
    s = jnp.einsum("bhgd,bnhd->bhgn", qg, self.landmarks.astype(jnp.float32))
    return s.reshape(b, hq, -1)

  def memory_bytes(self) -> int:
    return int(sum(x.nbytes for x in (self.k, self.v, self.landmarks, self.lengths)))
