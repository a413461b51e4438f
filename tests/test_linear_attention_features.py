"""Feature maps of linear attention: each against its defining formula in float64 NumPy."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.attention import attention_reference
from lcjax.attention import linear as la


def normal(seed, shape, scale=1.0):
  return scale * jax.random.normal(jax.random.key(seed), shape)


def test_elu_plus_one_and_relu_formulas():
  x = normal(0, (2, 5, 3, 8))
  xn = np.asarray(x, np.float64)
  np.testing.assert_allclose(la.elu_plus_one(x), np.where(xn > 0, xn + 1, np.exp(xn)), rtol=1e-6)
  np.testing.assert_array_equal(la.relu(x), np.maximum(np.asarray(x), 0))
  assert (np.asarray(la.elu_plus_one(x)) > 0).all()


def test_orthogonal_random_features_blocks_and_redraw():
  w = la.orthogonal_random_features(jax.random.key(1), 20, 8)
  assert w.shape == (20, 8)
  for start in (0, 8):                       # full blocks: mutually orthogonal rows
    block = np.asarray(w[start:start + 8], np.float64)
    gram = block @ block.T
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-4 * np.abs(gram).max())
  norms = np.linalg.norm(np.asarray(w), axis=1)
  assert norms.std() > 0.1                   # chi-distributed norms, not all equal
  np.testing.assert_array_equal(w, la.orthogonal_random_features(jax.random.key(1), 20, 8))
  assert np.abs(np.asarray(w - la.orthogonal_random_features(jax.random.key(2), 20, 8))).max() > 0.1


def favor_kernel(q, k, num_features, seeds):
  """phi(q) . phi(k) [len(seeds), Tq, Tk] for one FAVOR+ draw per seed."""
  def one(key):
    w = la.orthogonal_random_features(key, num_features, q.shape[-1])
    return jnp.einsum("bihf,bjhf->ij", la.favor_plus(q, w, is_query=True), la.favor_plus(k, w, is_query=False))
  return np.asarray(jax.vmap(one)(jax.vmap(jax.random.key)(jnp.asarray(seeds))), np.float64)


def test_favor_plus_formula_unbiased_and_error_falls_with_features():
  d = 8
  q, k = normal(3, (1, 6, 1, d), 0.5), normal(4, (1, 6, 1, d), 0.5)
  w = la.orthogonal_random_features(jax.random.key(5), 16, d)
  # The defining formula, in float64.
  xs = np.asarray(q, np.float64) * d ** -0.25
  expected = np.exp(xs @ np.asarray(w, np.float64).T - 0.5 * (xs ** 2).sum(-1, keepdims=True)) / 4.0
  np.testing.assert_allclose(la.favor_plus(q, w, is_query=True), expected, rtol=1e-5)
  exact = np.exp(np.einsum("bihd,bjhd->ij", np.asarray(q, np.float64), np.asarray(k, np.float64)) / d ** 0.5)
  rel = lambda est: np.abs(est - exact).mean() / exact.mean()
  # Unbiased: the mean over 64 redraws is far closer than one draw (a biased rotation fails this).
  draws = favor_kernel(q, k, 256, range(64))
  assert rel(draws.mean(0)) < 0.03 and rel(draws.mean(0)) < 0.25 * np.mean([rel(e) for e in draws])
  errors = [np.mean([rel(e) for e in favor_kernel(q, k, m, range(4))]) for m in (8, 128, 2048)]
  assert errors[0] > errors[1] > errors[2] and errors[2] < 0.05, errors


def test_favor_plus_attention_approximates_softmax_and_stabilizer_cancels():
  d, t = 8, 12
  q, k, v = normal(6, (1, t, 2, d), 0.5), normal(7, (1, t, 2, d), 0.5), normal(8, (1, t, 2, d))
  exact = np.asarray(attention_reference(q, k, v))

  def features(m, seed, stabilize=False):
    w = la.orthogonal_random_features(jax.random.key(seed), m, d)
    return (la.favor_plus(q, w, is_query=True, stabilize=stabilize),
            la.favor_plus(k, w, is_query=False, stabilize=stabilize))

  error = lambda m: np.mean([np.linalg.norm(la.noncausal_linear_attention(*features(m, s), v) - exact)
                             / np.linalg.norm(exact) for s in range(3)])
  coarse, fine = error(64), error(2048)
  assert fine < 0.06 and fine < 0.5 * coarse, (coarse, fine)
  # The stabilisers are constants per query row / per (batch, head) over keys: they cancel
  # (eps=0: FAVOR+ features are positive, and the constants shrink the denominator below eps).
  for fn in (la.noncausal_linear_attention, functools.partial(la.chunk_linear_attention, chunk_size=5)):
    np.testing.assert_allclose(fn(*features(256, 0, True), v, eps=0.0), fn(*features(256, 0), v, eps=0.0),
                               atol=2e-5)


def test_cosformer_features_give_cos_reweighted_relu_kernel():
  t, m = 7, 16
  q, k = normal(10, (2, t, 3, 4)), normal(11, (2, t, 3, 4))
  pos = jnp.arange(3, 3 + t)
  a = np.einsum("bihf,bjhf->bhij", la.cosformer(q, pos, max_len=m), la.cosformer(k, pos, max_len=m))
  relu = lambda x: np.maximum(np.asarray(x, np.float64), 0)
  dist = np.asarray(pos)[:, None] - np.asarray(pos)[None, :]
  expected = np.einsum("bihf,bjhf->bhij", relu(q), relu(k)) * np.cos(np.pi / 2 * dist / m)
  np.testing.assert_allclose(a, expected, atol=1e-5)
  assert la.cosformer(q, pos[None].repeat(2, 0), max_len=m).shape == (2, t, 3, 8)


def numpy_norm_aware(x, is_query, eps=1e-6):
  x = np.asarray(x, np.float64)
  if is_query:
    norm = np.sqrt((x ** 2).sum(-1, keepdims=True) + eps)
    p = 3 * (0.5 + np.tanh(norm))
    return np.concatenate([(np.maximum(x, 0) / norm) ** p, (np.maximum(-x, 0) / norm) ** p], -1)
  return np.concatenate([np.maximum(x, 0) ** 3, np.maximum(-x, 0) ** 3], -1)


def test_norm_aware_formula_and_query_norm_controls_spikiness():
  q, k = normal(12, (1, 1, 1, 16)), normal(13, (1, 64, 1, 16))
  np.testing.assert_allclose(la.norm_aware(q, is_query=True), numpy_norm_aware(q, True), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(la.norm_aware(k, is_query=False), numpy_norm_aware(k, False), rtol=1e-5, atol=1e-6)

  def entropy(scale):
    a = np.einsum("bihf,bjhf->j", la.norm_aware(q * scale, is_query=True), la.norm_aware(k, is_query=False))
    p = np.asarray(a, np.float64) / a.sum()
    return -(p * np.log(p + 1e-30)).sum()

  # Unlike ReLU or elu+1 features, the normalised attention depends on the query norm.
  assert entropy(1.0) < entropy(0.1) - 0.1
  grad = jax.grad(lambda x: la.norm_aware(x, is_query=True).sum())(q)
  assert np.isfinite(np.asarray(grad)).all()


def test_feature_map_bad_projection_raises():
  with pytest.raises(ValueError, match="projection"):
    la.favor_plus(normal(0, (1, 2, 1, 8)), jnp.ones((4, 6)), is_query=True)
  with pytest.raises(ValueError, match="num_features"):
    la.orthogonal_random_features(jax.random.key(0), 0, 8)
