"""KIVI int8 / int4 in the quantised decode kernel's layout: decode steps run the Pallas kernel.

The same method as lcjax.cache.kivi (Liu et al., ICML 2024): keys quantised per channel over
groups of `group_size` tokens, values per token over groups of `value_group` channels, the most
recent tokens in a full-precision ring until their key group is complete. What differs is the
storage: the quantised part is a `QuantizedKV` (pallas_kernels.gpu.decode_quant: signed codes
with a mid-range zero, values channel-major, int4 packed two channels per byte), which the
quantised split-KV decode kernel reads directly. KIVI's int2 and GEAR's low-rank residual stay
in lcjax.cache.kivi (the kernel takes neither).

attend(q) = the log-sum-exp merge of two partial attentions:
  quantised part: positions [0, qb), qb = min(quantized_len(lengths), lengths - T), all of them
    before every query (so no causal mask is needed there); the kernel on a GPU for decode steps,
    XLA on the dequantised store otherwise;
  full-precision part: the ring's tokens at positions [qb, lengths), causal (XLA; at most
    residual + group_size + max_chunk tokens).
The T queries of a step attend the chunk itself in full precision, as in the paper (a chunk's
attention is computed before it is quantised).

Capacity: positions >= capacity cannot be stored; those sequences' outputs are NaN.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lcjax.attention import decode_backend
from lcjax.attention.reference import attention_reference
from lcjax.cache import kivi
from lcjax.cache.base import KV_AXES, tree_bytes
from lcjax.cache.slots import slot_visibility
from pallas_kernels.gpu import decode_quant
from pallas_kernels.gpu.decode import merge_splits
from pallas_kernels.gpu.decode_quant import QuantizedKV


def _write_at(buffer, x, start, axis: int, active):
  """buffer [B, ...] <- x [B, ...] at start[b] along `axis` (of the per-sequence arrays), where
  active (bool [B]); other sequences keep their rows."""
  def one(buf, xx, s, on):
    old = jax.lax.dynamic_slice_in_dim(buf, s, xx.shape[axis], axis)
    return jax.lax.dynamic_update_slice_in_dim(buf, jnp.where(on, xx.astype(buf.dtype), old), s, axis)
  return jax.vmap(one)(buffer, x, start, active)


def _one_token_view(q, kv_heads: int):
  """q [B, T, Hq, D] -> [B, 1, Hkv*T*G, D]: every row a 'single query token' of its KV head, so a
  decode kernel given the quantised length applies no causal mask among the T rows."""
  b, t, hq, d = q.shape
  g = hq // kv_heads
  return jnp.transpose(q.reshape(b, t, kv_heads, g, d), (0, 2, 1, 3, 4)).reshape(b, 1, kv_heads * t * g, d)


def _from_one_token_view(x, t: int, kv_heads: int):
  """Inverse of _one_token_view for out [B, 1, Hkv*T*G, D] -> [B, T, Hq, D] and for
  lse [B, Hkv*T*G, 1] -> [B, Hq, T]."""
  if x.ndim == 4:
    b, d = x.shape[0], x.shape[-1]
    x = jnp.transpose(x.reshape(b, kv_heads, t, -1, d), (0, 2, 1, 3, 4))
    return x.reshape(b, t, -1, d)
  b = x.shape[0]
  x = jnp.transpose(x.reshape(b, kv_heads, t, -1), (0, 1, 3, 2))
  return x.reshape(b, -1, t)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["store", "k_fp", "v_fp", "lengths"],
                   meta_fields=["group_size", "residual", "max_chunk", "int8_dots"])
@dataclasses.dataclass(frozen=True)
class KIVIKernelCache:
  """store: QuantizedKV over the whole capacity (rows below quantized_len(lengths) meaningful):
    k_codes int8 [B, C, Hkv, D*bits/8], k_scale / k_zero float16 [B, C/group_size, Hkv, D],
    v_codes int8 [B, Hkv, D*bits/8, C], v_scale / v_zero float16 [B, Hkv, D/value_group, C];
  k_fp, v_fp: [B, F, Hkv, D] full-precision ring (slot = position % F, F = residual +
    group_size + max_chunk); lengths: int32 [B].
  int8_dots: the kernel's int8 tensor-core dots for 16-bit queries (the fast path; ~1 % error
    against the dequantised cache, float16 dots ~0.4 %; BENCHMARKS.md runs 8-10)."""
  store: QuantizedKV
  k_fp: jax.Array
  v_fp: jax.Array
  lengths: jax.Array
  group_size: int
  residual: int
  max_chunk: int
  int8_dots: bool

  @classmethod
  def create(cls, batch: int, capacity: int, kv_heads: int, head_dim: int, *, bits: int = 8,
             group_size: int = 32, value_group: int | None = None, residual: int = 32,
             max_chunk: int = 1, int8_dots: bool = True, dtype=jnp.float32) -> "KIVIKernelCache":
    """value_group: channels per value scale (default group_size); int4 needs it to divide
    head_dim / 2 or equal head_dim."""
    value_group = group_size if value_group is None else value_group
    if bits not in (4, 8):
      raise ValueError(f"bits={bits}; accepted: 4, 8 (int2 and GEAR: policy 'kivi')")
    if group_size < 1 or capacity % group_size:
      raise ValueError(f"group_size={group_size} must divide capacity={capacity}")
    if head_dim % 2 or not decode_quant.value_group_fits(head_dim, bits, value_group):
      raise ValueError(f"value_group={value_group} must divide head_dim={head_dim}"
                       + (" / 2 or equal it (int4)" if bits == 4 else ""))
    if residual < 0 or max_chunk < 1:
      raise ValueError(f"residual={residual}, max_chunk={max_chunk}: need residual >= 0, max_chunk >= 1")
    b, c, h, d, packed = batch, capacity, kv_heads, head_dim, head_dim * bits // 8
    z = lambda *shape, dt=jnp.float16: jnp.zeros(shape, dt)
    store = QuantizedKV(z(b, c, h, packed, dt=jnp.int8), z(b, c // group_size, h, d),
                        z(b, c // group_size, h, d), z(b, h, packed, c, dt=jnp.int8),
                        z(b, h, d // value_group, c), z(b, h, d // value_group, c))
    ring = jnp.zeros((batch, residual + group_size + max_chunk, kv_heads, head_dim), dtype)
    return cls(store, ring, ring, jnp.zeros((batch,), jnp.int32), group_size, residual, max_chunk,
               int8_dots)

  @property
  def capacity(self) -> int:
    return self.store.capacity

  def quantized_len(self, lengths):
    """int32 [B]: positions [0, qb) are held quantised (whole groups older than `residual`)."""
    return kivi.quantized_len(lengths, self.residual, self.group_size)

  def update(self, k_new, v_new, *, q=None, num_new=None) -> "KIVIKernelCache":
    """Writes k_new, v_new [B, T, Hkv, D] (T <= max_chunk) into the ring, then quantises the key
    groups that left the residual window into the store (lcjax.cache.kivi's update)."""
    del q
    return kivi.update_ring_then_flush(self, k_new, v_new, num_new)

  def _flush_group(self, gi, active):
    """Quantises token group gi (int32 [B]) from the ring into the store where active (bool [B])."""
    g, f = self.group_size, self.k_fp.shape[1]
    s = self.store
    gi = jnp.clip(gi, 0, s.k_scale.shape[1] - 1)     # inactive rows may point past the end
    idx = (gi[:, None] * g + jnp.arange(g)[None]) % f
    take = lambda x: jnp.take_along_axis(x, idx[:, :, None, None], 1)        # [B, G, Hkv, D]
    part = decode_quant.quantize_kv(take(self.k_fp), take(self.v_fp), bits=s.bits, key_group=g,
                                    value_group=s.value_group, scale_dtype=s.k_scale.dtype)
    start = gi * g
    store = QuantizedKV(
        _write_at(s.k_codes, part.k_codes, start, 0, active),
        _write_at(s.k_scale, part.k_scale, gi, 0, active),
        _write_at(s.k_zero, part.k_zero, gi, 0, active),
        _write_at(s.v_codes, part.v_codes, start, 2, active),              # channel-major: tokens last
        _write_at(s.v_scale, part.v_scale, start, 2, active),
        _write_at(s.v_zero, part.v_zero, start, 2, active))
    return dataclasses.replace(self, store=store)

  def kernel_unsupported_reason(self, q) -> str | None:
    """Why the quantised decode kernel cannot read this store for q [B, T, Hq, D]; None if it can."""
    kv_heads = self.k_fp.shape[2]
    rows = q.shape[1] * q.shape[2] // kv_heads
    if rows > decode_backend.MAX_DECODE_ROWS:
      return f"T x (Hq / Hkv) = {rows} query rows per KV head > {decode_backend.MAX_DECODE_ROWS}"
    if q.shape[-1] % 16 or self.group_size % 16 or self.store.value_group < 16:
      return (f"head_dim {q.shape[-1]} and group_size {self.group_size} must be multiples of 16 and "
              f"value_group {self.store.value_group} >= 16")
    if self.int8_dots and q.dtype != jnp.float32 and q.shape[-1] > 256:
      return f"int8 dots need head_dim <= 256; got {q.shape[-1]}"
    return None

  def attend(self, q, *, scale: float | None = None, implementation: str = "auto"):
    """q [B, T, Hq, D]: the last T tokens written. Returns [B, T, Hq, D] in q.dtype."""
    b, t, hq, d = q.shape
    kv_heads = self.k_fp.shape[2]
    scale = d ** -0.5 if scale is None else scale
    qb = jnp.minimum(self.quantized_len(self.lengths), jnp.maximum(self.lengths - t, 0))
    if self.kernel_unsupported_reason(q) is not None:
      implementation = "xla"
    out_q, lse_q = decode_backend.quantized_decode_attend(
        _one_token_view(q, kv_heads), self.store, qb, scale=scale, return_lse=True,
        implementation=implementation, int8_mma=self.int8_dots)
    out_q, lse_q = _from_one_token_view(out_q, t, kv_heads), _from_one_token_view(lse_q, t, kv_heads)

    # The ring's slot s holds the latest position p < lengths with p % F == s.
    f = self.k_fp.shape[1]
    last = self.lengths[:, None] - 1
    slot_pos = last - (last - jnp.arange(f)[None]) % f                          # [B, F]
    visible = slot_visibility(slot_pos[:, None], (slot_pos >= qb[:, None])[:, None], q_heads=hq)
    score_mod = lambda s, bb, hh, q_pos, slot: jnp.where(visible(bb, hh, q_pos, slot), s, -jnp.inf)
    out_r, lse_r = attention_reference(q.astype(jnp.float32), self.k_fp.astype(jnp.float32),
                                       self.v_fp.astype(jnp.float32), score_mod=score_mod, scale=scale,
                                       q_offset=self.lengths - t, return_lse=True)

    # Log-sum-exp merge of the two parts (partials [B, Hq, 2, T, D], lse [B, Hq, 2, T]).
    parts = jnp.stack([out_q.astype(jnp.float32), out_r], 2)                  # [B, T, 2, Hq, D]
    out, _ = merge_splits(jnp.transpose(parts, (0, 3, 2, 1, 4)), jnp.stack([lse_q, lse_r], 2))
    out = jnp.transpose(out, (0, 2, 1, 3)).astype(q.dtype)
    return jnp.where((self.lengths > self.capacity)[:, None, None, None], jnp.nan, out)

  def logical_axes(self) -> "KIVIKernelCache":
    """This cache's structure with logical axis names in place of its arrays (lcjax.sharding):
    KV heads split as the decode kernel's shard_map splits them."""
    keys, values = ("batch", "cache_seq", "kv_heads", None), ("batch", "kv_heads", None, "cache_seq")
    return dataclasses.replace(self, store=QuantizedKV(keys, keys, keys, values, values, values),
                               k_fp=KV_AXES, v_fp=KV_AXES, lengths=("batch",))

  def memory_bytes(self) -> int:
    """Codes, scales and zeros of the store, the full-precision ring and the lengths."""
    return tree_bytes(self)
