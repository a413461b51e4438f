"""Glue from lcjax's caches to the GPU decode and linear-attention kernels (issue 5).

What a cache's `attend` calls (DenseKVCache and the Quest / landmark caches read through
decode_attend). Each function takes `implementation`: "pallas" (the kernels in
pallas_kernels.gpu; without a GPU they run in interpret mode), "xla" (the references, the CPU
fallback), or "auto" (Pallas on a GPU backend, else XLA).

  decode_attend(q, k, v, lengths, layout=None)        dense or block-sparse cache
  quantized_decode_attend(q, kv, lengths)             QuantizedKV (int8 / int4, KIVI-style)
  quantize_kv(k, v, bits=, key_group=, value_group=)  -> QuantizedKV (re-exported)
  linear_attention(q, k, v, log_decay)                chunked causal linear attention (prefill)
  linear_attention_decode_step(state, q, k, v, log_decay)  recurrent step on a linear state

Under a mesh (`jax.set_mesh`, as generate(mesh=) runs) the kernels run inside a shard_map over
(batch, KV heads), split as the sharding rules split "batch" and "kv_heads" (_on_mesh_shards).

Conventions as in lcjax.cache.base: q [B, T, Hq, D] are the last T tokens written, at positions
lengths - T .. lengths - 1; k, v [B, C, Hkv, D]; lengths int32 [B]. Each query sees the keys at
or before its own position (causal among the T new tokens) and below lengths.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lcjax.attention import linear_reference
from lcjax.attention.layout import BlockLayout
from lcjax.attention.masks import causal
from lcjax.attention.reference import attention_reference
from lcjax.sharding.rules import active_mesh, logical_to_spec
from pallas_kernels.gpu import decode as decode_kernels
from pallas_kernels.gpu import decode_quant, decode_quant_mgpu
from pallas_kernels.gpu import linear as linear_kernels
from pallas_kernels.gpu.decode_quant import QuantizedKV, dequantize_kv, quantize_kv  # noqa: F401

IMPLEMENTATIONS = ("auto", "pallas", "xla")

# Head axis of each kernel operand (batch is always axis 0): q, out [B, T, Hq, D]; k, v
# [B, C, Hkv, D]; lse [B, Hq, T]; block lists [B, H, n] / [B, H]; QuantizedKV's key arrays
# [B, C(/G), Hkv, ...] and channel-major value arrays [B, Hkv, ..., C]; lengths [B] have none.
_QKV_HEAD_AXES = QuantizedKV(2, 2, 2, 1, 1, 1)


# The decode kernels pack the T x G query rows of a KV head into one tile: a few tokens only.
MAX_DECODE_ROWS = 64


def _use_pallas(implementation: str, interpret: bool) -> tuple[bool, bool]:
  """(run the Pallas kernel?, in interpret mode?). "pallas" on a machine without a GPU runs the
  kernel in interpret mode (slow, for tests) rather than failing to compile it."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}; got {implementation!r}")
  on_gpu = jax.default_backend() == "gpu"
  if implementation == "auto":
    return on_gpu or interpret, interpret
  return implementation == "pallas", interpret or not on_gpu


def uses_kernels(implementation: str) -> bool:
  """Whether `implementation` ("auto", "pallas", "xla") runs the Pallas kernels on this backend."""
  return _use_pallas(implementation, False)[0]


def decode_unsupported_reason(q, k, v, block_size: int | None = None) -> str | None:
  """Why decode_attend's kernel cannot serve q [B, T, Hq, D] over k, v [B, C, Hkv, D] (with key
  blocks of block_size for block-sparse decode); None if it can."""
  rows = q.shape[1] * (q.shape[2] // k.shape[2])
  if rows > MAX_DECODE_ROWS:
    return f"T x (Hq / Hkv) = {rows} query rows per KV head > {MAX_DECODE_ROWS} (a prefill chunk)"
  if not (q.dtype == k.dtype == v.dtype):
    return f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"
  if k.shape[1] % 16 or q.shape[-1] % 16:
    return f"capacity {k.shape[1]} and head_dim {q.shape[-1]} must be multiples of 16"
  if block_size is not None and block_size % 16:
    return f"block_size {block_size} must be a multiple of 16"
  return None


def _on_mesh_shards(fn, args, head_axes, out_head_axes, batch: int, kv_heads: int):
  """fn(*args), run per (batch, KV head) shard under jax.shard_map when a mesh is active.

  A Pallas kernel is one custom call that XLA cannot partition: under a sharded jit (generate
  with a mesh) it would gather the whole cache onto every device. Decode is independent per
  (sequence, KV head), so each device runs the kernel on its own shard instead: batch split as
  the rules split "batch", heads as they split "kv_heads" (the query heads of a KV head, and
  per-query-head block lists, go with it). head_axes / out_head_axes: per argument / output the
  axis holding heads (None: no head axis), pytrees matching args / fn's outputs. Without an
  active mesh: fn(*args).
  """
  mesh = active_mesh()
  if mesh is None:
    return fn(*args)
  batch_spec, head_spec = logical_to_spec(("batch", "kv_heads"), mesh, (batch, kv_heads))

  def specs(x, head_axis):
    if isinstance(head_axis, tuple):                # a tuple / NamedTuple of arrays
      parts = [specs(xx, h) for xx, h in zip(x, head_axis)]
      return type(head_axis)(*parts) if hasattr(head_axis, "_fields") else tuple(parts)
    dims = [batch_spec] + [None] * (x.ndim - 1)
    if head_axis is not None:
      dims[head_axis] = head_spec
    return P(*dims)

  in_specs = specs(args, head_axes)
  out_specs = specs(jax.eval_shape(fn, *args), out_head_axes)
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)


