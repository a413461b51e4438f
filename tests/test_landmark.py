"""Landmark attention's grouped softmax and landmark insertion against a float64 NumPy loop."""
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.attention import attention_reference, masks
from lcjax.attention.landmark import (insert_landmarks, landmark_attention, landmark_mask,
                                      landmark_weights, remove_landmarks)


def softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def numpy_landmark_weights(q, k, block_size):
  """The paper's grouped softmax, one query at a time, in float64."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  b, t, hq, d = q.shape
  k = np.repeat(k, hq // k.shape[2], axis=2)
  block = np.arange(t) // (block_size + 1)
  is_lm = np.arange(t) % (block_size + 1) == block_size
  w = np.zeros((b, hq, t, t))
  for bi in range(b):
    for h in range(hq):
      for i in range(t):
        s = k[bi, :i + 1, h] @ q[bi, i, h] / np.sqrt(d)
        direct = [j for j in range(i + 1) if block[j] == block[i] or is_lm[j]]
        for j, p in zip(direct, softmax(s[direct])):
          if block[j] == block[i]:
            w[bi, h, i, j] += p
          else:  # an earlier block's landmark hands its weight to the block's ordinary tokens
            members = [m for m in range(i + 1) if block[m] == block[j] and not is_lm[m]]
            w[bi, h, i, members] += p * softmax(s[members])
  return w


def qkv(seed, t, hq=4, hkv=2, d=8, b=2):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (b, t, hq, d)), jax.random.normal(ks[1], (b, t, hkv, d)),
          jax.random.normal(ks[2], (b, t, hkv, d)))


@pytest.mark.parametrize("t,block_size", [(23, 4), (15, 4), (7, 1)])   # partial, closed, tiny blocks
def test_weights_and_output_match_numpy(t, block_size):
  q, k, v = qkv(t, t)
  expected = numpy_landmark_weights(q, k, block_size)
  w = landmark_weights(q, k, block_size=block_size)
  np.testing.assert_allclose(w, expected, atol=1e-6)
  np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, atol=1e-5)
  lm = landmark_mask(t, block_size)
  own_block = (np.arange(t)[:, None] // (block_size + 1)) == (np.arange(t)[None, :] // (block_size + 1))
  assert (np.asarray(w)[..., ~own_block & lm[None, :]] == 0).all()       # earlier landmarks: no value
  v_rep = np.repeat(np.asarray(v, np.float64), 2, axis=2)
  out = landmark_attention(q, k, v, block_size=block_size)
  np.testing.assert_allclose(out, np.einsum("bhij,bjhd->bihd", expected, v_rep), atol=2e-5)


def test_one_block_is_causal_attention():
  q, k, v = qkv(1, 12)
  np.testing.assert_allclose(landmark_attention(q, k, v, block_size=12),
                             attention_reference(q, k, v, mask=masks.causal()), atol=1e-6)


def test_gradients_match_numpy_finite_differences():
  q, k, v = qkv(2, 11, hq=2, hkv=1, d=4, b=1)
  cot = np.asarray(jax.random.normal(jax.random.key(3), (1, 11, 2, 4)), np.float64)
  loss = lambda q, k, v: jnp.sum(landmark_attention(q, k, v, block_size=3) * cot)
  grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  def numpy_loss(q, k, v):
    w = numpy_landmark_weights(q, k, 3)
    return np.sum(np.einsum("bhij,bjhd->bihd", w, np.repeat(v, 2, axis=2)) * cot)

  base = [np.asarray(x, np.float64) for x in (q, k, v)]
  rng = np.random.default_rng(0)
  for arg in range(3):
    for _ in range(2):                      # directional derivatives along random directions
      u = rng.standard_normal(base[arg].shape)
      plus, minus = list(base), list(base)
      plus[arg], minus[arg] = base[arg] + 1e-5 * u, base[arg] - 1e-5 * u
      fd = (numpy_loss(*plus) - numpy_loss(*minus)) / 2e-5
      np.testing.assert_allclose(np.sum(np.asarray(grads[arg], np.float64) * u), fd, rtol=1e-4, atol=1e-4)


def test_insert_and_remove_landmarks():
  tokens = jnp.arange(20).reshape(2, 10) + 100
  ins = insert_landmarks(tokens, block_size=3, landmark_id=7)
  assert ins.tokens.shape == (2, 13)
  np.testing.assert_array_equal(ins.tokens[0], [100, 101, 102, 7, 103, 104, 105, 7, 106, 107, 108, 7, 109])
  np.testing.assert_array_equal(ins.is_landmark, np.asarray(ins.tokens[0]) == 7)
  np.testing.assert_array_equal(ins.positions, np.broadcast_to(np.arange(13), (2, 13)))
  np.testing.assert_array_equal(remove_landmarks(ins.tokens, block_size=3), tokens)
  # Given positions: ordinary tokens keep theirs, a landmark takes its block's last position.
  pos = jnp.arange(20).reshape(2, 10) * 2
  ins = insert_landmarks(tokens, block_size=3, landmark_id=7, positions=pos)
  np.testing.assert_array_equal(ins.positions[1], [20, 22, 24, 24, 26, 28, 30, 30, 32, 34, 36, 36, 38])
  # A per-token model output [B, T', V] maps back onto the original tokens (and their targets).
  logits = jax.nn.one_hot(ins.tokens, 200)
  np.testing.assert_array_equal(remove_landmarks(logits, block_size=3).argmax(-1), tokens)
  # T a multiple of block_size: a landmark closes the last block too.
  ins = insert_landmarks(tokens[:, :9], block_size=3, landmark_id=7)
  assert ins.tokens.shape == (2, 12) and int(ins.tokens[0, -1]) == 7
  np.testing.assert_array_equal(remove_landmarks(ins.tokens, block_size=3), tokens[:, :9])


def test_bad_arguments_raise():
  q, k, v = qkv(4, 6)
  with pytest.raises(ValueError, match="block_size"):
    landmark_attention(q, k, v, block_size=0)
  with pytest.raises(ValueError, match="Hq % Hkv"):
    landmark_attention(q[:, :, :3], k, v, block_size=2)
  with pytest.raises(ValueError, match="cannot come from insert_landmarks"):
    remove_landmarks(jnp.zeros((1, 7)), block_size=3)
  with pytest.raises(ValueError, match="positions"):
    insert_landmarks(jnp.zeros((1, 6), jnp.int32), block_size=2, landmark_id=1, positions=jnp.zeros((1, 5)))


@hypothesis.settings(max_examples=5, deadline=None)
@hypothesis.given(t=st.integers(1, 14), block_size=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_property_weights_match_numpy(t, block_size, seed):
  q, k, _ = qkv(seed, t, hq=2, hkv=1, d=4, b=1)
  w = landmark_weights(q, k, block_size=block_size)
  np.testing.assert_allclose(w, numpy_landmark_weights(q, k, block_size), atol=1e-6)
