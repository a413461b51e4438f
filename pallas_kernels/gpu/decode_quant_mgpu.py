"""int8 / int4 KV-cache decode on Hopper in Pallas Mosaic GPU, with the scores computed transposed.

The Triton kernel (decode_quant.py) computes the score tile as [16 query rows, 128 keys]: Triton
dots need every dimension >= 16, and a decode step has only q_len * group real rows (4 at GQA 4),
so three quarters of the element-wise softmax work is padding. Here the keys are the rows:

  S^T [128 keys, 8] = K_codes [128 keys, D] . Q_op^T [D, 8]         (int8 wgmma, int32 accumulator)
  O_j^T [64 channels, 8] += V_codes_j [64 channels, 128 keys] . P_g^T [128 keys, 8]

wgmma takes N = 8 columns (the packed query rows, q_len * group <= 8), so a warpgroup holds 8 score
elements per thread per 128-key tile. Both cache tiles go by TMA into shared memory: the key codes
are token-major (D contiguous) and the value codes channel-major (tokens contiguous), which is
the K-major layout int8 wgmma needs for A. int8 tiles are the A operands as they lie; int4 tiles
(D = 128: byte j holds channel j in its low nibble and j + 64 in its high one) are loaded into
registers in wgmma's A-fragment layout (WGMMA_8BIT) and unpacked there to 16 * nibble, one or two
32-bit instructions per four bytes, giving the two 64-channel halves as register A operands:

  S^T = K_lo . Q_lo^T + K_hi . Q_hi^T      (Q_lo, Q_hi: the query operand's channel halves)
  O_lo^T += V_lo . P_g^T,  O_hi^T += V_hi . P_g'^T

and the factor 16 goes into the scales. Only P^T goes through shared memory, written by the threads.

Numerics are those of the Triton kernel's int8 path (decode_quant.quantized_decode_attention with
int8_mma=True): the key scales are folded into the queries once per tile inside the kernel
(q * k_scale quantised to int8 per row, written to shared memory as the B operand), p = exp2(s - tile max) is quantised with the value
scales folded in, p * vs / max(vs over the tile) * 127, and the tile's factor exp2(tile max - m)
is applied to the int32 product. The softmax sums l and p . v_zero are kept as per-thread partials
(rescaled by alpha every tile, reduced over keys once at the end), so the per-tile cross-warp
reductions are only the maxima (scores per column, value scales per group).

Shapes: q [B, T, Hq, D] bf16 / f16, T * Hq / Hkv <= 8; a QuantizedKV with 8-bit codes at D 64
or 128 or 4-bit codes at D 128, key_group a multiple of 128, value_group a multiple of 64 dividing
D, capacity a multiple of 128. Mosaic GPU's interpreter cannot run wgmma kernels, so the kernel is tested on the GPU
(tests/test_pallas_decode_gpu.py); CPU CI checks that it lowers for an H100
(tests/test_pallas_decode.py).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith

from pallas_kernels.gpu.decode import (NUM_SMS, merge_splits, pack_queries, split_range,
                                       unpack_rows, validate_decode_args)
from pallas_kernels.gpu.decode_quant import QuantizedKV

BLOCK_K = 128    # keys per tile: two 64-row wgmma groups
COLS = 8         # wgmma N: the packed query rows, zero-padded
M_GROUP = 64     # wgmma M
_LOG2E = math.log2(math.e)


def config_reason(q_shape, kv: QuantizedKV, block_k: int | None = None) -> str | None:
  """None when this kernel takes the call (device aside) with tiles of block_k keys (None: the
  default, default_block_k), else why not."""
  _, q_len, q_heads, head_dim = q_shape
  kv_heads = kv.k_codes.shape[2]
  if kv.bits == 8 and head_dim not in (64, 128):
    return f"head_dim {head_dim}; the Mosaic GPU kernel takes 64 or 128 with int8 codes"
  if kv.bits == 4 and head_dim != 2 * M_GROUP:
    return f"head_dim {head_dim}; the Mosaic GPU kernel takes {2 * M_GROUP} with int4 codes (a nibble half per wgmma)"
  if q_len * (q_heads // kv_heads) > COLS:
    return f"q_len * group = {q_len * (q_heads // kv_heads)} query rows per KV head; at most {COLS}"
  if kv.key_group % BLOCK_K or kv.capacity % BLOCK_K:
    return f"key_group {kv.key_group} and capacity {kv.capacity} must be multiples of {BLOCK_K}"
  if kv.value_group % M_GROUP or head_dim % kv.value_group:
    return f"value_group {kv.value_group} must be a multiple of {M_GROUP} dividing head_dim {head_dim}"
  block_k = block_k or default_block_k(kv.bits)
  if block_k not in (BLOCK_K, 2 * BLOCK_K):
    return f"block_k {block_k}; the Mosaic GPU kernel takes {BLOCK_K} or {2 * BLOCK_K}"
  if kv.capacity % block_k or (kv.key_group % block_k and kv.key_group != BLOCK_K):
    return (f"block_k {block_k} must divide the capacity {kv.capacity} and the key_group "
            f"{kv.key_group} (or the key_group be {BLOCK_K})")
  return None


def default_block_k(bits: int) -> int:
  """Keys per tile: 128 for int8, 256 for int4 (the same bytes per tile; see BENCHMARKS.md run 14)."""
  return 128 if bits == 8 else 256


def supports(q, kv: QuantizedKV, block_k: int | None = None) -> bool:
  """Whether this kernel serves the call: a Hopper GPU, 16-bit queries, config_reason None."""
  if jax.default_backend() != "gpu":
    return False
  try:
    if "9.0" not in getattr(jax.devices()[0], "compute_capability", ""):
      return False
  except Exception:  # pylint: disable=broad-except
    return False
  return q.dtype in (jnp.bfloat16, jnp.float16) and config_reason(q.shape, kv, block_k) is None


def _smem_tile(shape, dtype, row_bytes: int):
  """A shared-memory tile the wgmma reads: (8, row) tiles, swizzled by the row's bytes."""
  elems = row_bytes // jnp.dtype(dtype).itemsize
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, elems)),
                                              plgpu.SwizzleTransform(row_bytes)))


