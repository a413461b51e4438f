"""Block-sparse flash attention, forward and backward, in Pallas (Triton lowering).

One kernel family serves dense masked attention and block-sparse attention: the caller passes, per
(batch, head, query block), the list of key blocks to visit, how many there are and which are fully
visible (the BlockLayout tables of lcjax, as plain arrays). The wrappers reorder each list so that
fully visible blocks come first (full_blocks_first); kernels run those without the element mask
and the rest with `mask_fn(q_idx, kv_idx)` (absolute positions) and the key-length bound.

This lowering runs on every CUDA GPU JAX supports and in interpret mode on the CPU (the tests).
The Hopper forward in Mosaic GPU lives in block_sparse_attention_mgpu.py.

Shapes (all arrays already padded by the caller):
  q [B, Tq, Hq, D], k and v [B, Tk, Hkv, D]; Tq % block_q == 0, Tk % block_kv == 0.
  kv_indices, kv_full: int32 [Bt, Ht, Tq // block_q, W]; kv_counts int32 [Bt, Ht, Tq // block_q, 1],
    Bt in (1, B), Ht divides Hq (layout head h * Ht // Hq serves query head h); W a power of two.
  q_indices, q_full: int32 [Bt, Ht, Tk // block_kv, Wq]; q_counts [Bt, Ht, Tk // block_kv, 1].
  lse: float32 [B, Hq, Tq], natural log; -inf for rows that see nothing.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton
import jax.numpy as jnp

MaskFn = Callable[[jax.Array, jax.Array], jax.Array]
LOG2E = math.log2(math.e)
# Finite start for the running max: rows whose every key is masked keep m = M_INIT and p = 0.
M_INIT = -1e30


def _table_spec(table, q_heads: int, width: int):
  """BlockSpec reading row [b, layout head of h, block i, :] of a [Bt, Ht, n, W] table."""
  bt, ht = table.shape[:2]
  return pl.BlockSpec((None, None, None, width),
                      lambda b, h, i: (b if bt > 1 else 0, h * ht // q_heads, i, 0))


def _element_mask(mask_fn: MaskFn | None, q_pos, kv_pos, kv_len: int):
  """bool [block_q, block_kv] for a partly visible block: the mask and the key-length bound."""
  ok = kv_pos[None, :] < kv_len
  if mask_fn is not None:
    ok &= mask_fn(q_pos[:, None], kv_pos[None, :])
  return ok


def full_blocks_first(indices, counts, full):
  """Reorders each table row so that the fully visible blocks come first.

  Softmax accumulation does not depend on the order of key (or query) blocks, and with the full
  blocks first a kernel runs them in one loop without the element mask and the rest in another.
  indices, full: int32 [..., W]; counts: int32 [..., 1]. Returns (indices, counts, n_full) with
  n_full int32 [..., 1] the number of leading fully visible blocks.
  """
  width = indices.shape[-1]
  pos = jnp.arange(width, dtype=jnp.int32)
  valid = pos < counts
  is_full = (full != 0) & valid
  # Stable order: full blocks, then partial ones, then padding (which repeats a valid index).
  key = jnp.where(is_full, 0, jnp.where(valid, 1, 2)) * width + pos
  order = jnp.argsort(key, axis=-1)
  return (jnp.take_along_axis(indices, order, axis=-1), counts,
          is_full.sum(-1, keepdims=True).astype(jnp.int32))


def _two_loops(n_full, count, body, carry):
  """body(j, carry, masked) over [0, n_full) unmasked, then [n_full, count) masked."""
  carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), carry)
  return lax.fori_loop(n_full, count, functools.partial(body, masked=True), carry)


def _fwd_kernel(idx_ref, cnt_ref, nfull_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, mask_fn, scale,
                block_q, block_kv, kv_len, q_offset):
  qi = pl.program_id(2)
  q = q_ref[...]
  q_pos = q_offset + qi * block_q + jnp.arange(block_q, dtype=jnp.int32)
  head_dim = q.shape[-1]

  def body(j, carry, masked: bool):
    acc, m, l = carry
    kb = idx_ref[j]
    k = k_ref[pl.ds(kb * block_kv, block_kv), :]
    v = v_ref[pl.ds(kb * block_kv, block_kv), :]
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    s = s * (scale * LOG2E)
    if masked:
      kv_pos = kb * block_kv + jnp.arange(block_kv, dtype=jnp.int32)
      s = jnp.where(_element_mask(mask_fn, q_pos, kv_pos, kv_len), s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    l = l * alpha + p.sum(axis=1)
    acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return acc, m_new, l

  acc = jnp.zeros((block_q, head_dim), jnp.float32)
  m = jnp.full((block_q,), M_INIT, jnp.float32)
  l = jnp.zeros((block_q,), jnp.float32)
  acc, m, l = _two_loops(nfull_ref[0], cnt_ref[0], body, (acc, m, l))
  seen = l > 0
  l_safe = jnp.where(seen, l, 1.0)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, (m + jnp.log2(l_safe)) / LOG2E, -jnp.inf)


def _compiler_params(num_warps, num_stages):
  return plgpu_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


@functools.partial(jax.jit, static_argnames=("mask_fn", "scale", "block_q", "block_kv", "kv_len",
                                             "q_offset", "interpret", "num_warps", "num_stages"))
def block_sparse_attention_fwd(q, k, v, kv_indices, kv_counts, kv_full, *, mask_fn: MaskFn | None,
                               scale: float, block_q: int, block_kv: int, kv_len: int,
                               q_offset: int = 0, interpret: bool = False, num_warps: int = 4,
                               num_stages: int = 2):
  """Forward pass. Returns (out [B, Tq, Hq, D] in q.dtype, lse float32 [B, Hq, Tq])."""
  batch, q_len, q_heads, head_dim = q.shape
  kv_len_padded, kv_heads = k.shape[1], k.shape[2]
  group = q_heads // kv_heads
  width = kv_indices.shape[-1]
  kv_indices, kv_counts, kv_nfull = full_blocks_first(kv_indices, kv_counts, kv_full)
  grid = (batch, q_heads, q_len // block_q)
  kernel = functools.partial(_fwd_kernel, mask_fn=mask_fn, scale=scale, block_q=block_q,
                             block_kv=block_kv, kv_len=kv_len, q_offset=q_offset)
  kv_spec = pl.BlockSpec((None, kv_len_padded, None, head_dim), lambda b, h, i: (b, 0, h // group, 0))
  return pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=[
          _table_spec(kv_indices, q_heads, width),
          _table_spec(kv_counts, q_heads, 1),
          _table_spec(kv_nfull, q_heads, 1),
          pl.BlockSpec((None, block_q, None, head_dim), lambda b, h, i: (b, i, h, 0)),
          kv_spec, kv_spec,
      ],
      out_specs=[
          pl.BlockSpec((None, block_q, None, head_dim), lambda b, h, i: (b, i, h, 0)),
          pl.BlockSpec((None, None, block_q), lambda b, h, i: (b, h, i)),
      ],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, q_heads, q_len), jnp.float32)],
      compiler_params=_compiler_params(num_warps, num_stages),
      interpret=interpret,
      name="lcjax_block_sparse_attention_fwd",
  )(kv_indices, kv_counts, kv_nfull, q, k, v)


def _dq_kernel(idx_ref, cnt_ref, nfull_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               mask_fn, scale, block_q, block_kv, kv_len, q_offset):
  qi = pl.program_id(2)
  q = q_ref[...]
  do = do_ref[...]
  lse2 = lse_ref[...] * LOG2E          # +inf on rows that see nothing: p = 0 there
  delta = delta_ref[...]
  q_pos = q_offset + qi * block_q + jnp.arange(block_q, dtype=jnp.int32)

  def body(j, dq, masked: bool):
    kb = idx_ref[j]
    k = k_ref[pl.ds(kb * block_kv, block_kv), :]
    v = v_ref[pl.ds(kb * block_kv, block_kv), :]
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    p = jnp.exp2(s * (scale * LOG2E) - lse2[:, None])
    if masked:
      kv_pos = kb * block_kv + jnp.arange(block_kv, dtype=jnp.int32)
      p = jnp.where(_element_mask(mask_fn, q_pos, kv_pos, kv_len), p, 0.0)
    dp = lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    ds = p * (dp - delta[:, None])
    return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  dq = _two_loops(nfull_ref[0], cnt_ref[0], body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(idx_ref, cnt_ref, nfull_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref,
                dv_ref, *, mask_fn, scale, block_q, block_kv, kv_len, q_offset):
  ki = pl.program_id(2)
  k = k_ref[...]
  v = v_ref[...]
  kv_pos = ki * block_kv + jnp.arange(block_kv, dtype=jnp.int32)

  def body(j, carry, masked: bool):
    dk, dv = carry
    qb = idx_ref[j]
    rows = pl.ds(qb * block_q, block_q)
    q = q_ref[rows, :]
    do = do_ref[rows, :]
    lse2 = lse_ref[rows] * LOG2E
    delta = delta_ref[rows]
    q_pos = q_offset + qb * block_q + jnp.arange(block_q, dtype=jnp.int32)
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    p = jnp.exp2(s * (scale * LOG2E) - lse2[:, None])
    if masked:
      p = jnp.where(_element_mask(mask_fn, q_pos, kv_pos, kv_len), p, 0.0)
    dv = dv + lax.dot_general(p.astype(do.dtype), do, (((0,), (0,)), ((), ())),
                              preferred_element_type=jnp.float32)
    dp = lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    ds = p * (dp - delta[:, None])
    dk = dk + lax.dot_general(ds.astype(q.dtype), q, (((0,), (0,)), ((), ())),
                              preferred_element_type=jnp.float32)
    return dk, dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = _two_loops(nfull_ref[0], cnt_ref[0], body, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


@functools.partial(jax.jit, static_argnames=("mask_fn", "scale", "block_q", "block_kv", "kv_len",
                                             "q_offset", "interpret", "num_warps", "num_stages"))
def block_sparse_attention_bwd(q, k, v, out, lse, do, kv_indices, kv_counts, kv_full, q_indices,
                               q_counts, q_full, dlse=None, *, mask_fn: MaskFn | None, scale: float, block_q: int,
                               block_kv: int, kv_len: int, q_offset: int = 0, interpret: bool = False,
                               num_warps: int = 4, num_stages: int = 2):
  """Backward pass (FlashAttention-2 style: one kernel for dQ, one for dK/dV).

  dlse: optional float32 [B, Hq, Tq] cotangent of the forward's lse.
  Returns dq [B, Tq, Hq, D], dk and dv [B, Tk, Hkv, D], in the input dtypes. With GQA the dK/dV
  kernel runs per query head and the group is summed in float32 afterwards.
  """
  batch, q_len, q_heads, head_dim = q.shape
  kv_len_padded, kv_heads = k.shape[1], k.shape[2]
  group = q_heads // kv_heads
  delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), do.astype(jnp.float32))
  if dlse is not None:       # d lse / d s = p, so a cotangent on lse shifts delta
    delta = delta - dlse.astype(jnp.float32)
  lse = jnp.where(jnp.isneginf(lse), jnp.inf, lse)      # empty rows: p = exp(s - inf) = 0
  params = dict(mask_fn=mask_fn, scale=scale, block_q=block_q, block_kv=block_kv, kv_len=kv_len,
                q_offset=q_offset)
  kv_indices, kv_counts, kv_nfull = full_blocks_first(kv_indices, kv_counts, kv_full)
  q_indices, q_counts, q_nfull = full_blocks_first(q_indices, q_counts, q_full)
  q_blk = pl.BlockSpec((None, block_q, None, head_dim), lambda b, h, i: (b, i, h, 0))
  kv_whole = pl.BlockSpec((None, kv_len_padded, None, head_dim), lambda b, h, i: (b, 0, h // group, 0))
  row_blk = pl.BlockSpec((None, None, block_q), lambda b, h, i: (b, h, i))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, **params),
      grid=(batch, q_heads, q_len // block_q),
      in_specs=[_table_spec(kv_indices, q_heads, kv_indices.shape[-1]),
                _table_spec(kv_counts, q_heads, 1),
                _table_spec(kv_nfull, q_heads, 1),
                q_blk, kv_whole, kv_whole, q_blk, row_blk, row_blk],
      out_specs=q_blk,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_compiler_params(num_warps, num_stages),
      interpret=interpret,
      name="lcjax_block_sparse_attention_dq",
  )(kv_indices, kv_counts, kv_nfull, q, k, v, do, lse, delta)

  q_whole = pl.BlockSpec((None, q_len, None, head_dim), lambda b, h, i: (b, 0, h, 0))
  kv_blk = pl.BlockSpec((None, block_kv, None, head_dim), lambda b, h, i: (b, i, h // group, 0))
  row_whole = pl.BlockSpec((None, None, q_len), lambda b, h, i: (b, h, 0))
  dkv_blk = pl.BlockSpec((None, block_kv, None, head_dim), lambda b, h, i: (b, i, h, 0))
  dkv_dtype = k.dtype if group == 1 else jnp.float32
  dkv_shape = jax.ShapeDtypeStruct((batch, kv_len_padded, q_heads, head_dim), dkv_dtype)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, **params),
      grid=(batch, q_heads, kv_len_padded // block_kv),
      in_specs=[_table_spec(q_indices, q_heads, q_indices.shape[-1]),
                _table_spec(q_counts, q_heads, 1),
                _table_spec(q_nfull, q_heads, 1),
                q_whole, kv_blk, kv_blk, q_whole, row_whole, row_whole],
      out_specs=[dkv_blk, dkv_blk],
      out_shape=[dkv_shape, dkv_shape],
      compiler_params=_compiler_params(num_warps, num_stages),
      interpret=interpret,
      name="lcjax_block_sparse_attention_dkv",
  )(q_indices, q_counts, q_nfull, q, k, v, do, lse, delta)
  if group > 1:
    dk = dk.reshape(batch, kv_len_padded, kv_heads, group, head_dim).sum(3).astype(k.dtype)
    dv = dv.reshape(batch, kv_len_padded, kv_heads, group, head_dim).sum(3).astype(v.dtype)
  return dq, dk, dv
