"""FlexPrefill: per-head choice between a query-aware and a vertical-slash pattern.

Lai et al. 2025, "FlexPrefill: A Context-Aware Sparse Attention Mechanism for Efficient
Long-Sequence Inference" (ICLR 2025, arXiv:2502.20766). For each head, the last query block's
true attention, pooled to key blocks (â), is compared with the estimate from pooled q and k (ā)
by the square root of the Jensen-Shannon divergence. Below `tau` the pooled estimate is
trusted and every query block keeps the fewest key blocks whose estimated attention reaches
`gamma` (query-aware). Otherwise the head uses vertical-slash lines from the last query block,
the fewest columns and the fewest diagonals each reaching `gamma` of the mass. The first block
and the diagonal are always kept.

Simplification: the query-aware pattern applies the cumulative threshold per query block
(row), where the paper ranks the whole flattened block map.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lcjax.attention.selectors import common
from lcjax.attention.selectors.vertical_slash import line_scores


def _js_distance(p, q):
  """sqrt of the Jensen-Shannon divergence (natural log) along the last axis."""
  m = 0.5 * (p + q)
  kl = lambda a: jnp.sum(jnp.where(a > 0, a * jnp.log(jnp.where(a > 0, a, 1.0) / jnp.where(m > 0, m, 1.0)), 0.0), -1)
  return jnp.sqrt(jnp.maximum(0.5 * kl(p) + 0.5 * kl(q), 0.0))


def select(q, k, gamma: float, *, tau: float = 0.1, block_q: int = 64, block_kv: int = 64,
           sink_tokens: int = 1, local_tokens: int = 1, scale=None, return_choice: bool = False):
  """BlockLayout [B, Hq] (causal); with return_choice also bool [B, Hq], True = query-aware.

  Args:
    q: [B, Tq, Hq, D]; k: [B, Tk, Hkv, D] (see selectors/common.py for conventions).
    gamma: static float in (0, 1]: share of the estimated attention mass to keep.
    tau: static float in (0, 1]: JS distance below which a head is query-aware (1 = always).
  """
  block_q, block_kv = common.check_inputs(q, k, block_q, block_kv)
  q_len, kv_len, q_heads = q.shape[1], k.shape[1], q.shape[2]
  gamma = common.check_fraction("gamma", gamma)
  tau = common.check_fraction("tau", tau)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  allowed, _, _ = common.base_tables(q_len, kv_len, block_q, block_kv, True, sink_tokens, local_tokens)
  last = q_len - (common._cdiv(q_len, block_q) - 1) * block_q       # rows of the last query block

  vertical, slash = line_scores(q, k, last_q=last, scale=scale)     # [B, H, Tk], each sums to last
  a_hat = common.block_sums(vertical, block_kv) / last               # true block distribution
  pooled_k = common.pool(common.repeat_kv(k, q_heads), block_kv)     # [B, nK, H, D]
  pooled_last = common.pool(q[:, q_len - last:], last)               # [B, 1, H, D]
  logits = jnp.einsum("bihd,bjhd->bhij", pooled_last, pooled_k)[:, :, 0] * scale
  a_bar = jax.nn.softmax(jnp.where(allowed[-1], logits, -jnp.inf), axis=-1)
  query_aware = _js_distance(a_bar, a_hat) < tau                     # [B, H]

  block_logits = jnp.einsum("bihd,bjhd->bhij", common.pool(q, block_q), pooled_k) * scale
  block_probs = jax.nn.softmax(jnp.where(allowed, block_logits, -jnp.inf), axis=-1)
  aware = common.cumulative_mask(block_probs, gamma)
  columns = common.cumulative_mask(vertical / last, gamma)
  diagonals = common.cumulative_mask(slash / last, gamma)
  lines = common.columns_and_diagonals_to_blocks(columns, diagonals, q_len=q_len, kv_len=kv_len,
                                                 block_q=block_q, block_kv=block_kv)
  visible = jnp.where(query_aware[:, :, None, None], aware, lines)
  layout = common.finish(visible, q_len=q_len, kv_len=kv_len, block_q=block_q, block_kv=block_kv,
                         causal=True, sink_tokens=sink_tokens, local_tokens=local_tokens)
  return (layout, query_aware) if return_choice else layout
