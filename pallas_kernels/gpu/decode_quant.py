"""Split-KV decode over an int8 / int4 KV cache, dequantised inside the kernel (KIVI-style).

KIVI (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache")
quantises keys per channel (outliers live in a few channels) and values per token. Here:

  keys:   codes [B, C, Hkv, D * bits / 8] uint8; scale, zero [B, C / key_group, Hkv, D]
          (one (scale, zero) per channel per group of key_group consecutive tokens)
  values: codes [B, C, Hkv, D * bits / 8] uint8; scale, zero [B, C, Hkv, D / value_group]
          (one (scale, zero) per token per group of value_group consecutive channels)
  x ~= code * scale + zero   (asymmetric; zero is the value of code 0, i.e. the group minimum)

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
  """Asymmetric min/max quantisation of x (float) over `axis`: codes uint8, scale, zero."""
  qmax = (1 << bits) - 1
  x = x.astype(jnp.float32)
  lo, hi = x.min(axis, keepdims=True), x.max(axis, keepdims=True)
  scale = ((hi - lo) / qmax).astype(scale_dtype)
  zero = lo.astype(scale_dtype)
  s, z = scale.astype(jnp.float32), zero.astype(jnp.float32)
  codes = jnp.clip(jnp.round((x - z) / jnp.where(s > 0, s, 1.0)), 0, qmax).astype(jnp.uint8)
  return codes, scale, zero


def pack_int4(codes):
  """uint8 codes < 16, [..., D] -> [..., D/2]: low nibble channel j, high nibble channel j + D/2."""
  half = codes.shape[-1] // 2
  return codes[..., :half] | (codes[..., half:] << 4)


def unpack_int4(packed):
  return jnp.concatenate([packed & 15, packed >> 4], axis=-1)


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


# fp16 with exponent bits 0x6400 is 1024.0; OR-ing an integer c < 1024 into its mantissa gives
# exactly 1024 + c. This turns codes into fp16 with integer ops only (the int->float conversion
# unit is the bottleneck otherwise); the constant 1024 is folded into a per-row correction.
_MAGIC_BITS = 0x6400
_MAGIC = 1024.0


def _codes_to_float(codes, dtype):
  """uint8 codes -> dtype: exact `1024 + c` for float16 (magic number), exact `c` for float32."""
  if dtype == jnp.float16:
    return lax.bitcast_convert_type(codes.astype(jnp.uint16) | _MAGIC_BITS, jnp.float16)
  return codes.astype(dtype)


def _quant_decode_kernel(len_ref, q_ref, kc_ref, ks_ref, kz_ref, vc_ref, vs_ref, vz_ref, o_ref, lse_ref,
                         *, scale, block_k, num_splits, group, q_len, bits, key_group, value_group,
                         prefetch):
  b, split = pl.program_id(0), pl.program_id(2)
  rows, head_dim = q_ref.shape
  cdt = q_ref.dtype                       # float16 (magic-number codes) or float32
  offset = _MAGIC if cdt == jnp.float16 else 0.0
  parts = 8 // bits                       # nibbles per byte
  width = head_dim // parts               # channels per part = bytes per row
  length = len_ref[b]
  qpos = query_positions(length, rows, group, q_len)
  q_parts = [q_ref[:, pl.ds(p * width, width)].astype(jnp.float32) for p in range(parts)]
  lo, hi = split_range((length + block_k - 1) // block_k, num_splits, split)
  f32 = lambda x: x.astype(jnp.float32)

  def nibble(raw, p):
    if bits == 8:
      return raw
    return raw & 15 if p == 0 else raw >> 4

  def load_tile(i):
    """Every load of tile i: codes, and the scales / zeros that go with them."""
    start = pl.multiple_of(i * block_k, block_k)
    g = start // key_group
    tile = {"k": kc_ref[pl.ds(start, block_k), :],                         # [bk, width] uint8
            "ks": [ks_ref[g, pl.ds(p * width, width)] for p in range(parts)],
            "kz": [kz_ref[g, pl.ds(p * width, width)] for p in range(parts)],
            "v": [vc_ref[pl.ds(start, block_k), pl.ds(gi * value_group, value_group)]
                  for gi in range(width // value_group)],
            "vs": [vs_ref[pl.ds(start, block_k), c] for c in range(head_dim // value_group)],
            "vz": [vz_ref[pl.ds(start, block_k), c] for c in range(head_dim // value_group)]}
    return tile

  def compute(i, carry, tile):
    start = i * block_k
    # k = c * ks + kz per channel: q.k = (q * ks) . c + q . kz, so the tile is never rescaled.
    s = None
    bias = None
    for p in range(parts):
      ks, kz = f32(tile["ks"][p]), f32(tile["kz"][p])
      qk = (q_parts[p] * ks[None, :]).astype(cdt)
      sp = plgpu.dot(qk, _codes_to_float(nibble(tile["k"], p), cdt), trans_b=True)
      bp = jnp.sum(q_parts[p] * kz[None, :] - offset * f32(qk), axis=1)
      s = sp if s is None else s + sp
      bias = bp if bias is None else bias + bp
    s = (s + bias[:, None]) * scale
    kpos = start + lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
    mask = kpos <= qpos[:, None]

    def v_dot(pr):
      # v = c * vs + vz per token (per channel group): p @ v = (p * vs) @ c + p . vz.
      outs = [None] * (head_dim // value_group)
      for gi in range(width // value_group):                      # byte groups
        for p in range(parts):
          col = p * (width // value_group) + gi                     # channel group index
          vs, vz = f32(tile["vs"][col]), f32(tile["vz"][col])
          ps = (pr * vs[None, :]).astype(cdt)
          corr = jnp.sum(pr * vz[None, :] - offset * f32(ps), axis=1)
          outs[col] = plgpu.dot(ps, _codes_to_float(nibble(tile["v"][gi], p), cdt)) + corr[:, None]
      return tuple(outs)

    return online_softmax_step(carry, s, mask, v_dot)

  acc = tuple(jnp.zeros((rows, value_group), jnp.float32) for _ in range(head_dim // value_group))
  carry = (acc, jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32))
  if prefetch:
    # Register double-buffering: issue tile i+1's loads before computing on tile i, so the
    # small scale loads (which the compiler does not pipeline) overlap with the maths.
    last_tile = kc_ref.shape[0] // block_k - 1

    def body(i, state):
      carry, tile = state
      nxt = load_tile(jnp.minimum(i + 1, jnp.maximum(hi - 1, 0)))
      return compute(i, carry, tile), nxt

    carry, _ = lax.fori_loop(lo, hi, body, (carry, load_tile(jnp.minimum(lo, last_tile))))
  else:
    carry = lax.fori_loop(lo, hi, lambda i, c: compute(i, c, load_tile(i)), carry)
  finish(o_ref, lse_ref, carry)


@functools.partial(jax.jit, static_argnames=(
    "scale", "block_k", "num_splits", "num_warps", "num_stages", "prefetch", "interpret",
    "return_lse"))
def quantized_decode_attention(q, kv: QuantizedKV, lengths, *, scale: float | None = None,
                               block_k: int | None = None, num_splits: int | None = None,
                               num_warps: int = 4, num_stages: int = 3, prefetch: bool = True,
                               interpret: bool = False, return_lse: bool = False):
  """Decode attention of q [B, T, Hq, D] (bf16/f16/f32) over a QuantizedKV cache.

  Same contract as pallas_kernels.gpu.decode.decode_attention; block_k must divide the key
  group (default min(128, key_group)). Scales are folded into the query / probability side, so
  the codes go to the tensor cores unscaled (float16 for bf16/fp16 queries, float32 otherwise).
  prefetch: load tile i+1 (codes and scales) before computing on tile i.
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
  # Dots run in float16 for 16-bit queries (codes become fp16 exactly), float32 for float32.
  qp, rows = pack_queries(q.astype(jnp.float32 if q.dtype == jnp.float32 else jnp.float16), kv_heads)
  kernel = functools.partial(
      _quant_decode_kernel, scale=scale, block_k=bk, num_splits=splits, group=q_heads // kv_heads,
      q_len=q_len, bits=bits, key_group=key_group, value_group=value_group,
      prefetch=prefetch)
  per_head = lambda x: pl.BlockSpec((None, x.shape[1], None, x.shape[3]), lambda b, h, j: (b, 0, h, 0))
  o, lse = pl.pallas_call(
      kernel,
      grid=(batch, kv_heads, splits),
      in_specs=[pl.BlockSpec(lengths.shape, lambda b, h, j: (0,)),
                pl.BlockSpec((None, None, rows, head_dim), lambda b, h, j: (b, h, 0, 0))]
               + [per_head(x) for x in kv],
      out_specs=[pl.BlockSpec((None, None, None, rows, head_dim), lambda b, h, j: (b, h, j, 0, 0)),
                 pl.BlockSpec((None, None, None, rows), lambda b, h, j: (b, h, j, 0))],
      out_shape=[jax.ShapeDtypeStruct((batch, kv_heads, splits, rows, head_dim), jnp.float32),
                 jax.ShapeDtypeStruct((batch, kv_heads, splits, rows), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name=f"lcjax_int{bits}_decode",
  )(lengths.astype(jnp.int32), qp, *kv)
  n = q_len * (q_heads // kv_heads)         # drop the padding rows before the merge reads them
  out, lse = merge_splits(o[..., :n, :], lse[..., :n])
  out = unpack_rows(out, q_len, q_heads).astype(q.dtype)
  if return_lse:
    return out, jnp.moveaxis(unpack_rows(lse, q_len, q_heads), 1, 2)
  return out
