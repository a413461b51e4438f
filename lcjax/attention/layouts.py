"""to_layout: compile a Mask (and optional segment ids) into a BlockLayout.

Static masks are compiled once on the host with numpy and cached (the mask is hashable, the sizes
are ints); data-dependent inputs (segment ids, a traced q_offset) are compiled with jnp, so the
call works under jit. Both paths are exact: a block is *visible* when at least one of its pairs
is allowed, and *full* when every pair is allowed, where

  - query rows past q_len (padding of the last query block) are ignored: their outputs are
    dropped anyway;
  - key columns past kv_len count as not allowed, so the last partial key block is never full
    (a kernel skipping the element mask there would read padding).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.attention.layout import BlockLayout, _cdiv
from lcjax.attention.masks import Full, Mask

_HOST_CHUNK_ELEMENTS = 1 << 24      # pairs evaluated at once on the host (16 MiB of bools)


def static_int(name: str, value, minimum: int = 1) -> int:
  """Returns value as an int, or raises ValueError if it is not a static Python int >= minimum."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name}={value!r} (type {type(value).__name__}); accepted: a static Python "
                     f"int >= {minimum} (shapes and block sizes must be known at trace time)")
  if value < minimum:
    raise ValueError(f"{name}={value}; accepted: an int >= {minimum}")
  return int(value)


def _reduce_blocks(allowed, q_pad, block_q, block_kv):
  """allowed: bool [..., rows, cols] over whole blocks (key padding already False); q_pad: bool
  [..., rows, 1] marking padded query rows. Returns (visible, full) [..., rows/bq, cols/bk]."""
  xp = np if isinstance(allowed, np.ndarray) else jnp
  *lead, rows, cols = allowed.shape
  shape = (*lead, rows // block_q, block_q, cols // block_kv, block_kv)
  axes = (len(lead) + 1, len(lead) + 3)
  visible = xp.any((allowed & ~q_pad).reshape(shape), axis=axes)
  full = xp.all((allowed | q_pad).reshape(shape), axis=axes)
  return visible, full & visible


@functools.lru_cache(maxsize=128)
def host_block_tables(mask: Mask, q_len: int, kv_len: int, block_q: int, block_kv: int,
                      q_offset: int = 0):
  """numpy bool [nQ, nK] tables (visible, full) of a static mask; cached, read-only."""
  n_q, n_kv = _cdiv(q_len, block_q), _cdiv(kv_len, block_kv)
  kv_pos = np.arange(n_kv * block_kv)
  rows_per_chunk = max(1, _HOST_CHUNK_ELEMENTS // (block_q * kv_pos.size))
  visible, full = [], []
  for start in range(0, n_q, rows_per_chunk):
    q_pos = np.arange(start * block_q, min(start + rows_per_chunk, n_q) * block_q)[:, None]
    allowed = np.broadcast_to(np.asarray(mask(q_pos + q_offset, kv_pos[None, :])),
                              (q_pos.size, kv_pos.size))
    allowed = allowed & (kv_pos < kv_len)[None, :]
    vis, ful = _reduce_blocks(allowed, q_pos >= q_len, block_q, block_kv)
    visible.append(vis)
    full.append(ful)
  visible, full = np.concatenate(visible), np.concatenate(full)
  visible.flags.writeable = full.flags.writeable = False   # cached and shared: keep immutable
  return visible, full


@functools.lru_cache(maxsize=128)
def _host_layout(mask: Mask, q_len: int, kv_len: int, block_q: int, block_kv: int,
                 q_offset: int) -> BlockLayout:
  visible, full = host_block_tables(mask, q_len, kv_len, block_q, block_kv, q_offset)
  layout = BlockLayout.from_block_mask(visible[None, None], full[None, None], block_q=block_q,
                                       block_kv=block_kv, q_len=q_len, kv_len=kv_len)
  for leaf in jax.tree_util.tree_leaves(layout):
    leaf.flags.writeable = False
  return layout


def _device_layout(mask, q_len, kv_len, block_q, block_kv, q_offset, segment_ids, kv_segment_ids):
  """jnp path: per-batch layout [B, 1, ...], one query block at a time (memory B * bq * Tk)."""
  n_q, n_kv = _cdiv(q_len, block_q), _cdiv(kv_len, block_kv)
  batch = 1
  for x in (segment_ids, kv_segment_ids, jnp.atleast_1d(q_offset)):
    if x is not None and x.shape[0] != 1:
      batch = x.shape[0]
  q_off = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32).reshape(-1), (batch,))
  kv_pos = jnp.arange(n_kv * block_kv, dtype=jnp.int32)
  pad = lambda s, n: None if s is None else jnp.pad(s, ((0, 0), (0, n - s.shape[1])), constant_values=-1)
  q_seg = pad(segment_ids, n_q * block_q)
  kv_seg = pad(kv_segment_ids, n_kv * block_kv)

  def one_block(i):
    q_pos = i * block_q + jnp.arange(block_q, dtype=jnp.int32)
    allowed = jnp.broadcast_to(mask(q_off[:, None, None] + q_pos[None, :, None], kv_pos[None, None, :]),
                               (batch, block_q, kv_pos.size))
    allowed &= (kv_pos < kv_len)[None, None, :]
    if q_seg is not None:
      seg = jax.lax.dynamic_slice_in_dim(q_seg, i * block_q, block_q, axis=1)
      allowed &= seg[:, :, None] == kv_seg[:, None, :]
    q_pad = jnp.broadcast_to((q_pos >= q_len)[None, :, None], (batch, block_q, 1))
    vis, ful = _reduce_blocks(allowed, q_pad, block_q, block_kv)
    return vis[:, 0], ful[:, 0]                       # [B, n_kv]

  visible, full = jax.lax.map(one_block, jnp.arange(n_q))    # [n_q, B, n_kv]
  visible = jnp.moveaxis(visible, 0, 1)[:, None]
  full = jnp.moveaxis(full, 0, 1)[:, None]
  return BlockLayout.from_block_mask(visible, full, block_q=block_q, block_kv=block_kv,
                                     q_len=q_len, kv_len=kv_len)


