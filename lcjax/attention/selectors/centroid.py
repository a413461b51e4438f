"""Centroid lookup (Squeezed Attention): k-means clusters of keys, chosen per query.

Hooper et al. 2025, "Squeezed Attention: Accelerating Long Context Length LLM Inference"
(ACL 2025, arXiv:2411.09688). Offline, the keys of each head are grouped by k-means and each
cluster is represented by its centroid. At inference a query estimates the attention mass of each
cluster from its centroid, count_c * exp(q · c_c * scale) normalised over clusters, and keeps the
clusters above `threshold`; the keys of the kept clusters are attended exactly. Here a key block
is visited when it holds a key of a cluster kept by any query of the query block; the diagonal
(the query's own, dynamic part of the context) is always kept.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lcjax.attention.layout import _cdiv
from lcjax.attention.selectors import common


def kmeans(k, num_clusters: int, *, iters: int = 10):
  """Lloyd's k-means over the keys of each (batch, kv head), jittable.

  Args:
    k: [B, Tk, Hkv, D]. num_clusters: static int in [1, Tk]. iters: static int >= 1.
  Returns:
    centroids float32 [B, Hkv, C, D] and assignments int32 [B, Hkv, Tk]. Initialised with keys
    spread evenly over the sequence (deterministic); an empty cluster keeps its last centroid.
  """
  kv_len = k.shape[1]
  num_clusters = common.check_budget("num_clusters", num_clusters, 1, kv_len)
  iters = common.static_int("iters", iters)
  x = jnp.transpose(k.astype(jnp.float32), (0, 2, 1, 3))                  # [B, H, Tk, D]
  centroids = x[:, :, (jnp.arange(num_clusters) * kv_len) // num_clusters]

  def assign(c):
    dist = (jnp.sum(c * c, -1)[:, :, None, :] - 2 * jnp.einsum("bhtd,bhcd->bhtc", x, c))
    return jnp.argmin(dist, -1).astype(jnp.int32)

  def step(c, _):
    onehot = jax.nn.one_hot(assign(c), num_clusters, dtype=jnp.float32)      # [B, H, Tk, C]
    counts = onehot.sum(2)[..., None]
    sums = jnp.einsum("bhtc,bhtd->bhcd", onehot, x)
    return jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), c), None

  centroids, _ = jax.lax.scan(step, centroids, None, length=iters)
  return centroids, assign(centroids)


def select(q, k, centroids, assignments, threshold: float, *, block_q: int = 64, block_kv: int = 64,
           causal: bool = True, sink_tokens: int = 0, local_tokens: int = 1, scale=None):
  """BlockLayout [B, Hq] of the key blocks holding keys of the clusters the queries keep.

  Args:
    q: [B, Tq, Hq, D]; k: [B, Tk, Hkv, D] (see selectors/common.py for conventions).
    centroids [B, Hkv, C, D], assignments int32 [B, Hkv, Tk]: from `kmeans`.
    threshold: static float in (0, 1]: a cluster is kept when its estimated share of the
      attention is at least this.
  """
  block_q, block_kv = common.check_inputs(q, k, block_q, block_kv)
  batch, q_len, q_heads, dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  threshold = common.check_fraction("threshold", threshold)
  if centroids.ndim != 4 or tuple(centroids.shape[:2]) != (batch, kv_heads) or centroids.shape[3] != dim:
    raise ValueError(f"centroids has shape {centroids.shape}; accepted: [batch={batch}, "
                     f"kv_heads={kv_heads}, clusters, head_dim={dim}]")
  if tuple(assignments.shape) != (batch, kv_heads, kv_len):
    raise ValueError(f"assignments has shape {assignments.shape}; accepted: {(batch, kv_heads, kv_len)}")
  scale = dim ** -0.5 if scale is None else scale
  num_clusters = centroids.shape[2]
  member = jax.nn.one_hot(assignments, num_clusters, dtype=jnp.int32)        # [B, Hkv, Tk, C]
  counts = member.sum(2).astype(jnp.float32)                                  # [B, Hkv, C]
  in_block = common.block_sums(jnp.swapaxes(member, -1, -2), block_kv) > 0    # [B, Hkv, C, nK]
  group = q_heads // kv_heads
  logits = jnp.einsum("bqhgd,bhcd->bhgqc", q.astype(jnp.float32).reshape(batch, q_len, kv_heads, group, dim),
                      centroids.astype(jnp.float32)) * scale
  logits = jnp.where(counts[:, :, None, None] > 0, logits + jnp.log(jnp.maximum(counts, 1.0))[:, :, None, None],
                     -jnp.inf)
  share = jax.nn.softmax(logits, axis=-1)                                     # [B, Hkv, G, Tq, C]
  share = common.max_over_query_blocks(share.reshape(batch, q_heads, q_len, num_clusters), block_q)
  kept = (share >= threshold).astype(jnp.int32)                               # [B, Hq, nQ, C]
  in_block = jnp.repeat(in_block, group, axis=1).astype(jnp.int32)           # [B, Hq, C, nK]
  visible = jnp.einsum("bhic,bhcj->bhij", kept, in_block) > 0
  return common.finish(visible, q_len=q_len, kv_len=kv_len, block_q=block_q, block_kv=block_kv,
                       causal=causal, sink_tokens=sink_tokens, local_tokens=local_tokens)
