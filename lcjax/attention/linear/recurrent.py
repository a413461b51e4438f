"""Recurrent (decoding) form of causal linear attention: a constant-size state per kv head.

  S_t = decay * S_{t-1} + phi(k_t) v_t^T        kv state   [B, Hkv, F, Dv]
  z_t = decay * z_{t-1} + phi(k_t)              normaliser [B, Hkv, F]
  o_t = phi(q_t) S_t [/ (phi(q_t) . z_t + eps)]

Its outputs equal chunk.py's and naive.py's causal outputs; chunk.py's final state is this
state after the last token, so a prefill by chunks continues with recurrent_step decoding.
"""

from __future__ import annotations

import functools

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lcjax.attention.linear import common


class LinearAttentionState(NamedTuple):
  """A pytree. kv: float32 [B, Hkv, F, Dv] = sum_j decay^(t-j) phi(k_j) v_j^T;
  normalizer: float32 [B, Hkv, F] = sum_j decay^(t-j) phi(k_j), t the last token written."""
  kv: jax.Array
  normalizer: jax.Array


def init_state(batch: int, kv_heads: int, feature_dim: int, value_dim: int) -> LinearAttentionState:
  """The empty state (no token seen)."""
  return LinearAttentionState(jnp.zeros((batch, kv_heads, feature_dim, value_dim), jnp.float32),
                              jnp.zeros((batch, kv_heads, feature_dim), jnp.float32))


def recurrent_step(state: LinearAttentionState, phi_q, phi_k, v, *, decay=None,
                   normalize: bool = True, eps: float = 1e-6, valid=None):
  """Writes one token into the state, then reads it with the token's query.

  Args:
    state: LinearAttentionState for batch B and Hkv heads.
    phi_q: [B, Hq, F]; phi_k: [B, Hkv, F]; v: [B, Hkv, Dv] (one token, no time axis).
    decay: None or [Hkv] in (0, 1].
    valid: None or bool [B]; rows marked False leave their state untouched (no write, no decay)
      and output zeros (a cache slot with no new token).
  Returns:
    (out [B, Hq, Dv] in v.dtype, new state).
  """
  common.validate_linear_inputs(phi_q[:, None], phi_k[:, None], v[:, None], decay)
  if state.kv.shape != (*phi_k.shape, v.shape[-1]):
    raise ValueError(f"state.kv has shape {state.kv.shape}; phi_k {phi_k.shape} and v {v.shape} "
                     f"need {(*phi_k.shape, v.shape[-1])}")
  k = phi_k.astype(jnp.float32)
  lam = jnp.exp(common.log_decay(decay, k.shape[1]))[None, :, None]         # [1, Hkv, 1]
  kv = lam[..., None] * state.kv + k[..., :, None] * v.astype(jnp.float32)[..., None, :]
  z = lam * state.normalizer + k
  if valid is not None:
    kv = jnp.where(valid[:, None, None, None], kv, state.kv)
    z = jnp.where(valid[:, None, None], z, state.normalizer)
  q = common.group_queries(phi_q[:, None], k.shape[1])[:, 0]               # [B, Hkv, G, F]
  num = jnp.einsum("bhgf,bhfd->bhgd", q, kv)
  den = jnp.einsum("bhgf,bhf->bhg", q, z)
  out = common.normalize_output(num, den, normalize, eps).reshape(*phi_q.shape[:2], v.shape[-1])
  if valid is not None:
    out = jnp.where(valid[:, None, None], out, 0.0)
  return out.astype(v.dtype), LinearAttentionState(kv, z)


@functools.partial(jax.jit, static_argnames=("normalize", "eps"))
def recurrent_linear_attention(phi_q, phi_k, v, *, state: LinearAttentionState | None = None,
                               decay=None, normalize: bool = True, eps: float = 1e-6, valid=None):
  """recurrent_step over T tokens with lax.scan (flash-linear-attention's fused_recurrent).

  Args:
    phi_q: [B, T, Hq, F]; phi_k: [B, T, Hkv, F]; v: [B, T, Hkv, Dv].
    state: starting state (default: empty).
    valid: None or bool [B, T] (see recurrent_step).
  Returns:
    (out [B, T, Hq, Dv] in v.dtype, final state).
  """
  common.validate_linear_inputs(phi_q, phi_k, v, decay)
  b, t, hkv, f = phi_k.shape
  if state is None:
    state = init_state(b, hkv, f, v.shape[-1])
  if valid is None:
    valid = jnp.ones((b, t), bool)

  def step(carry, xs):
    q, k, vv, ok = xs
    out, carry = recurrent_step(carry, q, k, vv, decay=decay, normalize=normalize, eps=eps, valid=ok)
    return carry, out

  time_major = lambda x: jnp.moveaxis(x, 1, 0)
  state, out = jax.lax.scan(step, state, tuple(map(time_major, (phi_q, phi_k, v, valid))))
  return jnp.moveaxis(out, 0, 1), state
