"""XLA reference attention: the test oracle and the CPU fallback of every kernel.

Written for clarity, not speed: it materialises the [B, Hq, Tq, Tk] logits.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from lcjax.attention.layout import BlockLayout
from lcjax.attention.masks import Mask

# score_mod(scores, b, h, q_idx, kv_idx) -> scores; float32 scores [B, Hq, Tq, Tk], the index
# arrays broadcast against them (b [B,1,1,1], h [1,Hq,1,1], q_idx [B,1,Tq,1], kv_idx [1,1,1,Tk]).
ScoreMod = Callable[..., jax.Array]


def allowed_pairs(*, batch: int, q_len: int, kv_len: int, q_heads: int, mask: Mask | None = None,
                  layout: BlockLayout | None = None, segment_ids=None, kv_segment_ids=None,
                  q_offset=0, kv_valid_len=None):
  """bool [B, Hq or 1, Tq, Tk]: which pairs the arguments allow (everything when all are None).

  q_offset: int or int32 [B]; the absolute index of query i is q_offset + i.
  kv_valid_len: None, or an int32 scalar or [B]; keys at or past it are excluded (a cache's fill level).
  segment_ids: int32 [B, Tq] (and kv_segment_ids [B, Tk], defaulting to segment_ids): pairs
    attend only within a segment (document masking of packed sequences).
  """
  q_off = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (batch,))
  q_idx = q_off[:, None, None, None] + jnp.arange(q_len, dtype=jnp.int32)[None, None, :, None]
  kv_idx = jnp.arange(kv_len, dtype=jnp.int32)[None, None, None, :]
  ok = jnp.ones((batch, 1, q_len, kv_len), bool)
  if mask is not None:
    ok &= mask(q_idx, kv_idx)
  if segment_ids is not None:
    kv_seg = segment_ids if kv_segment_ids is None else kv_segment_ids
    ok &= segment_ids[:, None, :, None] == kv_seg[:, None, None, :]
  if kv_valid_len is not None:
    valid = jnp.broadcast_to(jnp.asarray(kv_valid_len, jnp.int32), (batch,))
    ok &= kv_idx < valid[:, None, None, None]
  if layout is not None:
    visible, full = layout.block_mask()                      # [Bl, Hl, nQ, nK]
    expand = lambda t: jnp.repeat(jnp.repeat(t, layout.block_q, -2)[..., :q_len, :],
                                  layout.block_kv, -1)[..., :kv_len]
    visible, full = expand(visible), expand(full)
    head_of = jnp.arange(q_heads) * visible.shape[1] // q_heads   # layout head serving each q head
    visible, full = visible[:, head_of], full[:, head_of]
    # Inside a block marked full the element mask is skipped, as the kernels skip it.
    ok = visible & (full | ok)
  return ok


def attention_reference(q, k, v, *, mask: Mask | None = None, layout: BlockLayout | None = None,
                        score_mod: ScoreMod | None = None, scale: float | None = None,
                        segment_ids=None, kv_segment_ids=None, q_offset=0, kv_valid_len=None,
                        return_lse: bool = False):
  """Exact softmax attention.

  Args:
    q: [B, Tq, Hq, D]; k, v: [B, Tk, Hkv, D] (v may have its own head dim), Hq % Hkv == 0.
    scale: defaults to D ** -0.5.
  Returns:
    out [B, Tq, Hq, Dv] in q.dtype, and with return_lse the float32 log-sum-exp [B, Hq, Tq]
    (-inf for rows that see nothing; their output is zero).
  """
  batch, q_len, q_heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  group = q_heads // kv_heads
  scale = head_dim ** -0.5 if scale is None else scale
  acc = jnp.promote_types(q.dtype, jnp.float32)       # statistics in float32 (float64 stays float64)
  qg = q.reshape(batch, q_len, kv_heads, group, head_dim)
  s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=acc)
  s = s.reshape(batch, q_heads, q_len, kv_len) * scale
  if score_mod is not None:
    q_off = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (batch,))
    s = score_mod(s, jnp.arange(batch)[:, None, None, None], jnp.arange(q_heads)[None, :, None, None],
                  q_off[:, None, None, None] + jnp.arange(q_len)[None, None, :, None],
                  jnp.arange(kv_len)[None, None, None, :])
  ok = allowed_pairs(batch=batch, q_len=q_len, kv_len=kv_len, q_heads=q_heads, mask=mask, layout=layout,
                     segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, q_offset=q_offset,
                     kv_valid_len=kv_valid_len)
  s = jnp.where(ok, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m_safe)
  l = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(l == 0, 1.0, l)                       # empty rows: all-zero weights, not NaN
  pg = p.reshape(batch, kv_heads, group, q_len, kv_len).astype(v.dtype)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", pg, v, preferred_element_type=acc)
  out = out.reshape(batch, q_len, q_heads, v.shape[-1]).astype(q.dtype)
  if return_lse:
    lse = jnp.where(l[..., 0] > 0, m_safe[..., 0] + jnp.log(jnp.where(l[..., 0] > 0, l[..., 0], 1.0)), -jnp.inf)
    return out, lse
  return out
