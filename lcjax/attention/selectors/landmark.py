"""Landmark-token retrieval: top-k key blocks by q · landmark key.

Mohtashami & Jaggi 2023, "Landmark Attention: Random-Access Infinite Context Length for
Transformers" (arXiv:2305.16300). A landmark token closes every block and its key stands for the
block; at inference each query retrieves the blocks whose landmark keys score highest, plus its
own (local) block. Here a query block keeps the `budget` blocks with the largest q · landmark
over its queries. The trained landmark keys come from the training form
(lcjax/attention/landmark.py); without them the mean key of each block is used.
"""

from __future__ import annotations

import jax.numpy as jnp

from lcjax.attention.layout import _cdiv
from lcjax.attention.selectors import common


def select(q, k, budget: int, *, landmarks=None, block_q: int = 64, block_kv: int = 64,
           causal: bool = True, sink_tokens: int = 0, local_tokens: int = 1):
  """BlockLayout [B, Hq] of the `budget` blocks with the best landmark scores per query block.

  Args:
    q: [B, Tq, Hq, D]; k: [B, Tk, Hkv, D] (see selectors/common.py for conventions).
    budget: static int in [1, ceil(Tk / block_kv)].
    landmarks: [B, ceil(Tk / block_kv), Hkv, D] landmark keys, one per key block, or None for
      the mean key of each block.
  """
  block_q, block_kv = common.check_inputs(q, k, block_q, block_kv)
  q_len, kv_len = q.shape[1], k.shape[1]
  n_kv = _cdiv(kv_len, block_kv)
  budget = common.check_budget("budget", budget, 1, n_kv)
  if landmarks is None:
    landmarks = common.pool(k, block_kv)
  elif tuple(landmarks.shape) != (k.shape[0], n_kv, k.shape[2], k.shape[3]):
    raise ValueError(f"landmarks has shape {landmarks.shape}; accepted: [batch, ceil(kv_len / block_kv), "
                     f"kv_heads, head_dim] = {(k.shape[0], n_kv, k.shape[2], k.shape[3])}")
  landmarks = common.repeat_kv(landmarks.astype(jnp.float32), q.shape[2])
  scores = jnp.einsum("bqhd,bjhd->bhqj", q.astype(jnp.float32), landmarks)   # [B, Hq, Tq, nK]
  scores = common.max_over_query_blocks(scores, block_q)
  return common.topk_layout(scores, budget, q_len=q_len, kv_len=kv_len, block_q=block_q,
                            block_kv=block_kv, causal=causal, sink_tokens=sink_tokens,
                            local_tokens=local_tokens)
