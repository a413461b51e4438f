"""Split-KV decode over an int8 / int4 KV cache, dequantised inside the kernel (KIVI-style).

KIVI (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache")
quantises keys per channel (outliers live in a few channels) and values per token. Here:

  keys:   codes [B, C, Hkv, D * bits / 8] int8; scale, zero [B, C / key_group, Hkv, D]
          (one (scale, zero) per channel per group of key_group consecutive tokens)
  values: codes [B, C, Hkv, D * bits / 8] int8; scale, zero [B, C, Hkv, D / value_group]
          (one (scale, zero) per token per group of value_group consecutive channels)
  x ~= code * scale + zero   (asymmetric min/max; zero is the group's mid-range, the value of code 0)

int4 codes are packed two per byte, split-half: byte j of a row holds channel j in its low
nibble and channel j + D/2 in its high nibble, so the kernel unpacks with a mask and a shift
and never interleaves. The decode kernel reads codes and scales once, dequantises in registers
and runs the same split-KV online softmax as pallas_kernels.gpu.decode.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gpu.decode import (default_num_splits, finish, merge_splits, online_softmax_step,
                                       pack_queries, pick_block_k, query_positions, split_range,
                                       unpack_rows, validate_decode_args)


class QuantizedKV(NamedTuple):
  """A quantised KV cache's arrays (a pytree). bits and group sizes follow from the shapes."""
  k_codes: jax.Array
  k_scale: jax.Array
  k_zero: jax.Array
  v_codes: jax.Array
  v_scale: jax.Array
  v_zero: jax.Array

  @property
  def head_dim(self) -> int:
    return self.k_scale.shape[-1]

  @property
  def bits(self) -> int:
    return 8 if self.k_codes.shape[-1] == self.head_dim else 4

  @property
  def key_group(self) -> int:
    return self.k_codes.shape[1] // self.k_scale.shape[1]

  @property
  def value_group(self) -> int:
    return self.head_dim // self.v_scale.shape[-1]


def _check_bits(bits):
  if bits not in (4, 8):
    raise ValueError(f"bits must be 4 or 8; got {bits}")


def _quantize_groups(x, axis: int, bits: int, scale_dtype):
  """Asymmetric min/max quantisation of x over `axis`: signed codes in [-2^(b-1), 2^(b-1) - 1]
  (int8), and scale, zero with x ~= code * scale + zero (zero is the group's mid-range)."""
  qmax, half = (1 << bits) - 1, 1 << (bits - 1)
  x = x.astype(jnp.float32)
  lo, hi = x.min(axis, keepdims=True), x.max(axis, keepdims=True)
  scale = ((hi - lo) / qmax).astype(scale_dtype)
  zero = (lo + half * (hi - lo) / qmax).astype(scale_dtype)
  s, z = scale.astype(jnp.float32), zero.astype(jnp.float32)
  codes = jnp.clip(jnp.round((x - z) / jnp.where(s > 0, s, 1.0)), -half, half - 1).astype(jnp.int8)
  return codes, scale, zero


def pack_int4(codes):
  """int8 codes in [-8, 7], [..., D] -> int8 [..., D/2]: low nibble channel j, high nibble j + D/2."""
  half = codes.shape[-1] // 2
  u = lambda c: lax.bitcast_convert_type(c, jnp.uint8)
  return lax.bitcast_convert_type((u(codes[..., :half]) & 15) | (u(codes[..., half:]) << 4), jnp.int8)


def _signed_nibble(packed, part: int):
  """int8 packed nibbles -> the signed 4-bit values of one half (arithmetic shifts sign-extend)."""
  return (packed << 4) >> 4 if part == 0 else packed >> 4


def unpack_int4(packed):
  return jnp.concatenate([_signed_nibble(packed, 0), _signed_nibble(packed, 1)], axis=-1)


