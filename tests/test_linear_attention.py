"""Linear attention: chunked, recurrent and non-causal forms against float64 NumPy oracles."""
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.attention import linear as la


def numpy_linear_attention(phi_q, phi_k, v, *, causal=True, decay=None, normalize=True, eps=1e-6):
  """float64 oracle: a_ij = phi_q_i . phi_k_j decay^(i-j) (j <= i when causal)."""
  q, k, v = (np.asarray(x, np.float64) for x in (phi_q, phi_k, v))
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  a = np.einsum("bihf,bjhf->bhij", q, k)
  if causal:
    dist = np.arange(q.shape[1])[:, None] - np.arange(k.shape[1])[None, :]
    lam = np.ones(q.shape[2]) if decay is None else np.repeat(np.asarray(decay, np.float64), group)
    a = a * np.where(dist >= 0, lam[:, None, None] ** np.maximum(dist, 0), 0.0)[None]
  num = np.einsum("bhij,bjhd->bihd", a, v)
  if not normalize:
    return num
  return num / (np.einsum("bhij->bih", a) + eps)[..., None]


def make_inputs(seed, b, t, hq, hkv, d, dv, tk=None, feature=la.elu_plus_one):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  tk = t if tk is None else tk
  return (feature(jax.random.normal(kq, (b, t, hq, d))), feature(jax.random.normal(kk, (b, tk, hkv, d))),
          jax.random.normal(kv, (b, tk, hkv, dv)))


def assert_close(actual, expected, tol=2e-5):
  expected = np.asarray(expected)
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected,
                             atol=tol * max(1.0, np.abs(expected).max()), rtol=tol)


@pytest.mark.parametrize("t,chunk,hq,hkv,use_decay,normalize", [
    (13, 4, 4, 2, True, True),     # chunk does not divide T, GQA
    (16, 16, 2, 2, False, False),  # one chunk, unnormalised
    (7, 3, 4, 1, True, False),     # MQA, odd length
    (9, 32, 2, 1, False, True),    # chunk longer than T
])
def test_chunk_matches_numpy(t, chunk, hq, hkv, use_decay, normalize):
  phi_q, phi_k, v = make_inputs(t, 2, t, hq, hkv, 8, 5)
  decay = jnp.linspace(0.7, 0.95, hkv) if use_decay else None
  out = la.chunk_linear_attention(phi_q, phi_k, v, chunk_size=chunk, decay=decay, normalize=normalize)
  expected = numpy_linear_attention(phi_q, phi_k, v, decay=decay, normalize=normalize)
  assert out.shape == (2, t, hq, 5) and out.dtype == v.dtype
  assert_close(out, expected)
  assert_close(la.naive_linear_attention(phi_q, phi_k, v, decay=decay, normalize=normalize), expected)


def test_recurrent_outputs_and_state_equal_chunked():
  phi_q, phi_k, v = make_inputs(1, 2, 11, 4, 2, 6, 3)
  decay = jnp.array([0.8, 0.97])
  out_c, state_c = la.chunk_linear_attention(phi_q, phi_k, v, chunk_size=4, decay=decay,
                                             return_final_state=True)
  out_r, state_r = la.recurrent_linear_attention(phi_q, phi_k, v, decay=decay)
  assert_close(out_r, np.asarray(out_c, np.float64))
  assert state_r.kv.shape == (2, 2, 6, 3) and state_r.normalizer.shape == (2, 2, 6)
  assert_close(state_r.kv, np.asarray(state_c.kv, np.float64))
  assert_close(state_r.normalizer, np.asarray(state_c.normalizer, np.float64))


def test_chunked_prefill_then_step_decoding_matches_full_sequence():
  phi_q, phi_k, v = make_inputs(2, 1, 10, 2, 1, 4, 4)
  decay = jnp.array([0.9])
  expected = numpy_linear_attention(phi_q, phi_k, v, decay=decay)
  out, state = la.chunk_linear_attention(phi_q[:, :7], phi_k[:, :7], v[:, :7], chunk_size=3,
                                         decay=decay, return_final_state=True)
  outs = [out]
  for i in range(7, 10):
    o, state = la.recurrent_step(state, phi_q[:, i], phi_k[:, i], v[:, i], decay=decay)
    outs.append(o[:, None])
  assert_close(jnp.concatenate(outs, axis=1), expected)
  # A chunked call continuing from a state also matches.
  _, state7 = la.chunk_linear_attention(phi_q[:, :7], phi_k[:, :7], v[:, :7], decay=decay,
                                        return_final_state=True)
  tail = la.chunk_linear_attention(phi_q[:, 7:], phi_k[:, 7:], v[:, 7:], chunk_size=2, decay=decay,
                                   initial_state=state7)
  assert_close(tail, expected[:, 7:])