def to_layout(mask: Mask | None, q_len: int, kv_len: int, block_q: int, block_kv: int, *,
              q_offset=0, segment_ids=None, kv_segment_ids=None) -> BlockLayout:
  """The BlockLayout of the pairs `mask` (and segment ids) allow.

  Args:
    mask: a Mask over absolute positions, or None for every pair.
    q_len, kv_len, block_q, block_kv: static Python ints.
    q_offset: absolute position of query 0: a Python int (host path, cached), or an int32 scalar
      or [B] array (jnp path).
    segment_ids: int32 [B, q_len]; kv_segment_ids: int32 [B, kv_len], defaulting to segment_ids.
      With either, queries see only keys of their own segment (document masking) and the layout
      is built per batch row with jnp (traceable).
  Returns:
    A BlockLayout with one head; batch 1 on the host path (shared by every row), B on the jnp path.
    Host layouts hold read-only numpy arrays and are cached on (mask, sizes, q_offset).
  """
  q_len, kv_len = static_int("q_len", q_len), static_int("kv_len", kv_len)
  block_q, block_kv = static_int("block_q", block_q), static_int("block_kv", block_kv)
  mask = Full() if mask is None else mask
  if not isinstance(mask, Mask):
    raise ValueError(f"mask={mask!r}; accepted: a lcjax.attention.masks.Mask or None")
  if segment_ids is None and kv_segment_ids is not None:
    raise ValueError("kv_segment_ids was given without segment_ids; accepted: both, or segment_ids alone")
  if segment_ids is not None:
    kv_segment_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
    if segment_ids.ndim != 2 or segment_ids.shape[1] != q_len:
      raise ValueError(f"segment_ids has shape {segment_ids.shape}; accepted: [batch, q_len={q_len}]")
    if kv_segment_ids.shape != (segment_ids.shape[0], kv_len):
      raise ValueError(f"kv_segment_ids has shape {kv_segment_ids.shape}; accepted: "
                       f"[batch={segment_ids.shape[0]}, kv_len={kv_len}]")
  static_offset = isinstance(q_offset, (int, np.integer)) and not isinstance(q_offset, bool)
  if segment_ids is None and static_offset:
    try:
      hash(mask)
    except TypeError:            # an unhashable user mask: compile without the caches
      visible, full = host_block_tables.__wrapped__(mask, q_len, kv_len, block_q, block_kv, int(q_offset))
      return BlockLayout.from_block_mask(visible[None, None], full[None, None], block_q=block_q,
                                         block_kv=block_kv, q_len=q_len, kv_len=kv_len)
    return _host_layout(mask, q_len, kv_len, block_q, block_kv, int(q_offset))
  q_offset = jnp.asarray(q_offset, jnp.int32)
  if q_offset.ndim > 1 or (segment_ids is not None and q_offset.ndim == 1
                           and q_offset.shape[0] not in (1, segment_ids.shape[0])):
    raise ValueError(f"q_offset has shape {q_offset.shape}; accepted: an int, a scalar or [batch]")
  return _device_layout(mask, q_len, kv_len, block_q, block_kv, q_offset, segment_ids, kv_segment_ids)
