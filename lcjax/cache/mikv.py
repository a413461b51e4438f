"""MiKV: evicted tokens are kept at low precision instead of being dropped.

Yang et al., "No Token Left Behind: Reliable KV Cache Compression via Importance-Aware Mixed
Precision Quantization" (arXiv:2402.18096). Eviction (H2O's accumulated attention here) decides
which tokens are important; those stay at full precision, the others are quantized to `bits` bits
(per token, `group_size` channels per scale) rather than discarded, so that the context they carry
is not lost.

Layout: an EvictingKVCache (the important tokens) plus a low-precision store indexed by absolute
position and head; a slot of the store is filled when the evicting cache drops that token. The
paper balances outlier channels before quantizing; that step is not implemented.
Capacity: positions >= capacity cannot be stored: those sequences' outputs become NaN.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lcjax.cache import quant
from lcjax.cache.evicting import EvictingKVCache
from lcjax.cache.h2o import H2OPolicy
from lcjax.cache.slots import attend_slots, resolve_num_new, slot_visibility


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["inner", "kq", "k_scale", "k_zero", "vq", "v_scale", "v_zero", "held"],
                   meta_fields=["bits"])
@dataclasses.dataclass(frozen=True)
class MiKVCache:
  """inner: EvictingKVCache (full precision); kq, vq: uint8 [B, capacity, Hkv, D*bits/8];
  scales/zeros: [B, capacity, Hkv, D/G]; held: bool [B, capacity, Hkv] low-precision token present."""
  inner: EvictingKVCache
  kq: jax.Array
  k_scale: jax.Array
  k_zero: jax.Array
  vq: jax.Array
  v_scale: jax.Array
  v_zero: jax.Array
  held: jax.Array
  bits: int

  @classmethod
  def create(cls, batch: int, capacity: int, kv_heads: int, head_dim: int, *, budget, window: int = 16,
             sinks: int = 0, bits: int = 4, group_size: int = 32, max_chunk: int = 1,
             dtype=jnp.float32, scale_dtype=jnp.float16) -> "MiKVCache":
    quant.check_bits(bits)
    if head_dim % group_size:
      raise ValueError(f"group_size={group_size} must divide head_dim={head_dim}")
    inner = EvictingKVCache.create(batch, kv_heads, head_dim, policy=H2OPolicy(sinks, window),
                                   budget=budget, max_chunk=max_chunk, dtype=dtype)
    shape = (batch, capacity, kv_heads)
    codes = jnp.zeros(shape + (head_dim * bits // 8,), jnp.uint8)
    scales = jnp.zeros(shape + (head_dim // group_size,), scale_dtype)
    return cls(inner, codes, scales, scales, codes, scales, scales, jnp.zeros(shape, bool), bits)

  @property
  def lengths(self):
    return self.inner.lengths

  @property
  def capacity(self) -> int:
    return self.kq.shape[1]

  def update(self, k_new, v_new, *, q=None, num_new=None) -> "MiKVCache":
    num_new = resolve_num_new(self.lengths, k_new.shape[1], num_new)
    inner, evicted_pos = self.inner.compress()
    b, c, h = evicted_pos.shape
    g = self.k_scale.shape[-1]
    d = inner.k.shape[-1]
    kc, ks, kz = quant.quantize_channel_groups(inner.k, self.bits, d // g, self.k_scale.dtype)
    vc, vs, vz = quant.quantize_channel_groups(inner.v, self.bits, d // g, self.v_scale.dtype)
    # Scatter the dropped slots to their (position, head) in the store; others go out of range.
    bi = jnp.arange(b)[:, None, None]
    hi = jnp.arange(h)[None, None, :]
    pi = jnp.where(evicted_pos >= 0, evicted_pos, self.capacity)
    put = lambda buf, x: buf.at[bi, pi, hi].set(x.astype(buf.dtype), mode="drop")
    new = dataclasses.replace(
        self, kq=put(self.kq, quant.pack(kc, self.bits)), k_scale=put(self.k_scale, ks),
        k_zero=put(self.k_zero, kz), vq=put(self.vq, quant.pack(vc, self.bits)),
        v_scale=put(self.v_scale, vs), v_zero=put(self.v_zero, vz),
        held=put(self.held, jnp.ones((b, c, h), bool)))
    inner = inner.write(k_new, v_new, num_new)
    return dataclasses.replace(new, inner=dataclasses.replace(
        inner, score=inner.policy.observe(inner, q, num_new, k_new.shape[1])))

  def low_precision(self):
    """(k, v) float32 [B, capacity, Hkv, D] dequantized store (meaningful where held)."""
    deq = lambda c, s, z: quant.dequantize_channel_groups(quant.unpack(c, self.bits), s, z)
    return deq(self.kq, self.k_scale, self.k_zero), deq(self.vq, self.v_scale, self.v_zero)

  def attend(self, q, *, scale: float | None = None, implementation: str = "xla"):
    k_low, v_low = self.low_precision()
    dt = self.inner.k.dtype
    k = jnp.concatenate([self.inner.k, k_low.astype(dt)], 1)
    v = jnp.concatenate([self.inner.v, v_low.astype(dt)], 1)
    low_pos = jnp.where(self.held, jnp.arange(self.capacity)[None, :, None], -1)
    pos = jnp.moveaxis(jnp.concatenate([self.inner.pos, low_pos], 1), 1, 2)
    return attend_slots(q, k, v, slot_visibility(pos, q_heads=q.shape[2]), self.lengths, scale=scale,
                        poison=self.lengths > self.capacity, implementation=implementation)

  def memory_bytes(self) -> int:
    low = sum(x.nbytes for x in (self.kq, self.k_scale, self.k_zero, self.vq, self.v_scale, self.v_zero))
    return int(self.inner.memory_bytes() + low + self.held.size // 8)    # held: one bit per slot
