"""Plain-jnp references for causal linear attention with an optional per-head scalar decay.

    o_t = sum_{s <= t} gamma_h^(t - s) (q_t . k_s) v_s          gamma_h = exp(log_decay_h) <= 1

(Lightning attention / RetNet-style retention without normalisation; log_decay = None means
gamma = 1, plain causal linear attention.) q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; the logit
scale multiplies q. The recurrent state after token t is S_t = gamma S_{t-1} + k_t^T v_t,
[B, H, Dk, Dv] float32, and o_t = q_t S_t. Self-contained (feature maps live elsewhere) and
written for clarity: the quadratic form materialises [B, H, T, T].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _decay(log_decay, heads):
  if log_decay is None:
    return jnp.zeros((heads,), jnp.float32)
  return jnp.asarray(log_decay, jnp.float32)


def linear_attention_reference(q, k, v, *, log_decay=None, scale: float | None = None):
  """Quadratic-form causal linear attention: out [B, T, H, Dv] in q.dtype (float32 maths)."""
  t, h = q.shape[1], q.shape[2]
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  g = _decay(log_decay, h)
  pos = jnp.arange(t, dtype=jnp.float32)
  diff = pos[:, None] - pos[None, :]                                   # t - s
  weight = jnp.where(diff >= 0, jnp.exp(g[:, None, None] * jnp.maximum(diff, 0)), 0.0)  # [H, T, T]
  s = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32) * scale, k.astype(jnp.float32))
  out = jnp.einsum("bhts,bshe->bthe", s * weight[None], v.astype(jnp.float32))
  return out.astype(q.dtype)


def linear_attention_recurrent(q, k, v, *, log_decay=None, scale: float | None = None,
                               initial_state=None):
  """Token-by-token scan: (out [B, T, H, Dv] in q.dtype, final state [B, H, Dk, Dv] float32)."""
  b, _, h, dk = q.shape
  scale = dk ** -0.5 if scale is None else scale
  gamma = jnp.exp(_decay(log_decay, h))[None, :, None, None]
  state = jnp.zeros((b, h, dk, v.shape[-1]), jnp.float32) if initial_state is None else initial_state

  def step(state, qkv):
    qt, kt, vt = (x.astype(jnp.float32) for x in qkv)
    state = gamma * state + kt[..., :, None] * vt[..., None, :]
    return state, jnp.einsum("bhd,bhde->bhe", qt * scale, state)

  state, out = jax.lax.scan(step, state, tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v)))
  return jnp.moveaxis(out, 0, 1).astype(q.dtype), state


def linear_attention_decode_step_reference(state, q, k, v, *, log_decay=None, scale: float | None = None):
  """One recurrent step: q, k [B, H, Dk], v [B, H, Dv] -> (out [B, H, Dv], new state)."""
  out, state = linear_attention_recurrent(q[:, None], k[:, None], v[:, None], log_decay=log_decay,
                                          scale=scale, initial_state=state)
  return out[:, 0], state
