"""HyperAttention: sorted-LSH block-diagonal attention plus uniform column sampling.

Han et al. 2024, "HyperAttention: Long-context Attention in Near-Linear Time" (ICLR 2024).
An approximate method, for the fidelity-versus-compute experiments:
  1. Hash queries and keys with an angular LSH of `lsh_bits` random hyperplanes; rank the
     2^bits buckets in Gray-code order (adjacent buckets differ in one hyperplane) and sort the
     queries and the keys by bucket. Queries and keys that are close in angle land in the same
     stretch of the sorted order, where most of the large entries of q k^T then lie.
  2. Exact attention inside the block diagonal of the sorted order (key blocks of `block_size`,
     query blocks of the matching share of the queries).
  3. Everything off the block diagonal is estimated from `sample_size` key columns drawn
     uniformly with replacement, each standing for T_k / sample_size columns (the sampled keys
     that fall in the query's own block are masked out: step 2 counted them).
  Steps 2 and 3 are merged through their log-sum-exps.
Causal attention is by the paper's recursion: the two diagonal halves recurse (causal), the
off-diagonal lower-left quarter is the non-causal approximation above, and lengths up to
`min_seq_len` are exact. Error knobs: more bits sharpen the sort, larger blocks and samples
cover more of the mass; block_size >= T_k is exact attention.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def gray_code_rank(bits: int) -> np.ndarray:
  """int32 [2^bits]: rank of each bucket code in the binary-reflected Gray sequence, so buckets
  of adjacent rank differ in exactly one hyperplane sign."""
  codes = np.arange(1 << bits)
  gray = codes ^ (codes >> 1)                   # the Gray sequence: gray[r] is the code at rank r
  rank = np.empty_like(codes)
  rank[gray] = codes
  return rank.astype(np.int32)


def angular_lsh(x, projections):
  """int32 [...]: Gray-ordered bucket of x [..., D] under hyperplanes `projections` [D, bits]."""
  bits = projections.shape[-1]
  signs = (jnp.einsum("...d,dr->...r", x.astype(jnp.float32), projections) > 0).astype(jnp.int32)
  codes = jnp.sum(signs << jnp.arange(bits, dtype=jnp.int32), axis=-1)
  return jnp.asarray(gray_code_rank(bits))[codes]


def _merge(out_a, lse_a, out_b, lse_b):
  """Combines two partial softmax attentions over disjoint key sets by their log-sum-exps."""
  lse = jnp.logaddexp(lse_a, lse_b)
  safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
  wa = jnp.where(jnp.isfinite(lse_a), jnp.exp(lse_a - safe), 0.0)
  wb = jnp.where(jnp.isfinite(lse_b), jnp.exp(lse_b - safe), 0.0)
  return out_a * wa[..., None] + out_b * wb[..., None], lse


def _softmax_with_lse(s, v):
  """s [..., Tq, Tk] masked with -inf, v [..., Tk, Dv] -> (out [..., Tq, Dv], lse [..., Tq])."""
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
  l = p.sum(-1)
  out = jnp.einsum("...qk,...kd->...qd", p, v) / jnp.where(l > 0, l, 1.0)[..., None]
  lse = jnp.where(l > 0, m[..., 0] + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
  return out, lse


def _exact(q, k, v, scale, causal):
  s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * scale
  if causal:
    t = q.shape[2]
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
  return _softmax_with_lse(s, v)


def _take_rows(x, idx):
  """x [B, H, T, D], idx int [B, H, N] -> [B, H, N, D]."""
  return jnp.take_along_axis(x, idx[..., None], axis=2)


def _noncausal(q, k, v, rng, scale, lsh_bits, block_size, sample_size):
  """q [B, H, Tq, D], k, v [B, H, Tk, .] float32 -> (out [B, H, Tq, Dv], lse [B, H, Tq])."""
  b, h, tq, d = q.shape
  tk = k.shape[2]
  num_blocks = -(-tk // block_size)
  if num_blocks == 1:
    return _exact(q, k, v, scale, causal=False)
  rng_lsh, rng_sample = jax.random.split(rng)
  projections = jax.random.normal(rng_lsh, (d, lsh_bits))
  q_order = jnp.argsort(angular_lsh(q, projections), axis=-1, stable=True)
  k_order = jnp.argsort(angular_lsh(k, projections), axis=-1, stable=True)
  qs, ks, vs = _take_rows(q, q_order), _take_rows(k, k_order), _take_rows(v, k_order)
  # Block diagonal of the sorted order; padded keys masked, padded query rows dropped.
  bq = -(-tq // num_blocks)
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, 0), (0, n - x.shape[2]), (0, 0)))
  qb = pad(qs, num_blocks * bq).reshape(b, h, num_blocks, bq, d)
  kb = pad(ks, num_blocks * block_size).reshape(b, h, num_blocks, block_size, d)
  vb = pad(vs, num_blocks * block_size).reshape(b, h, num_blocks, block_size, v.shape[-1])
  s = jnp.einsum("bhnqd,bhnkd->bhnqk", qb, kb) * scale
  key_ok = (jnp.arange(num_blocks * block_size) < tk).reshape(num_blocks, 1, block_size)
  out, lse = _softmax_with_lse(jnp.where(key_ok, s, -jnp.inf), vb)
  out = out.reshape(b, h, num_blocks * bq, -1)[:, :, :tq]
  lse = lse.reshape(b, h, num_blocks * bq)[:, :, :tq]
  if sample_size > 0:
    cols = jax.random.randint(rng_sample, (b, h, sample_size), 0, tk)     # into the sorted keys
    s = jnp.einsum("bhqd,bhmd->bhqm", qs, _take_rows(ks, cols)) * scale
    own_block = (jnp.arange(tq) // bq)[None, None, :, None] == (cols // block_size)[:, :, None, :]
    out_r, lse_r = _softmax_with_lse(jnp.where(own_block, -jnp.inf, s), _take_rows(vs, cols))
    out, lse = _merge(out, lse, out_r, lse_r + math.log(tk / sample_size))
  inverse = jnp.argsort(q_order, axis=-1)
  return _take_rows(out, inverse), jnp.take_along_axis(lse, inverse, axis=-1)


def _causal(q, k, v, rng, scale, lsh_bits, block_size, sample_size, min_seq_len):
  """The paper's recursion over halves; q, k, v [B, H, T, .] float32 of one length T."""
  b, h, t, d = q.shape
  if t <= min_seq_len:
    return _exact(q, k, v, scale, causal=True)
  if t % 2:  # a zero row at the end: its key is seen only by its own (dropped) query
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, 1), (0, 0)))
    out, lse = _causal(pad(q), pad(k), pad(v), rng, scale, lsh_bits, block_size, sample_size,
                       min_seq_len)
    return out[:, :, :t], lse[:, :, :t]
  half = t // 2
  rng_diag, rng_low = jax.random.split(rng)
  halves = lambda x: x.reshape(b, h * 2, half, x.shape[-1])               # (head, half) pairs
  out_d, lse_d = _causal(halves(q), halves(k), halves(v), rng_diag, scale, lsh_bits, block_size,
                         sample_size, min_seq_len)
  out_d, lse_d = out_d.reshape(b, h, t, -1), lse_d.reshape(b, h, t)
  out_l, lse_l = _noncausal(q[:, :, half:], k[:, :, :half], v[:, :, :half], rng_low, scale,
                            lsh_bits, block_size, sample_size)
  out_low, lse_low = _merge(out_d[:, :, half:], lse_d[:, :, half:], out_l, lse_l)
  return (jnp.concatenate([out_d[:, :, :half], out_low], axis=2),
          jnp.concatenate([lse_d[:, :, :half], lse_low], axis=2))


