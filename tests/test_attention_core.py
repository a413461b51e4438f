"""Core contracts: BlockLayout construction and the reference attention against float64 NumPy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.attention import BlockLayout, attend, masks


def numpy_attention(q, k, v, allowed, scale):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  group = q.shape[2] // k.shape[2]
  k = np.repeat(k, group, axis=2)
  v = np.repeat(v, group, axis=2)
  s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
  s = np.where(allowed, s, -np.inf)
  m = s.max(-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0)
  p = np.exp(s - m)
  l = p.sum(-1, keepdims=True)
  p = p / np.where(l == 0, 1, l)
  return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_causal_gqa_matches_numpy(q_heads, kv_heads):
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(kq, (2, 13, q_heads, 16))
  k = jax.random.normal(kk, (2, 13, kv_heads, 16))
  v = jax.random.normal(kv, (2, 13, kv_heads, 16))
  out = attend(q, k, v, mask=masks.causal(), implementation="xla")
  allowed = np.tril(np.ones((13, 13), bool))[None, None]
  np.testing.assert_allclose(out, numpy_attention(q, k, v, allowed, 16 ** -0.5), atol=1e-5)


def test_empty_rows_are_zero_not_nan():
  q = jax.random.normal(jax.random.key(1), (1, 4, 2, 8))
  k = jax.random.normal(jax.random.key(2), (1, 4, 2, 8))
  out, lse = attend(q, k, k, mask=masks.causal(), q_offset=-2, return_lse=True, implementation="xla")
  assert not np.isnan(np.asarray(out)).any()
  np.testing.assert_array_equal(out[:, :2], 0)
  assert np.isneginf(np.asarray(lse[:, :, :2])).all()


def test_layout_from_block_mask_host_and_jit_agree():
  rng = np.random.default_rng(0)
  visible = rng.random((2, 3, 4, 5)) < 0.5
  full = visible & (rng.random(visible.shape) < 0.5)
  host = BlockLayout.from_block_mask(visible, full, block_q=4, block_kv=4, q_len=16, kv_len=20)
  traced = jax.jit(lambda a, b: BlockLayout.from_block_mask(a, b, block_q=4, block_kv=4, q_len=16, kv_len=20))(
      jnp.asarray(visible), jnp.asarray(full))
  for layout in (host, traced):
    vis, ful = layout.block_mask()
    np.testing.assert_array_equal(vis, visible)
    np.testing.assert_array_equal(ful, full)
  # The transposed lists hold the same pairs.
  np.testing.assert_array_equal(host.q_counts, visible.sum(2))


def test_bad_heads_named_in_error():
  q = jnp.ones((1, 4, 3, 8))
  k = jnp.ones((1, 4, 2, 8))
  with pytest.raises(ValueError, match="multiple of kv heads"):
    attend(q, k, k)


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_q=0), "block_q=0"), (dict(block_kv=2.0), "block_kv=2.0"), (dict(q_len=jnp.int32(8)), "q_len"),
    (dict(full=np.ones((1, 1, 2, 3), bool)), "full has shape"), (dict(kv_len=9), "block grid"),
])
def test_from_block_mask_bad_arguments_are_named(kwargs, match):
  args = dict(visible=np.ones((1, 1, 2, 2), bool), full=None, block_q=4, block_kv=4, q_len=8, kv_len=8) | kwargs
  with pytest.raises(ValueError, match=match):
    BlockLayout.from_block_mask(args.pop("visible"), args.pop("full"), **args)
