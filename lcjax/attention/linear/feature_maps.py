"""Feature maps phi for kernelized (linear) attention: sim(q, k) = phi(q) . phi(k) >= 0.

Every map takes queries or keys x [..., D] (usually [B, T, H, D]) and returns features
[..., F] in x.dtype, computed in float32. Linear attention then costs O(T F Dv) instead of
O(T^2 D). Maps that depend on the query/key role or on positions take them as arguments.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def elu_plus_one(x):
  """phi(x) = elu(x) + 1, F = D.

  Katharopoulos et al. 2020, "Transformers are RNNs: Fast Autoregressive Transformers with
  Linear Attention".
  """
  return (jax.nn.elu(x.astype(jnp.float32)) + 1.0).astype(x.dtype)


def relu(x):
  """phi(x) = max(x, 0), F = D: the base map of cosFormer (Qin et al. 2022, "cosFormer:
  Rethinking Softmax in Attention"). A row whose features are all zero sees nothing; the
  normalised attention's eps then keeps its output finite (zero)."""
  return jax.nn.relu(x)


def orthogonal_random_features(key, num_features: int, head_dim: int):
  """float32 [num_features, head_dim] projection for FAVOR+; redraw by passing a new key.

  Rows come in blocks of head_dim mutually orthogonal directions (QR of a Gaussian matrix), each
  row rescaled to the norm of an independent Gaussian vector, so every row is marginally
  N(0, I) while rows of a block are exactly orthogonal (Choromanski et al. 2021, section 2.4).
  """
  if num_features < 1 or head_dim < 1:
    raise ValueError(f"num_features={num_features} and head_dim={head_dim} must be >= 1")
  num_blocks = -(-num_features // head_dim)
  keys = jax.random.split(key, num_blocks + 1)
  blocks = []
  for k in keys[:-1]:
    q, r = jnp.linalg.qr(jax.random.normal(k, (head_dim, head_dim)))
    # Sign-fix so the rotation is Haar-uniform: LAPACK's Householder QR alone biases directions.
    blocks.append((q * jnp.sign(jnp.diagonal(r))[None, :]).T)
  directions = jnp.concatenate(blocks, axis=0)[:num_features]
  norms = jnp.linalg.norm(jax.random.normal(keys[-1], (num_features, head_dim)), axis=1)
  return directions * norms[:, None]


def favor_plus(x, projection, *, is_query: bool, scale: float | None = None,
               stabilize: bool = False):
  """FAVOR+ positive random features: E[phi(q) . phi(k)] = exp(scale * q . k).

  Choromanski et al. 2021, "Rethinking Attention with Performers":
  phi(x) = exp(w_r . x' - |x'|^2 / 2) / sqrt(m), x' = sqrt(scale) * x, w_r the rows of
  `projection` [m, D] (orthogonal_random_features). scale defaults to D ** -0.5 (softmax's).

  stabilize subtracts a constant before exp, as the Performer code does: per row for queries,
  and one max over the sequence and features (per batch row and head) for keys. Both cancel in
  *normalised* attention only, and the key constant depends on every key of the sequence, so
  leave it False for unnormalised attention and for a recurrent (decoding) state. The constants
  also shrink the denominator, so pair stabilize=True with a smaller eps (e.g. 0: FAVOR+
  features are positive).

  Args:
    x: [B, T, H, D] queries or keys.
    projection: float32 [m, D].
    is_query: which stabiliser applies (only matters when stabilize).
  Returns:
    [B, T, H, m] in x.dtype.
  """
  if projection.ndim != 2 or projection.shape[1] != x.shape[-1]:
    raise ValueError(f"projection must be [num_features, head_dim={x.shape[-1]}]; got {projection.shape}")
  scale = x.shape[-1] ** -0.5 if scale is None else scale
  xs = x.astype(jnp.float32) * math.sqrt(scale)
  logits = jnp.einsum("...d,md->...m", xs, projection) - 0.5 * jnp.sum(xs * xs, -1, keepdims=True)
  if stabilize:
    axes = (-1,) if is_query else (-3, -1)   # keys: over T and features, per batch and head
    logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=axes, keepdims=True))
  return (jnp.exp(logits) / math.sqrt(projection.shape[0])).astype(x.dtype)


def cosformer(x, positions, *, max_len: int):
  """cosFormer's cos-reweighted ReLU features, F = 2 D.

  Qin et al. 2022, "cosFormer: Rethinking Softmax in Attention": sim(q_i, k_j) =
  relu(q_i) . relu(k_j) cos(pi/2 (i - j) / M), which decomposes by cos(a - b) = cos a cos b +
  sin a sin b into phi(x_i) = [relu(x_i) cos(pi i / 2M), relu(x_i) sin(pi i / 2M)].
  The same map serves queries and keys. M = max_len must exceed every position so the weight
  stays in (0, 1] and decays with distance.

  Args:
    x: [B, T, H, D].
    positions: int [T] or [B, T], absolute positions of x's tokens.
  Returns:
    [B, T, H, 2 D] in x.dtype.
  """
  angle = (math.pi / (2 * max_len)) * jnp.asarray(positions, jnp.float32)
  angle = jnp.broadcast_to(angle, x.shape[:2])[:, :, None, None]
  r = jax.nn.relu(x.astype(jnp.float32))
  return jnp.concatenate([r * jnp.cos(angle), r * jnp.sin(angle)], axis=-1).astype(x.dtype)


def norm_aware(x, *, is_query: bool, key_power: float = 3.0, eps: float = 1e-6):
  """NaLaFormer's norm-aware features, F = 2 D.

  Meng et al. 2025, "NaLaFormer: Norm-Aware Linear Attention for Transformer Models"
  (arXiv 2506.21137), following its reference code: x is split into its positive and negative
  parts [relu(x), relu(-x)] so that only same-sign coordinates interact (non-negative without
  discarding the negative half of the inner product). Queries are reduced to their direction
  x / |x| and raised, elementwise, to the query-norm-dependent power p = 3 (1/2 + tanh |x|):
  larger query norms give spikier (lower-entropy) attention even though normalised linear
  attention cancels the norm itself. Keys are cubed (key_power) before the split.

  Args:
    x: [..., D] queries or keys.
  Returns:
    [..., 2 D] in x.dtype.
  """
  xf = x.astype(jnp.float32)
  if is_query:
    norm = jnp.sqrt(jnp.sum(xf * xf, -1, keepdims=True) + eps)
    power = 3.0 * (0.5 + jnp.tanh(norm))
    pos, neg = jax.nn.relu(xf) / norm, jax.nn.relu(-xf) / norm
    # pos ** power with a safe zero (0 ** p has an undefined gradient in p at 0).
    lift = lambda t: jnp.where(t > 0, jnp.exp(power * jnp.log(jnp.where(t > 0, t, 1.0))), 0.0)
    feats = [lift(pos), lift(neg)]
  else:
    xk = jnp.sign(xf) * jnp.abs(xf) ** key_power
    feats = [jax.nn.relu(xk), jax.nn.relu(-xk)]
  return jnp.concatenate(feats, axis=-1).astype(x.dtype)