def layout_block_lists(layout: BlockLayout, batch: int, q_heads: int, kv_heads: int, capacity: int):
  """A decode BlockLayout (one query block) -> (block_indices [B, H, n], block_counts [B, H]).

  The layout's heads must be 1 or kv_heads (all query heads of a KV head share its blocks, so K/V
  are read once), or q_heads (one list per query head: a KV block is read once per query head
  that lists it); its batch 1 or B. kv_full is not needed: the causal / fill-level mask is
  always applied inside the visited blocks.
  """
  if layout.num_q_blocks != 1:
    raise ValueError(f"decode layouts need one query block; got block_q={layout.block_q}, "
                     f"q_len={layout.q_len} ({layout.num_q_blocks} blocks)")
  if layout.kv_len != capacity:
    raise ValueError(f"layout.kv_len={layout.kv_len} must equal the cache capacity {capacity}")
  lb, lh = layout.kv_counts.shape[:2]
  if lh not in (1, kv_heads, q_heads):
    raise ValueError(f"layout heads {lh} must be 1, kv_heads={kv_heads} or q_heads={q_heads} for decode")
  if lb not in (1, batch):
    raise ValueError(f"layout batch {lb} must be 1 or the batch size {batch}")
  heads = kv_heads if lh == 1 else lh
  idx = jnp.broadcast_to(layout.kv_indices[:, :, 0], (batch, heads, layout.kv_indices.shape[-1]))
  cnt = jnp.broadcast_to(layout.kv_counts[:, :, 0], (batch, heads))
  return idx, cnt


def decode_attend(q, k, v, lengths, *, layout: BlockLayout | None = None, scale: float | None = None,
                  return_lse: bool = False, implementation: str = "auto", interpret: bool = False,
                  **kernel_options):
  """Causal decode attention of q [B, T, Hq, D] over a dense cache k, v [B, C, Hkv, D].

  layout: optional BlockLayout with one query block (block_q >= T) listing the key blocks each
    (batch, kv head) visits (Quest / landmark / top-k retrieval); block_kv must divide C.
  kernel_options: block_k, num_splits, schedule, num_warps, num_stages (see pallas_kernels.gpu.decode).
  Returns out [B, T, Hq, D] in q.dtype (and float32 lse [B, Hq, T] with return_lse).
  """
  lengths = jnp.asarray(lengths, jnp.int32)
  use_pallas, interpret = _use_pallas(implementation, interpret)
  if use_pallas:
    lists = ()
    if layout is not None:
      lists = layout_block_lists(layout, q.shape[0], q.shape[2], k.shape[2], k.shape[1])
      kernel_options = dict(kernel_options, block_size=layout.block_kv)
    kernel = functools.partial(decode_kernels.decode_attention, scale=scale, interpret=interpret,
                               return_lse=return_lse, **kernel_options)
    return _on_mesh_shards(kernel, (q, k, v, lengths, *lists), (2, 2, 2, None) + (1,) * len(lists),
                           (2, 1) if return_lse else 2, q.shape[0], k.shape[2])
  return attention_reference(q, k, v, mask=causal(), layout=layout, scale=scale,
                             q_offset=lengths - q.shape[1], kv_valid_len=lengths, return_lse=return_lse)


_TRITON_ONLY_OPTIONS = ("num_warps", "num_stages")


