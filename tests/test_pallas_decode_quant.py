"""int8 / int4 KIVI-style decode kernel in interpret mode vs dequantise-then-attend."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcjax.attention import attention_reference, masks
from pallas_kernels.gpu import decode_quant as dq


def _inputs(seed, batch=3, q_len=1, q_heads=8, kv_heads=2, capacity=64, head_dim=32):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(kq, (batch, q_len, q_heads, head_dim))
  k = jax.random.normal(kk, (batch, capacity, kv_heads, head_dim))
  # A few large-magnitude key channels, the outliers per-channel quantisation is for.
  k = k * jnp.where(jnp.arange(head_dim) % 7 == 0, 8.0, 1.0)
  v = jax.random.normal(kv, (batch, capacity, kv_heads, head_dim))
  return q, k, v


def _reference(q, k, v, lengths):
  return attention_reference(q, k, v, mask=masks.causal(), q_offset=lengths - q.shape[1],
                             kv_valid_len=lengths, return_lse=True)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantizer_round_trip_error_is_within_half_a_step(bits):
  _, k, v = _inputs(1)
  kv = dq.quantize_kv(k, v, bits=bits, key_group=16, value_group=16, scale_dtype=jnp.float32)
  assert kv.bits == bits and kv.key_group == 16 and kv.value_group == 16
  kd, vd = dq.dequantize_kv(kv)
  k_step = jnp.repeat(kv.k_scale, 16, 1)
  v_step = jnp.repeat(jnp.transpose(kv.v_scale, (0, 3, 1, 2)), 16, -1)   # channel-major stored
  assert np.all(np.abs(np.asarray(kd - k)) <= np.asarray(k_step) * 0.5 + 1e-5)
  assert np.all(np.abs(np.asarray(vd - v)) <= np.asarray(v_step) * 0.5 + 1e-5)
  assert float(jnp.max(jnp.abs(kd - k))) > 0          # it really quantised
  assert kv.k_codes.dtype == jnp.int8
  codes = dq.unpack_int4(kv.k_codes) if bits == 4 else kv.k_codes
  half = 1 << (bits - 1)
  assert int(codes.min()) == -half and int(codes.max()) == half - 1   # full signed range used


@pytest.mark.parametrize("bits,q_len,value_group", [(8, 1, 16), (4, 1, 16), (4, 2, 16), (8, 3, 32),
                                                    (4, 1, 32)])   # int4, one group = the whole head
def test_quantized_decode_matches_dequantized_reference(bits, q_len, value_group):
  q, k, v = _inputs(bits + q_len, q_len=q_len)
  kv = dq.quantize_kv(k, v, bits=bits, key_group=32, value_group=value_group)
  lengths = jnp.array([1, 45, 64], jnp.int32)
  out, lse = dq.quantized_decode_attention(q, kv, lengths, block_k=16, num_splits=3, interpret=True,
                                           return_lse=True)
  kd, vd = dq.dequantize_kv(kv)
  ref, ref_lse = _reference(q, kd, vd, lengths)
  np.testing.assert_allclose(out, ref, atol=3e-5, rtol=3e-5)
  np.testing.assert_allclose(lse, ref_lse, atol=3e-5, rtol=3e-5)


@pytest.mark.parametrize("bits,int8_mma", [(8, False), (4, False), (8, True), (4, True)])
def test_quantized_decode_bf16_close_to_full_precision(bits, int8_mma):
  # 16-bit queries: codes as exact float16 (magic number), or int8 tensor-core dots.
  q, k, v = _inputs(9 + bits)
  lengths = jnp.array([64, 30, 7], jnp.int32)
  kv = dq.quantize_kv(k, v, bits=bits, key_group=32, value_group=16)
  out = dq.quantized_decode_attention(q.astype(jnp.bfloat16), kv, lengths, block_k=32, num_splits=2,
                                      int8_mma=int8_mma, interpret=True)
  kd, vd = dq.dequantize_kv(kv)
  ref, _ = _reference(q, kd, vd, lengths)
  err = np.linalg.norm(np.asarray(out, np.float32) - ref) / np.linalg.norm(ref)
  # int8_mma also quantises q * k_scale and p * v_scale to int8 per row: an approximation
  # beyond bf16 rounding (about 1.5% here, with 8x outlier key channels).
  assert out.dtype == jnp.bfloat16 and err < (3e-2 if int8_mma else 1e-2)
  full, _ = _reference(q, k, v, lengths)                 # and close to the unquantised cache
  assert np.linalg.norm(np.asarray(out, np.float32) - full) / np.linalg.norm(full) < (3e-2 if bits == 8 else 0.3)


@pytest.mark.parametrize("bits,value_group", [(8, 16), (4, 32)])
def test_int8_dots_follow_each_key_groups_scales(bits, value_group):
  # Key groups of very different magnitude: the query operand folded per group (inside the
  # kernel for int8 keys, outside for int4) must use its own group's scales and zeros.
  q, k, v = _inputs(21, capacity=128)
  k = k * jnp.repeat(jnp.array([1.0, 12.0, 0.2, 4.0]), 32)[None, :, None, None] + 3.0
  lengths = jnp.array([128, 70, 33], jnp.int32)
  kv = dq.quantize_kv(k, v, bits=bits, key_group=32, value_group=value_group)
  out = dq.quantized_decode_attention(q.astype(jnp.bfloat16), kv, lengths, block_k=32, num_splits=2,
                                      int8_mma=True, interpret=True)
  kd, vd = dq.dequantize_kv(kv)
  ref, _ = _reference(q, kd, vd, lengths)
  err = np.linalg.norm(np.asarray(out, np.float32) - ref) / np.linalg.norm(ref)
  assert err < 3e-2, err


def test_value_group_rules():
  assert dq.value_group_fits(128, 8, 32) and dq.value_group_fits(128, 4, 64)
  assert dq.value_group_fits(128, 4, 128)            # one scale per token, both nibble halves
  assert not dq.value_group_fits(96, 4, 32)          # would straddle the halves (48 channels each)
  _, k, v = _inputs(3, head_dim=96)
  with pytest.raises(ValueError, match="value group_size=32"):
    dq.quantize_values(v, bits=4, group_size=32)


def test_bad_groups_raise():
  q, k, v = _inputs(2)
  with pytest.raises(ValueError, match="bits"):
    dq.quantize_kv(k, v, bits=3)
  kv = dq.quantize_kv(k, v, bits=8, key_group=16, value_group=16)
  with pytest.raises(ValueError, match="block_k"):
    dq.quantized_decode_attention(q, kv, jnp.array([1, 2, 3], jnp.int32), block_k=32, interpret=True)
