"""Chunked linear attention kernels (forward, backward, decode step) in interpret mode vs references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.attention.linear_reference import (linear_attention_decode_step_reference,
                                              linear_attention_recurrent, linear_attention_reference)
from pallas_kernels.gpu import linear


def _inputs(seed, b=2, t=40, h=2, dk=16, dv=32, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(kq, (b, t, h, dk)).astype(dtype)
  k = jax.random.normal(kk, (b, t, h, dk)).astype(dtype)
  v = jax.random.normal(kv, (b, t, h, dv)).astype(dtype)
  return q, k, v


DECAYS = [None, jnp.array([-0.05, -0.3], jnp.float32)]


def test_references_agree():
  q, k, v = _inputs(0)
  for d in DECAYS:
    out, _ = linear_attention_recurrent(q, k, v, log_decay=d)
    np.testing.assert_allclose(out, linear_attention_reference(q, k, v, log_decay=d), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("decay", [0, 1])
@pytest.mark.parametrize("t", [40, 64])        # 40: padded to the chunk; 64: exact chunks
def test_forward_matches_reference(decay, t):
  q, k, v = _inputs(t + decay, t=t)
  d = DECAYS[decay]
  out = linear.linear_attention(q, k, v, d, chunk_size=16, block_v=16, interpret=True)
  ref = linear_attention_reference(q, k, v, log_decay=d)
  assert out.shape == v.shape and out.dtype == q.dtype
  np.testing.assert_allclose(out, ref, atol=5e-5 * float(jnp.abs(ref).max()), rtol=1e-4)


@pytest.mark.parametrize("decay", [0, 1])
def test_gradients_match_reference(decay):
  q, k, v = _inputs(7 + decay, t=48)
  d = DECAYS[decay]
  w = jax.random.normal(jax.random.key(99), v.shape)          # random cotangent
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * w)
  kern = lambda q, k, v: linear.linear_attention(q, k, v, d, chunk_size=16, block_v=16, interpret=True)
  ref = lambda q, k, v: linear_attention_reference(q, k, v, log_decay=d)
  got = jax.grad(loss(kern), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, atol=1e-4 * float(jnp.abs(r).max()), rtol=1e-4)


def test_bf16_forward():
  q, k, v = _inputs(3, t=64, dtype=jnp.bfloat16)
  out = linear.linear_attention(q, k, v, DECAYS[1], chunk_size=16, block_v=32, interpret=True)
  ref = linear_attention_reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                   log_decay=DECAYS[1])
  err = np.linalg.norm(np.asarray(out, np.float32) - ref) / np.linalg.norm(ref)
  assert out.dtype == jnp.bfloat16 and err < 2e-2


@pytest.mark.parametrize("decay", [0, 1])
def test_final_state_and_decode_step_continue_the_sequence(decay):
  q, k, v = _inputs(11 + decay, t=41)
  d = DECAYS[decay]
  # Prefill 40 tokens with the chunked kernel, then decode token 41 with the recurrent step.
  _, state = linear.linear_attention(q[:, :40], k[:, :40], v[:, :40], d, chunk_size=16, block_v=16,
                                     interpret=True, return_state=True)
  _, ref_state = linear_attention_recurrent(q[:, :40], k[:, :40], v[:, :40], log_decay=d)
  np.testing.assert_allclose(state, ref_state, atol=1e-4, rtol=1e-4)
  out, new_state = linear.linear_attention_decode_step(state, q[:, 40], k[:, 40], v[:, 40], d, block_v=16,
                                                       interpret=True)
  ref_out, ref_new = linear_attention_decode_step_reference(ref_state, q[:, 40], k[:, 40], v[:, 40], log_decay=d)
  np.testing.assert_allclose(out, ref_out, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(new_state, ref_new, atol=1e-4, rtol=1e-4)
  full = linear_attention_reference(q, k, v, log_decay=d)
  np.testing.assert_allclose(out, full[:, 40], atol=1e-4, rtol=1e-4)


def test_bad_arguments_raise():
  q, k, v = _inputs(1)
  with pytest.raises(ValueError, match="chunk_size"):
    linear.linear_attention(q, k, v, chunk_size=24, interpret=True)
  with pytest.raises(ValueError, match="log_decay"):
    linear.linear_attention(q, k, v, jnp.zeros(3), interpret=True)
