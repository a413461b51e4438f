"""Kernelized attention with relative positional encoding in O(T log T) through the FFT.

Luo et al. 2021, "Stable, Fast and Accurate: Kernelized Attention with Relative Positional
Encoding". With an additive relative bias b(i - j) on the logits, softmax attention's kernel
exp(q_i . k_j + b(i - j)) becomes, in kernelized form,

  out_i = sum_j c_{i-j} phi_q_i . phi_k_j v_j / sum_j c_{i-j} phi_q_i . phi_k_j,  c = exp(b).

Pulling phi_q_i out leaves, per feature f and value dim d, y_i = sum_j c_{i-j} x_j with
x_j = phi_k_jf v_jd (and x_j = phi_k_jf for the normaliser): a Toeplitz matrix-vector product,
computed by embedding the Toeplitz matrix in a circulant one and multiplying in Fourier space.
Memory is O(T F Dv) per head (the paper's cost too). FFT round-off is about 1e-7 of the largest
column sum, so rows whose exact kernel sum is near zero (ReLU features that overlap no key) come
out as noise over noise: use strictly positive maps (elu+1, FAVOR+) here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lcjax.attention.linear import common


def toeplitz_matmul(coeffs, x):
  """y[..., i, :] = sum_j coeffs[..., T - 1 + i - j] x[..., j, :], by FFT in O(T log T).

  Args:
    coeffs: [..., 2T - 1] float, the diagonals from offset -(T-1) to T-1 (broadcast with x's
      leading dims).
    x: [..., T, N] float.
  Returns:
    float32 [..., T, N].
  """
  t = x.shape[-2]
  if coeffs.shape[-1] != 2 * t - 1:
    raise ValueError(f"coeffs must end in 2T-1 = {2 * t - 1} diagonals; got shape {coeffs.shape}")
  n = 1 << (2 * t - 1).bit_length()                          # power of two >= 2T - 1
  coeffs = coeffs.astype(jnp.float32)
  # First column of the n x n circulant: offsets 0 .. T-1, zeros, then offsets -(T-1) .. -1.
  zeros = jnp.zeros((*coeffs.shape[:-1], n - (2 * t - 1)), jnp.float32)
  column = jnp.concatenate([coeffs[..., t - 1:], zeros, coeffs[..., :t - 1]], axis=-1)
  spectrum = jnp.fft.rfft(column, n=n, axis=-1)[..., :, None]
  y = jnp.fft.irfft(spectrum * jnp.fft.rfft(x.astype(jnp.float32), n=n, axis=-2), n=n, axis=-2)
  return y[..., :t, :]


@functools.partial(jax.jit, static_argnames=("causal", "normalize", "eps"))
def rpe_linear_attention(phi_q, phi_k, v, rel_bias, *, causal: bool = False,
                         normalize: bool = True, eps: float = 1e-6):
  """Kernelized attention with a relative positional bias, O(T log T) (module docstring).

  Args:
    phi_q: [B, T, Hq, F]; phi_k: [B, T, Hkv, F]; v: [B, T, Hkv, Dv].
    rel_bias: float [H, 2T - 1], H in (1, Hq): the additive logit bias b(i - j) at index
      T - 1 + i - j; the kernel is multiplied by exp(b). Being per query head, it makes GQA keys
      and values be repeated to Hq heads.
    causal: drop j > i (the future half of the bias).
    normalize: divide by the same sum with v -> 1, plus eps.
  Returns:
    [B, T, Hq, Dv] in v.dtype.
  """
  common.validate_linear_inputs(phi_q, phi_k, v)
  b, t, hq, f = phi_q.shape
  rel_bias = jnp.asarray(rel_bias, jnp.float32)
  if rel_bias.ndim != 2 or rel_bias.shape[0] not in (1, hq) or rel_bias.shape[1] != 2 * t - 1:
    raise ValueError(f"rel_bias must be [1 or q_heads={hq}, 2T-1={2 * t - 1}]; got {rel_bias.shape}")
  coeffs = jnp.exp(rel_bias)
  if causal:
    coeffs = coeffs.at[:, :t - 1].set(0.0)
  group = hq // phi_k.shape[2]
  k = jnp.repeat(phi_k.astype(jnp.float32), group, axis=2)               # [B, T, Hq, F]
  vv = jnp.repeat(v.astype(jnp.float32), group, axis=2)
  dv = v.shape[-1]
  # Per head, the Toeplitz product runs over time for F * Dv + F columns at once.
  x = jnp.concatenate([(k[..., :, None] * vv[..., None, :]).reshape(b, t, hq, f * dv), k], -1)
  y = toeplitz_matmul(coeffs[None], jnp.moveaxis(x, 1, 2))               # [B, Hq, T, F(Dv+1)]
  y = jnp.moveaxis(y, 1, 2)
  kv, z = y[..., :f * dv].reshape(b, t, hq, f, dv), y[..., f * dv:]
  q = phi_q.astype(jnp.float32)
  num = jnp.einsum("bthf,bthfd->bthd", q, kv)
  den = jnp.einsum("bthf,bthf->bth", q, z)
  return common.normalize_output(num, den, normalize, eps).astype(v.dtype)
