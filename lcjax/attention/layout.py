"""BlockLayout: which key blocks each query block visits, as a pytree of int32 tables.

The contract between "select" and "attend" (docs/architecture.md). Producers (static masks
compiled on the host, dynamic selectors under jit) build one with `BlockLayout.from_block_mask`,
or `from_kv_lists` from top-k block indices; consumers (the XLA reference, the Pallas kernels)
read the index lists.

Shapes (B and H may be 1, meaning "the same for every batch row / head"; a layout with H heads
serves q heads h * H // q_heads, so H may be 1, kv_heads or q_heads):
  kv_indices  int32 [B, H, num_q_blocks, max_kv_blocks]  key blocks to visit, ascending; the
              padding past kv_counts repeats the last valid index (kernels may prefetch it).
  kv_counts   int32 [B, H, num_q_blocks]                 how many of kv_indices are valid.
  kv_full     bool  [B, H, num_q_blocks, max_kv_blocks]  the block is fully visible: no element
              mask needs to be applied inside it.
  q_indices / q_counts / q_full: the transpose (query blocks that visit each key block), shapes
              [B, H, num_kv_blocks, max_q_blocks], [B, H, num_kv_blocks], for backward kernels.
Static fields: block_q, block_kv, q_len, kv_len.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _compress(visible, full):
  """[..., n_rows, n_cols] bool tables -> (indices, counts, full_flags) lists along the last axis.

  Works for numpy (host compilation) and jnp (inside jit) inputs alike.
  """
  xp = np if isinstance(visible, np.ndarray) else jnp
  n_cols = visible.shape[-1]
  counts = visible.sum(-1).astype(xp.int32)
  # Stable sort puts visible columns first, in ascending order.
  order = xp.argsort(~visible, axis=-1, stable=True).astype(xp.int32)
  width = max(int(counts.max()) if xp is np else n_cols, 1)
  order = order[..., :width]
  pos = xp.arange(width, dtype=xp.int32)
  last = xp.take_along_axis(order, xp.maximum(counts - 1, 0)[..., None], axis=-1)
  indices = xp.where(pos < counts[..., None], order, last)
  flags = xp.take_along_axis(full, indices, axis=-1) & (pos < counts[..., None])
  return indices.astype(xp.int32), counts, flags


def _check_static_sizes(**sizes):
  for name, value in sizes.items():
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name}={value!r}; accepted: a static Python int >= 1")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["kv_indices", "kv_counts", "kv_full", "q_indices", "q_counts", "q_full"],
    meta_fields=["block_q", "block_kv", "q_len", "kv_len"],
)
@dataclasses.dataclass(frozen=True)
class BlockLayout:
  kv_indices: jax.Array
  kv_counts: jax.Array
  kv_full: jax.Array
  q_indices: jax.Array
  q_counts: jax.Array
  q_full: jax.Array
  block_q: int
  block_kv: int
  q_len: int
  kv_len: int

  @property
  def num_q_blocks(self) -> int:
    return _cdiv(self.q_len, self.block_q)

  @property
  def num_kv_blocks(self) -> int:
    return _cdiv(self.kv_len, self.block_kv)

  @classmethod
  def from_block_mask(cls, visible, full=None, *, block_q: int, block_kv: int, q_len: int,
                      kv_len: int) -> "BlockLayout":
    """Builds a layout from dense block tables.

    Args:
      visible: bool [B, H, num_q_blocks, num_kv_blocks], True where the block is visited.
        numpy (compiled on the host: the list width is the largest count) or jnp (under jit:
        the width is num_kv_blocks, so shapes stay static).
      full: bool, same shape: True where every element of a visited block is allowed. None
        means no block is known to be fully visible (the element mask is always applied).
    """
    xp = np if isinstance(visible, np.ndarray) else jnp
    _check_static_sizes(block_q=block_q, block_kv=block_kv, q_len=q_len, kv_len=kv_len)
    if visible.ndim != 4:
      raise ValueError(f"visible must be [B, H, num_q_blocks, num_kv_blocks]; got shape {visible.shape}")
    expected = (_cdiv(q_len, block_q), _cdiv(kv_len, block_kv))
    if tuple(visible.shape[2:]) != expected:
      raise ValueError(
          f"visible has block grid {tuple(visible.shape[2:])}, but q_len={q_len}, kv_len={kv_len} "
          f"with block_q={block_q}, block_kv={block_kv} need {expected}")
    if full is not None and tuple(full.shape) != tuple(visible.shape):
      raise ValueError(f"full has shape {tuple(full.shape)}; accepted: None or the shape of visible "
                       f"{tuple(visible.shape)}")
    visible = visible.astype(bool)
    full = xp.zeros_like(visible) if full is None else (full.astype(bool) & visible)
    kv_indices, kv_counts, kv_full = _compress(visible, full)
    q_indices, q_counts, q_full = _compress(xp.swapaxes(visible, -1, -2), xp.swapaxes(full, -1, -2))
    return cls(kv_indices, kv_counts, kv_full, q_indices, q_counts, q_full,
               block_q=block_q, block_kv=block_kv, q_len=q_len, kv_len=kv_len)

  @classmethod
  def from_kv_lists(cls, kv_indices, kv_counts, kv_full=None, *, block_q: int, block_kv: int, q_len: int,
                    kv_len: int) -> "BlockLayout":
    """Builds a layout from key-block lists, as selectors working from top-k indices produce them.

    Args:
      kv_indices: int32 [B, H, num_q_blocks, k], ascending, the padding past kv_counts repeating
        the last valid index (as in the layout).
      kv_counts: int32 [B, H, num_q_blocks].
      kv_full: bool like kv_indices, or None (no block known to be fully visible).
    The transposed lists come from the dense table; under jit they cost nothing where no consumer
    reads them (the decode kernels read only the key-block lists).
    """
    _check_static_sizes(block_q=block_q, block_kv=block_kv, q_len=q_len, kv_len=kv_len)
    if kv_indices.ndim != 4 or kv_indices.shape[2] != _cdiv(q_len, block_q):
      raise ValueError(f"kv_indices must be [B, H, num_q_blocks={_cdiv(q_len, block_q)}, k]; got shape "
                       f"{kv_indices.shape}")
    if tuple(kv_counts.shape) != tuple(kv_indices.shape[:3]):
      raise ValueError(f"kv_counts has shape {tuple(kv_counts.shape)}; accepted: {tuple(kv_indices.shape[:3])}")
    listed = jnp.arange(kv_indices.shape[-1]) < kv_counts[..., None]
    kv_full = jnp.zeros(kv_indices.shape, bool) if kv_full is None else kv_full.astype(bool) & listed
    kv_lists = cls(kv_indices.astype(jnp.int32), kv_counts.astype(jnp.int32), kv_full, None, None, None,
                   block_q=block_q, block_kv=block_kv, q_len=q_len, kv_len=kv_len)
    visible, full = kv_lists.block_mask()
    q_indices, q_counts, q_full = _compress(jnp.swapaxes(visible, -1, -2), jnp.swapaxes(full, -1, -2))
    return dataclasses.replace(kv_lists, q_indices=q_indices, q_counts=q_counts, q_full=q_full)

  def block_mask(self):
    """Dense bool [B, H, num_q_blocks, num_kv_blocks] tables (visible, full), for references and tests."""
    n_kv = self.num_kv_blocks
    valid = jnp.arange(self.kv_indices.shape[-1]) < self.kv_counts[..., None]
    one_hot = jax.nn.one_hot(self.kv_indices, n_kv, dtype=jnp.bool_) & valid[..., None]
    visible = one_hot.any(-2)
    full = (one_hot & self.kv_full[..., None]).any(-2)
    return visible, full

  def density(self):
    """Fraction of (query block, key block) pairs visited, per [B, H], float32."""
    return self.kv_counts.sum(-1) / (self.num_q_blocks * self.num_kv_blocks)
