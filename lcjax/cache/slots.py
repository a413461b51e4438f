"""Shared machinery of the compressed caches: attention over slots that carry absolute positions.

A compressed cache keeps tokens in slots whose order says nothing about their position (an evicting
cache keeps the survivors, a ring buffer wraps around). Each slot therefore stores the absolute
position of its token, and the causal / window masks are evaluated on those positions.

Keys are cached AFTER RoPE: a key keeps the rotation of its original absolute position, so the
stored position is only used for masking, never to re-rotate (StreamingLLM re-assigns positions
inside the cache; with pre-rotated keys that is not possible and not done here).

KERNEL HOOK: `attend_slots` is the single place where every compressed cache reads its slots. It
goes through lcjax.attention.attend (the XLA reference path, via a score_mod that applies the slot
mask). A decode kernel that takes per-slot positions and validity (lcjax/attention/decode_backend.py)
plugs in here: dispatch on `implementation` before the attend() call.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from lcjax.attention import attend

# visible(b [B,1,1,1], hq [1,Hq,1,1], q_pos [B,1,Tq,1], slot [1,1,1,C]) -> bool, broadcastable to
# [B, Hq, Tq, C]: may query (b, hq) at absolute position q_pos read this slot?
VisibleFn = Callable[..., jax.Array]


def query_positions(lengths, q_len: int):
  """int32 [B, Tq]: absolute positions of the last q_len tokens written."""
  return (lengths - q_len)[:, None] + jnp.arange(q_len, dtype=jnp.int32)[None, :]


def slot_visibility(slot_pos, slot_ok=None, *, q_heads: int, window: int | None = None,
                    sinks: int = 0) -> VisibleFn:
  """A VisibleFn for slots with absolute positions.

  Args:
    slot_pos: int32 [B, Hs, C] absolute position of each slot's token (Hs = 1 or kv heads).
    slot_ok: bool [B, Hs, C] or None: which slots hold a token (default: slot_pos >= 0).
    q_heads: number of query heads (query head h reads slot head h * Hs // q_heads).
    window: if set, a query sees keys at distance < window, plus the first `sinks` positions.
  """
  ok_all = slot_pos >= 0 if slot_ok is None else slot_ok & (slot_pos >= 0)
  hs = slot_pos.shape[1]

  def visible(b, hq, q_pos, slot):
    hk = hq * hs // q_heads
    pos = slot_pos[b, hk, slot]                       # [B, Hq, 1, C]
    ok = ok_all[b, hk, slot] & (pos <= q_pos)
    if window is not None:
      ok &= (q_pos - pos < window) | (pos < sinks)
    return ok

  return visible


def attend_slots(q, k, v, visible: VisibleFn, lengths, *, scale: float | None = None,
                 logit_bias=None, poison=None, implementation: str = "xla"):
  """Softmax attention of q over slots, restricted to the visible ones.

  Args:
    q: [B, Tq, Hq, Dq], the last Tq tokens written (absolute positions lengths - Tq ...).
    k: [B, C, Hkv, Dq]; v: [B, C, Hkv, Dv] (Dq may differ from Dv: ThinK prunes key channels).
    visible: a VisibleFn.
    lengths: int32 [B] tokens written per sequence.
    scale: logit scale (default Dq ** -0.5; pass the model's when keys were pruned).
    logit_bias: optional float32 [B, Hkv, C] added to the logits (log of merge counts).
    poison: optional bool [B]; rows of those sequences become NaN (a cache that overflowed says so
      loudly instead of returning a silently wrong answer).
    implementation: passed to lcjax.attention.attend ("xla" until a slot-aware decode kernel exists).
  Returns:
    [B, Tq, Hq, Dv] in q.dtype.
  """
  q_heads, kv_heads = q.shape[2], k.shape[2]

  def score_mod(s, b, hq, q_pos, slot):
    if logit_bias is not None:
      s = s + logit_bias[b, hq * kv_heads // q_heads, slot]
    return jnp.where(visible(b, hq, q_pos, slot), s, -jnp.inf)

  out = attend(q, k, v, score_mod=score_mod, scale=scale, q_offset=lengths - q.shape[1],
               implementation=implementation)
  if poison is not None:
    out = jnp.where(poison[:, None, None, None], jnp.nan, out)
  return out


def slot_probs(q, k, visible: VisibleFn, lengths, *, scale: float | None = None, num_new=None):
  """Attention weights float32 [B, Hq, Tq, C] of q over the visible slots (rows sum to 1).

  Used by the scoring policies (H2O, TOVA, SnapKV...). q is the chunk as written: with num_new,
  row t < num_new[b] is at position lengths - num_new + t and rows t >= num_new[b] are zeroed
  (without it, the rows are the last T positions).
  """
  b, tq, hq, d = q.shape
  kv_heads = k.shape[2]
  scale = d ** -0.5 if scale is None else scale
  qg = q.reshape(b, tq, kv_heads, hq // kv_heads, d).astype(jnp.float32)
  s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(jnp.float32)).reshape(b, hq, tq, -1) * scale
  first = lengths - (tq if num_new is None else num_new)
  q_pos = (first[:, None] + jnp.arange(tq, dtype=jnp.int32)[None])[:, None, :, None]
  ok = visible(jnp.arange(b)[:, None, None, None], jnp.arange(hq)[None, :, None, None], q_pos,
               jnp.arange(k.shape[1])[None, None, None, :])
  s = jnp.where(ok, s, -jnp.inf)
  m = jnp.max(s, -1, keepdims=True)
  p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
  p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
  if num_new is not None:
    p = jnp.where((jnp.arange(tq)[None, :] < num_new[:, None])[:, None, :, None], p, 0.0)
  return p


def group_mean(p, kv_heads: int):
  """[B, Hq, ...] -> [B, Hkv, ...]: average over the query heads that share a KV head (GQA)."""
  return p.reshape(p.shape[0], kv_heads, p.shape[1] // kv_heads, *p.shape[2:]).mean(2)


def resolve_num_new(lengths, t: int, num_new):
  return jnp.full_like(lengths, t) if num_new is None else jnp.asarray(num_new, jnp.int32)