def test_recurrent_invalid_tokens_leave_state_untouched():
  phi_q, phi_k, v = make_inputs(3, 2, 6, 2, 2, 4, 3)
  decay = jnp.array([0.5, 0.9])
  valid = jnp.array([[True, False, True, True, False, True], [True] * 6])
  out, state = la.recurrent_linear_attention(phi_q, phi_k, v, decay=decay, valid=valid)
  keep = np.flatnonzero(np.asarray(valid[0]))
  expected = numpy_linear_attention(phi_q[:1, keep], phi_k[:1, keep], v[:1, keep], decay=decay)
  assert_close(out[0, keep], expected[0])
  np.testing.assert_array_equal(out[0, ~np.asarray(valid[0])], 0.0)
  _, state0 = la.recurrent_linear_attention(phi_q[:1, keep], phi_k[:1, keep], v[:1, keep], decay=decay)
  assert_close(state.kv[0], np.asarray(state0.kv[0], np.float64))


@pytest.mark.parametrize("tq,tk,hq,hkv,normalize", [(9, 9, 4, 2, True), (5, 12, 2, 1, False)])
def test_noncausal_matches_numpy(tq, tk, hq, hkv, normalize):
  phi_q, phi_k, v = make_inputs(4, 2, tq, hq, hkv, 8, 6, tk=tk)
  out = la.noncausal_linear_attention(phi_q, phi_k, v, normalize=normalize)
  assert_close(out, numpy_linear_attention(phi_q, phi_k, v, causal=False, normalize=normalize))
  kv_mask = jnp.arange(tk)[None, :] < jnp.array([[tk - 3], [tk]])
  out = la.noncausal_linear_attention(phi_q, phi_k, v, normalize=normalize, kv_mask=kv_mask)
  expected = numpy_linear_attention(phi_q[:1], phi_k[:1, :tk - 3], v[:1, :tk - 3], causal=False,
                                    normalize=normalize)
  assert_close(out[:1], expected)


@pytest.mark.parametrize("normalize", [True, False])
def test_chunk_gradients_match_naive(normalize):
  phi_q, phi_k, v = make_inputs(5, 1, 10, 4, 2, 4, 3)
  decay = jnp.array([0.8, 0.95])
  cot = jax.random.normal(jax.random.key(9), (1, 10, 4, 3))

  def loss(fn, *args):
    return jnp.sum(fn(*args[:3], decay=args[3], normalize=normalize) * cot)

  chunk = lambda *a, **kw: la.chunk_linear_attention(*a, chunk_size=4, **kw)
  grads = jax.grad(lambda *a: loss(chunk, *a), argnums=(0, 1, 2, 3))(phi_q, phi_k, v, decay)
  expected = jax.grad(lambda *a: loss(la.naive_linear_attention, *a), argnums=(0, 1, 2, 3))(
      phi_q, phi_k, v, decay)
  for g, e in zip(grads, expected):
    assert np.abs(np.asarray(e)).max() > 0
    assert_close(g, np.asarray(e, np.float64), tol=1e-4)


def test_bf16_inputs_give_bf16_outputs_close_to_float32():
  phi_q, phi_k, v = make_inputs(6, 1, 12, 2, 2, 8, 8)
  out = la.chunk_linear_attention(*(x.astype(jnp.bfloat16) for x in (phi_q, phi_k, v)), chunk_size=4)
  assert out.dtype == jnp.bfloat16
  expected = numpy_linear_attention(*(np.asarray(x.astype(jnp.bfloat16), np.float64) for x in (phi_q, phi_k, v)))
  np.testing.assert_allclose(np.asarray(out, np.float64), expected, atol=2e-2)


def test_bad_inputs_name_the_argument():
  phi_q, phi_k, v = make_inputs(7, 1, 6, 4, 2, 4, 4)
  with pytest.raises(ValueError, match="decay"):
    la.chunk_linear_attention(phi_q, phi_k, v, decay=jnp.ones(4))
  with pytest.raises(ValueError, match="chunk_size"):
    la.chunk_linear_attention(phi_q, phi_k, v, chunk_size=0)
  with pytest.raises(ValueError, match="heads"):
    la.chunk_linear_attention(phi_q[:, :, :3], phi_k, v)
  with pytest.raises(ValueError, match="length"):
    la.chunk_linear_attention(phi_q[:, :5], phi_k, v)
  with pytest.raises(ValueError, match="decay needs causal"):
    la.naive_linear_attention(phi_q, phi_k, v, causal=False, decay=jnp.ones(2))
  with pytest.raises(ValueError, match="initial_state"):
    la.chunk_linear_attention(phi_q, phi_k, v, initial_state=la.init_state(2, 2, 4, 4))
  with pytest.raises(ValueError, match="state.kv"):
    la.recurrent_step(la.init_state(1, 2, 4, 3), phi_q[:, 0], phi_k[:, 0], v[:, 0])


@hypothesis.settings(max_examples=6, deadline=None)
@hypothesis.given(t=st.integers(1, 17), chunk=st.integers(1, 8), group=st.sampled_from([1, 2]),
                  use_decay=st.booleans(), normalize=st.booleans(), seed=st.integers(0, 2**16))
def test_chunk_property_matches_numpy(t, chunk, group, use_decay, normalize, seed):
  phi_q, phi_k, v = make_inputs(seed, 1, t, 2 * group, 2, 4, 3, feature=la.relu)
  decay = jnp.array([0.6, 0.9]) if use_decay else None
  out = la.chunk_linear_attention(phi_q, phi_k, v, chunk_size=chunk, decay=decay, normalize=normalize)
  assert_close(out, numpy_linear_attention(phi_q, phi_k, v, decay=decay, normalize=normalize))
