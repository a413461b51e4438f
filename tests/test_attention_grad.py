"""Gradients of attend() (XLA reference) against a float64 NumPy backward pass and finite differences."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.attention import BlockLayout, attend, masks, score_mods


def numpy_grads(q, k, v, d_out, allowed, scale, cap=None):
  """float64 (dq, dk, dv) of sum(out * d_out) by the textbook softmax-attention backward pass."""
  q, k, v, d_out = (np.asarray(x, np.float64) for x in (q, k, v, d_out))
  group = q.shape[2] // k.shape[2]
  kr, vr = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  raw = np.einsum("bqhd,bkhd->bhqk", q, kr) * scale
  s = raw if cap is None else cap * np.tanh(raw / cap)
  s = np.where(allowed, s, -np.inf)
  m = s.max(-1, keepdims=True)
  p = np.exp(s - np.where(np.isfinite(m), m, 0))
  l = p.sum(-1, keepdims=True)
  p = p / np.where(l == 0, 1, l)
  dv = np.einsum("bhqk,bqhd->bkhd", p, d_out)
  dp = np.einsum("bqhd,bkhd->bhqk", d_out, vr)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True))
  if cap is not None:
    ds = ds * (1 - np.tanh(raw / cap) ** 2)
  dq = np.einsum("bhqk,bkhd->bqhd", ds, kr) * scale
  dk = np.einsum("bhqk,bqhd->bkhd", ds, q) * scale
  fold = lambda x: x.reshape(x.shape[0], x.shape[1], k.shape[2], group, x.shape[-1]).sum(3)
  return dq, fold(dk), fold(dv)


def _inputs(seed, q_len, kv_len, q_heads, kv_heads, dim=8):
  keys = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(keys[0], (2, q_len, q_heads, dim)), jax.random.normal(keys[1], (2, kv_len, kv_heads, dim)),
          jax.random.normal(keys[2], (2, kv_len, kv_heads, dim)), jax.random.normal(keys[3], (2, q_len, q_heads, dim)))


@pytest.mark.parametrize("heads,cap", [((4, 2), None), ((3, 1), 2.0), ((2, 2), None)])
def test_grads_match_numpy_backward(heads, cap):
  q, k, v, d_out = _inputs(sum(heads), 9, 14, *heads)
  offset = 2                       # with causal: query 0 sees keys 0..2, and rows past the window are empty
  mask = masks.causal() & masks.sliding_window(6) & ~masks.sinks(1)
  mod = None if cap is None else score_mods.soft_cap(cap)
  loss = lambda q, k, v: jnp.sum(attend(q, k, v, mask=mask, score_mod=mod, q_offset=offset,
                                        implementation="xla") * d_out)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  qpos, kpos = np.arange(9)[:, None] + offset, np.arange(14)[None, :]
  allowed = (kpos <= qpos) & (kpos >= qpos - 6) & (kpos >= 1)
  want = numpy_grads(q, k, v, d_out, allowed, 8 ** -0.5, cap)
  for got, expected in zip(grads, want):
    np.testing.assert_allclose(got, expected, atol=2e-5)


def test_empty_rows_have_zero_finite_grads():
  q, k, v, d_out = _inputs(7, 6, 6, 2, 2)
  loss = lambda q, k, v: jnp.sum(attend(q, k, v, mask=masks.causal(), q_offset=-3, implementation="xla") * d_out)
  dq, dk, dv = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  for g in (dq, dk, dv):
    assert np.isfinite(np.asarray(g)).all()
  np.testing.assert_array_equal(dq[:, :3], 0)          # queries at -3..-1 see no key


def test_grads_through_layout_match_finite_differences_in_float64():
  with jax.enable_x64(True):
    q, k, v, d_out = (x.astype(jnp.float64) for x in _inputs(11, 7, 10, 2, 1, dim=4))
    visible = np.random.default_rng(0).random((1, 1, 3, 4)) < 0.7
    visible[..., 0] = True
    layout = BlockLayout.from_block_mask(visible, block_q=3, block_kv=3, q_len=7, kv_len=10)
    loss = jax.jit(lambda q, k, v: jnp.sum(attend(q, k, v, layout=layout, score_mod=score_mods.alibi(2),
                                                  implementation="xla") * d_out))
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    eps = 1e-6
    rng = np.random.default_rng(1)
    for arg, g in enumerate(grads):
      for _ in range(4):                                # a few random coordinates per argument
        idx = tuple(rng.integers(0, n) for n in g.shape)
        args = [q, k, v]
        plus, minus = list(args), list(args)
        plus[arg] = args[arg].at[idx].add(eps)
        minus[arg] = args[arg].at[idx].add(-eps)
        numeric = (loss(*plus) - loss(*minus)) / (2 * eps)
        np.testing.assert_allclose(g[idx], numeric, rtol=1e-6, atol=1e-8)
