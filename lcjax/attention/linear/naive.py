"""Quadratic reference of linear attention: materialises the [T, T] kernel matrix.

The oracle that chunk.py, noncausal.py and recurrent.py are tested against, written for clarity.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lcjax.attention.linear import common


@functools.partial(jax.jit, static_argnames=("causal", "normalize", "eps"))
def naive_linear_attention(phi_q, phi_k, v, *, causal: bool = True, decay=None,
                           normalize: bool = True, eps: float = 1e-6):
  """out_i = sum_j a_ij v_j [/ sum_j a_ij], a_ij = (phi_q_i . phi_k_j) decay ** (i - j).

  Args:
    phi_q: [B, Tq, Hq, F]; phi_k: [B, Tk, Hkv, F]; v: [B, Tk, Hkv, Dv] (common.py).
    causal: keep j <= i only (then Tq == Tk).
    decay: None or [Hkv] in (0, 1]; causal only.
    normalize: divide by the row sum of a plus eps (the kernelized softmax); else return the
      unnormalised sum (as in RetNet / Lightning attention, which normalise the output instead).
  Returns:
    [B, Tq, Hq, Dv] in v.dtype.
  """
  common.validate_linear_inputs(phi_q, phi_k, v, decay, same_length=causal)
  if decay is not None and not causal:
    raise ValueError("decay needs causal=True (it weighs key j for query i >= j by decay**(i-j))")
  kv_heads = phi_k.shape[2]
  q = common.group_queries(phi_q, kv_heads)                                  # [B, Tq, Hkv, G, F]
  a = jnp.einsum("bihgf,bjhf->bhgij", q, phi_k.astype(jnp.float32))
  if causal:
    t = phi_q.shape[1]
    dist = jnp.arange(t)[:, None] - jnp.arange(t)[None, :]
    weight = jnp.where(dist >= 0, jnp.exp(common.log_decay(decay, kv_heads)[:, None, None]
                                          * jnp.maximum(dist, 0)), 0.0)         # [Hkv, T, T]
    a = a * weight[None, :, None]
  num = jnp.einsum("bhgij,bjhd->bihgd", a, v.astype(jnp.float32))
  den = jnp.einsum("bhgij->bihg", a)
  out = common.normalize_output(num, den, normalize, eps)
  return out.reshape(*phi_q.shape[:3], v.shape[-1]).astype(v.dtype)


@functools.partial(jax.jit, static_argnames=("causal", "normalize", "eps"))
def naive_rpe_linear_attention(phi_q, phi_k, v, rel_bias, *, causal: bool = False,
                               normalize: bool = True, eps: float = 1e-6):
  """Kernelized attention with relative positions, quadratic: a_ij = phi_q_i . phi_k_j
  exp(rel_bias[h, T-1 + i - j]) (Luo et al. 2021); the reference of rpe_fft.py.

  rel_bias: float [H, 2T - 1] with H in (1, Hq). Returns [B, T, Hq, Dv] in v.dtype.
  """
  common.validate_linear_inputs(phi_q, phi_k, v)
  t, hq = phi_q.shape[1], phi_q.shape[2]
  group = hq // phi_k.shape[2]
  k = jnp.repeat(phi_k.astype(jnp.float32), group, axis=2)
  vv = jnp.repeat(v.astype(jnp.float32), group, axis=2)
  a = jnp.einsum("bihf,bjhf->bhij", phi_q.astype(jnp.float32), k)
  offset = jnp.arange(t)[:, None] - jnp.arange(t)[None, :] + t - 1
  weight = jnp.exp(jnp.broadcast_to(jnp.asarray(rel_bias, jnp.float32), (hq, 2 * t - 1))[:, offset])
  if causal:
    weight = jnp.where(offset >= t - 1, weight, 0.0)
  a = a * weight[None]
  out = common.normalize_output(jnp.einsum("bhij,bjhd->bihd", a, vv),
                                jnp.einsum("bhij->bih", a), normalize, eps)
  return out.astype(v.dtype)
