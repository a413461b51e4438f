"""Non-causal (bidirectional) linear attention in O(T): phi_q (phi_k^T v) / phi_q (phi_k^T 1).

Katharopoulos et al. 2020, "Transformers are RNNs"; Performer's bidirectional FAVOR+.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lcjax.attention.linear import common


@functools.partial(jax.jit, static_argnames=("normalize", "eps"))
def noncausal_linear_attention(phi_q, phi_k, v, *, normalize: bool = True, eps: float = 1e-6,
                               kv_mask=None):
  """Every query sees every key; Tq and Tk may differ (cross-attention).

  Args:
    phi_q: [B, Tq, Hq, F]; phi_k: [B, Tk, Hkv, F]; v: [B, Tk, Hkv, Dv].
    normalize: divide by phi_q . sum_j phi_k_j + eps.
    kv_mask: None or bool [B, Tk]; False keys (padding) are left out.
  Returns:
    [B, Tq, Hq, Dv] in v.dtype.
  """
  common.validate_linear_inputs(phi_q, phi_k, v, same_length=False)
  if kv_mask is not None and kv_mask.shape != phi_k.shape[:2]:
    raise ValueError(f"kv_mask must be [batch, kv_len] = {phi_k.shape[:2]}; got {kv_mask.shape}")
  k = phi_k.astype(jnp.float32)
  if kv_mask is not None:
    k = jnp.where(kv_mask[:, :, None, None], k, 0.0)
  q = common.group_queries(phi_q, phi_k.shape[2])
  kv = jnp.einsum("bjhf,bjhd->bhfd", k, v.astype(jnp.float32))             # [B, Hkv, F, Dv]
  num = jnp.einsum("bihgf,bhfd->bihgd", q, kv)
  den = jnp.einsum("bihgf,bhf->bihg", q, k.sum(1))
  out = common.normalize_output(num, den, normalize, eps)
  return out.reshape(*phi_q.shape[:3], v.shape[-1]).astype(v.dtype)
