"""The prefill/training kernels at real sizes on a GPU (skipped elsewhere): every kernel path
against the float32 XLA reference, outputs and gradients, on random bf16/fp16 inputs.

Run on the device machine (conftest.py defaults JAX_PLATFORMS to cpu):
  JAX_PLATFORMS=cuda PYTHONPATH=. python3 -m pytest -q tests/test_pallas_prefill_gpu.py
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.attention import BlockLayout, attention_reference, masks
from lcjax.attention.pallas_backend import attend_pallas

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
KERNELS = ["triton", "mosaic"]


def _rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _inputs(seed, q_len, kv_len, q_heads, kv_heads, head_dim, dtype):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (2, q_len, q_heads, head_dim), dtype)
  k = jax.random.normal(keys[1], (2, kv_len, kv_heads, head_dim), dtype)
  v = jax.random.normal(keys[2], (2, kv_len, kv_heads, head_dim), dtype)
  do = jax.random.normal(keys[3], (2, q_len, q_heads, head_dim), dtype)
  return q, k, v, do


def _vjp(fn, q, k, v, do):
  out, pull = jax.vjp(fn, q, k, v)
  return (out, *pull(do))


CASES = {
    "causal_gqa": dict(q_len=2048, kv_len=2048, q_heads=8, kv_heads=2, head_dim=128,
                       mask=masks.causal()),
    "window_ragged_d64": dict(q_len=1000, kv_len=1000, q_heads=4, kv_heads=4, head_dim=64,
                              mask=masks.sliding_window(300) & masks.causal()),
    "full_chunk_offset": dict(q_len=512, kv_len=1536, q_heads=4, kv_heads=1, head_dim=128,
                              mask=masks.causal(), q_offset=1024),
}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_dense_masked_fwd_bwd(case, dtype, kernel):
  cfg = dict(CASES[case])
  mask, q_offset = cfg.pop("mask"), cfg.pop("q_offset", 0)
  q, k, v, do = _inputs(0, **cfg, dtype=dtype)
  got = _vjp(lambda q, k, v: attend_pallas(q, k, v, mask=mask, q_offset=q_offset, kernel=kernel),
             q, k, v, do)
  f32 = lambda x: x.astype(jnp.float32)
  want = _vjp(lambda q, k, v: attention_reference(q, k, v, mask=mask, q_offset=q_offset),
              f32(q), f32(k), f32(v), f32(do))
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    assert a.dtype == dtype
    assert _rel(a, b) < 1e-2, (name, _rel(a, b))


@pytest.mark.parametrize("kernel", KERNELS)
def test_block_sparse_fwd_bwd_with_lse(kernel):
  q, k, v, do = _inputs(1, 2048, 2048, 4, 2, 128, jnp.bfloat16)
  rng = np.random.default_rng(0)
  visible = rng.random((2, 2, 16, 16)) < 0.3
  visible[:, :, 3] = False                      # a query block that sees nothing
  full = visible & (rng.random(visible.shape) < 0.5)
  layout = BlockLayout.from_block_mask(visible, full, block_q=128, block_kv=128, q_len=2048,
                                       kv_len=2048)
  mask = masks.causal()
  f32 = lambda x: x.astype(jnp.float32)

  def loss(fn):
    def f(q, k, v):
      out, lse = fn(q, k, v)
      lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
      return (f32(out) * f32(do)).sum() + lse.sum()
    return f
  kern = lambda q, k, v: attend_pallas(q, k, v, layout=layout, mask=mask, return_lse=True,
                                       kernel=kernel)
  ref = lambda q, k, v: attention_reference(q, k, v, layout=layout, mask=mask, return_lse=True)
  out, lse = kern(q, k, v)
  ref_out, ref_lse = ref(f32(q), f32(k), f32(v))
  assert _rel(out, ref_out) < 1e-2
  np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref_lse))
  fin = np.isfinite(np.asarray(ref_lse))
  np.testing.assert_allclose(np.asarray(lse)[fin], np.asarray(ref_lse)[fin], atol=2e-2)
  grads = jax.grad(loss(kern), argnums=(0, 1, 2))(q, k, v)
  ref_grads = jax.grad(loss(ref), argnums=(0, 1, 2))(f32(q), f32(k), f32(v))
  for name, a, b in zip("qkv", grads, ref_grads):
    assert _rel(a, b) < 1e-2, (name, _rel(a, b))
