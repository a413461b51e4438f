"""Kernelized attention with relative positions through FFT against the O(T^2) formula."""
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.attention import linear as la


def numpy_rpe_attention(phi_q, phi_k, v, rel_bias, causal, eps=1e-6):
  """float64 O(T^2): a_ij = phi_q_i . phi_k_j exp(b(i - j)), j <= i when causal."""
  q, k, v = (np.asarray(x, np.float64) for x in (phi_q, phi_k, v))
  t, hq = q.shape[1], q.shape[2]
  group = hq // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  weight = np.exp(np.broadcast_to(np.asarray(rel_bias, np.float64), (hq, 2 * t - 1))[:, t - 1 + i - j])
  if causal:
    weight = weight * (j <= i)
  a = np.einsum("bihf,bjhf->bhij", q, k) * weight[None]
  return np.einsum("bhij,bjhd->bihd", a, v) / (np.einsum("bhij->bih", a) + eps)[..., None]


@pytest.mark.parametrize("t", [1, 5, 16, 33])
def test_toeplitz_matmul_matches_dense_matrix(t):
  coeffs = jax.random.normal(jax.random.key(t), (3, 2 * t - 1))
  x = jax.random.normal(jax.random.key(t + 1), (2, 3, t, 4))
  c = np.asarray(coeffs, np.float64)
  dense = c[:, np.arange(t)[:, None] - np.arange(t)[None, :] + t - 1]      # [3, T, T]
  expected = np.einsum("hij,bhjn->bhin", dense, np.asarray(x, np.float64))
  np.testing.assert_allclose(la.toeplitz_matmul(coeffs, x), expected, atol=2e-5 * max(1, np.abs(expected).max()))


@pytest.mark.parametrize("t,hq,hkv,bias_heads,causal", [(9, 4, 2, 4, False), (12, 2, 1, 1, True),
                                                         (7, 2, 2, 2, True)])
def test_rpe_attention_matches_quadratic_formula(t, hq, hkv, bias_heads, causal):
  ks = jax.random.split(jax.random.key(t), 4)
  phi_q = la.elu_plus_one(jax.random.normal(ks[0], (2, t, hq, 4)))
  phi_k = la.elu_plus_one(jax.random.normal(ks[1], (2, t, hkv, 4)))
  v = jax.random.normal(ks[2], (2, t, hkv, 3))
  rel_bias = jax.random.normal(ks[3], (bias_heads, 2 * t - 1))
  expected = numpy_rpe_attention(phi_q, phi_k, v, rel_bias, causal)
  out = la.rpe_linear_attention(phi_q, phi_k, v, rel_bias, causal=causal)
  assert out.shape == (2, t, hq, 3)
  np.testing.assert_allclose(out, expected, atol=5e-5)
  np.testing.assert_allclose(la.naive_rpe_linear_attention(phi_q, phi_k, v, rel_bias, causal=causal),
                             expected, atol=5e-5)


def test_zero_bias_reduces_to_plain_linear_attention():
  ks = jax.random.split(jax.random.key(0), 3)
  phi_q = la.elu_plus_one(jax.random.normal(ks[0], (1, 10, 2, 4)))
  phi_k = la.elu_plus_one(jax.random.normal(ks[1], (1, 10, 2, 4)))
  v = jax.random.normal(ks[2], (1, 10, 2, 4))
  zero = jnp.zeros((1, 19))
  np.testing.assert_allclose(la.rpe_linear_attention(phi_q, phi_k, v, zero),
                             la.noncausal_linear_attention(phi_q, phi_k, v), atol=1e-5)
  np.testing.assert_allclose(la.rpe_linear_attention(phi_q, phi_k, v, zero, causal=True),
                             la.chunk_linear_attention(phi_q, phi_k, v, chunk_size=4), atol=1e-5)


def test_rpe_gradients_match_quadratic():
  ks = jax.random.split(jax.random.key(1), 5)
  phi_q = la.elu_plus_one(jax.random.normal(ks[0], (1, 8, 2, 3)))
  phi_k = la.elu_plus_one(jax.random.normal(ks[1], (1, 8, 1, 3)))
  v = jax.random.normal(ks[2], (1, 8, 1, 2))
  bias = 0.5 * jax.random.normal(ks[3], (2, 15))
  cot = jax.random.normal(ks[4], (1, 8, 2, 2))
  loss = lambda fn: lambda *a: jnp.sum(fn(*a, causal=True) * cot)
  grads = jax.grad(loss(la.rpe_linear_attention), argnums=(0, 1, 2, 3))(phi_q, phi_k, v, bias)
  expected = jax.grad(loss(la.naive_rpe_linear_attention), argnums=(0, 1, 2, 3))(phi_q, phi_k, v, bias)
  for g, e in zip(grads, expected):
    np.testing.assert_allclose(g, e, atol=1e-4 * max(1, np.abs(np.asarray(e)).max()))


def test_bad_bias_shape_raises():
  x = jnp.ones((1, 4, 2, 3))
  with pytest.raises(ValueError, match="rel_bias"):
    la.rpe_linear_attention(x, x, x, jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="coeffs"):
    la.toeplitz_matmul(jnp.zeros((5,)), jnp.ones((4, 1)))


@hypothesis.settings(max_examples=5, deadline=None)
@hypothesis.given(t=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_property_toeplitz_matches_dense(t, seed):
  rng = np.random.default_rng(seed)
  coeffs, x = rng.standard_normal(2 * t - 1), rng.standard_normal((t, 3))
  dense = coeffs[np.arange(t)[:, None] - np.arange(t)[None, :] + t - 1]
  np.testing.assert_allclose(la.toeplitz_matmul(jnp.asarray(coeffs), jnp.asarray(x)), dense @ x,
                             atol=1e-5 * max(1.0, np.abs(dense @ x).max()))
