"""Split-KV decode kernels (dense and block-sparse) in interpret mode vs the XLA reference."""
import functools
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.attention import BlockLayout, attention_reference, masks
from pallas_kernels.gpu import decode


def _inputs(key, batch, q_len, q_heads, kv_heads, capacity, head_dim, dtype):
  kq, kk, kv = jax.random.split(key, 3)
  q = jax.random.normal(kq, (batch, q_len, q_heads, head_dim), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (batch, capacity, kv_heads, head_dim), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (batch, capacity, kv_heads, head_dim), jnp.float32).astype(dtype)
  return q, k, v


def _reference(q, k, v, lengths, layout=None):
  f32 = lambda x: x.astype(jnp.float32)
  return attention_reference(f32(q), f32(k), f32(v), mask=masks.causal(), layout=layout,
                             q_offset=lengths - q.shape[1], kv_valid_len=lengths, return_lse=True)


def _rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(x - ref) / np.linalg.norm(ref)


@pytest.mark.parametrize("schedule", decode.SCHEDULES)
@pytest.mark.parametrize("q_len,q_heads,kv_heads,splits", [(1, 8, 2, 3), (3, 4, 4, 2), (2, 6, 1, 5)])
def test_dense_decode_matches_reference_fp32(q_len, q_heads, kv_heads, splits, schedule):
  capacity = 96
  q, k, v = _inputs(jax.random.key(q_len * 7 + splits), 4, q_len, q_heads, kv_heads, capacity, 16,
                    jnp.float32)
  # Ragged: length 1 (fewer keys than queries when q_len > 1), partial blocks, full capacity.
  lengths = jnp.array([1, 37, 64, capacity], jnp.int32)
  out, lse = decode.decode_attention(q, k, v, lengths, block_k=16, num_splits=splits, schedule=schedule,
                                     interpret=True, return_lse=True)
  ref, ref_lse = _reference(q, k, v, lengths)
  assert out.shape == q.shape and out.dtype == q.dtype
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(lse, ref_lse, atol=2e-5, rtol=2e-5)


def test_dense_decode_bf16():
  q, k, v = _inputs(jax.random.key(3), 2, 1, 8, 2, 128, 32, jnp.bfloat16)
  lengths = jnp.array([128, 77], jnp.int32)
  out = decode.decode_attention(q, k, v, lengths, block_k=32, num_splits=2, interpret=True)
  ref, _ = _reference(q, k, v, lengths)
  assert out.dtype == jnp.bfloat16
  assert _rel_err(out, ref) < 1e-2


