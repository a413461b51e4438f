"""HiP: hierarchically pruned top-k block selection in O(T log T).

Lee et al. 2024, "A Training-free Sub-quadratic Cost Transformer Model Serving Framework With
Hierarchically Pruned Attention" (HiP, ICLR 2025, arXiv:2406.09827). Each query block starts with
`budget` nodes that split its visible key range evenly. Every round splits each node in two,
scores each half by its representative key (the key in the middle of the half; the score is the
largest q · k over the queries of the block) and keeps the `budget` best halves. After
ceil(log2(range / budget)) rounds every node is one key block: the cost is
O(T/block_q · budget · log T · block_q · D), sub-quadratic, against the O(T^2 D) of exact scores.
Sinks and the diagonal are kept besides the selected blocks (as HiP keeps its sink and
sliding-window tokens).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lcjax.attention.layout import _cdiv
from lcjax.attention.selectors import common


def _score_nodes(q_blocks, k, start, end, block_kv: int, kv_len: int):
  """Best q · k[middle key of the node] over each block's queries; -inf for empty nodes.

  q_blocks [B, H, nQ, bq, D] float32; k [B, Tk, H, D], already repeated to the query heads;
  start/end [B, H, nQ, N] in key blocks. Returns [B, H, nQ, N].
  """
  first, last = start * block_kv, jnp.minimum(end * block_kv, kv_len) - 1
  middle = jnp.clip((first + last) // 2, 0, kv_len - 1)
  batch, _, heads, dim = k.shape
  kt = jnp.transpose(k.astype(jnp.float32), (0, 2, 1, 3))                     # [B, H, Tk, D]
  flat = middle.reshape(batch, heads, -1)
  rep = jnp.take_along_axis(kt, flat[..., None], axis=2).reshape(*middle.shape, dim)
  scores = jnp.einsum("bhiqd,bhind->bhiqn", q_blocks, rep).max(3)
  return jnp.where(end > start, scores, -jnp.inf)


def select(q, k, budget: int, *, block_q: int = 64, block_kv: int = 64, sink_tokens: int = 4,
           local_tokens: int = 1):
  """BlockLayout [B, Hq] (causal) of `budget` key blocks per query block found by tree pruning.

  Args:
    q: [B, Tq, Hq, D]; k: [B, Tk, Hkv, D] (see selectors/common.py for conventions).
    budget: static int in [1, ceil(Tk / block_kv)].
  """
  block_q, block_kv = common.check_inputs(q, k, block_q, block_kv)
  batch, q_len, heads, _ = q.shape
  kv_len = k.shape[1]
  n_q, n_kv = _cdiv(q_len, block_q), _cdiv(kv_len, block_kv)
  budget = common.check_budget("budget", budget, 1, n_kv)
  allowed, _, _ = common.base_tables(q_len, kv_len, block_q, block_kv, True, sink_tokens, local_tokens)
  span = jnp.asarray(allowed.sum(-1), jnp.int32)                  # visible key blocks per query block
  # Padded query rows are copies of the last real row, so they never raise a block's max.
  row = jnp.minimum(jnp.arange(n_q * block_q), q_len - 1).reshape(n_q, block_q)
  q_blocks = jnp.transpose(q.astype(jnp.float32), (0, 2, 1, 3))[:, :, row]
  k = common.repeat_kv(k, heads)

  node = jnp.arange(budget + 1)
  bounds = (node[None, :] * span[:, None]) // budget              # [nQ, budget + 1]: even split
  shape = (batch, heads, n_q, budget)
  start = jnp.broadcast_to(bounds[:, :-1], shape)
  end = jnp.broadcast_to(bounds[:, 1:], shape)
  for _ in range(max(0, math.ceil(math.log2(_cdiv(n_kv, budget))))):
    middle = start + (end - start + 1) // 2
    child_start = jnp.concatenate([start, middle], -1)
    child_end = jnp.concatenate([middle, end], -1)
    scores = _score_nodes(q_blocks, k, child_start, child_end, block_kv, kv_len)
    _, best = jax.lax.top_k(scores, budget)
    start = jnp.take_along_axis(child_start, best, -1)
    end = jnp.take_along_axis(child_end, best, -1)
  chosen = common.scatter_true((batch, heads, n_q, n_kv + 1), jnp.where(end > start, start, n_kv))
  return common.finish(chosen[..., :n_kv], q_len=q_len, kv_len=kv_len, block_q=block_q,
                       block_kv=block_kv, causal=True, sink_tokens=sink_tokens, local_tokens=local_tokens)