def _quantized_kernel(q, kv: QuantizedKV, kernel: str, interpret: bool, kernel_options) -> str:
  """"triton" or "mosaic": which quantised decode kernel serves the call (see quantized_decode_attend)."""
  if kernel not in ("auto", "triton", "mosaic"):
    raise ValueError(f"kernel must be 'auto', 'triton' or 'mosaic'; got {kernel!r}")
  if kernel == "triton":
    return kernel
  why = decode_quant_mgpu.config_reason(q.shape, kv, kernel_options.get("block_k"))
  if not kernel_options.get("int8_mma", False):
    why = "int8_mma=False (the Mosaic GPU kernel has int8 tensor-core dots only)"
  elif (triton_only := [k for k in _TRITON_ONLY_OPTIONS if k in kernel_options]):
    why = f"options {triton_only} are the Triton kernel's"
  elif interpret:
    why = "interpret mode (Mosaic GPU's interpreter cannot run wgmma)"
  if kernel == "mosaic":
    if why is not None:
      raise ValueError(f"kernel='mosaic' cannot serve this call: {why}; use kernel='auto' or 'triton'")
    return kernel
  return "mosaic" if why is None and decode_quant_mgpu.supports(q, kv, kernel_options.get("block_k")) else "triton"


def quantized_decode_attend(q, kv: QuantizedKV, lengths, *, scale: float | None = None,
                            return_lse: bool = False, implementation: str = "auto",
                            interpret: bool = False, kernel: str = "auto", **kernel_options):
  """Causal decode attention over a QuantizedKV cache (dequantised inside the kernel).

  kernel_options: block_k, num_splits, num_warps, num_stages, int8_mma (int8 tensor-core dots,
  the fast path for int8 and int4: relative error ~1 % instead of ~0.3-0.5 %).
  kernel: "auto" takes the Mosaic GPU kernel (pallas_kernels.gpu.decode_quant_mgpu) for int8 and
  int4 codes with int8_mma on a Hopper GPU when its config_reason (for the block_k given, or its
  default) is None and no Triton-only option (num_warps, num_stages) is given, else the Triton
  kernel (decode_quant); "triton" or "mosaic" choose one (for benchmarks and tests). On the
  H200 at 32k-128k keys with the defaults (Mosaic GPU): int8 1.64-1.77x cuDNN's bf16 tokens/s
  (Triton 1.62-1.74x), int4 2.52-2.74x (Triton 2.12-2.36x); BENCHMARKS.md runs 10-14.
  """
  lengths = jnp.asarray(lengths, jnp.int32)
  use_pallas, interpret = _use_pallas(implementation, interpret)
  if use_pallas:
    if _quantized_kernel(q, kv, kernel, interpret, kernel_options) == "mosaic":
      kernel = functools.partial(decode_quant_mgpu.quantized_decode_attention, scale=scale,
                                 return_lse=return_lse, block_k=kernel_options.get("block_k"),
                                 num_splits=kernel_options.get("num_splits"))
    else:
      kernel = functools.partial(decode_quant.quantized_decode_attention, scale=scale,
                                 interpret=interpret, return_lse=return_lse, **kernel_options)
    return _on_mesh_shards(kernel, (q, kv, lengths), (2, _QKV_HEAD_AXES, None),
                           (2, 1) if return_lse else 2, q.shape[0], kv.k_codes.shape[2])
  k, v = dequantize_kv(kv, q.dtype)
  return attention_reference(q, k, v, mask=causal(), scale=scale, q_offset=lengths - q.shape[1],
                             kv_valid_len=lengths, return_lse=return_lse)


def linear_attention(q, k, v, log_decay=None, *, scale: float | None = None, return_state: bool = False,
                     implementation: str = "auto", interpret: bool = False, **kernel_options):
  """Chunked causal linear attention (see pallas_kernels.gpu.linear); differentiable in q, k, v.

  With return_state also the float32 state [B, H, Dk, Dv] after the last token, which
  linear_attention_decode_step continues from.
  """
  use_pallas, interpret = _use_pallas(implementation, interpret)
  if use_pallas:
    return linear_kernels.linear_attention(q, k, v, log_decay, scale=scale, return_state=return_state,
                                           interpret=interpret, **kernel_options)
  if return_state:
    return linear_reference.linear_attention_recurrent(q, k, v, log_decay=log_decay, scale=scale)
  return linear_reference.linear_attention_reference(q, k, v, log_decay=log_decay, scale=scale)


def linear_attention_decode_step(state, q, k, v, log_decay=None, *, scale: float | None = None,
                                 implementation: str = "auto", interpret: bool = False, **kernel_options):
  """One recurrent step: q, k [B, H, Dk], v [B, H, Dv], state float32 [B, H, Dk, Dv] -> (out, state)."""
  use_pallas, interpret = _use_pallas(implementation, interpret)
  if use_pallas:
    return linear_kernels.linear_attention_decode_step(state, q, k, v, log_decay, scale=scale,
                                                       interpret=interpret, **kernel_options)
  return linear_reference.linear_attention_decode_step_reference(state, q, k, v, log_decay=log_decay,
                                                                 scale=scale)
