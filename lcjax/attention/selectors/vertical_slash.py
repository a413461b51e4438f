"""MInference's vertical-slash pattern.

Jiang et al. 2024, "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic
Sparse Attention" (arXiv:2407.02490). The last `last_q` queries estimate the attention map; its
column sums rank the vertical lines (keys every query attends to) and its sums along diagonals
rank the slash lines (fixed query-key offsets). The top `n_vertical` columns and `n_slash`
diagonals are kept, and the first columns (sinks) and the nearest diagonals (local window) are
always kept, as in the paper's kernels. Lines are converted to the key blocks they cross.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lcjax.attention.selectors import common


def line_scores(q, k, *, last_q: int, scale: float):
  """Column and diagonal attention mass estimated from the last `last_q` queries.

  Returns float32 (vertical [B, Hq, Tk], slash [B, Hq, Tk]); slash[o] sums the estimated
  attention of the pairs with q_pos - k_pos = o.
  """
  q_len, kv_len = q.shape[1], k.shape[1]
  probs = jax.nn.softmax(common.masked_scores(q[:, q_len - last_q:], k, scale=scale, causal=True,
                                              kv_len=kv_len), axis=-1)    # [B, H, last_q, Tk]
  vertical = probs.sum(2)
  offsets = common.query_positions(q_len, kv_len)[q_len - last_q:, None] - jnp.arange(kv_len)[None, :]
  offsets = jnp.where(offsets >= 0, offsets, kv_len)             # future pairs go to a dropped bin
  slash = jnp.zeros(probs.shape[:2] + (kv_len + 1,), jnp.float32)
  slash = slash.at[:, :, offsets].add(probs)[..., :kv_len]
  return vertical, slash


def select(q, k, n_vertical: int, n_slash: int, *, block_q: int = 64, block_kv: int = 64,
           last_q: int = 64, sink_tokens: int = 30, local_tokens: int = 100, scale=None):
  """BlockLayout [B, Hq] (causal) of the blocks crossed by the chosen vertical and slash lines.

  Args:
    q: [B, Tq, Hq, D]; k: [B, Tk, Hkv, D] (see selectors/common.py for conventions).
    n_vertical, n_slash: static ints in [1, Tk]: columns and diagonals kept besides the sinks and
      the local window (MInference's defaults keep the first 30 columns and last 100 diagonals).
    last_q: static int, queries used for the estimate (clipped to Tq).
  """
  block_q, block_kv = common.check_inputs(q, k, block_q, block_kv)
  q_len, kv_len = q.shape[1], k.shape[1]
  n_vertical = common.check_budget("n_vertical", n_vertical, 1, kv_len)
  n_slash = common.check_budget("n_slash", n_slash, 1, kv_len)
  last_q = min(common.static_int("last_q", last_q), q_len)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  vertical, slash = line_scores(q, k, last_q=last_q, scale=scale)
  columns = common.topk_mask(vertical, n_vertical)
  diagonals = common.topk_mask(slash, n_slash)
  visible = common.columns_and_diagonals_to_blocks(columns, diagonals, q_len=q_len, kv_len=kv_len,
                                                   block_q=block_q, block_kv=block_kv)
  return common.finish(visible, q_len=q_len, kv_len=kv_len, block_q=block_q, block_kv=block_kv,
                       causal=True, sink_tokens=sink_tokens, local_tokens=local_tokens)
