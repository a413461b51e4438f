"""Chunked causal linear attention: Lightning attention's intra-chunk quadratic + inter-chunk state.

Qin et al. 2024, "Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths
in Large Language Models". The sequence is cut into chunks of C tokens. For token i = cC + s
(s = 0 .. C-1) of chunk c, with lam the per-head decay and S_c, z_c the recurrent state after
the last token of chunk c - 1 (recurrent.py):

  intra_i = sum_{j in chunk, j <= i} lam^(i-j) (phi_q_i . phi_k_j) v_j      (C x C, masked)
  inter_i = lam^(s+1) phi_q_i S_c                                             (state read)
  out_i   = (intra_i + inter_i) [/ (same sums with v_j -> 1) + eps]
  S_{c+1} = lam^C S_c + sum_{s'} lam^(C-1-s') phi_k_{s'} v_{s'}^T              (state write)

Cost O(T C F + T F Dv) instead of O(T^2 F). A length T that chunk_size does not divide is run
as T // C full chunks then one shorter chunk: the outputs are those of zero-padding the end,
and the final state is exact at token T - 1 (padding would decay it further).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lcjax.attention.linear import common
from lcjax.attention.linear.recurrent import LinearAttentionState, init_state


def _chunk_step(state: LinearAttentionState, q, k, v, log_lam, normalize, eps):
  """One chunk. q [B, C, Hkv, G, F], k [B, C, Hkv, F], v [B, C, Hkv, Dv] (float32)."""
  c = q.shape[1]
  s = jnp.arange(c, dtype=jnp.float32)
  dist = s[:, None] - s[None, :]
  intra_w = jnp.where(dist >= 0, jnp.exp(log_lam[:, None, None] * jnp.maximum(dist, 0)), 0.0)
  q_w = jnp.exp(log_lam[None, :] * (s[:, None] + 1))                        # [C, Hkv] reads
  k_w = jnp.exp(log_lam[None, :] * (c - 1 - s[:, None]))                    # [C, Hkv] writes
  a = jnp.einsum("bihgf,bjhf->bhgij", q, k) * intra_w[None, :, None]
  num = jnp.einsum("bhgij,bjhd->bihgd", a, v)
  num += jnp.einsum("bihgf,bhfd->bihgd", q, state.kv) * q_w[None, :, :, None, None]
  den = jnp.einsum("bhgij->bihg", a) + jnp.einsum("bihgf,bhf->bihg", q, state.normalizer) * q_w[None, :, :, None]
  lam_c = jnp.exp(log_lam * c)
  kw = k * k_w[None, :, :, None]
  new_state = LinearAttentionState(
      lam_c[None, :, None, None] * state.kv + jnp.einsum("bjhf,bjhd->bhfd", kw, v),
      lam_c[None, :, None] * state.normalizer + kw.sum(1))
  return new_state, common.normalize_output(num, den, normalize, eps)


@functools.partial(jax.jit,
                   static_argnames=("chunk_size", "normalize", "eps", "return_final_state"))
def chunk_linear_attention(phi_q, phi_k, v, *, chunk_size: int = 64, decay=None,
                           normalize: bool = True, eps: float = 1e-6,
                           initial_state: LinearAttentionState | None = None,
                           return_final_state: bool = False):
  """Causal linear attention, chunk by chunk (training and prefill).

  Args:
    phi_q: [B, T, Hq, F]; phi_k: [B, T, Hkv, F]; v: [B, T, Hkv, Dv]; Hq % Hkv == 0.
    chunk_size: tokens per chunk (any T; see the module docstring).
    decay: None or float [Hkv] in (0, 1]: key j weighs decay ** (i - j) for query i.
    normalize: divide by phi_q_i . (decayed sum of phi_k_j, j <= i) + eps.
    initial_state: state of the tokens before this call (recurrent.py), default empty.
    return_final_state: also return the state after token T - 1.
  Returns:
    out [B, T, Hq, Dv] in v.dtype, and the final LinearAttentionState if asked.
  """
  common.validate_linear_inputs(phi_q, phi_k, v, decay)
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
  b, t, hkv, f = phi_k.shape
  state = init_state(b, hkv, f, v.shape[-1]) if initial_state is None else initial_state
  if state.kv.shape != (b, hkv, f, v.shape[-1]) or state.normalizer.shape != (b, hkv, f):
    raise ValueError(f"initial_state has kv {state.kv.shape}, normalizer {state.normalizer.shape}; "
                     f"these inputs need {(b, hkv, f, v.shape[-1])} and {(b, hkv, f)}")
  log_lam = common.log_decay(decay, hkv)
  q = common.group_queries(phi_q, hkv)
  k, vv = phi_k.astype(jnp.float32), v.astype(jnp.float32)
  step = lambda st, xs: _chunk_step(st, *xs, log_lam, normalize, eps)
  num_full, outs = t // chunk_size, []
  if num_full:
    cut = num_full * chunk_size
    to_chunks = lambda x: jnp.moveaxis(x[:, :cut].reshape(b, num_full, chunk_size, *x.shape[2:]), 1, 0)
    state, out = jax.lax.scan(step, state, (to_chunks(q), to_chunks(k), to_chunks(vv)))
    outs.append(jnp.moveaxis(out, 0, 1).reshape(b, cut, *out.shape[3:]))
  if t % chunk_size:
    rest = num_full * chunk_size
    state, out = step(state, (q[:, rest:], k[:, rest:], vv[:, rest:]))
    outs.append(out)
  out = jnp.concatenate(outs, axis=1).reshape(*phi_q.shape[:3], v.shape[-1]).astype(v.dtype)
  return (out, state) if return_final_state else out
