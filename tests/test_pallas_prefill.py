"""Prefill/training Pallas kernels (issue 4) in interpret mode against attention_reference.

Outputs, log-sum-exp and gradients on random inputs; fp32 to a tight tolerance, bf16/fp16 by
relative norm error. Shapes are tiny (16-wide blocks) so that the interpreter stays fast.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.attention import BlockLayout, attend, attention_reference, masks
from lcjax.attention import pallas_backend
from lcjax.attention.pallas_backend import attend_pallas


def _qkv(seed, batch, q_len, kv_len, q_heads, kv_heads, head_dim, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(kq, (batch, q_len, q_heads, head_dim), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (batch, kv_len, kv_heads, head_dim), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (batch, kv_len, kv_heads, head_dim), jnp.float32).astype(dtype)
  return q, k, v


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def _loss(fn, head_dim):
  """A scalar that depends on every output element and on the lse (so d_lse is exercised)."""
  weights = jnp.cos(jnp.arange(head_dim, dtype=jnp.float32))

  def loss(q, k, v):
    out, lse = fn(q, k, v)
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return (out.astype(jnp.float32) * weights).sum() + 0.3 * lse.sum()
  return loss


def _check(q, k, v, out_tol, grad_tol, **kwargs):
  kernel = lambda q, k, v: attend_pallas(q, k, v, return_lse=True, interpret=True, **kwargs)
  ref = lambda q, k, v: attention_reference(q.astype(jnp.float32), k.astype(jnp.float32),
                                            v.astype(jnp.float32), return_lse=True, **kwargs)
  out, lse = kernel(q, k, v)
  ref_out, ref_lse = ref(q, k, v)
  assert out.dtype == q.dtype and out.shape == q.shape
  assert not np.isnan(np.asarray(out, np.float32)).any()
  assert _rel(out, ref_out) < out_tol
  finite = np.isfinite(np.asarray(ref_lse))
  np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
  np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(ref_lse)[finite], atol=out_tol)
  if grad_tol is not None:
    grads = jax.grad(_loss(kernel, q.shape[-1]), argnums=(0, 1, 2))(q, k, v)
    ref_grads = jax.grad(_loss(ref, q.shape[-1]), argnums=(0, 1, 2))(q, k, v)
    for name, g, rg in zip("qkv", grads, ref_grads):
      assert g.dtype == q.dtype, name
      assert _rel(g, rg) < grad_tol, (name, _rel(g, rg))


def test_causal_gqa_ragged_fp32():
  # 40 = 2.5 blocks of 16: padded queries and a partial last key block; 4 q heads over 2 kv heads.
  q, k, v = _qkv(0, 2, 40, 40, 4, 2, 64)
  _check(q, k, v, 1e-5, 1e-5, mask=masks.causal())


def test_window_with_sinks_offset_mqa_fp32():
  # A chunk of 24 queries at absolute position 16 against 40 keys; one kv head (MQA).
  q, k, v = _qkv(1, 1, 24, 40, 2, 1, 64)
  mask = masks.sinks(3) | (masks.sliding_window(9) & masks.causal())
  _check(q, k, v, 1e-5, 1e-5, mask=mask, q_offset=16, scale=0.2)


def test_block_sparse_layout_per_batch_and_head_fp32():
  # A random layout per (batch, layout head), partial blocks masked causally inside, some query
  # blocks with no key block at all (their rows are zero, lse -inf, gradients finite).
  q, k, v = _qkv(2, 2, 64, 64, 4, 2, 64)
  rng = np.random.default_rng(0)
  visible = rng.random((2, 2, 4, 4)) < 0.5
  visible[0, 1, 2] = False
  full = visible & (rng.random(visible.shape) < 0.5)
  layout = BlockLayout.from_block_mask(visible, full, block_q=16, block_kv=16, q_len=64, kv_len=64)
  _check(q, k, v, 1e-5, 1e-5, layout=layout, mask=masks.causal())


def test_full_attention_bf16_padded_head_dim():
  # head_dim 32 is padded to 64 by the wrapper; no mask: every block is fully visible.
  q, k, v = _qkv(3, 1, 32, 48, 2, 2, 32, jnp.bfloat16)
  _check(q, k, v, 1e-2, 2e-2)


def test_fp16_head_dim_256_forward():
  q, k, v = _qkv(4, 1, 32, 32, 2, 1, 256, jnp.float16)
  _check(q, k, v, 5e-3, None, mask=masks.causal())


def test_attend_dispatch_and_unsupported_reasons(monkeypatch):
  q, k, v = _qkv(5, 1, 16, 16, 2, 2, 64)
  assert "GPU backend" in pallas_backend.unsupported_reason(q, k, v)
  monkeypatch.setenv(pallas_backend.INTERPRET_ENV, "1")
  assert pallas_backend.unsupported_reason(q, k, v, score_mod=lambda s, *a: s) is not None
  assert "q_offset" in pallas_backend.unsupported_reason(q, k, v, q_offset=jnp.zeros((1,), jnp.int32))
  out = attend(q, k, v, mask=masks.causal(), implementation="pallas")
  np.testing.assert_allclose(out, attention_reference(q, k, v, mask=masks.causal()), atol=1e-5)
  with pytest.raises(ValueError, match="score_mod"):
    attend(q, k, v, score_mod=lambda s, *a: s, implementation="pallas")
  with pytest.raises(ValueError, match="kernel="):
    attend_pallas(q, k, v, kernel="cuda")
  with pytest.raises(ValueError, match="float32"):
    attend_pallas(q, k, v, kernel="mosaic", block_q=128, block_kv=128)


@pytest.mark.parametrize("kernel", ["triton", "mosaic"])
def test_kernels_lower_for_h100(kernel, monkeypatch):
  """Forward and backward lower to the GPU custom calls for an H100 target, without a GPU.

  Mosaic GPU's CPU interpreter cannot run the wgmma kernels, so this lowering (Pallas -> Mosaic
  GPU / Triton IR, layout inference included) is what CI checks of them; tests/
  test_pallas_prefill_gpu.py runs them on the device machine.
  """
  from jax import export
  from jax._src import mesh as mesh_lib
  monkeypatch.setenv(pallas_backend.INTERPRET_ENV, "1")
  q = jax.ShapeDtypeStruct((1, 300, 4, 64), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, 300, 2, 64), jnp.bfloat16)
  mask = (masks.sinks(4) | masks.sliding_window(100)) & masks.prefix_lm(8)
  assert pallas_backend._mosaic_mask_ok(mask)    # the mask auto-dispatch sends to Mosaic GPU

  def grads(q, k, v):
    loss = lambda q, k, v: attend_pallas(q, k, v, mask=mask, kernel=kernel,
                                         interpret=False).astype(jnp.float32).sum()
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  target = "__gpu$xla.gpu.triton" if kernel == "triton" else "mosaic_gpu_v2"
  h100 = mesh_lib.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="gpu")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)):
    exported = export.export(jax.jit(grads), platforms=["cuda"],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call(target)])(q, k, k)
  # Forward, dQ and dK/dV kernels.
  assert exported.mlir_module().count(f"custom_call @{target}") == 3


def test_full_blocks_first_keeps_each_list_and_puts_full_blocks_first():
  from pallas_kernels.gpu.block_sparse_attention import full_blocks_first
  rng = np.random.default_rng(3)
  visible = rng.random((2, 3, 5, 7)) < 0.6
  full = visible & (rng.random(visible.shape) < 0.5)
  layout = BlockLayout.from_block_mask(visible, full, block_q=16, block_kv=16, q_len=80, kv_len=112)
  indices, counts, n_full = full_blocks_first(
      jnp.asarray(layout.kv_indices), jnp.asarray(layout.kv_counts)[..., None],
      jnp.asarray(layout.kv_full).astype(jnp.int32))
  indices, counts, n_full = map(np.asarray, (indices, counts[..., 0], n_full[..., 0]))
  for row in np.ndindex(counts.shape):
    got = indices[row][:counts[row]]
    assert sorted(got) == list(np.flatnonzero(visible[row]))
    assert set(got[:n_full[row]]) == set(np.flatnonzero(full[row]))