def test_zero_length_sequence_gives_zero_output():
  q, k, v = _inputs(jax.random.key(4), 2, 1, 4, 2, 32, 16, jnp.float32)
  out, lse = decode.decode_attention(q, k, v, jnp.array([0, 32], jnp.int32), block_k=16,
                                     num_splits=2, interpret=True, return_lse=True)
  assert np.all(np.asarray(out[0]) == 0) and np.all(np.isneginf(np.asarray(lse[0])))
  ref, _ = _reference(q, k, v, jnp.array([0, 32], jnp.int32))
  np.testing.assert_allclose(out[1], ref[1], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("schedule", decode.SCHEDULES)
@pytest.mark.parametrize("block_size,block_k,list_heads", [(16, 16, 2), (32, 16, 2), (32, 16, 8)])
def test_sparse_decode_matches_layout_reference(block_size, block_k, list_heads, schedule):
  """Block lists per KV head (list_heads 2) or per query head (8)."""
  batch, q_len, q_heads, kv_heads, capacity, head_dim = 3, 2, 8, 2, 128, 16
  q, k, v = _inputs(jax.random.key(block_size), batch, q_len, q_heads, kv_heads, capacity, head_dim,
                    jnp.float32)
  lengths = jnp.array([capacity, 50, 1], jnp.int32)
  n_blocks = capacity // block_size
  rng = np.random.default_rng(block_size + list_heads)
  visible = rng.random((batch, list_heads, 1, n_blocks)) < 0.5
  visible[:, :, 0, 0] = True          # every head sees at least one block
  layout = BlockLayout.from_block_mask(visible, block_q=q_len, block_kv=block_size, q_len=q_len,
                                       kv_len=capacity)
  out, lse = decode.decode_attention(
      q, k, v, lengths, layout.kv_indices[:, :, 0], layout.kv_counts[:, :, 0], block_size=block_size,
      block_k=block_k, num_splits=3, schedule=schedule, interpret=True, return_lse=True)
  ref, ref_lse = _reference(q, k, v, lengths, layout)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(lse, ref_lse, atol=2e-5, rtol=2e-5)


def test_balanced_schedule_reads_every_tile_once_in_equal_chunks():
  rng = np.random.default_rng(0)
  cases = [np.array([0, 0, 0]), np.array([1024, 1, 1, 1, 0, 3]), rng.integers(0, 50, 16), np.array([7])]
  for tiles in cases:
    for programs in (1, 5, 64):
      segment, lo, hi = map(np.asarray, decode.balanced_schedule(jnp.asarray(tiles, jnp.int32), programs))
      assert segment.shape == (programs + len(tiles),)
      chunk = max(1, -(-int(tiles.sum()) // programs))
      assert np.all(hi - lo <= chunk) and np.all(hi >= lo)
      for s, n in enumerate(tiles):                  # each segment's [0, n) exactly once, in order
        mine = (segment == s) & (hi > lo)
        covered = np.concatenate([np.arange(a, b) for a, b in zip(lo[mine], hi[mine])] or [np.zeros(0, int)])
        np.testing.assert_array_equal(covered, np.arange(n))
      # A long sequence in a ragged batch gets the programs: no chunk longer than the even share.
      assert (hi - lo).max(initial=0) == min(chunk, tiles.max(initial=0))


def test_bad_arguments_raise():
  q, k, v = _inputs(jax.random.key(5), 2, 1, 4, 2, 32, 16, jnp.float32)
  with pytest.raises(ValueError, match="schedule='even'; accepted"):
    decode.decode_attention(q, k, v, jnp.array([1, 2], jnp.int32), schedule="even", interpret=True)
  q, k, v = _inputs(jax.random.key(5), 2, 1, 3, 2, 32, 16, jnp.float32)
  with pytest.raises(ValueError, match="multiple of kv heads"):
    decode.decode_attention(q, k, v, jnp.array([1, 2], jnp.int32), interpret=True)
  q, k, v = _inputs(jax.random.key(5), 2, 1, 4, 2, 40, 16, jnp.float32)
  with pytest.raises(ValueError, match="capacity"):
    decode.decode_attention(q, k, v, jnp.array([1, 2], jnp.int32), interpret=True)


def test_lengths_past_capacity_read_only_the_cache():
  # Caller bugs must not read outside the cache: the kernel clamps to the capacity.
  q, k, v = _inputs(jax.random.key(6), 1, 1, 4, 2, 32, 16, jnp.float32)
  out = decode.decode_attention(q, k, v, jnp.array([40], jnp.int32), block_k=16, num_splits=2,
                                interpret=True)
  ref, _ = _reference(q, k, v, jnp.array([32], jnp.int32))
  # Query position 39 sees every key that exists: the same as a full cache of 32.
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


def test_decode_kernels_lower_for_h100():
  """Dense, block-sparse (lists per KV head and per query head; both schedules) and int8 / int4 decode on both dot
  paths lower to Triton custom calls for an H100 target without a GPU (the int4 inline PTX is only
  assembled on a GPU); tests/test_pallas_decode_gpu.py runs them on the device machine."""
  from jax import export
  from jax._src import mesh as mesh_lib
  from pallas_kernels.gpu import decode_quant
  S = jax.ShapeDtypeStruct
  b, hq, hkv, c, d = 2, 8, 2, 512, 128
  q, kv, lengths = S((b, 1, hq, d), jnp.bfloat16), S((b, c, hkv, d), jnp.bfloat16), S((b,), jnp.int32)
  calls = []
  for schedule in decode.SCHEDULES:
    calls.append((lambda q, k, v, l, s=schedule: decode.decode_attention(q, k, v, l, schedule=s), (q, kv, kv, lengths)))
    for heads in (hkv, hq):
      calls.append((lambda q, k, v, l, i, n, s=schedule: decode.decode_attention(q, k, v, l, i, n, block_size=128,
                                                                                  schedule=s),
                    (q, kv, kv, lengths, S((b, heads, 4), jnp.int32), S((b, heads), jnp.int32))))
  for bits, vg in ((8, 128), (4, 64), (4, 128)):
    cache = jax.eval_shape(lambda: decode_quant.quantize_kv(jnp.zeros(kv.shape), jnp.zeros(kv.shape),
                                                            bits=bits, key_group=128, value_group=vg))
    for int8_mma in (False, True):
      calls.append((lambda q, c, l, m=int8_mma: decode_quant.quantized_decode_attention(q, c, l, int8_mma=m),
                    (q, cache, lengths)))
  target = "__gpu$xla.gpu.triton"
  h100 = mesh_lib.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="gpu")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)):
    for fn, args in calls:
      exported = export.export(jax.jit(fn), platforms=["cuda"],
                               disabled_checks=[export.DisabledSafetyCheck.custom_call(target)])(*args)
      assert exported.mlir_module().count(f"custom_call @{target}") == 1


