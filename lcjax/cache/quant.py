"""Asymmetric integer quantization in groups, and bit packing (helpers of KIVI, GEAR, MiKV).

x ~ code * scale + zero, code in [0, 2**bits - 1], scale = (max - min) / (2**bits - 1) and
zero = min over a group. Scale and zero are rounded to `scale_dtype` (float16, as KIVI stores
them) BEFORE the codes are computed, so that dequantization uses exactly the stored values.
Codes of 2 or 4 bits are packed along the last axis into uint8 (memory is counted packed).
"""

from __future__ import annotations

import jax.numpy as jnp

BITS = (2, 4, 8)


def check_bits(bits: int) -> None:
  if bits not in BITS:
    raise ValueError(f"bits={bits}; accepted: {BITS}")


def quantize(x, bits: int, axis: int, scale_dtype=jnp.float16):
  """Quantizes x with one (scale, zero) per slice along `axis` (the group is the whole axis).

  Returns (codes uint8 same shape as x, scale, zero) with `axis` kept at size 1 in scale/zero.
  """
  check_bits(bits)
  x = x.astype(jnp.float32)
  lo, hi = x.min(axis, keepdims=True), x.max(axis, keepdims=True)
  scale = ((hi - lo) / (2 ** bits - 1)).astype(scale_dtype)
  zero = lo.astype(scale_dtype)
  s32 = scale.astype(jnp.float32)
  codes = jnp.round((x - zero.astype(jnp.float32)) / jnp.where(s32 > 0, s32, 1.0))
  return jnp.clip(codes, 0, 2 ** bits - 1).astype(jnp.uint8), scale, zero


def dequantize(codes, scale, zero):
  return codes.astype(jnp.float32) * scale.astype(jnp.float32) + zero.astype(jnp.float32)


def quantize_channel_groups(x, bits: int, group: int, scale_dtype=jnp.float16):
  """Per-token quantization: x [..., D] in groups of `group` channels.

  Returns codes uint8 [..., D], scale and zero [..., D // group].
  """
  d = x.shape[-1]
  if d % group:
    raise ValueError(f"group_size={group} must divide head_dim={d}")
  codes, scale, zero = quantize(x.reshape(*x.shape[:-1], d // group, group), bits, -1, scale_dtype)
  return codes.reshape(x.shape), scale[..., 0], zero[..., 0]


def dequantize_channel_groups(codes, scale, zero):
  d = codes.shape[-1]
  g = d // scale.shape[-1]
  c = codes.reshape(*codes.shape[:-1], d // g, g)
  return dequantize(c, scale[..., None], zero[..., None]).reshape(codes.shape)


def pack(codes, bits: int):
  """uint8 codes [..., D] with values < 2**bits -> uint8 [..., D * bits // 8]."""
  if bits == 8:
    return codes
  per = 8 // bits
  c = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per, per).astype(jnp.uint8)
  shifts = (jnp.arange(per, dtype=jnp.uint8) * bits)
  # Disjoint bit fields: the sum is the bitwise or.
  return (c << shifts).sum(-1, dtype=jnp.uint8)


def unpack(packed, bits: int):
  """Inverse of pack: uint8 [..., D * bits // 8] -> uint8 codes [..., D]."""
  if bits == 8:
    return packed
  per = 8 // bits
  shifts = jnp.arange(per, dtype=jnp.uint8) * bits
  c = (packed[..., None] >> shifts) & jnp.uint8(2 ** bits - 1)
  return c.reshape(*packed.shape[:-1], packed.shape[-1] * per)
