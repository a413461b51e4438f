"""Glue between attend() and the GPU Pallas kernels of pallas_kernels/gpu (issue 4).

Turns a mask and/or a BlockLayout into the kernels' block tables, pads lengths and head_dim,
picks the kernels (Mosaic GPU forward and backward on Hopper where they apply, the Triton-lowered
family elsewhere) and wires the custom VJP. pallas_kernels never imports lcjax:
only arrays, static block sizes and the mask (a hashable callable) cross the boundary.

Dense masked attention is block-sparse attention over the layout the mask implies (to_layout,
compiled on the host once per mask, lengths, blocks and q_offset): empty blocks are skipped, fully
visible ones skip the element mask.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.attention.layout import BlockLayout
from lcjax.attention.layouts import to_layout
from lcjax.attention import masks as masks_lib
from lcjax.attention.masks import Mask
from pallas_kernels.gpu import block_sparse_attention as bsa
from pallas_kernels.gpu import block_sparse_attention_mgpu as mgpu

SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
SUPPORTED_HEAD_DIMS = (64, 128, 256)
KERNELS = ("auto", "triton", "mosaic")
# Set to 1 to let attend(implementation="pallas") run the kernels in interpret mode on the CPU.
INTERPRET_ENV = "LCJAX_PALLAS_INTERPRET"


def _cdiv(a, b):
  return -(-a // b)


def _interpret_default() -> bool:
  return jax.default_backend() != "gpu"


def _padded_head_dim(d: int) -> int | None:
  for size in SUPPORTED_HEAD_DIMS:
    if d <= size:
      return size
  return None


def unsupported_reason(q, k, v, *, mask=None, layout=None, score_mod=None, scale=None,
                       segment_ids=None, kv_segment_ids=None, q_offset=0, kv_valid_len=None,
                       return_lse=False) -> str | None:
  """None when attend_pallas can serve the call, else a sentence saying why not."""
  del scale, return_lse
  return _reason(q, k, v, mask=mask, layout=layout, score_mod=score_mod, segment_ids=segment_ids,
                 kv_segment_ids=kv_segment_ids, q_offset=q_offset, kv_valid_len=kv_valid_len,
                 allow_cpu=False)


def _reason(q, k, v, *, mask, layout, score_mod, segment_ids, kv_segment_ids, q_offset, kv_valid_len,
            allow_cpu: bool) -> str | None:
  allow_cpu = allow_cpu or os.environ.get(INTERPRET_ENV) == "1"
  if jax.default_backend() != "gpu" and not allow_cpu:
    return (f"the Pallas GPU kernels need a GPU backend (default backend is {jax.default_backend()}; "
            f"set {INTERPRET_ENV}=1 to run them in interpret mode)")
  if score_mod is not None:
    return "score_mod is not supported by the Pallas kernels"
  if segment_ids is not None or kv_segment_ids is not None:
    return "segment_ids are not supported by the Pallas kernels (use a document mask)"
  if kv_valid_len is not None:
    return "kv_valid_len is not supported by the Pallas prefill kernels"
  if not isinstance(q_offset, (int, np.integer)):
    return f"q_offset must be a Python int for the Pallas kernels; got {type(q_offset).__name__}"
  if mask is not None and not isinstance(mask, Mask):
    return f"mask must be a lcjax Mask; got {type(mask).__name__}"
  dtypes = {jnp.dtype(x.dtype) for x in (q, k, v)}
  if len(dtypes) != 1 or jnp.dtype(q.dtype) not in map(jnp.dtype, SUPPORTED_DTYPES):
    return f"q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype}: need one of bf16, fp16, fp32 for all three"
  if v.shape[-1] != q.shape[-1]:
    return f"v head_dim {v.shape[-1]} differs from q head_dim {q.shape[-1]}"
  if _padded_head_dim(q.shape[-1]) is None:
    return f"head_dim {q.shape[-1]} is over the largest supported, {SUPPORTED_HEAD_DIMS[-1]}"
  if layout is not None:
    for name in ("block_q", "block_kv"):
      b = getattr(layout, name)
      if b < 16 or b & (b - 1):
        return f"layout.{name}={b}: the kernels need a power of two >= 16"
  return None


def _pow2_width(table, fill_last: bool):
  """Pads the last axis of a [.., W] table to a power of two (Triton block shapes need one)."""
  width = table.shape[-1]
  target = 1 << max(width - 1, 0).bit_length()
  if target == width:
    return table
  pad = jnp.repeat(table[..., -1:], target - width, axis=-1) if fill_last else \
      jnp.zeros((*table.shape[:-1], target - width), table.dtype)
  return jnp.concatenate([table, pad], axis=-1)


def _kernel_tables(layout: BlockLayout):
  """The layout as int32 kernel tables, ragged last key block marked partial (bounds check)."""
  kv_full = layout.kv_full
  q_full = layout.q_full
  if layout.kv_len % layout.block_kv:
    last = layout.num_kv_blocks - 1
    kv_full = kv_full & (layout.kv_indices != last)
    q_full = q_full & (jnp.arange(layout.num_kv_blocks) != last)[:, None]
  as_i32 = lambda x: jnp.asarray(x).astype(jnp.int32)
  fwd = (_pow2_width(as_i32(layout.kv_indices), True), as_i32(layout.kv_counts)[..., None],
         _pow2_width(as_i32(kv_full), False))
  bwd = (_pow2_width(as_i32(layout.q_indices), True), as_i32(layout.q_counts)[..., None],
         _pow2_width(as_i32(q_full), False))
  return fwd, bwd


def _default_blocks(head_dim: int, interpret: bool) -> tuple[int, int]:
  if interpret:
    return 16, 16
  return (128, 128) if head_dim <= 128 else (64, 64)


def _mosaic_mask_ok(mask) -> bool:
  """Masks whose index arithmetic is known to lower in Mosaic GPU (compare, add, and/or/not)."""
  if mask is None or isinstance(mask, (masks_lib.Causal, masks_lib.SlidingWindow, masks_lib.Sinks,
                                      masks_lib.PrefixLM)):
    return True
  if isinstance(mask, (masks_lib.And, masks_lib.Or)):
    return _mosaic_mask_ok(mask.left) and _mosaic_mask_ok(mask.right)
  if isinstance(mask, masks_lib.Not):
    return _mosaic_mask_ok(mask.inner)
  return False


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10, 11, 12, 13, 14, 15, 16))
def _flash(q, k, v, kv_indices, kv_counts, kv_full, q_indices, q_counts, q_full, mask_fn, scale,
           block_q, block_kv, kv_len, q_offset, interpret, kernel):
  del q_indices, q_counts, q_full
  return _forward(q, k, v, (kv_indices, kv_counts, kv_full), mask_fn, scale, block_q, block_kv,
                  kv_len, q_offset, interpret, kernel)


def _use_mosaic(q, k, v, mask_fn, block_q, block_kv, interpret, kernel) -> bool:
  if kernel == "auto" and not interpret:
    return _mosaic_mask_ok(mask_fn) and mgpu.supports(q, k, v, block_q=block_q, block_kv=block_kv)
  return kernel == "mosaic"


def _forward(q, k, v, tables, mask_fn, scale, block_q, block_kv, kv_len, q_offset, interpret,
             kernel):
  if _use_mosaic(q, k, v, mask_fn, block_q, block_kv, interpret, kernel):
    return mgpu.block_sparse_attention_fwd(q, k, v, *tables, mask_fn=mask_fn, scale=scale,
                                           kv_len=kv_len, q_offset=q_offset)
  return bsa.block_sparse_attention_fwd(q, k, v, *tables, mask_fn=mask_fn, scale=scale,
                                        block_q=block_q, block_kv=block_kv, kv_len=kv_len,
                                        q_offset=q_offset, interpret=interpret,
                                        num_warps=8 if block_q * block_kv >= 128 * 128 else 4)


def _flash_fwd(q, k, v, kv_indices, kv_counts, kv_full, q_indices, q_counts, q_full, mask_fn, scale,
               block_q, block_kv, kv_len, q_offset, interpret, kernel):
  out, lse = _forward(q, k, v, (kv_indices, kv_counts, kv_full), mask_fn, scale, block_q, block_kv,
                      kv_len, q_offset, interpret, kernel)
  res = (q, k, v, out, lse, kv_indices, kv_counts, kv_full, q_indices, q_counts, q_full)
  return (out, lse), res


def _flash_bwd(mask_fn, scale, block_q, block_kv, kv_len, q_offset, interpret, kernel, res,
               cts):
  q, k, v, out, lse, kv_indices, kv_counts, kv_full, q_indices, q_counts, q_full = res
  d_out, d_lse = cts
  if _use_mosaic(q, k, v, mask_fn, block_q, block_kv, interpret, kernel):
    dq, dk, dv = mgpu.block_sparse_attention_bwd(
        q, k, v, out, lse, d_out.astype(q.dtype), kv_indices, kv_counts, kv_full, q_indices,
        q_counts, q_full, d_lse, mask_fn=mask_fn, scale=scale, kv_len=kv_len, q_offset=q_offset)
    return dq, dk, dv, None, None, None, None, None, None
  dq, dk, dv = bsa.block_sparse_attention_bwd(
      q, k, v, out, lse, d_out.astype(q.dtype), kv_indices, kv_counts, kv_full, q_indices, q_counts,
      q_full, d_lse, mask_fn=mask_fn, scale=scale, block_q=block_q, block_kv=block_kv, kv_len=kv_len,
      q_offset=q_offset, interpret=interpret, num_warps=4, num_stages=2)
  return dq, dk, dv, None, None, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def attend_pallas(q, k, v, *, mask: Mask | None = None, layout: BlockLayout | None = None,
                  score_mod=None, scale: float | None = None, segment_ids=None, kv_segment_ids=None,
                  q_offset=0, kv_valid_len=None, return_lse: bool = False,
                  interpret: bool | None = None, block_q: int | None = None,
                  block_kv: int | None = None, kernel: str = "auto"):
  """attend() through the Pallas kernels; differentiable in q, k, v (custom VJP).

  Args: as lcjax.attention.attend; plus
    interpret: run the kernels in interpret mode (default: when the backend is not a GPU).
    block_q, block_kv: tile sizes for mask-only calls (a layout brings its own).
    kernel: "auto" (Mosaic GPU kernels on Hopper where they apply, else the Triton-lowered
      family), "triton" or "mosaic" (for benchmarks and tests); forward and backward alike.
  Returns:
    out [B, Tq, Hq, D] in q.dtype, and with return_lse the float32 lse [B, Hq, Tq].
  """
  reason = _reason(q, k, v, mask=mask, layout=layout, score_mod=score_mod, segment_ids=segment_ids,
                   kv_segment_ids=kv_segment_ids, q_offset=q_offset, kv_valid_len=kv_valid_len,
                   allow_cpu=bool(interpret))
  if reason is not None:
    raise ValueError(f"attend_pallas cannot serve this call: {reason}")
  if kernel not in KERNELS:
    raise ValueError(f"kernel={kernel!r}; accepted: {KERNELS}")
  interpret = _interpret_default() if interpret is None else interpret
  batch, q_len, q_heads, head_dim = q.shape
  kv_len = k.shape[1]
  scale = head_dim ** -0.5 if scale is None else float(scale)
  q_offset = int(q_offset)
  if layout is None:
    dq_, dk_ = _default_blocks(head_dim, interpret)
    block_q = block_q or dq_
    block_kv = block_kv or dk_
    layout = to_layout(mask, q_len, kv_len, block_q, block_kv, q_offset=q_offset)
  else:
    block_q, block_kv = layout.block_q, layout.block_kv
  fwd_tables, bwd_tables = _kernel_tables(layout)

  # Pad lengths to whole blocks and head_dim to a supported size; padding is masked or sliced off.
  d_pad = _padded_head_dim(head_dim)
  tq, tk = layout.num_q_blocks * block_q, layout.num_kv_blocks * block_kv
  pad = lambda x, t: jnp.pad(x, ((0, 0), (0, t - x.shape[1]), (0, 0), (0, d_pad - head_dim)))
  qp, kp, vp = pad(q, tq), pad(k, tk), pad(v, tk)
  if kernel == "mosaic":
    why = mgpu.config_reason(q.dtype, d_pad, block_q, block_kv)
    if why is not None:
      raise ValueError(f"kernel='mosaic' cannot serve this call: {why}; use kernel='auto' or 'triton'")
  mask_fn = None if isinstance(mask, masks_lib.Full) else mask
  out, lse = _flash(qp, kp, vp, *fwd_tables, *bwd_tables, mask_fn, scale, block_q, block_kv, kv_len,
                    q_offset, bool(interpret), kernel)
  out = out[:, :q_len, :, :head_dim]
  lse = lse[:, :, :q_len]
  return (out, lse) if return_lse else out