def quantize_keys(k, *, bits: int, group_size: int, scale_dtype=jnp.float16):
  """k [B, C, H, D] -> (codes, scale, zero), per channel over groups of group_size tokens."""
  _check_bits(bits)
  b, c, h, d = k.shape
  if c % group_size:
    raise ValueError(f"key group_size={group_size} must divide the length {c}")
  codes, scale, zero = _quantize_groups(k.reshape(b, c // group_size, group_size, h, d), 2, bits,
                                        scale_dtype)
  codes = codes.reshape(b, c, h, d)
  return (pack_int4(codes) if bits == 4 else codes), scale[:, :, 0], zero[:, :, 0]


def quantize_values(v, *, bits: int, group_size: int, scale_dtype=jnp.float16):
  """v [B, C, H, D] -> (codes, scale, zero), per token over groups of group_size channels."""
  _check_bits(bits)
  b, c, h, d = v.shape
  if d % group_size or (bits == 4 and (d // 2) % group_size):
    raise ValueError(f"value group_size={group_size} must divide head_dim {d} (and D/2 for int4)")
  codes, scale, zero = _quantize_groups(v.reshape(b, c, h, d // group_size, group_size), 4, bits,
                                        scale_dtype)
  codes = codes.reshape(b, c, h, d)
  return (pack_int4(codes) if bits == 4 else codes), scale[..., 0], zero[..., 0]


def quantize_kv(k, v, *, bits: int, key_group: int = 128, value_group: int = 64,
                scale_dtype=jnp.float16) -> QuantizedKV:
  """Quantises a whole cache, KIVI-style (keys per channel, values per token)."""
  return QuantizedKV(*quantize_keys(k, bits=bits, group_size=key_group, scale_dtype=scale_dtype),
                     *quantize_values(v, bits=bits, group_size=value_group, scale_dtype=scale_dtype))


def dequantize_kv(kv: QuantizedKV, dtype=jnp.float32):
  """The reference: (k, v) [B, C, H, D] as the kernel sees them."""
  unpack = (lambda c: c) if kv.bits == 8 else unpack_int4
  f32 = lambda x: x.astype(jnp.float32)
  k = f32(unpack(kv.k_codes)) * jnp.repeat(f32(kv.k_scale), kv.key_group, 1) + jnp.repeat(
      f32(kv.k_zero), kv.key_group, 1)
  v = f32(unpack(kv.v_codes)) * jnp.repeat(f32(kv.v_scale), kv.value_group, -1) + jnp.repeat(
      f32(kv.v_zero), kv.value_group, -1)
  return k.astype(dtype), v.astype(dtype)


# fp16 with exponent bits 0x6400 is 1024.0; OR-ing an integer u < 1024 into its mantissa gives
# exactly 1024 + u. This turns codes into fp16 with integer ops only (the int->float conversion
# unit is slow); the constant is folded into a per-row correction.
_MAGIC_BITS = 0x6400
_MAGIC = 1024.0


def _unsigned_codes(raw, bits: int, part: int):
  """int8 raw bytes -> uint8 code + 2^(b-1) in [0, 2^b) of one nibble half (or the byte)."""
  u = lax.bitcast_convert_type(raw, jnp.uint8)
  if bits == 8:
    return u ^ 0x80
  return ((u & 15) if part == 0 else (u >> 4)) ^ 8


def _signed_codes(raw, bits: int, part: int):
  return raw if bits == 8 else _signed_nibble(raw, part)


def _quantize_rows(x):
  """float32 [rows, n] -> (int8 codes, float32 [rows] scale): symmetric, per row."""
  amax = jnp.max(jnp.abs(x), axis=1)
  sc = jnp.where(amax > 0, amax / 127.0, 1.0)
  return jnp.floor(x / sc[:, None] + 0.5).astype(jnp.int8), sc


def _unpack_scale_zero(w):
  """uint32 words holding (float16 scale | float16 zero << 16) -> float32 (scale, zero)."""
  as_f32 = lambda h: lax.bitcast_convert_type(h.astype(jnp.uint16), jnp.float16).astype(jnp.float32)
  return as_f32(w & 0xFFFF), as_f32(w >> 16)


def pack_scale_zero(scale, zero):
  """float16 scale, zero (same shape) -> uint32 words; one 4-byte load per token in the kernel
  (2-byte strided loads are not pipelined by the compiler)."""
  bits = lambda x: lax.bitcast_convert_type(x.astype(jnp.float16), jnp.uint16).astype(jnp.uint32)
  return bits(scale) | (bits(zero) << 16)


def _quant_decode_kernel(len_ref, q_ref, kc_ref, ks_ref, kz_ref, vc_ref, vsz_ref, o_ref, lse_ref,
                         *, scale, block_k, num_splits, group, q_len, bits, key_group, value_group,
                         int8_mma):
  b, split = pl.program_id(0), pl.program_id(2)
  rows, head_dim = q_ref.shape
  exact = q_ref.dtype == jnp.float32      # float32 queries: exact float32 maths throughout
  parts = 8 // bits                       # nibbles per byte
  width = head_dim // parts               # channels per part = bytes per row
  half = 1 << (bits - 1)
  length = len_ref[b]
  qpos = query_positions(length, rows, group, q_len)
  q_parts = [q_ref[:, pl.ds(p * width, width)].astype(jnp.float32) for p in range(parts)]
  num_tiles = kc_ref.shape[0] // block_k
  lo, hi = split_range(jnp.minimum((length + block_k - 1) // block_k, num_tiles), num_splits, split)
  f32 = lambda x: x.astype(jnp.float32)

  def body(i, carry):
    start = pl.multiple_of(i * block_k, block_k)
    g = start // key_group
    raw_k = kc_ref[pl.ds(start, block_k), :]                        # [bk, width] int8
    # k = c * ks + kz per channel: q.k = (q * ks) . c + q . kz, so the tile is never rescaled.
    qk = [q_parts[p] * f32(ks_ref[g, pl.ds(p * width, width)])[None, :] for p in range(parts)]
    bias = sum(jnp.sum(q_parts[p] * f32(kz_ref[g, pl.ds(p * width, width)])[None, :], axis=1)
               for p in range(parts))
    if exact:
      s = sum(plgpu.dot(qk[p], f32(_signed_codes(raw_k, bits, p)), trans_b=True) for p in range(parts))
    elif int8_mma:
      # int8 tensor cores: q * ks quantised per row (as SageAttention does for Q K^T), the signed
      # codes taken as they are stored.
      amax = jnp.max(jnp.abs(qk[0]), axis=1)
      for x in qk[1:]:
        amax = jnp.maximum(amax, jnp.max(jnp.abs(x), axis=1))
      sq = jnp.where(amax > 0, amax / 127.0, 1.0)
      s = None
      for p in range(parts):
        qi = jnp.floor(qk[p] / sq[:, None] + 0.5).astype(jnp.int8)
        sp = plgpu.dot(qi, _signed_codes(raw_k, bits, p), trans_b=True)
        s = sp if s is None else s + sp
      s = f32(s) * sq[:, None]
    else:
      s = None
      for p in range(parts):
        qh = qk[p].astype(jnp.float16)
        codes = lax.bitcast_convert_type(_unsigned_codes(raw_k, bits, p).astype(jnp.uint16) | _MAGIC_BITS,
                                         jnp.float16)                # exactly 1024 + half + c
        sp = plgpu.dot(qh, codes, trans_b=True) - (_MAGIC + half) * jnp.sum(f32(qh), axis=1)[:, None]
        s = sp if s is None else s + sp
    s = (s + bias[:, None]) * scale
    kpos = start + lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
    mask = kpos <= qpos[:, None]

    def v_dot(pr):
      # v = c * vs + vz per token (per channel group): p @ v = (p * vs) @ c + p . vz.
      outs = [None] * (head_dim // value_group)
      for gi in range(width // value_group):                      # byte groups
        raw_v = vc_ref[pl.ds(start, block_k), pl.ds(gi * value_group, value_group)]
        for p in range(parts):
          col = p * (width // value_group) + gi                     # channel group index
          vs, vz = _unpack_scale_zero(vsz_ref[pl.ds(start, block_k), col])
          ps = pr * vs[None, :]
          corr = jnp.sum(pr * vz[None, :], axis=1)
          if exact:
            o = plgpu.dot(ps, f32(_signed_codes(raw_v, bits, p)))
          elif int8_mma:
            pi, sp = _quantize_rows(ps)
            o = f32(plgpu.dot(pi, _signed_codes(raw_v, bits, p))) * sp[:, None]
          else:
            ph = ps.astype(jnp.float16)
            codes = lax.bitcast_convert_type(
                _unsigned_codes(raw_v, bits, p).astype(jnp.uint16) | _MAGIC_BITS, jnp.float16)
            o = plgpu.dot(ph, codes) - (_MAGIC + half) * jnp.sum(f32(ph), axis=1)[:, None]
          outs[col] = o + corr[:, None]
      return tuple(outs)

    return online_softmax_step(carry, s, mask, v_dot)

  acc = tuple(jnp.zeros((rows, value_group), jnp.float32) for _ in range(head_dim // value_group))
  carry = (acc, jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32))
  finish(o_ref, lse_ref, lax.fori_loop(lo, hi, body, carry))


@functools.partial(jax.jit, static_argnames=(
    "scale", "block_k", "num_splits", "num_warps", "num_stages", "int8_mma", "interpret",
    "return_lse"))
def quantized_decode_attention(q, kv: QuantizedKV, lengths, *, scale: float | None = None,
                               block_k: int | None = None, num_splits: int | None = None,
                               num_warps: int = 4, num_stages: int = 3, int8_mma: bool = False,
                               interpret: bool = False, return_lse: bool = False):
  """Decode attention of q [B, T, Hq, D] (bf16/f16/f32) over a QuantizedKV cache.

  Same contract as pallas_kernels.gpu.decode.decode_attention; block_k must divide the key
  group (default min(128, key_group)). Scales and zeros are used as float16. Scales are folded into the query / probability side, so
  the codes go to the tensor cores unscaled (float16 for bf16/fp16 queries, float32 otherwise).
  int8_mma: for 16-bit queries, run both dots on the int8 tensor cores (q * k_scale and
    p * v_scale quantised to int8 per row, SageAttention-style); otherwise the codes become
    float16 exactly and the dots run in float16. float32 queries always take exact float32 dots.
  """
  batch, q_len, q_heads, head_dim = q.shape
  capacity, kv_heads = kv.k_codes.shape[1], kv.k_codes.shape[2]
  if kv.k_scale.shape[-1] != head_dim or kv.k_codes.shape != kv.v_codes.shape:
    raise ValueError(f"QuantizedKV shapes k_codes{kv.k_codes.shape}, k_scale{kv.k_scale.shape}, "
                     f"v_codes{kv.v_codes.shape} do not fit head_dim {head_dim}")
  validate_decode_args(q, jax.ShapeDtypeStruct((batch, capacity, kv_heads, head_dim), q.dtype),
                       jax.ShapeDtypeStruct((batch, capacity, kv_heads, head_dim), q.dtype), lengths)
  bits, key_group, value_group = kv.bits, kv.key_group, kv.value_group
  if value_group < 16 or (head_dim // (8 // bits)) % value_group:
    raise ValueError(f"value_group={value_group} must be >= 16 and divide {head_dim // (8 // bits)}")
  bk = block_k or pick_block_k(key_group)
  if key_group % bk or capacity % bk:
    raise ValueError(f"block_k={bk} must divide key_group={key_group} and capacity={capacity}")
  scale = head_dim ** -0.5 if scale is None else scale
  splits = num_splits or default_num_splits(batch, kv_heads, capacity // bk)
  qp, rows = pack_queries(q, kv_heads)
  kernel = functools.partial(
      _quant_decode_kernel, scale=scale, block_k=bk, num_splits=splits, group=q_heads // kv_heads,
      q_len=q_len, bits=bits, key_group=key_group, value_group=value_group,
      int8_mma=int8_mma)
  per_head = lambda x: pl.BlockSpec((None, x.shape[1], None, x.shape[3]), lambda b, h, j: (b, 0, h, 0))
  o, lse = pl.pallas_call(
      kernel,
      grid=(batch, kv_heads, splits),
      in_specs=[pl.BlockSpec(lengths.shape, lambda b, h, j: (0,)),
                pl.BlockSpec((None, None, rows, head_dim), lambda b, h, j: (b, h, 0, 0))]
               + [per_head(x) for x in kv[:4]] + [per_head(kv.v_scale)],
      out_specs=[pl.BlockSpec((None, None, None, rows, head_dim), lambda b, h, j: (b, h, j, 0, 0)),
                 pl.BlockSpec((None, None, None, rows), lambda b, h, j: (b, h, j, 0))],
      out_shape=[jax.ShapeDtypeStruct((batch, kv_heads, splits, rows, head_dim), jnp.float32),
                 jax.ShapeDtypeStruct((batch, kv_heads, splits, rows), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name=f"lcjax_int{bits}_decode",
  )(lengths.astype(jnp.int32), qp, *kv[:4], pack_scale_zero(kv.v_scale, kv.v_zero))
  n = q_len * (q_heads // kv_heads)         # drop the padding rows before the merge reads them
  out, lse = merge_splits(o[..., :n, :], lse[..., :n])
  out = unpack_rows(out, q_len, q_heads).astype(q.dtype)
  if return_lse:
    return out, jnp.moveaxis(unpack_rows(lse, q_len, q_heads), 1, 2)
  return out
