"""KIVI-style quantized cache (int8 / int4 / int2), with an optional GEAR low-rank residual.

KIVI: Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache" (ICML 2024,
arXiv:2402.02750). Keys have outlier CHANNELS, so keys are quantized per channel (one scale/zero
per channel over a group of `group_size` tokens); values are quantized per token (one scale/zero
per `group_size` channels). The most recent tokens stay in full precision (a residual window),
because per-channel groups need `group_size` tokens before they can be quantized.

Rule here: tokens older than the last `residual` are quantized in whole groups of group_size
tokens (positions [0, qb) with qb = floor(max(len - residual, 0) / G) * G); the rest live in a
full-precision ring of residual + G + max_chunk slots.

GEAR: Kang et al., "GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless Generative
Inference of LLM" (arXiv:2403.05527). The quantization error of each group ([G tokens, D] per
head) is approximated by its best rank-`rank` factorisation (truncated SVD) and added back when
dequantizing. (GEAR's sparse outlier matrix is not implemented.)

Capacity: positions >= capacity cannot be stored. Sequences that overflow are flagged and their
attention output is NaN (never a silently wrong answer); check `lengths` against `capacity`
before generating (generate does).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lcjax.attention import attend, masks
from lcjax.cache import quant
from lcjax.cache.base import tree_bytes
from lcjax.cache.slots import resolve_num_new


def quantized_len(lengths, residual: int, group_size: int):
  """int32 [B]: KIVI holds positions [0, qb) quantised, qb = whole groups older than `residual`."""
  return jnp.maximum(lengths - residual, 0) // group_size * group_size


def update_ring_then_flush(cache, k_new, v_new, num_new):
  """The update of a KIVI cache (KIVIKVCache, KIVIKernelCache): writes k_new, v_new [B, T, Hkv, D]
  (T <= max_chunk) into the full-precision ring k_fp, v_fp (slot = position % ring size), then
  `cache._flush_group(gi, active)` quantises each token group that left the residual window."""
  t = k_new.shape[1]
  if t > cache.max_chunk:
    raise ValueError(f"update of {t} tokens exceeds max_chunk={cache.max_chunk}; create the cache "
                     "with max_chunk >= the prefill chunk")
  num_new = resolve_num_new(cache.lengths, t, num_new)
  f, g, b = cache.k_fp.shape[1], cache.group_size, k_new.shape[0]
  p = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
  slot = jnp.where(jnp.arange(t)[None] < num_new[:, None], p % f, f)       # f: dropped
  rows = jnp.arange(b)[:, None]
  k_fp = cache.k_fp.at[rows, slot].set(k_new.astype(cache.k_fp.dtype), mode="drop")
  v_fp = cache.v_fp.at[rows, slot].set(v_new.astype(cache.v_fp.dtype), mode="drop")
  new = dataclasses.replace(cache, k_fp=k_fp, v_fp=v_fp, lengths=cache.lengths + num_new)
  first, last = cache.quantized_len(cache.lengths) // g, cache.quantized_len(new.lengths) // g
  for j in range(-(-cache.max_chunk // g) + 1):      # groups that may complete in one update
    new = new._flush_group(first + j, first + j < last)
  return new


def low_rank(err, rank: int):
  """Best rank-r factors of err [..., G, D] (float32): (a [..., G, r], b [..., D, r]), err ~ a b^T."""
  u, s, vt = jnp.linalg.svd(err, full_matrices=False)
  return u[..., :rank] * s[..., None, :rank], jnp.swapaxes(vt[..., :rank, :], -1, -2)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["kq", "k_scale", "k_zero", "vq", "v_scale", "v_zero", "k_fp", "v_fp",
                                "k_lr", "v_lr", "lengths"],
                   meta_fields=["bits", "group_size", "residual", "max_chunk", "rank"])
@dataclasses.dataclass(frozen=True)
class KIVIKVCache:
  """kq, vq: uint8 [B, C, Hkv, D*bits/8] packed codes (rows < qb are meaningful);
  k_scale, k_zero: [B, C/G, Hkv, D] (per channel per token group); v_scale, v_zero: [B, C, Hkv, D/G];
  k_fp, v_fp: [B, F, Hkv, D] full-precision ring (slot = position % F);
  k_lr, v_lr: GEAR factors ((a [B, C, Hkv, r], b [B, C/G, Hkv, D, r]) or None when rank=0)."""
  kq: jax.Array
  k_scale: jax.Array
  k_zero: jax.Array
  vq: jax.Array
  v_scale: jax.Array
  v_zero: jax.Array
  k_fp: jax.Array
  v_fp: jax.Array
  k_lr: tuple | None
  v_lr: tuple | None
  lengths: jax.Array
  bits: int
  group_size: int
  residual: int
  max_chunk: int
  rank: int

  @classmethod
  def create(cls, batch: int, capacity: int, kv_heads: int, head_dim: int, *, bits: int = 8,
             group_size: int = 32, residual: int = 32, max_chunk: int = 1, rank: int = 0,
             dtype=jnp.float32, scale_dtype=jnp.float16) -> "KIVIKVCache":
    quant.check_bits(bits)
    if capacity % group_size or head_dim % group_size:
      raise ValueError(f"group_size={group_size} must divide capacity={capacity} and head_dim={head_dim}")
    if residual < 0 or max_chunk < 1 or not 0 <= rank <= min(group_size, head_dim):
      raise ValueError(f"residual={residual}, max_chunk={max_chunk}, rank={rank}: need residual >= 0, "
                       f"max_chunk >= 1, 0 <= rank <= min(group_size, head_dim)")
    b, c, h, d, g = batch, capacity, kv_heads, head_dim, group_size
    z = lambda *s, dt=scale_dtype: jnp.zeros(s, dt)
    fp = residual + g + max_chunk
    lr = lambda: (z(b, c, h, rank, dt=dtype), z(b, c // g, h, d, rank, dt=dtype)) if rank else None
    return cls(z(b, c, h, d * bits // 8, dt=jnp.uint8), z(b, c // g, h, d), z(b, c // g, h, d),
               z(b, c, h, d * bits // 8, dt=jnp.uint8), z(b, c, h, d // g), z(b, c, h, d // g),
               z(b, fp, h, d, dt=dtype), z(b, fp, h, d, dt=dtype), lr(), lr(),
               jnp.zeros((b,), jnp.int32), bits, group_size, residual, max_chunk, rank)

  @property
  def capacity(self) -> int:
    return self.kq.shape[1]

  def quantized_len(self, lengths):
    """int32 [B]: positions [0, qb) are held quantized."""
    return quantized_len(lengths, self.residual, self.group_size)

  def update(self, k_new, v_new, *, q=None, num_new=None) -> "KIVIKVCache":
    del q
    return update_ring_then_flush(self, k_new, v_new, num_new)

  def _flush_group(self, gi, active):
    """Quantizes token group gi (int32 [B]) from the ring into the store where active (bool [B])."""
    g, f = self.group_size, self.k_fp.shape[1]
    ng = self.k_scale.shape[1]
    gi = jnp.clip(gi, 0, ng - 1)        # inactive rows may point past the end; they write nothing
    idx = (gi[:, None] * g + jnp.arange(g)[None]) % f
    kg = jnp.take_along_axis(self.k_fp, idx[:, :, None, None], 1).astype(jnp.float32)   # [B, G, H, D]
    vg = jnp.take_along_axis(self.v_fp, idx[:, :, None, None], 1).astype(jnp.float32)
    kc, ks, kz = quant.quantize(kg, self.bits, 1, self.k_scale.dtype)        # per channel over G tokens
    vc, vs, vz = quant.quantize_channel_groups(vg, self.bits, g, self.v_scale.dtype)   # per token
    upd = {}

    def put(buf, x, row):
      x = x.astype(buf.dtype)
      old = jax.vmap(lambda bb, r: jax.lax.dynamic_slice_in_dim(bb, r, x.shape[1], 0))(buf, row)
      x = jnp.where(active.reshape((-1,) + (1,) * (x.ndim - 1)), x, old)
      return jax.vmap(lambda bb, xx, r: jax.lax.dynamic_update_slice_in_dim(bb, xx, r, 0))(buf, x, row)

    upd["kq"] = put(self.kq, quant.pack(kc, self.bits), gi * g)
    upd["k_scale"] = put(self.k_scale, ks, gi)
    upd["k_zero"] = put(self.k_zero, kz, gi)
    upd["vq"] = put(self.vq, quant.pack(vc, self.bits), gi * g)
    upd["v_scale"] = put(self.v_scale, vs, gi * g)
    upd["v_zero"] = put(self.v_zero, vz, gi * g)
    if self.rank:
      deqs = {"k_lr": (kg, quant.dequantize(kc, ks, kz)),
              "v_lr": (vg, quant.dequantize_channel_groups(vc, vs, vz))}
      for name, (x, deq) in deqs.items():
        a, bfac = low_rank(jnp.moveaxis(x - deq, 2, 1), self.rank)      # [B, H, G, r], [B, H, D, r]
        old_a, old_b = getattr(self, name)
        upd[name] = (put(old_a, jnp.moveaxis(a, 1, 2), gi * g),
                     put(old_b, bfac[:, None], gi))
    return dataclasses.replace(self, **upd)

  def dequantized(self, q_len: int = 0):
    """(k, v) float32 [B, C, Hkv, D]: what attention reads: dequantized codes below
    qb = quantized_len(lengths), the full-precision ring above. With q_len, the last q_len tokens
    (the chunk being attended) are read from the ring even if already quantized: the paper computes
    a chunk's attention before quantizing it."""
    g = self.group_size
    k = quant.dequantize(quant.unpack(self.kq, self.bits), jnp.repeat(self.k_scale, g, 1),
                         jnp.repeat(self.k_zero, g, 1))
    v = quant.dequantize_channel_groups(quant.unpack(self.vq, self.bits), self.v_scale, self.v_zero)
    if self.rank:
      for name in ("k_lr", "v_lr"):
        a, bfac = getattr(self, name)
        corr = jnp.einsum("bchr,bchdr->bchd", a.astype(jnp.float32),
                          jnp.repeat(bfac, g, 1).astype(jnp.float32))
        k, v = (k + corr, v) if name == "k_lr" else (k, v + corr)
    pos = jnp.arange(self.capacity)
    ring = lambda x: jnp.take(x, pos % x.shape[1], axis=1).astype(jnp.float32)
    qb = jnp.minimum(self.quantized_len(self.lengths), self.lengths - q_len)
    quantized = (pos[None, :] < qb[:, None])[..., None, None]
    return jnp.where(quantized, k, ring(self.k_fp)), jnp.where(quantized, v, ring(self.v_fp))

  def attend(self, q, *, scale: float | None = None, implementation: str = "xla"):
    # KERNEL HOOK: a quantized decode kernel would read codes + scales and dequantize in-register.
    k, v = self.dequantized(q.shape[1])
    out = attend(q, k.astype(q.dtype), v.astype(q.dtype), mask=masks.causal(), scale=scale,
                 q_offset=self.lengths - q.shape[1], kv_valid_len=self.lengths, implementation=implementation)
    return jnp.where((self.lengths > self.capacity)[:, None, None, None], jnp.nan, out)

  def memory_bytes(self) -> int:
    """Every array the compressed representation needs: packed codes, scales, zeros, the
    full-precision ring and the GEAR factors."""
    return tree_bytes(self)
