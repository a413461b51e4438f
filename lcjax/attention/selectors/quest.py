"""Quest: query-aware block selection from per-block key min/max bounds.

Tang et al. 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference"
(arXiv:2406.10774). Each key block ("page") keeps the elementwise min and max of its keys; for a
query q, sum_d max(q_d * min_d, q_d * max_d) is an upper bound on q · k for every key k of the
block. A query block takes the largest bound among its queries (still an upper bound on the
block's true max logit) and keeps the `budget` blocks with the highest bounds, plus the
diagonal block (Quest always attends to the current page).
"""

from __future__ import annotations

import jax.numpy as jnp

from lcjax.attention.layout import _cdiv
from lcjax.attention.selectors import common


def block_bounds(q, k, block_kv: int):
  """Per-query upper bounds on q · k over each key block: float32 [B, Hq, Tq, nK]."""
  batch, kv_len, kv_heads, dim = k.shape
  n = _cdiv(kv_len, block_kv)
  kf = jnp.pad(k.astype(jnp.float32), ((0, 0), (0, n * block_kv - kv_len), (0, 0), (0, 0)), mode="edge")
  kf = kf.reshape(batch, n, block_kv, kv_heads, dim)       # edge padding leaves min/max unchanged
  k_min = common.repeat_kv(kf.min(2), q.shape[2])           # [B, nK, Hq, D]
  k_max = common.repeat_kv(kf.max(2), q.shape[2])
  qf = q.astype(jnp.float32)[:, :, None]                   # [B, Tq, 1, Hq, D]
  bound = jnp.maximum(qf * k_min[:, None], qf * k_max[:, None]).sum(-1)   # [B, Tq, nK, Hq]
  return jnp.transpose(bound, (0, 3, 1, 2))


def select(q, k, budget: int, *, block_q: int = 64, block_kv: int = 64, causal: bool = True,
           sink_tokens: int = 0, local_tokens: int = 1):
  """BlockLayout [B, Hq] of the `budget` key blocks with the highest Quest bounds per query block.

  Args:
    q: [B, Tq, Hq, D]; k: [B, Tk, Hkv, D] (see selectors/common.py for conventions).
    budget: static int in [1, ceil(Tk / block_kv)].
  """
  block_q, block_kv = common.check_inputs(q, k, block_q, block_kv)
  q_len, kv_len = q.shape[1], k.shape[1]
  budget = common.check_budget("budget", budget, 1, _cdiv(kv_len, block_kv))
  scores = common.max_over_query_blocks(block_bounds(q, k, block_kv), block_q)
  return common.topk_layout(scores, budget, q_len=q_len, kv_len=kv_len, block_q=block_q,
                            block_kv=block_kv, causal=causal, sink_tokens=sink_tokens,
                            local_tokens=local_tokens)
