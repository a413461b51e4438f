"""Block-sparse flash attention for Hopper, forward and backward, in Pallas Mosaic GPU.

FlashAttention-3's shape (the idioms of jax/experimental/pallas/ops/gpu/attention_mgpu.py): a CTA
owns one 128-row query block, split over two compute warpgroups of 64 rows that issue warpgroup
MMAs (wgmma) on swizzled shared memory, and a third, memory warpgroup that streams the key/value
blocks of the query block's list into a ring of shared-memory slots with TMA, one barrier per
slot for "loaded" and one for "consumed". A schedule barrier staggers the two compute warpgroups
so that one's softmax overlaps the other's matrix products.

Block sparsity: the memory warpgroup reads the key-block index of each step from the table in
global memory. The tables are reordered so that the fully visible blocks come first: the compute
warpgroups run those with no element mask and the rest with `mask_fn` and the key-length bound.

The backward (FlashAttention-2's split) is a dQ kernel shaped like the forward and a dK/dV kernel
whose CTA owns a 128-key block and streams the 64-row halves of the query blocks in the
transposed lists (q_indices); both reuse the same full-blocks-first ordering.

Shapes: q [B, Tq, Hq, D], k and v [B, Tk, Hkv, D], Tq and Tk multiples of 128 (the caller pads),
D 64 or 128, bf16 or fp16; tables as in block_sparse_attention.py with block_q = block_kv = 128.
The forward returns out [B, Tq, Hq, D] and lse float32 [B, Hq, Tq] (natural log, -inf for empty
rows). Mosaic GPU's CPU interpreter (InterpretGPUParams, JAX 0.11.2) cannot run these kernels
("Cannot lower jaxpr with effects: _WGMMAPipelineEffect"), so they are tested on the GPU only
(tests/test_pallas_prefill_gpu.py); the CPU tests cover the Triton-lowered family.
"""

from __future__ import annotations

import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from pallas_kernels.gpu import block_sparse_attention as bsa

BLOCK_Q = 128            # rows per CTA (= the layout's block_q), 64 per compute warpgroup
BLOCK_KV = 128           # keys per step (= the layout's block_kv)
COMPUTE_WGS = 2
M_INIT = -1e30           # finite running-max start: fully masked rows keep p = 0, never NaN


def config_reason(dtype, head_dim: int, block_q: int, block_kv: int) -> str | None:
  """None when these kernels take the configuration, else why not (device aside)."""
  if (block_q, block_kv) != (BLOCK_Q, BLOCK_KV):
    return f"block_q, block_kv = {block_q}, {block_kv}; the Mosaic GPU kernels need {BLOCK_Q}, {BLOCK_KV}"
  if head_dim not in (64, 128):
    return f"head_dim (padded) {head_dim}; the Mosaic GPU kernels take 64 or 128"
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"dtype {jnp.dtype(dtype).name}; the Mosaic GPU kernels take bfloat16 or float16"
  return None


def supports(q, k, v, *, block_q: int, block_kv: int) -> bool:
  """Whether this kernel serves the call (a Hopper GPU, and config_reason is None)."""
  if jax.default_backend() != "gpu":
    return False
  try:
    if "9.0" not in getattr(jax.devices()[0], "compute_capability", ""):
      return False
  except Exception:  # pylint: disable=broad-except
    return False
  return (k.dtype == q.dtype and v.dtype == q.dtype and
          config_reason(q.dtype, q.shape[-1], block_q, block_kv) is None)


full_blocks_first = bsa.full_blocks_first