def _fold_layouts(width: int):
  """The layout of a [COLS, width] part of the query fold (width = D, or D / 2 for int4's nibble
  halves): warp w holds rows 2w, 2w + 1, each row spread over 16 lanes (width / 16 channels per
  lane), so its reductions over channels are shuffles within a warp; and the layout of its
  [width] (per channel) vectors."""
  fold = plgpu.Layout.TILED(plgpu.Tiling(((COLS, width), (2, width), (width // 16,))),
                            warp_dims=(-5,), lane_dims=(-3, -2), vector_dim=-1)
  return fold, fold.reduce(0)


_HIGH_NIBBLES = 0xF0F0F0F0 - (1 << 32)    # as a signed int32


def _nibbles_times16(packed, part: int):
  """int8 packed nibbles [M, K] in the WGMMA_8BIT layout -> int8 16 * (signed nibble of `part`):
  a byte (hi, lo) is, as int8, 16 * hi + lo, so byte & 0xF0 = 16 * hi and byte << 4 = 16 * lo
  exactly; done on each thread's 32-bit registers (four bytes) at once."""
  layout = plgpu.Layout.WGMMA_8BIT

  @plgpu.inline_mgpu(arg_types=(layout,),
                     return_type=plgpu.ShapeDtypeStruct(packed.shape, jnp.int8, layout=layout))
  def unpack(_, x):
    i32 = ir.IntegerType.get_signless(32)
    regs = np.empty_like(x.registers)
    for idx, reg in np.ndenumerate(x.registers):
      word = mgpu.utils.bitcast(reg, i32)
      if part == 0:
        word = arith.shli(word, mgpu.utils.c(4, i32))
      regs[idx] = mgpu.utils.bitcast(arith.andi(word, mgpu.utils.c(_HIGH_NIBBLES, i32)), reg.type)
    return mgpu.FragmentedArray(_registers=regs, _layout=x.layout, _is_signed=True)
  return unpack(packed)


def _kernel(len_ref, q_ref, ks_ref, kz_ref, kc_ref, vc_ref, vs_ref, vz_ref, o_ref, lse_ref, smem, bars, *,
            scale, n, group, q_len, num_splits, stages, tile_k, key_group, value_group, head_dim, bits):
  split, h, b = lax.axis_index("split"), lax.axis_index("head"), lax.axis_index("batch")
  q_sm, qsb_sm, ks_sm, kz_sm, k_sm, v_sm, vs_sm, vz_sm = smem
  q_bar, bars = bars[0], bars[1:]
  length = len_ref[b]
  total = jnp.minimum((length + tile_k - 1) // tile_k, kc_ref.shape[1] // tile_k)
  lo, hi = split_range(total, num_splits, split)
  groups = head_dim // value_group
  parts = 8 // bits                       # nibble halves per byte
  width = head_dim // parts               # channels per part = bytes per row
  code_unit = 1.0 if bits == 8 else 1 / 16     # int4 operands are 16 * code
  chunks = tile_k // BLOCK_K              # score wgmmas per tile, one per 128 keys
  key_groups = ks_sm.shape[1]             # key groups per tile (each folds the queries once)
  chunk_group = lambda c: c * BLOCK_K // key_group     # the tile's key group holding chunk c
  shape = (BLOCK_K, COLS)
  wgmma_layout = plgpu.Layout.WGMMA
  col_layout = wgmma_layout.reduce(0)     # [COLS] vectors, one value per query column
  row_layout = wgmma_layout.reduce(1)     # [BLOCK_K] vectors, one value per key
  # [BLOCK_K] vectors held whole by every warp (4 per lane): their maximum needs only shuffles.
  warp_layout = plgpu.Layout.TILED(plgpu.Tiling(((BLOCK_K,), (4,))), warp_dims=(plgpu.Replicated(4),),
                                   lane_dims=(-2,), vector_dim=-1)
  fold_layout, channel_layout = _fold_layouts(width)
  cols = lambda x: lax.broadcast_in_dim(x, shape, [1])
  rows = lambda x: lax.broadcast_in_dim(x, shape, [0])
  chunk_keys = lambda c: pl.ds(c * BLOCK_K, BLOCK_K)

  def issue(tile, slot):
    start = tile * tile_k
    g = pl.ds(start // key_group, key_groups)
    plgpu.copy_gmem_to_smem(ks_ref.at[b, g, h], ks_sm.at[slot], bars[0].at[slot])
    plgpu.copy_gmem_to_smem(kz_ref.at[b, g, h], kz_sm.at[slot], bars[1].at[slot])
    plgpu.copy_gmem_to_smem(kc_ref.at[b, pl.ds(start, tile_k), h], k_sm.at[slot], bars[2].at[slot])
    keys = pl.ds(start, tile_k)
    plgpu.copy_gmem_to_smem(vc_ref.at[b, h, :, keys], v_sm.at[slot], bars[3].at[slot])
    plgpu.copy_gmem_to_smem(vs_ref.at[b, h, :, keys], vs_sm.at[slot], bars[4].at[slot])
    plgpu.copy_gmem_to_smem(vz_ref.at[b, h, :, keys], vz_sm.at[slot], bars[5].at[slot])

  def load_queries(q_in_sm):             # a scope of its own: its shared memory is reused below
    plgpu.copy_gmem_to_smem(q_ref.at[b, h], q_in_sm, q_bar)
    for i in range(stages):
      pl.when(lo + i < hi)(functools.partial(issue, lo + i, i))
    plgpu.barrier_wait(q_bar)
    return [plgpu.load(q_in_sm.at[:, part_cols(p)], layout=fold_layout) for p in range(parts)]
  part_cols = lambda p: pl.ds(p * width, width)
  q = [x.astype(jnp.float32) * (scale * _LOG2E)                     # base 2, [COLS, width] each
       for x in pl.run_scoped(load_queries, plgpu.SMEM((COLS, head_dim), q_ref.dtype))]

  def fold_query(slot):
    """q . k = (q * ks) . code + q . kz per key group: writes the int8 operand round(q * ks /
    row scale) to q_sm (one [COLS, width] part per nibble half) and the row scale and bias to
    qsb_sm, for each key group of the tile (SageAttention-style int8 queries)."""
    channel = lambda ref: plgpu.layout_cast(
        lax.broadcast_in_dim(plgpu.load(ref, layout=channel_layout).astype(jnp.float32), q[0].shape, [1]),
        fold_layout)
    for i in range(key_groups):
      qk = [qp * channel(ks_sm.at[slot, i, part_cols(p)]) for p, qp in enumerate(q)]
      amax = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(x), axis=1) for x in qk])
      inv_scale = plgpu.layout_cast(
          lax.broadcast_in_dim(jnp.where(amax > 0, 127.0 / amax, 0.0), q[0].shape, [0]), fold_layout)
      for p, x in enumerate(qk):
        x = x * inv_scale
        q_sm[i, p] = jnp.where(x >= 0, x + 0.5, x - 0.5).astype(jnp.int8)      # round half away
      qsb_sm[i, 0, :] = amax * (code_unit / 127.0)
      qsb_sm[i, 1, :] = functools.reduce(
          jnp.add, [jnp.sum(qp * channel(kz_sm.at[slot, i, part_cols(p)]), axis=1) for p, qp in enumerate(q)])
    plgpu.commit_smem()                  # the operand visible to the tensor cores, the vectors to all

  col_ids = plgpu.broadcasted_iota(jnp.int32, (COLS,), 0, layout=col_layout)
  q_pos = jnp.where(col_ids < n, length - q_len + col_ids // group, -1)   # padding columns: -1

  # One loop body for every tile, the causal / length mask always applied: a second, unmasked copy
  # of the body cost 16-24 registers (ptxas allocates for the larger loop).
  def body(p_sm, tile, carry):
    acc, m, l_part, corr_part = carry
    slot = lax.rem(tile - lo, stages)
    start = tile * tile_k
    key = lambda c, layout: start + c * BLOCK_K + plgpu.broadcasted_iota(jnp.int32, (BLOCK_K,), 0, layout=layout)
    for bar in bars:
      plgpu.barrier_wait(bar.at[slot])
    fold_query(slot)

    def scores(acc_refs):
      for c, acc_ref in enumerate(acc_refs):
        operand = lambda p: q_sm.at[chunk_group(c), p].T
        if bits == 8:
          plgpu.wgmma(acc_ref, k_sm.at[slot, chunk_keys(c)], operand(0))
        else:
          packed = plgpu.load(k_sm.at[slot, chunk_keys(c)], layout=plgpu.Layout.WGMMA_8BIT)
          for p in range(parts):
            plgpu.wgmma(acc_ref, _nibbles_times16(packed, p), operand(p))
          if c + 1 < chunks:  # register operands: one chunk's unpacked nibbles live at a time
            plgpu.wgmma_wait(0)
      return [acc_ref[...] for acc_ref in acc_refs]
    s_int = pl.run_scoped(scores, [plgpu.ACC(shape, jnp.int32)] * chunks)
    s = []
    for c, x in enumerate(s_int):
      q_scale = plgpu.load(qsb_sm.at[chunk_group(c), 0], layout=col_layout)
      q_bias = plgpu.load(qsb_sm.at[chunk_group(c), 1], layout=col_layout)
      x = x.astype(jnp.float32) * cols(q_scale) + cols(q_bias)           # base-2 logits
      s.append(jnp.where(rows(key(c, row_layout)) <= cols(q_pos), x, -jnp.inf))
    tile_max = functools.reduce(jnp.maximum, [x.max(axis=0) for x in s])
    m_new = jnp.maximum(m, tile_max)
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)                  # columns that saw nothing yet
    alpha = jnp.exp2(m - m_safe)
    t_safe = jnp.where(tile_max == -jnp.inf, 0.0, tile_max)
    # p = exp2(s - tile max) has a column maximum of 1, so a fixed int8 scale gives every column
    # the full range; the column's factor exp2(tile max - m) goes onto the tile's products.
    tile_factor = jnp.where(tile_max == -jnp.inf, 0.0, jnp.exp2(t_safe - m_safe))
    half = lambda x: x[:M_GROUP] + x[M_GROUP:]          # [64, COLS] partials: rows r and r + 64 summed
    alpha_half = lax.broadcast_in_dim(alpha, (M_GROUP, COLS), [1])
    written = lambda x, c, layout: jnp.where(key(c, layout) < length, x, 0.0)
    # slots past the length may hold anything: keep them out of vmax and p . vz
    v_max = []
    for g in range(groups):
      w = [written(plgpu.load(vs_sm.at[slot, g, chunk_keys(c)], layout=warp_layout).astype(jnp.float32), c,
                   warp_layout).max(axis=0) for c in range(chunks)]
      v_max.append(jnp.maximum(functools.reduce(jnp.maximum, w), 1e-30))              # a scalar
    l_part = l_part * alpha_half
    corr_part = [x * alpha_half for x in corr_part]
    for c in range(chunks):
      p = jnp.exp2(s[c] - cols(t_safe))                                 # 0 where masked
      p_f = p * cols(tile_factor)
      l_part = l_part + half(p_f)
      for g in range(groups):
        vs = written(plgpu.load(vs_sm.at[slot, g, chunk_keys(c)], layout=row_layout).astype(jnp.float32), c, row_layout)
        vz = written(plgpu.load(vz_sm.at[slot, g, chunk_keys(c)], layout=row_layout).astype(jnp.float32), c, row_layout)
        corr_part[g] = corr_part[g] + half(p_f * rows(vz))
        p_q = plgpu.layout_cast(p * rows(vs) * (127.0 / v_max[g]) + 0.5, plgpu.Layout.WGMMA_TRANSPOSED)
        p_sm.at[g, :, chunk_keys(c)].T[...] = p_q.astype(jnp.int8)
    units = [vm * (code_unit / 127.0) * tile_factor for vm in v_max]
    new_corr = corr_part
    plgpu.commit_smem()                  # P^T visible to the tensor cores

    # The value codes are read after the barrier above: wgmma is issued by the whole warpgroup
    # with register A operands from all four warps, so its completion (waited for before the
    # slot's refill is issued) follows every warp's reads of the slot.
    def values(acc_refs):
      for c in range(chunks):
        if bits == 4:
          packed_v = plgpu.load(v_sm.at[slot, :, chunk_keys(c)], layout=plgpu.Layout.WGMMA_8BIT)
        for j, acc_ref in enumerate(acc_refs):          # 64 output channels each
          codes = (v_sm.at[slot, pl.ds(j * M_GROUP, M_GROUP), chunk_keys(c)] if bits == 8
                   else _nibbles_times16(packed_v, j))
          plgpu.wgmma(acc_ref, codes, p_sm.at[j * M_GROUP // value_group, :, chunk_keys(c)].T)
        if c + 1 < chunks:
          plgpu.wgmma_wait(0)
      return [acc_ref[...] for acc_ref in acc_refs]
    o_int = pl.run_scoped(values, [plgpu.ACC((M_GROUP, COLS), jnp.int32)] * len(acc))
    acc = [a * lax.broadcast_in_dim(alpha, a.shape, [1])
           + o.astype(jnp.float32) * lax.broadcast_in_dim(units[j * M_GROUP // value_group], a.shape, [1])
           for j, (a, o) in enumerate(zip(acc, o_int))]

    @pl.when(tile + stages < hi)
    def _next():
      issue(tile + stages, slot)
    return acc, m_new, l_part, new_corr

  zeros = lambda s: plgpu.layout_cast(jnp.full(s, 0, jnp.float32), wgmma_layout)
  carry = ([zeros((M_GROUP, COLS)) for _ in range(head_dim // M_GROUP)],
           plgpu.layout_cast(jnp.full((COLS,), -jnp.inf, jnp.float32), col_layout),
           zeros((M_GROUP, COLS)), [zeros((M_GROUP, COLS)) for _ in range(groups)])
  # P_g in a scope after the queries' one, so the two share shared memory.
  acc, m, l_part, corr_part = pl.run_scoped(
      lambda p_sm: lax.fori_loop(lo, hi, functools.partial(body, p_sm), carry),
      _smem_tile((groups, COLS, tile_k), jnp.int8, BLOCK_K))
  l = l_part.sum(axis=0)
  nonempty = l > 0
  inv_l = 1.0 / jnp.where(nonempty, l, 1.0)
  corr = [c.sum(axis=0) for c in corr_part]
  for j, a in enumerate(acc):
    o = (a + lax.broadcast_in_dim(corr[j * M_GROUP // value_group], a.shape, [1])) \
        * lax.broadcast_in_dim(inv_l, a.shape, [1])
    o_ref.at[b, h, split, pl.ds(j * M_GROUP, M_GROUP)][...] = o       # straight from registers
  lse_ref.at[b, h, split][...] = jnp.where(nonempty, m * math.log(2.0) + jnp.log(jnp.where(nonempty, l, 1.0)),
                                           -jnp.inf)


def default_num_splits(batch: int, kv_heads: int, num_tiles: int) -> int:
  """Two programs per SM, one full wave (int8: 4 splits at B8 Hkv8, 153 us at 32k against 158-179
  us for 6, 8 or 12 splits, BENCHMARKS.md run 13; int4 on 256-key tiles: 109 us against 119-140
  for 3, 6 or 8, run 14; run 16's kernel: int8 ties at 4 and 6, int4 126 us at 4 against 128-132
  at 6)."""
  return int(max(1, min(2 * NUM_SMS // (batch * kv_heads), num_tiles)))


@functools.partial(jax.jit, static_argnames=("scale", "block_k", "num_splits", "stages", "return_lse"))
def quantized_decode_attention(q, kv: QuantizedKV, lengths, *, scale: float | None = None,
                               block_k: int | None = None, num_splits: int | None = None,
                               stages: int = 2, return_lse: bool = False):
  """Decode attention of q [B, T, Hq, D] (bf16 / f16) over an int8 or int4 QuantizedKV cache.

  Same contract and numerics as decode_quant.quantized_decode_attention(..., int8_mma=True);
  config_reason says which shapes it takes. block_k: keys per tile, 128 or 256 (default
  default_block_k); stages: cache tiles in flight per program.
  Returns out [B, T, Hq, D] in q.dtype (and with return_lse the float32 lse [B, Hq, T]).
  """
  batch, q_len, q_heads, head_dim = q.shape
  kv_heads, capacity = kv.k_codes.shape[2], kv.capacity
  validate_decode_args(q, jax.ShapeDtypeStruct((batch, capacity, kv_heads, head_dim), q.dtype),
                       jax.ShapeDtypeStruct((batch, capacity, kv_heads, head_dim), q.dtype), lengths)
  if (reason := config_reason(q.shape, kv, block_k)) is not None:
    raise ValueError(f"the Mosaic GPU quantised decode kernel does not take this call: {reason}")
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"q must be bfloat16 or float16 for the Mosaic GPU quantised kernel; got {q.dtype}")
  scale = head_dim ** -0.5 if scale is None else scale
  group = q_heads // kv_heads
  n = q_len * group
  qp = pack_queries(q, kv_heads)[0][:, :, :COLS]                      # [B, Hkv, 8, D]
  block_k = block_k or default_block_k(kv.bits)
  splits = num_splits or default_num_splits(batch, kv_heads, capacity // block_k)
  groups = head_dim // kv.value_group
  key_groups = max(1, block_k // kv.key_group)                         # per tile
  kernel = functools.partial(_kernel, scale=scale, n=n, group=group, q_len=q_len, num_splits=splits,
                             stages=stages, tile_k=block_k, key_group=kv.key_group,
                             value_group=kv.value_group, head_dim=head_dim, bits=kv.bits)
  width = kv.k_codes.shape[-1]                                         # bytes per cache row

  def entry(*refs):
    smem = (_smem_tile((key_groups, head_dim // width, COLS, width), jnp.int8, width),   # query operands
            plgpu.SMEM((key_groups, 2, COLS), jnp.float32),                    # their scale, bias
            plgpu.SMEM((stages, key_groups, head_dim), jnp.float16),           # key scales
            plgpu.SMEM((stages, key_groups, head_dim), jnp.float16),           # key zeros
            _smem_tile((stages, block_k, width), jnp.int8, width),             # key codes
            _smem_tile((stages, width, block_k), jnp.int8, BLOCK_K),           # value codes
            plgpu.SMEM((stages, groups, block_k), jnp.float16),                # value scales
            plgpu.SMEM((stages, groups, block_k), jnp.float16))                # value zeros
    bars = (plgpu.Barrier(), *(plgpu.Barrier(num_barriers=stages) for _ in range(6)))
    pl.run_scoped(lambda smem, bars: kernel(*refs, smem, bars), smem, bars)

  o, lse = plgpu.kernel(
      entry,
      out_type=[jax.ShapeDtypeStruct((batch, kv_heads, splits, head_dim, COLS), jnp.float32),
                jax.ShapeDtypeStruct((batch, kv_heads, splits, COLS), jnp.float32)],
      grid=(splits, kv_heads, batch),
      grid_names=("split", "head", "batch"),
      kernel_name=f"lcjax_int{kv.bits}_decode_mosaic",
      # No automatic barriers: the one after the P^T stores (commit_smem) also orders every read
      # of a slot before the copies that refill it, and the reductions bring their own.
      compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=1024,   # cross-warp maxima need 128 B; 2 KiB cost a third program per SM
                                           unsafe_no_auto_barriers=True,
                                           lowering_semantics=plgpu.LoweringSemantics.Lane),
  )(lengths.astype(jnp.int32), qp, kv.k_scale.astype(jnp.float16), kv.k_zero.astype(jnp.float16), kv.k_codes, kv.v_codes,
    kv.v_scale.astype(jnp.float16), kv.v_zero.astype(jnp.float16))
  out, lse = merge_splits(jnp.swapaxes(o[..., :n], -1, -2), lse[..., :n])
  out = unpack_rows(out, q_len, q_heads).astype(q.dtype)
  if return_lse:
    return out, jnp.moveaxis(unpack_rows(lse, q_len, q_heads), 1, 2)
  return out
