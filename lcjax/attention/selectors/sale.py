"""SALE: block selection from a low-bit (int4) estimate of q · k.

"SALE: Low-bit Estimation for Efficient Sparse Attention in Long-context LLM Prefilling"
(Ji et al. 2025, arXiv:2505.24179). Queries and keys are quantized to 4 bits (symmetric, one
scale per token and head, stored in int8); the integer products give a cheap estimate of every
logit, from which each query's attention over the key blocks is estimated. A query block keeps
the `budget` key blocks with the largest estimated attention over its queries, plus the sink
block and the diagonal (SALE measures scores relative to the sink and local regions it always
keeps).

Simplification: the paper selects by a threshold on a relative attention score; here the
estimated block mass feeds a top-k with a fixed budget, so budgets compare across methods.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lcjax.attention.layout import _cdiv
from lcjax.attention.selectors import common


def quantize_int4(x):
  """Symmetric per-(token, head) int4 quantization: (int8 values in [-7, 7], float32 scales [..., 1])."""
  x = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 7.0
  scale = jnp.where(scale > 0, scale, 1.0)
  return jnp.clip(jnp.round(x / scale), -7, 7).astype(jnp.int8), scale


def estimated_logits(q, k, scale: float):
  """int4 q · k with int32 accumulation, dequantized and scaled: float32 [B, Hq, Tq, Tk]."""
  q_int, q_scale = quantize_int4(q)
  k_int, k_scale = quantize_int4(common.repeat_kv(k, q.shape[2]))
  dots = jnp.einsum("bqhd,bkhd->bhqk", q_int, k_int, preferred_element_type=jnp.int32)
  q_scale = jnp.transpose(q_scale, (0, 2, 1, 3))                # [B, H, Tq, 1]
  k_scale = jnp.transpose(k_scale, (0, 2, 3, 1))                # [B, H, 1, Tk]
  return dots.astype(jnp.float32) * q_scale * k_scale * scale


def select(q, k, budget: int, *, block_q: int = 64, block_kv: int = 64, causal: bool = True,
           sink_tokens: int = 1, local_tokens: int = 1, scale=None):
  """BlockLayout [B, Hq] of the `budget` key blocks with the most int4-estimated attention.

  Args:
    q: [B, Tq, Hq, D]; k: [B, Tk, Hkv, D] (see selectors/common.py for conventions).
    budget: static int in [1, ceil(Tk / block_kv)].
  """
  block_q, block_kv = common.check_inputs(q, k, block_q, block_kv)
  q_len, kv_len = q.shape[1], k.shape[1]
  budget = common.check_budget("budget", budget, 1, _cdiv(kv_len, block_kv))
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  logits = estimated_logits(q, k, scale)
  if causal:
    ok = common.query_positions(q_len, kv_len)[:, None] >= jnp.arange(kv_len)[None, :]
    logits = jnp.where(ok, logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  scores = common.max_over_query_blocks(common.block_sums(probs, block_kv), block_q)
  return common.topk_layout(scores, budget, q_len=q_len, kv_len=kv_len, block_q=block_q,
                            block_kv=block_kv, causal=causal, sink_tokens=sink_tokens,
                            local_tokens=local_tokens)