@functools.partial(jax.jit, static_argnames=("lsh_bits", "block_size", "sample_size", "causal",
                                             "min_seq_len", "scale", "return_lse"))
def hyper_attention(q, k, v, *, rng, lsh_bits: int = 7, block_size: int = 256,
                    sample_size: int = 256, causal: bool = False, min_seq_len: int = 4096,
                    scale: float | None = None, return_lse: bool = False):
  """Approximate softmax attention in near-linear time (module docstring).

  Args:
    q: [B, Tq, Hq, D]; k, v: [B, Tk, Hkv, D] / [B, Tk, Hkv, Dv], Hq % Hkv == 0 (kv heads are
      repeated for the group).
    rng: a jax.random key (hyperplanes and sampled columns).
    lsh_bits: hyperplanes of the angular LSH, >= 1.
    block_size: keys per diagonal block of the sorted order, >= 1 (>= Tk: exact attention).
    sample_size: uniformly sampled key columns for the off-diagonal residual, >= 0.
    causal: the paper's recursion (Tq == Tk); lengths <= min_seq_len are computed exactly.
    scale: logit scale, default D ** -0.5.
    return_lse: also return the float32 log-sum-exp estimate [B, Hq, Tq].
  Returns:
    out [B, Tq, Hq, Dv] in q.dtype (and lse).
  """
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or k.shape[:3] != v.shape[:3] or \
      q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
    raise ValueError(f"q [B, Tq, Hq, D], k [B, Tk, Hkv, D], v [B, Tk, Hkv, Dv] with Hq % Hkv == 0 "
                     f"expected; got q{q.shape}, k{k.shape}, v{v.shape}")
  for name, value, low in (("lsh_bits", lsh_bits, 1), ("block_size", block_size, 1),
                           ("sample_size", sample_size, 0), ("min_seq_len", min_seq_len, 1)):
    if not isinstance(value, int) or value < low:
      raise ValueError(f"{name} must be an int >= {low}; got {value!r}")
  if causal and q.shape[1] != k.shape[1]:
    raise ValueError(f"causal=True needs q length {q.shape[1]} == k length {k.shape[1]}")
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  group = q.shape[2] // k.shape[2]
  heads_major = lambda x: jnp.moveaxis(x.astype(jnp.float32), 2, 1)
  qh = heads_major(q)
  kh, vh = heads_major(jnp.repeat(k, group, axis=2)), heads_major(jnp.repeat(v, group, axis=2))
  if causal:
    out, lse = _causal(qh, kh, vh, rng, scale, lsh_bits, block_size, sample_size, min_seq_len)
  else:
    out, lse = _noncausal(qh, kh, vh, rng, scale, lsh_bits, block_size, sample_size)
  out = jnp.moveaxis(out, 1, 2).astype(q.dtype)
  return (out, lse) if return_lse else out
