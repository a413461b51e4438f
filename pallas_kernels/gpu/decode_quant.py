"""Split-KV decode over an int8 / int4 KV cache, dequantised inside the kernel (KIVI-style).

KIVI (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache")
quantises keys per channel (outliers live in a few channels) and values per token. Here:

  keys:   codes [B, C, Hkv, D * bits / 8] int8      (token-major rows, as the dense cache)
          scale, zero [B, C / key_group, Hkv, D]    (per channel per group of key_group tokens)
  values: codes [B, Hkv, D * bits / 8, C] int8      (channel-major: tokens contiguous)
          scale, zero [B, Hkv, D / value_group, C]  (per token per group of value_group channels)
  x ~= code * scale + zero   (asymmetric min/max; zero is the group's mid-range, the value of code 0)

Values are stored channel-major because the value product p @ v reduces over tokens: with the
tokens contiguous, int8 value codes are already in the layout the int8 tensor cores take for
that operand (the reduction dimension innermost), so no tile is transposed in the kernel.

int4 codes are packed two per byte, split-half: byte j holds channel j in its low nibble and
channel j + D/2 in its high nibble, so the kernel unpacks with a mask and a shift and never
interleaves. int4 value groups lie within one half (value_group divides D/2) or are the whole
head (value_group = D: one scale per token, shared by both halves of a byte).

The kernel runs the split-KV online softmax of pallas_kernels.gpu.decode. The key scales are
folded into the queries once per key group (q * scale, quantised to int8 per row on the int8
path), so the key codes go to the tensor cores as stored: for int8 keys on int8 dots inside
the kernel (`_folded_query`), otherwise outside it (`query_operands`, which is also the
reference for the in-kernel fold). The value scales are folded into the probabilities.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gpu.decode import (NUM_SMS, default_num_splits, finish, merge_splits, pack_queries,
                                       pick_block_k, query_positions, split_range, unpack_rows,
                                       validate_decode_args)

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
  def capacity(self) -> int:
    return self.k_codes.shape[1]

  @property
  def bits(self) -> int:
    return 8 if self.k_codes.shape[-1] == self.head_dim else 4

  @property
  def key_group(self) -> int:
    return self.k_codes.shape[1] // self.k_scale.shape[1]

  @property
  def value_group(self) -> int:
    return self.head_dim // self.v_scale.shape[2]


def _check_bits(bits):
  if bits not in (4, 8):
    raise ValueError(f"bits must be 4 or 8; got {bits}")


def value_group_fits(head_dim: int, bits: int, group: int) -> bool:
  """Value groups divide D; for int4 they also lie within one nibble half or span all of D."""
  if bits == 8:
    return head_dim % group == 0
  return group == head_dim or (head_dim // 2) % group == 0


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
  """k [B, C, H, D] -> codes [B, C, H, D*bits/8]; scale, zero [B, C/group_size, H, D]."""
  _check_bits(bits)
  b, c, h, d = k.shape
  if c % group_size:
    raise ValueError(f"key group_size={group_size} must divide the length {c}")
  codes, scale, zero = _quantize_groups(k.reshape(b, c // group_size, group_size, h, d), 2, bits,
                                        scale_dtype)
  codes = codes.reshape(b, c, h, d)
  return (pack_int4(codes) if bits == 4 else codes), scale[:, :, 0], zero[:, :, 0]


def quantize_values(v, *, bits: int, group_size: int, scale_dtype=jnp.float16):
  """v [B, C, H, D] -> channel-major codes [B, H, D*bits/8, C]; scale, zero [B, H, D/group_size, C]."""
  _check_bits(bits)
  b, c, h, d = v.shape
  if not value_group_fits(d, bits, group_size):
    raise ValueError(f"value group_size={group_size} must divide head_dim {d}"
                     + (f" / 2 or equal it (int4)" if bits == 4 else ""))
  codes, scale, zero = _quantize_groups(v.reshape(b, c, h, d // group_size, group_size), 4, bits,
                                        scale_dtype)
  codes = codes.reshape(b, c, h, d)
  codes = pack_int4(codes) if bits == 4 else codes
  channel_major = lambda x: jnp.transpose(x, (0, 2, 3, 1))          # [B, C, H, n] -> [B, H, n, C]
  return channel_major(codes), channel_major(scale[..., 0]), channel_major(zero[..., 0])


def quantize_kv(k, v, *, bits: int, key_group: int = 128, value_group: int = 64,
                scale_dtype=jnp.float16) -> QuantizedKV:
  """Quantises a whole cache, KIVI-style (keys per channel, values per token)."""
  return QuantizedKV(*quantize_keys(k, bits=bits, group_size=key_group, scale_dtype=scale_dtype),
                     *quantize_values(v, bits=bits, group_size=value_group, scale_dtype=scale_dtype))


def dequantize_kv(kv: QuantizedKV, dtype=jnp.float32):
  """The reference: (k, v) [B, C, H, D] as the kernel sees them."""
  unpack = (lambda c: c) if kv.bits == 8 else unpack_int4
  f32 = lambda x: x.astype(jnp.float32)
  token_major = lambda x: jnp.transpose(x, (0, 3, 1, 2))            # [B, H, n, C] -> [B, C, H, n]
  k = f32(unpack(kv.k_codes)) * jnp.repeat(f32(kv.k_scale), kv.key_group, 1) + jnp.repeat(
      f32(kv.k_zero), kv.key_group, 1)
  v = f32(unpack(token_major(kv.v_codes))) * jnp.repeat(f32(token_major(kv.v_scale)), kv.value_group, -1) \
      + jnp.repeat(f32(token_major(kv.v_zero)), kv.value_group, -1)
  return k.astype(dtype), v.astype(dtype)


# fp16 with exponent bits 0x6400 is 1024.0; OR-ing an integer u < 1024 into its mantissa gives
# exactly 1024 + u: int8 codes become fp16 with integer ops only (no conversion instruction).
# The offset 1024 + 128 is subtracted after the dot; int4 codes are converted instead, because
# with values of only +-8 that subtraction would cancel ~250x and expose the rounding of the tensor
# cores' accumulation (measured on the H200: 2.5-7 % error with the offset, 0.5 % converted).
_FP16_MAGIC_BITS = 0x6400
_FP16_MAGIC = 1024.0


def _fp16_code_offset(bits: int) -> float:
  """What the float16 operand of a code adds to it (see _code_operand)."""
  return _FP16_MAGIC + 128 if bits == 8 else 0.0


# The same for float32 and int32 (|x| < 2^22): bits(2^23 + 2^22 + x) = 0x4B400000 + x. Adding the
# float constant rounds to the nearest integer (float -> int) and adding the integer constant makes
# the float (int -> float); the int8 path converts every score and output tile this way, since the
# conversion instructions run at a fraction of the rate of adds.
_F32_MAGIC_BITS = 0x4B400000
_F32_MAGIC = 12582912.0
_LOG2E = math.log2(math.e)


def _int32_to_f32(x):
  """int32 |x| < 2^22 -> float32 x + _F32_MAGIC exactly (the caller subtracts the constant)."""
  return lax.bitcast_convert_type(x + _F32_MAGIC_BITS, jnp.float32)


def _round_to_int8(x):
  """float32 x in [-127, 127] -> int8 round(x), without a conversion instruction (the low byte
  of 0x4B400000 + round(x) is round(x) in two's complement)."""
  return lax.bitcast_convert_type(x + _F32_MAGIC, jnp.int32).astype(jnp.int8)


# int4 on the int8 tensor cores: a byte holding nibbles (hi, lo) is, as int8, 16 * hi + lo, so
# byte & 0xF0 is exactly 16 * hi and (byte << 4) is exactly 16 * lo (signed, in [-128, 112]); the
# factor 16 goes into the scales. On four bytes at once this is one or two 32-bit instructions.
_INT4_X16_PTX = ("{ .reg .b32 t; shl.b32 t, $1, 4; and.b32 $0, t, 0xF0F0F0F0; }",   # low nibbles
                 "and.b32 $0, $1, 0xF0F0F0F0;")                                      # high nibbles


def _int4_times16(raw, part: int, interpret: bool):
  """int8 packed nibbles -> int8 16 * (signed nibble of `part`), four bytes per instruction."""
  if interpret:   # the same bits, one byte at a time (inline PTX has no interpreter)
    return raw << 4 if part == 0 else raw & -16
  [out] = plgpu.elementwise_inline_asm(_INT4_X16_PTX[part], args=[raw], constraints="=r,r", pack=4,
                                       result_shape_dtypes=[jax.ShapeDtypeStruct(raw.shape, jnp.int8)])
  return out


def _code_operand(raw, bits: int, part: int, mode: str, interpret: bool):
  """int8 raw key / value bytes -> the tensor-core operand of one nibble half (or the byte).

  int8 mode with int4 codes gives 16 * code (the callers divide by 16)."""
  if mode == "float32":
    return (raw if bits == 8 else _signed_nibble(raw, part)).astype(jnp.float32)
  if mode == "int8":
    return raw if bits == 8 else _int4_times16(raw, part, interpret)
  if bits == 4:
    return _signed_nibble(raw, part).astype(jnp.float16)
  # float16 int8: code + 128 is in [0, 256); OR it into the magic number's mantissa.
  u = lax.bitcast_convert_type(raw, jnp.uint8) ^ 0x80
  return lax.bitcast_convert_type(u.astype(jnp.uint16) | _FP16_MAGIC_BITS, jnp.float16)


def query_operands(qp, kv: QuantizedKV, n: int, scale: float, mode: str):
  """Folds the key scales and zeros into the packed queries, once per key group.

  q . k = (q * ks) . code + q . kz per key group, so
    logit * log2(e) = dot(operand, codes) * row_scale + row_bias  (base-2 logits).
  Args:
    qp: [B, Hkv, rows, D] packed queries (pack_queries), n real rows; kv: the cache.
  Returns:
    operand [B, Hkv, G*n + rows - n, D] (int8, float16 or float32 by mode), row_scale, row_bias
    float32 [B, Hkv, G*n + rows - n]: group g's rows are g*n .. g*n + n - 1, and the rows - n rows
    at the end pad the last group's tile (the kernel reads `rows` rows from g*n; the rows past n
    belong to later groups and only feed padding rows).
  """
  rows = qp.shape[2]
  q = qp[:, :, :n].astype(jnp.float32)                                   # [B, Hkv, n, D]
  ks = jnp.moveaxis(kv.k_scale.astype(jnp.float32), 2, 1)[:, :, :, None]  # [B, Hkv, G, 1, D]
  kz = jnp.moveaxis(kv.k_zero.astype(jnp.float32), 2, 1)                 # [B, Hkv, G, D]
  qk = q[:, :, None] * ks                                                 # [B, Hkv, G, n, D]
  bias = jnp.einsum("bhnd,bhgd->bhgn", q, kz, precision=lax.Precision.HIGHEST)
  row_scale = jnp.ones(bias.shape, jnp.float32)
  if mode == "int8":
    amax = jnp.max(jnp.abs(qk), axis=-1)
    row_scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    operand = jnp.round(qk / row_scale[..., None]).astype(jnp.int8)
  elif mode == "float16":
    operand = qk.astype(jnp.float16)
    bias = bias - _fp16_code_offset(kv.bits) * jnp.sum(operand.astype(jnp.float32), -1)
  else:
    operand = qk
  c = scale * _LOG2E
  if mode == "int8" and kv.bits == 4:
    row_scale = row_scale / 16.0            # the kernel's int4 operands are 16 * code
  flat = lambda x, pad: jnp.pad(x.reshape(*x.shape[:2], -1, *x.shape[4:]),
                                ((0, 0), (0, 0), (0, rows - n)) + pad)
  return flat(operand, ((0, 0),)), flat(row_scale * c, ()), flat(bias * c, ())


def _folded_query(q, ks_ref, kz_ref, g):
  """In-kernel int8 query operand of key group g (int8 keys; what query_operands computes outside).

  q: float32 [rows, D], times scale * log2 e; ks_ref, kz_ref [G, D]. Returns the int8
  operand [rows, D], row_scale and row_bias float32 [rows]."""
  qk = q * ks_ref[g, :].astype(jnp.float32)[None, :]
  amax = jnp.max(jnp.abs(qk), axis=1)
  operand = _round_to_int8(qk * jnp.where(amax > 0, 127.0 / amax, 0.0)[:, None])
  bias = jnp.sum(q * kz_ref[g, :].astype(jnp.float32)[None, :], axis=1)
  return operand, amax * (1 / 127.0), bias


def _quant_decode_kernel(len_ref, *refs, scale, block_k, num_splits, n, group, q_len, bits,
                         key_group, value_group, mode, fold_inside, interpret):
  if fold_inside:
    q_ref, ks_ref, kz_ref, kc_ref, vc_ref, vs_ref, vz_ref, o_ref, lse_ref = refs
  else:
    q_ref, qs_ref, qb_ref, kc_ref, vc_ref, vs_ref, vz_ref, o_ref, lse_ref = refs
  b, split = pl.program_id(0), pl.program_id(2)
  rows, head_dim = o_ref.shape
  parts = 8 // bits                       # nibbles per byte
  width = head_dim // parts               # channels per part = bytes per row
  chunk = min(value_group, width)         # value channels per p @ v dot
  length = len_ref[b]
  qpos = query_positions(length, rows, group, q_len)
  total = jnp.minimum((length + block_k - 1) // block_k, kc_ref.shape[0] // block_k)
  lo, hi = split_range(total, num_splits, split)
  # Tiles wholly at or before the first new query's position are seen by every query: no mask.
  unmasked_end = jnp.clip((length - q_len + 1) // block_k, lo, hi)
  f32 = lambda x: x.astype(jnp.float32)
  if fold_inside:
    q = q_ref[...].astype(jnp.float32) * (scale * _LOG2E)    # base-2 logits

  def body(masked, i, carry):
    acc, m, l = carry
    start = pl.multiple_of(i * block_k, block_k)
    raw_k = kc_ref[pl.ds(start, block_k), :]               # [bk, width] int8
    if fold_inside:
      operand, row_scale, row_bias = _folded_query(q, ks_ref, kz_ref, start // key_group)
      ops = [operand]
    else:
      r0 = (start // key_group) * n                        # this key group's query rows
      ops = [q_ref[pl.ds(r0, rows), pl.ds(p * width, width)] for p in range(parts)]
      row_scale, row_bias = qs_ref[pl.ds(r0, rows)], qb_ref[pl.ds(r0, rows)]
    s = None
    for p in range(parts):
      sp = plgpu.dot(ops[p], _code_operand(raw_k, bits, p, mode, interpret), trans_b=True)
      s = sp if s is None else s + sp
    if mode == "int8":
      row_bias = row_bias - _F32_MAGIC * row_scale
      s = _int32_to_f32(s)
    s = s * row_scale[:, None] + row_bias[:, None]         # base-2 logits [rows, bk]
    if masked:
      kpos = start + lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
      s = jnp.where(kpos <= qpos[:, None], s, -jnp.inf)
    tile_max = s.max(axis=-1)
    m_new = jnp.maximum(m, tile_max)
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)     # rows that saw nothing yet
    alpha = jnp.exp2(m - m_safe)
    if mode == "int8":
      # p = exp2(s - tile_max) * exp2(tile_max - m): the first factor has a row maximum of 1, so
      # quantising it with a fixed scale gives every row the full int8 range (a per-row scale
      # without a reduction); the second, per-row factor is applied to the tile's sums.
      t_safe = jnp.where(tile_max == -jnp.inf, 0.0, tile_max) if masked else tile_max
      pr = jnp.exp2(s - t_safe[:, None])                   # 0 where masked
      row_factor = jnp.exp2(t_safe - m_safe)
      if masked:
        row_factor = jnp.where(tile_max == -jnp.inf, 0.0, row_factor)
      l = alpha * l + pr.sum(axis=-1) * row_factor
    else:
      pr = jnp.exp2(s - m_safe[:, None])                   # <= 1; 0 where masked
      l = alpha * l + pr.sum(axis=-1)

    # v = code * vs + vz per token (per channel group): p @ v = (p * vs) @ code + p . vz.
    # The scaled probabilities of a channel group are made once, also when (int4, one group per
    # token) both nibble halves of a byte share it.
    scaled = {}

    def scaled_p(col):
      if col in scaled:
        return scaled[col]
      vs = f32(vs_ref[col, pl.ds(start, block_k)])
      vz = f32(vz_ref[col, pl.ds(start, block_k)])
      if masked:        # slots past the length may hold anything; keep them out of vmax and p . vz
        written = start + lax.broadcasted_iota(jnp.int32, (block_k,), 0) < length
        vs, vz = jnp.where(written, vs, 0.0), jnp.where(written, vz, 0.0)
      corr = jnp.sum(pr * vz[None, :], axis=1)
      if mode == "int8":
        # pr * vs / max(vs) <= 1: one int8 scale for the tile, no per-row reduction.
        vmax = jnp.maximum(jnp.max(vs), 1e-30)
        pv = _round_to_int8(pr * (vs * (127.0 / vmax))[None, :])
        unit = vmax / (127.0 if bits == 8 else 127.0 * 16)    # int4 operands are 16 * code
        o_scale, o_bias = unit * row_factor, (corr - _F32_MAGIC * unit) * row_factor
      elif mode == "float16":
        pv = (pr * vs[None, :]).astype(jnp.float16)
        o_scale, o_bias = None, corr - _fp16_code_offset(bits) * jnp.sum(f32(pv), axis=1)
      else:
        pv, o_scale, o_bias = pr * vs[None, :], None, corr
      scaled[col] = pv, o_scale, o_bias
      return scaled[col]

    outs = list(acc)
    for gi in range(width // chunk):                       # byte chunks of one row
      raw_v = vc_ref[pl.ds(gi * chunk, chunk), pl.ds(start, block_k)]   # [chunk, bk]
      for p in range(parts):
        c = p * (width // chunk) + gi                      # output channels c*chunk ...
        pv, o_scale, o_bias = scaled_p(c * chunk // value_group)
        o = plgpu.dot(pv, _code_operand(raw_v, bits, p, mode, interpret), trans_b=True)
        o = _int32_to_f32(o) * o_scale[:, None] if mode == "int8" else o
        outs[c] = alpha[:, None] * outs[c] + (o + o_bias[:, None])
    return tuple(outs), m_new, l

  acc = tuple(jnp.zeros((rows, chunk), jnp.float32) for _ in range(head_dim // chunk))
  carry = (acc, jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32))
  carry = lax.fori_loop(lo, unmasked_end, functools.partial(body, False), carry)
  acc, m, l = lax.fori_loop(unmasked_end, hi, functools.partial(body, True), carry)
  finish(o_ref, lse_ref, (acc, m * math.log(2.0), l))     # base-2 max -> natural log-sum-exp


@functools.partial(jax.jit, static_argnames=(
    "scale", "block_k", "num_splits", "num_warps", "num_stages", "int8_mma", "interpret",
    "return_lse"))
def quantized_decode_attention(q, kv: QuantizedKV, lengths, *, scale: float | None = None,
                               block_k: int | None = None, num_splits: int | None = None,
                               num_warps: int | None = None, num_stages: int = 3,
                               int8_mma: bool = False, interpret: bool = False,
                               return_lse: bool = False):
  """Decode attention of q [B, T, Hq, D] (bf16/f16/f32) over a QuantizedKV cache.

  Same contract as pallas_kernels.gpu.decode.decode_attention; block_k must divide the key
  group (default min(128, key_group)) and be at most 256. Scales and zeros are used as float16.
  Defaults are the fastest configuration measured at B8 Hq32 Hkv8 D128 (BENCHMARKS.md runs 8-12):
  block_k 128; int8 keys on int8 dots one wave of 3 programs per SM (6 splits at B8 Hkv8), int4
  on int8 dots at most 4 programs per SM (8 splits), float16 / float32 dots at most 8 (16
  splits); 2 warps with int8 dots, else 4.
  Dots: float32 queries take exact float32 dots. 16-bit queries take float16 dots of the codes
  (made exact in float16), or with int8_mma int8 tensor-core dots: q * k_scale quantised to
  int8 per row and key group (SageAttention-style), p per row from the tile maximum (times
  v_scale / the tile's largest v_scale).
  """
  batch, q_len, q_heads, head_dim = q.shape
  capacity, kv_heads = kv.capacity, kv.k_codes.shape[2]
  value_bytes = (kv.k_codes.shape[0], kv_heads, kv.k_codes.shape[3], capacity)
  if kv.k_scale.shape[-1] != head_dim or kv.v_codes.shape != value_bytes:
    raise ValueError(f"QuantizedKV shapes k_codes{kv.k_codes.shape}, k_scale{kv.k_scale.shape}, "
                     f"v_codes{kv.v_codes.shape} do not fit head_dim {head_dim} (v_codes must be "
                     f"{value_bytes}, channel-major)")
  validate_decode_args(q, jax.ShapeDtypeStruct((batch, capacity, kv_heads, head_dim), q.dtype),
                       jax.ShapeDtypeStruct((batch, capacity, kv_heads, head_dim), q.dtype), lengths)
  bits, key_group, value_group = kv.bits, kv.key_group, kv.value_group
  if value_group < 16 or not value_group_fits(head_dim, bits, value_group):
    raise ValueError(f"value_group={value_group} must be >= 16 and divide head_dim {head_dim}"
                     + (f" / 2 or equal it (int4)" if bits == 4 else ""))
  mode = "float32" if q.dtype == jnp.float32 else ("int8" if int8_mma else "float16")
  bk = block_k or pick_block_k(key_group)
  if mode == "int8" and head_dim > 256:
    raise ValueError(f"int8_mma needs head_dim <= 256 (int32 dots stay below 2^22); got {head_dim}")
  if key_group % bk or capacity % bk or bk > 256:
    raise ValueError(f"block_k={bk} must divide key_group={key_group} and capacity={capacity} "
                     f"and be at most 256")
  scale = head_dim ** -0.5 if scale is None else scale
  per_head = lambda x: pl.BlockSpec((None, None) + x.shape[2:], lambda b, h, j: (b, h) + (0,) * (x.ndim - 2))
  # int8 keys with int8 dots fold the key scales into the queries inside the kernel, one full
  # wave of 3 programs per SM; the other paths fold outside (BENCHMARKS.md run 9: for int4 the
  # in-kernel fold, done per nibble half, lost 15-45 %). int4 on int8 dots runs at most 4
  # programs per SM (run 12: 8 splits at B8 Hkv8 121.8 us against 130.7 for 16 at 32k, level at
  # 128k), the float16 / float32 dots at most 8.
  fold_inside = mode == "int8" and bits == 8
  if fold_inside:
    splits = num_splits or max(1, min(3 * NUM_SMS // (batch * kv_heads), capacity // bk))
  else:
    splits = num_splits or default_num_splits(batch, kv_heads, capacity // bk,
                                              waves=4 if mode == "int8" else 8)
  num_warps = num_warps or (2 if mode == "int8" else 4)
  qp, rows = pack_queries(q, kv_heads)
  n = q_len * (q_heads // kv_heads)
  if fold_inside:
    query_args = (qp, kv.k_scale, kv.k_zero)
    per_group = pl.BlockSpec((None, kv.k_scale.shape[1], None, head_dim), lambda b, h, j: (b, 0, h, 0))
    query_specs = [per_head(query_args[0]), per_group, per_group]
  else:
    query_args = query_operands(qp, kv, n, scale, mode)
    query_specs = [per_head(x) for x in query_args]
  kernel = functools.partial(
      _quant_decode_kernel, scale=scale, block_k=bk, num_splits=splits, n=n, group=q_heads // kv_heads,
      q_len=q_len, bits=bits, key_group=key_group, value_group=value_group, mode=mode,
      fold_inside=fold_inside, interpret=interpret)
  o, lse = pl.pallas_call(
      kernel,
      grid=(batch, kv_heads, splits),
      in_specs=[pl.BlockSpec(lengths.shape, lambda b, h, j: (0,)), *query_specs,
                pl.BlockSpec((None, capacity, None, kv.k_codes.shape[3]), lambda b, h, j: (b, 0, h, 0)),
                per_head(kv.v_codes), per_head(kv.v_scale), per_head(kv.v_zero)],
      out_specs=[pl.BlockSpec((None, None, None, rows, head_dim), lambda b, h, j: (b, h, j, 0, 0)),
                 pl.BlockSpec((None, None, None, rows), lambda b, h, j: (b, h, j, 0))],
      out_shape=[jax.ShapeDtypeStruct((batch, kv_heads, splits, rows, head_dim), jnp.float32),
                 jax.ShapeDtypeStruct((batch, kv_heads, splits, rows), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name=f"lcjax_int{bits}_decode",
  )(lengths.astype(jnp.int32), *query_args, kv.k_codes, kv.v_codes, kv.v_scale, kv.v_zero)
  out, lse = merge_splits(o[..., :n, :], lse[..., :n])    # drop the padding rows first
  out = unpack_rows(out, q_len, q_heads).astype(q.dtype)
  if return_lse:
    return out, jnp.moveaxis(unpack_rows(lse, q_len, q_heads), 1, 2)
  return out
