"""Block top-k from mean-pooled queries and keys.

The simplest block selector, the estimator behind many methods (e.g. the block scores of
FlexPrefill's query-aware pattern, Lai et al. 2025, arXiv:2502.20766, and NSA's compressed
branch, Yuan et al. 2025): each query block scores each key block by mean(q_block) · mean(k_block)
and keeps the `budget` best, plus the first block (sink) and the diagonal.
"""

from __future__ import annotations

import jax.numpy as jnp

from lcjax.attention.layout import _cdiv
from lcjax.attention.selectors import common


def select(q, k, budget: int, *, block_q: int = 64, block_kv: int = 64, causal: bool = True,
           sink_tokens: int = 1, local_tokens: int = 1):
  """BlockLayout [B, Hq] keeping `budget` key blocks per query block beyond the kept ones.

  Args:
    q: [B, Tq, Hq, D]; k: [B, Tk, Hkv, D] (see selectors/common.py for conventions).
    budget: static int in [1, ceil(Tk / block_kv)].
  """
  block_q, block_kv = common.check_inputs(q, k, block_q, block_kv)
  q_len, kv_len = q.shape[1], k.shape[1]
  budget = common.check_budget("budget", budget, 1, _cdiv(kv_len, block_kv))
  pooled_q = common.pool(q, block_q)                                      # [B, nQ, Hq, D]
  pooled_k = common.pool(common.repeat_kv(k, q.shape[2]), block_kv)       # [B, nK, Hq, D]
  scores = jnp.einsum("bihd,bjhd->bhij", pooled_q, pooled_k)
  return common.topk_layout(scores, budget, q_len=q_len, kv_len=kv_len, block_q=block_q,
                            block_kv=block_kv, causal=causal, sink_tokens=sink_tokens,
                            local_tokens=local_tokens)