@pytest.mark.parametrize("bits,head_dim,value_group,q_len,block_k,key_group",
                         [(8, 128, 64, 1, 128, 128), (8, 128, 128, 2, 256, 128), (8, 64, 64, 1, None, 128),
                          (4, 128, 64, 1, None, 128), (4, 128, 128, 2, 128, 128), (4, 128, 64, 1, 256, 256)])
def test_mgpu_quantized_decode_lowers_for_h100(bits, head_dim, value_group, q_len, block_k, key_group):
  """The Mosaic GPU int8 / int4 decode kernel lowers (layouts, int4's register unpacking, the
  transposed P^T store, TMA slices, one or two key groups per tile) to one Mosaic GPU custom call
  for an H100 target without a GPU; Mosaic GPU's interpreter cannot run its wgmma, so tests/test_pallas_decode_gpu.py checks
  its numbers on the device machine."""
  from jax import export
  from jax._src import mesh as mesh_lib
  from pallas_kernels.gpu import decode_quant, decode_quant_mgpu
  S = jax.ShapeDtypeStruct
  b, hq, hkv, c = 2, 8, 2, 1024
  kv = S((b, c, hkv, head_dim), jnp.bfloat16)
  cache = jax.eval_shape(lambda: decode_quant.quantize_kv(jnp.zeros(kv.shape), jnp.zeros(kv.shape), bits=bits,
                                                          key_group=key_group, value_group=value_group))
  assert decode_quant_mgpu.config_reason((b, q_len, hq, head_dim), cache, block_k) is None
  target = "mosaic_gpu_v2"
  h100 = mesh_lib.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="gpu")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)):
    exported = export.export(jax.jit(functools.partial(decode_quant_mgpu.quantized_decode_attention, block_k=block_k)),
                             platforms=["cuda"],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call(target)])(
                                 S((b, q_len, hq, head_dim), jnp.bfloat16), cache, S((b,), jnp.int32))
  assert exported.mlir_module().count(f"custom_call @{target}") == 1


def test_mgpu_quantized_decode_config_reason_names_what_it_refuses():
  from pallas_kernels.gpu import decode_quant, decode_quant_mgpu
  shape = lambda bits, vg, d=128: jax.eval_shape(lambda: decode_quant.quantize_kv(
      jnp.zeros((1, 256, 2, d)), jnp.zeros((1, 256, 2, d)), bits=bits, key_group=128, value_group=vg))
  assert decode_quant_mgpu.config_reason((1, 1, 8, 128), shape(4, 64)) is None
  assert "int4" in decode_quant_mgpu.config_reason((1, 1, 8, 64), shape(4, 32, d=64))
  assert "block_k 64" in decode_quant_mgpu.config_reason((1, 1, 8, 128), shape(8, 64), block_k=64)
  assert decode_quant_mgpu.config_reason((1, 1, 8, 128), shape(8, 64), block_k=256) is None
  odd = jax.eval_shape(lambda: decode_quant.quantize_kv(jnp.zeros((1, 384, 2, 128)), jnp.zeros((1, 384, 2, 128)),
                                                        bits=4, key_group=128, value_group=64))
  assert "capacity 384" in decode_quant_mgpu.config_reason((1, 1, 8, 128), odd)        # int4's 256 tiles
  assert decode_quant_mgpu.config_reason((1, 1, 8, 128), odd, block_k=128) is None
  assert "value_group 32" in decode_quant_mgpu.config_reason((1, 1, 8, 128), shape(8, 32))
  assert "query rows" in decode_quant_mgpu.config_reason((1, 3, 8, 128), shape(8, 64))
  with pytest.raises(ValueError, match="does not take this call"):
    decode_quant_mgpu.quantized_decode_attention(jnp.zeros((1, 3, 8, 128), jnp.bfloat16),
                                                 decode_quant.quantize_kv(jnp.zeros((1, 256, 2, 128)), jnp.zeros((1, 256, 2, 128)),
                                                                          bits=8, key_group=128, value_group=64),
                                                 jnp.array([256], jnp.int32))
