"""Shared input checks and decay helpers of the linear-attention family.

Conventions of every function in lcjax/attention/linear/:
  phi_q  [B, Tq, Hq, F]   feature-mapped queries (feature_maps.py)
  phi_k  [B, Tk, Hkv, F]  feature-mapped keys, Hq % Hkv == 0 (GQA/MQA: a group of query heads
                          reads the state of one kv head)
  v      [B, Tk, Hkv, Dv]
  decay  None or float [Hkv], values in (0, 1]: the weight of key j for query i >= j is
         decay ** (i - j) (RetNet / Lightning attention's per-head decay). It belongs to the kv
         head because the recurrent state it decays is per kv head.
Accumulation is in float32; outputs are in v.dtype.
"""

from __future__ import annotations

import jax.numpy as jnp


def validate_linear_inputs(phi_q, phi_k, v, decay=None, *, same_length: bool = True) -> None:
  """Raises ValueError naming the argument whose shape is wrong."""
  for name, x in (("phi_q", phi_q), ("phi_k", phi_k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"{name} must be [batch, len, heads, dim]; got shape {x.shape}")
  if phi_k.shape[:3] != v.shape[:3]:
    raise ValueError(f"phi_k {phi_k.shape} and v {v.shape} must agree on batch, length and heads")
  if phi_q.shape[0] != phi_k.shape[0]:
    raise ValueError(f"phi_q batch {phi_q.shape[0]} != phi_k batch {phi_k.shape[0]}")
  if phi_q.shape[3] != phi_k.shape[3]:
    raise ValueError(f"phi_q feature dim {phi_q.shape[3]} != phi_k feature dim {phi_k.shape[3]}")
  if phi_q.shape[2] % phi_k.shape[2]:
    raise ValueError(f"phi_q heads ({phi_q.shape[2]}) must be a multiple of phi_k heads "
                     f"({phi_k.shape[2]}) for GQA/MQA")
  if same_length and phi_q.shape[1] != phi_k.shape[1]:
    raise ValueError(f"causal linear attention needs phi_q length {phi_q.shape[1]} == phi_k length "
                     f"{phi_k.shape[1]}")
  if decay is not None and jnp.shape(decay) != (phi_k.shape[2],):
    raise ValueError(f"decay must have shape [kv_heads] = ({phi_k.shape[2]},); got {jnp.shape(decay)}")


def log_decay(decay, kv_heads: int):
  """float32 [Hkv] log of the per-head decay (zeros when decay is None: no decay)."""
  if decay is None:
    return jnp.zeros((kv_heads,), jnp.float32)
  return jnp.log(jnp.asarray(decay, jnp.float32))


def group_queries(phi_q, kv_heads: int):
  """[B, T, Hq, F] -> float32 [B, T, Hkv, G, F] (query head h reads kv head h // G)."""
  b, t, hq, f = phi_q.shape
  return phi_q.astype(jnp.float32).reshape(b, t, kv_heads, hq // kv_heads, f)


def normalize_output(num, den, normalize: bool, eps: float):
  """num [..., Dv] / (den [...] + eps) when normalize, else num."""
  return num / (den + eps)[..., None] if normalize else num