def _kernel(idx_ref, cnt_ref, nfull_ref, q_ref, k_ref, v_ref, out_ref, lse_ref, scoped, *, mask_fn,
            scale, kv_len, q_offset, head_dim, dtype, q_heads, table_batch, table_heads, group,
            max_steps, num_q_blocks):
  batch = lax.axis_index("batch")
  q_head = lax.axis_index("heads")
  # Last query blocks first: under causal-like masks they carry the most key blocks, and
  # launching the heaviest CTAs first shortens the tail of the last wave.
  q_block = (num_q_blocks - 1) - lax.axis_index("q_seq")
  wg_idx = lax.axis_index("wg")
  (qo_smem2, k_smem, v_smem, lse_smem2), (k_barriers, v_barriers, q_barriers), consumed, sched = scoped
  k_consumed_barriers, v_consumed_barriers = consumed
  block_q = BLOCK_Q // COMPUTE_WGS
  tb = batch if table_batch > 1 else 0
  th = q_head * table_heads // q_heads
  rows = (tb, th, q_block)
  count = cnt_ref[(*rows, 0)]

  def schedule_barrier():
    plgpu.barrier_arrive(sched)
    plgpu.barrier_wait(sched)

  @pl.when(wg_idx < COMPUTE_WGS)
  def _compute_wg():
    plgpu.set_max_registers(232, action="increase")
    qo_smem = qo_smem2.at[wg_idx]
    lse_smem = lse_smem2.at[wg_idx]
    q_base = q_block * BLOCK_Q + wg_idx * block_q
    n_full = nfull_ref[(*rows, 0)]
    plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(q_base, block_q), q_head], qo_smem,
                            q_barriers.at[wg_idx])
    plgpu.barrier_wait(q_barriers.at[wg_idx])
    m_i = plgpu.layout_cast(jnp.full((block_q,), M_INIT, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    l_i = plgpu.layout_cast(jnp.full((block_q,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    acc = plgpu.layout_cast(jnp.full((block_q, head_dim), 0, jnp.float32), plgpu.Layout.WGMMA)

    @pl.when(count > 0)
    def _():
      plgpu.barrier_wait(k_barriers.at[0])

    pl.when(wg_idx == 1)(schedule_barrier)
    c = scale * math.log2(math.e)    # logits kept in base 2: exp2 by FMA

    def kv_step(step, carry, masked: bool):
      acc, m_i, l_i = carry
      slot = lax.rem(step, jnp.array(max_steps, step.dtype))

      def compute_qk(acc_ref):
        plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
        schedule_barrier()
        return acc_ref[...]
      qk = pl.run_scoped(compute_qk, plgpu.ACC((block_q, BLOCK_KV), jnp.float32))
      plgpu.barrier_arrive(k_consumed_barriers.at[slot])
      if masked:
        kb = idx_ref[(*rows, step)]
        q_ids = plgpu.broadcasted_iota(jnp.int32, (block_q, BLOCK_KV), 0, layout=plgpu.Layout.WGMMA)
        kv_ids = plgpu.broadcasted_iota(jnp.int32, (block_q, BLOCK_KV), 1, layout=plgpu.Layout.WGMMA)
        q_ids = q_ids + (q_base + q_offset)
        kv_ids = kv_ids + kb * BLOCK_KV
        ok = kv_ids < kv_len
        if mask_fn is not None:
          ok = ok & mask_fn(q_ids, kv_ids)
        qk = jnp.where(ok, qk, -jnp.inf)
      m_ij = jnp.maximum(m_i, qk.max(axis=1) * c)
      alpha = jnp.exp2(m_i - m_ij)
      m_i = m_ij
      p = jnp.exp2(qk * c - lax.broadcast_in_dim(m_ij, qk.shape, [0]))
      acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
      l_i *= alpha
      p16 = p.astype(dtype)

      def end_softmax_barriers():
        plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(v_barriers.at[slot])
        plgpu.barrier_wait(sched)
      if head_dim <= 128:
        l_i += p.sum(axis=1)
        acc, l_i, m_i, p16 = lax.optimization_barrier((acc, l_i, m_i, p16))
        end_softmax_barriers()
      else:
        end_softmax_barriers()
        l_i += p.sum(axis=1)

      def compute_pv(acc_ref):
        plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
        wait_step = step + 1
        wait_slot = lax.rem(wait_step, jnp.array(max_steps, step.dtype))

        @pl.when(wait_step < count)
        def _wait():
          plgpu.barrier_wait(k_barriers.at[wait_slot])
      acc = pl.run_state(compute_pv)(plgpu.ACC.init(acc))
      plgpu.barrier_arrive(v_consumed_barriers.at[slot])
      return acc, m_i, l_i

    carry = lax.fori_loop(0, n_full, functools.partial(kv_step, masked=False), (acc, m_i, l_i))
    acc, m_i, l_i = lax.fori_loop(n_full, count, functools.partial(kv_step, masked=True), carry)
    pl.when(wg_idx == 0)(schedule_barrier)

    # Rows that saw no key have l = 0 and acc = 0: max() keeps them at 0 instead of NaN.
    acc /= lax.broadcast_in_dim(jnp.maximum(l_i, 1e-30), (block_q, head_dim), [0])
    qo_smem[...] = acc.astype(dtype)
    lse_smem[...] = m_i + jnp.log2(l_i)        # base 2; the wrapper converts and marks empty rows
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[batch, pl.ds(q_base, block_q), q_head])
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[batch, q_head, pl.ds(q_base, block_q)])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg_idx == COMPUTE_WGS)
  def _memory_wg():
    plgpu.set_max_registers(40, action="decrease")
    kv_head = lax.div(q_head, jnp.array(group, q_head.dtype))

    def issue(step, slot):
      kb = idx_ref[(*rows, step)]
      s = (batch, pl.ds(kb * BLOCK_KV, BLOCK_KV), kv_head)
      plgpu.copy_gmem_to_smem(k_ref.at[s], k_smem.at[slot], k_barriers.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[s], v_smem.at[slot], v_barriers.at[slot])

    for i in range(max_steps):
      pl.when(i < count)(functools.partial(issue, i, i))

    @pl.loop(0, jnp.maximum(count - max_steps, 0))
    def _loop(step):
      slot = lax.rem(step, jnp.array(max_steps, step.dtype))
      plgpu.barrier_wait(k_consumed_barriers.at[slot])
      plgpu.barrier_wait(v_consumed_barriers.at[slot])
      issue(step + max_steps, slot)


@functools.partial(jax.jit, static_argnames=("mask_fn", "scale", "kv_len", "q_offset",
                                             "max_concurrent_steps", "interpret"))
def block_sparse_attention_fwd(q, k, v, kv_indices, kv_counts, kv_full, *, mask_fn, scale: float,
                               kv_len: int, q_offset: int = 0, max_concurrent_steps: int = 2,
                               interpret: bool = False):
  """Forward pass; tables in the [Bt, Ht, nQ, W] format of block_sparse_attention.py.

  interpret: run on the CPU in Mosaic GPU's interpreter (plgpu.InterpretGPUParams), for tests.
  """
  batch, q_len, q_heads, head_dim = q.shape
  kv_heads = k.shape[2]
  dtype = q.dtype
  indices, counts, n_full = full_blocks_first(kv_indices, kv_counts, kv_full)
  max_steps = max(2, min(max_concurrent_steps, k.shape[1] // BLOCK_KV))
  block_q = BLOCK_Q // COMPUTE_WGS
  kernel = functools.partial(
      _kernel, mask_fn=mask_fn, scale=scale, kv_len=kv_len, q_offset=q_offset, head_dim=head_dim,
      dtype=dtype, q_heads=q_heads, table_batch=indices.shape[0], table_heads=indices.shape[1],
      group=q_heads // kv_heads, max_steps=max_steps, num_q_blocks=q_len // BLOCK_Q)

  def entry(idx_ref, cnt_ref, nfull_ref, q_ref, k_ref, v_ref, out_ref, lse_ref):
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    scratch = (
        plgpu.SMEM((COMPUTE_WGS, block_q, head_dim), dtype, transforms=transforms),
        plgpu.SMEM((max_steps, BLOCK_KV, head_dim), dtype, transforms=transforms),
        plgpu.SMEM((max_steps, BLOCK_KV, head_dim), dtype, transforms=transforms),
        plgpu.SMEM((COMPUTE_WGS, block_q), jnp.float32),
    )
    pl.run_scoped(
        lambda *args: kernel(idx_ref, cnt_ref, nfull_ref, q_ref, k_ref, v_ref, out_ref, lse_ref,
                             args),
        scratch,
        (plgpu.Barrier(num_barriers=max_steps), plgpu.Barrier(num_barriers=max_steps),
         plgpu.Barrier(num_barriers=COMPUTE_WGS)),
        (plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=max_steps),) * 2,
        plgpu.Barrier(num_arrivals=COMPUTE_WGS),
        collective_axes="wg",
    )

  out, lse2 = plgpu.kernel(
      entry,
      out_type=[jax.ShapeDtypeStruct(q.shape, dtype),
                jax.ShapeDtypeStruct((batch, q_heads, q_len), jnp.float32)],
      grid=(q_heads, q_len // BLOCK_Q, batch),
      grid_names=("heads", "q_seq", "batch"),
      num_threads=COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )(indices, counts, n_full, q, k, v)
  lse = jnp.where(lse2 < 0.5 * M_INIT, -jnp.inf, lse2 / bsa.LOG2E)
  return out, lse


# ----------------------------------------------------------------------------------------------
# Backward: one kernel for dQ (CTA = a 128-row query block, streaming its key blocks) and one for
# dK/dV (CTA = a 128-key block, streaming the 64-row halves of the query blocks that visit it).
# Each uses two compute warpgroups of 64 rows and a TMA memory warpgroup, like the forward.

BWD_ROWS = 64            # rows per compute warpgroup, and query rows per dK/dV pipeline step


def _issue_ring(count, max_steps, consumed, issue):
  """Memory-warpgroup loop: fill the ring, then refill each slot once both consumers freed it."""
  for i in range(max_steps):
    pl.when(i < count)(functools.partial(issue, i, i))

  @pl.loop(0, jnp.maximum(count - max_steps, 0))
  def _loop(step):
    slot = lax.rem(step, jnp.array(max_steps, step.dtype))
    plgpu.barrier_wait(consumed.at[slot])
    issue(step + max_steps, slot)


def _wgmma_scoped(a, b, shape):
  def body(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
    return acc_ref[...]
  return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def _wgmma_acc(acc, a, b):
  def body(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
  return pl.run_state(body)(plgpu.ACC.init(acc))


def _wgmma_two(acc, ab1, ab2, shape):
  """(acc + a1 @ b1, a2 @ b2): two independent products issued together, one wait for both.

  acc None starts the first from zero; accumulators are float32 [shape]."""
  def body(refs):
    plgpu.wgmma(refs[0], *ab1)
    plgpu.wgmma(refs[1], *ab2)
  zeros = plgpu.layout_cast(jnp.full(shape, 0, jnp.float32), plgpu.Layout.WGMMA)
  return pl.run_state(body)((plgpu.ACC.init(zeros if acc is None else acc), plgpu.ACC.init(zeros)))


def _dq_kernel(idx_ref, cnt_ref, nfull_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref,
               smem, bars, consumed, *, mask_fn, scale, kv_len, q_offset, head_dim, dtype, q_heads, table_batch,
               table_heads, group, max_steps, num_q_blocks):
  batch = lax.axis_index("batch")
  q_head = lax.axis_index("heads")
  # Last query blocks first: under causal-like masks they carry the most key blocks, and
  # launching the heaviest CTAs first shortens the tail of the last wave.
  q_block = (num_q_blocks - 1) - lax.axis_index("q_seq")
  wg_idx = lax.axis_index("wg")
  q_smem2, do_smem2, lse_smem2, delta_smem2, k_smem, v_smem = smem
  q_bars, do_bars, lse_bars, delta_bars, k_bars, v_bars = bars
  rows = (batch if table_batch > 1 else 0, q_head * table_heads // q_heads, q_block)
  count = cnt_ref[(*rows, 0)]

  @pl.when(wg_idx < COMPUTE_WGS)
  def _compute_wg():
    plgpu.set_max_registers(232, action="increase")
    q_base = q_block * BLOCK_Q + wg_idx * BWD_ROWS
    q_smem, do_smem = q_smem2.at[wg_idx], do_smem2.at[wg_idx]
    sl = (batch, pl.ds(q_base, BWD_ROWS), q_head)
    plgpu.copy_gmem_to_smem(q_ref.at[sl], q_smem, q_bars.at[wg_idx])
    plgpu.copy_gmem_to_smem(do_ref.at[sl], do_smem, do_bars.at[wg_idx])
    row_sl = (batch, q_head, pl.ds(q_base, BWD_ROWS))
    plgpu.copy_gmem_to_smem(lse_ref.at[row_sl], lse_smem2.at[wg_idx], lse_bars.at[wg_idx])
    plgpu.copy_gmem_to_smem(delta_ref.at[row_sl], delta_smem2.at[wg_idx], delta_bars.at[wg_idx])
    for b in (q_bars, do_bars, lse_bars, delta_bars):
      plgpu.barrier_wait(b.at[wg_idx])
    lse = plgpu.load(lse_smem2.at[wg_idx], layout=plgpu.Layout.WGMMA.reduce(1))
    delta = plgpu.load(delta_smem2.at[wg_idx], layout=plgpu.Layout.WGMMA.reduce(1))
    n_full = nfull_ref[(*rows, 0)]
    c = scale * math.log2(math.e)
    shape = (BWD_ROWS, BLOCK_KV)

    def step_fn(step, dq, masked: bool):
      slot = lax.rem(step, jnp.array(max_steps, step.dtype))
      plgpu.barrier_wait(k_bars.at[slot])
      plgpu.barrier_wait(v_bars.at[slot])
      # S = Q K^T and dP = dO V^T are independent: issue both before one wait.
      s, dp = _wgmma_two(None, (q_smem, k_smem.at[slot].transpose((1, 0))),
                         (do_smem, v_smem.at[slot].transpose((1, 0))), shape)
      s = s * c
      if masked:
        kb = idx_ref[(*rows, step)]
        q_ids = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
        kv_ids = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
        q_ids = q_ids + (q_base + q_offset)
        kv_ids = kv_ids + kb * BLOCK_KV
        ok = kv_ids < kv_len
        if mask_fn is not None:
          ok = ok & mask_fn(q_ids, kv_ids)
        s = jnp.where(ok, s, -jnp.inf)
      p = jnp.exp2(s - lax.broadcast_in_dim(lse, shape, [0]))
      ds = p * (dp - lax.broadcast_in_dim(delta, shape, [0]))
      dq = _wgmma_acc(dq, ds.astype(dtype), k_smem.at[slot])
      plgpu.barrier_arrive(consumed.at[slot])
      return dq

    dq = plgpu.layout_cast(jnp.full((BWD_ROWS, head_dim), 0, jnp.float32), plgpu.Layout.WGMMA)
    dq = lax.fori_loop(0, n_full, functools.partial(step_fn, masked=False), dq)
    dq = lax.fori_loop(n_full, count, functools.partial(step_fn, masked=True), dq)
    q_smem[...] = (dq * scale).astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[sl])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg_idx == COMPUTE_WGS)
  def _memory_wg():
    plgpu.set_max_registers(40, action="decrease")
    kv_head = lax.div(q_head, jnp.array(group, q_head.dtype))

    def issue(step, slot):
      kb = idx_ref[(*rows, step)]
      s = (batch, pl.ds(kb * BLOCK_KV, BLOCK_KV), kv_head)
      plgpu.copy_gmem_to_smem(k_ref.at[s], k_smem.at[slot], k_bars.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[s], v_smem.at[slot], v_bars.at[slot])
    _issue_ring(count, max_steps, consumed, issue)


def _dkv_kernel(idx_ref, cnt_ref, nfull_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref,
                dv_ref, smem, bars, consumed, *, mask_fn, scale, kv_len, q_offset, head_dim, dtype, q_heads,
                table_batch, table_heads, group, max_steps):
  batch = lax.axis_index("batch")
  q_head = lax.axis_index("heads")
  kv_block = lax.axis_index("kv_seq")
  wg_idx = lax.axis_index("wg")
  k_smem2, v_smem2, q_smem, do_smem, lse_smem, delta_smem = smem
  k_bars, v_bars, q_bars, do_bars, lse_bars, delta_bars = bars
  rows = (batch if table_batch > 1 else 0, q_head * table_heads // q_heads, kv_block)
  # Each query block of the list is streamed as two 64-row steps.
  count = 2 * cnt_ref[(*rows, 0)]
  kv_head = lax.div(q_head, jnp.array(group, q_head.dtype))

  def q_rows(step):
    if isinstance(step, int):
      return idx_ref[(*rows, step // 2)] * BLOCK_Q + (step % 2) * BWD_ROWS
    qb = idx_ref[(*rows, lax.div(step, jnp.array(2, step.dtype)))]
    return qb * BLOCK_Q + lax.rem(step, jnp.array(2, step.dtype)) * BWD_ROWS

  @pl.when(wg_idx < COMPUTE_WGS)
  def _compute_wg():
    plgpu.set_max_registers(232, action="increase")
    kv_base = kv_block * BLOCK_KV + wg_idx * BWD_ROWS
    k_smem, v_smem = k_smem2.at[wg_idx], v_smem2.at[wg_idx]
    kv_sl = (batch, pl.ds(kv_base, BWD_ROWS), kv_head)
    plgpu.copy_gmem_to_smem(k_ref.at[kv_sl], k_smem, k_bars.at[wg_idx])
    plgpu.copy_gmem_to_smem(v_ref.at[kv_sl], v_smem, v_bars.at[wg_idx])
    plgpu.barrier_wait(k_bars.at[wg_idx])
    plgpu.barrier_wait(v_bars.at[wg_idx])
    n_full = 2 * nfull_ref[(*rows, 0)]
    c = scale * math.log2(math.e)
    shape = (BWD_ROWS, BWD_ROWS)        # [keys, queries]

    def step_fn(step, carry, masked: bool):
      dk, dv = carry
      slot = lax.rem(step, jnp.array(max_steps, step.dtype))
      plgpu.barrier_wait(q_bars.at[slot])
      plgpu.barrier_wait(lse_bars.at[slot])
      s_t = _wgmma_scoped(k_smem, q_smem.at[slot].transpose((1, 0)), shape) * c
      if masked:
        kv_ids = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA) + kv_base
        q_ids = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
        q_ids = q_ids + (q_rows(step) + q_offset)
        ok = kv_ids < kv_len
        if mask_fn is not None:
          ok = ok & mask_fn(q_ids, kv_ids)
        s_t = jnp.where(ok, s_t, -jnp.inf)
      lse = plgpu.load(lse_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
      p_t = jnp.exp2(s_t - lax.broadcast_in_dim(lse, shape, [1]))
      plgpu.barrier_wait(do_bars.at[slot])
      plgpu.barrier_wait(delta_bars.at[slot])
      # dV += P^T dO and dP^T = V dO^T are independent: issue both before one wait.
      dv, dp_t = _wgmma_two(dv, (p_t.astype(dtype), do_smem.at[slot]),
                            (v_smem, do_smem.at[slot].transpose((1, 0))), shape)
      delta = plgpu.load(delta_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
      ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, shape, [1]))
      dk = _wgmma_acc(dk, ds_t.astype(dtype), q_smem.at[slot])
      plgpu.barrier_arrive(consumed.at[slot])
      return dk, dv

    zeros = plgpu.layout_cast(jnp.full((BWD_ROWS, head_dim), 0, jnp.float32), plgpu.Layout.WGMMA)
    carry = lax.fori_loop(0, n_full, functools.partial(step_fn, masked=False), (zeros, zeros))
    dk, dv = lax.fori_loop(n_full, count, functools.partial(step_fn, masked=True), carry)
    k_smem[...] = (dk * scale).astype(dtype)
    v_smem[...] = dv.astype(dtype)
    plgpu.commit_smem()
    out_sl = (batch, pl.ds(kv_base, BWD_ROWS), q_head)
    plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[out_sl])
    plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[out_sl])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg_idx == COMPUTE_WGS)
  def _memory_wg():
    plgpu.set_max_registers(40, action="decrease")

    def issue(step, slot):
      r = q_rows(step)
      sl = (batch, pl.ds(r, BWD_ROWS), q_head)
      row_sl = (batch, q_head, pl.ds(r, BWD_ROWS))
      plgpu.copy_gmem_to_smem(q_ref.at[sl], q_smem.at[slot], q_bars.at[slot])
      plgpu.copy_gmem_to_smem(lse_ref.at[row_sl], lse_smem.at[slot], lse_bars.at[slot])
      plgpu.copy_gmem_to_smem(do_ref.at[sl], do_smem.at[slot], do_bars.at[slot])
      plgpu.copy_gmem_to_smem(delta_ref.at[row_sl], delta_smem.at[slot], delta_bars.at[slot])
    _issue_ring(count, max_steps, consumed, issue)


@functools.partial(jax.jit, static_argnames=("mask_fn", "scale", "kv_len", "q_offset", "dq_steps",
                                             "dkv_steps"))
def block_sparse_attention_bwd(q, k, v, out, lse, do, kv_indices, kv_counts, kv_full, q_indices,
                               q_counts, q_full, dlse=None, *, mask_fn, scale: float, kv_len: int,
                               q_offset: int = 0, dq_steps: int = 2, dkv_steps: int = 4):
  """Backward pass; arguments as block_sparse_attention.block_sparse_attention_bwd.

  Returns dq [B, Tq, Hq, D], dk and dv [B, Tk, Hkv, D] in the input dtype. With GQA, dK/dV are
  computed per query head (in the input dtype) and summed over the group in float32.
  """
  batch, q_len, q_heads, head_dim = q.shape
  kv_len_padded, kv_heads = k.shape[1], k.shape[2]
  group = q_heads // kv_heads
  dtype = q.dtype
  delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), do.astype(jnp.float32))
  if dlse is not None:
    delta = delta - dlse.astype(jnp.float32)
  # Base-2 lse; +inf on rows that saw nothing, so that their p = exp2(s - lse) is 0.
  lse2 = jnp.where(jnp.isneginf(lse), jnp.inf, lse * bsa.LOG2E)
  transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  common = dict(mask_fn=mask_fn, scale=scale, kv_len=kv_len, q_offset=q_offset, head_dim=head_dim,
                dtype=dtype, q_heads=q_heads, group=group)
  params = plgpu.CompilerParams(approx_math=True)

  kv_idx, kv_cnt, kv_nfull = full_blocks_first(kv_indices, kv_counts, kv_full)
  dq_steps = max(2, min(dq_steps, kv_len_padded // BLOCK_KV))
  dq_kernel = functools.partial(_dq_kernel, table_batch=kv_idx.shape[0], table_heads=kv_idx.shape[1],
                                max_steps=dq_steps, num_q_blocks=q_len // BLOCK_Q, **common)
  rows_smem = plgpu.SMEM((COMPUTE_WGS, BWD_ROWS, head_dim), dtype, transforms=transforms)
  dq = plgpu.kernel(
      dq_kernel,
      out_type=jax.ShapeDtypeStruct(q.shape, dtype),
      scratch_types=[
          (rows_smem, rows_smem, plgpu.SMEM((COMPUTE_WGS, BWD_ROWS), jnp.float32),
           plgpu.SMEM((COMPUTE_WGS, BWD_ROWS), jnp.float32),
           plgpu.SMEM((dq_steps, BLOCK_KV, head_dim), dtype, transforms=transforms),
           plgpu.SMEM((dq_steps, BLOCK_KV, head_dim), dtype, transforms=transforms)),
          (plgpu.Barrier(num_barriers=COMPUTE_WGS),) * 4 + (plgpu.Barrier(num_barriers=dq_steps),) * 2,
          plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=dq_steps),
      ],
      grid=(q_heads, q_len // BLOCK_Q, batch),
      grid_names=("heads", "q_seq", "batch"),
      num_threads=COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=params,
  )(kv_idx, kv_cnt, kv_nfull, q, k, v, do, lse2, delta)

  q_idx, q_cnt, q_nfull = full_blocks_first(q_indices, q_counts, q_full)
  dkv_kernel = functools.partial(_dkv_kernel, table_batch=q_idx.shape[0], table_heads=q_idx.shape[1],
                                 max_steps=dkv_steps, **common)
  kv_smem = plgpu.SMEM((COMPUTE_WGS, BWD_ROWS, head_dim), dtype, transforms=transforms)
  step_smem = plgpu.SMEM((dkv_steps, BWD_ROWS, head_dim), dtype, transforms=transforms)
  dkv_shape = jax.ShapeDtypeStruct((batch, kv_len_padded, q_heads, head_dim), dtype)
  dk, dv = plgpu.kernel(
      dkv_kernel,
      out_type=[dkv_shape, dkv_shape],
      scratch_types=[
          (kv_smem, kv_smem, step_smem, step_smem,
           plgpu.SMEM((dkv_steps, BWD_ROWS), jnp.float32),
           plgpu.SMEM((dkv_steps, BWD_ROWS), jnp.float32)),
          (plgpu.Barrier(num_barriers=COMPUTE_WGS),) * 2 + (plgpu.Barrier(num_barriers=dkv_steps),) * 4,
          plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=dkv_steps),
      ],
      grid=(q_heads, kv_len_padded // BLOCK_KV, batch),
      grid_names=("heads", "kv_seq", "batch"),
      num_threads=COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=params,
  )(q_idx, q_cnt, q_nfull, q, k, v, do, lse2, delta)
  if group > 1:
    dk = dk.reshape(batch, kv_len_padded, kv_heads, group, head_dim).astype(jnp.float32).sum(3)
    dv = dv.reshape(batch, kv_len_padded, kv_heads, group, head_dim).astype(jnp.float32).sum(3)
  return dq, dk.astype(k.dtype), dv.astype(v.dtype)
