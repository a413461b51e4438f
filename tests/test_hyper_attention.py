"""HyperAttention: exact at the limit, error falling with its budgets, LSH ordering."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.attention import attention_reference, masks
from lcjax.attention.hyper import angular_lsh, gray_code_rank, hyper_attention


def numpy_attention(q, k, v, causal):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if causal:
    s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
  m = s.max(-1, keepdims=True)
  p = np.exp(s - m)
  lse = (m + np.log(p.sum(-1, keepdims=True)))[..., 0]
  return np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v), lse


def qkv(seed, tq, tk=None, hq=4, hkv=2, d=8, b=2, scale=1.0):
  ks = jax.random.split(jax.random.key(seed), 3)
  tk = tq if tk is None else tk
  return (scale * jax.random.normal(ks[0], (b, tq, hq, d)), scale * jax.random.normal(ks[1], (b, tk, hkv, d)),
          jax.random.normal(ks[2], (b, tk, hkv, d)))


@pytest.mark.parametrize("tq,tk,causal", [(24, 24, False), (9, 30, False), (37, 37, True)])
def test_exact_when_blocks_cover_the_keys(tq, tk, causal):
  q, k, v = qkv(tq, tq, tk)
  # Non-causal: one block of >= Tk keys. Causal: the recursion's off-diagonal quarters have
  # <= ceil(T/2) keys, so a block of T/2 + 1 covers each of them.
  block = tk if not causal else tk // 2 + 1
  out, lse = hyper_attention(q, k, v, rng=jax.random.key(0), block_size=block, sample_size=16,
                             causal=causal, min_seq_len=5, return_lse=True)
  expected, expected_lse = numpy_attention(q, k, v, causal)
  np.testing.assert_allclose(out, expected, atol=2e-5)
  np.testing.assert_allclose(lse, expected_lse, atol=2e-5)


def relative_error(causal, seeds=range(4), **knobs):
  q, k, v = qkv(7, 64, scale=1.5)
  exact = np.asarray(attention_reference(q, k, v, mask=masks.causal() if causal else None))
  errs = [np.linalg.norm(hyper_attention(q, k, v, rng=jax.random.key(s), causal=causal, min_seq_len=16,
                                         **knobs) - exact) / np.linalg.norm(exact) for s in seeds]
  return float(np.mean(errs))


@pytest.mark.parametrize("causal", [False, True])
def test_error_falls_as_blocks_grow(causal):
  errors = [relative_error(causal, block_size=b, sample_size=16, lsh_bits=4) for b in (4, 16, 64)]
  assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-5, errors


def test_error_falls_as_samples_grow():
  errors = [relative_error(False, block_size=8, sample_size=m, lsh_bits=4) for m in (0, 32, 512)]
  assert errors[0] > errors[1] > errors[2], errors


def test_gradients_equal_exact_attention_at_the_limit():
  q, k, v = qkv(3, 20, hq=2, hkv=1, d=4, b=1)
  cot = jax.random.normal(jax.random.key(4), (1, 20, 2, 4))
  hyper = lambda q, k, v: jnp.sum(hyper_attention(q, k, v, rng=jax.random.key(0), block_size=11,
                                                  causal=True, min_seq_len=6) * cot)
  exact = lambda q, k, v: jnp.sum(attention_reference(q, k, v, mask=masks.causal()) * cot)
  for g, e in zip(jax.grad(hyper, argnums=(0, 1, 2))(q, k, v), jax.grad(exact, argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(g, e, atol=5e-5)


def test_gray_order_and_angular_hash():
  rank = gray_code_rank(5)
  code_at = np.argsort(rank)                       # code at each rank
  assert sorted(rank) == list(range(32))
  assert all(bin(a ^ b).count("1") == 1 for a, b in zip(code_at[:-1], code_at[1:]))
  proj = jax.random.normal(jax.random.key(0), (8, 5))
  x = jax.random.normal(jax.random.key(1), (10, 8))
  h = np.asarray(angular_lsh(x, proj))
  np.testing.assert_array_equal(angular_lsh(3.0 * x, proj), h)   # angle only, not norm
  flipped = np.asarray(angular_lsh(-x, proj))       # opposite vector: every sign flips
  np.testing.assert_array_equal(np.argsort(rank)[flipped], 31 - np.argsort(rank)[h])


def test_bad_arguments_raise():
  q, k, v = qkv(5, 8)
  with pytest.raises(ValueError, match="block_size"):
    hyper_attention(q, k, v, rng=jax.random.key(0), block_size=0)
  with pytest.raises(ValueError, match="sample_size"):
    hyper_attention(q, k, v, rng=jax.random.key(0), sample_size=-1)
  with pytest.raises(ValueError, match="causal"):
    hyper_attention(q, k[:, :6], v[:, :6], rng=jax.random.key(0), causal=True)
  with pytest.raises(ValueError, match="Hq % Hkv"):
    hyper_attention(q[:, :, :3], k, v, rng=jax.random.key(0))
