"""Masks: which (query, key) pairs may attend, as pure functions of absolute indices.

A mask is a small frozen object whose `__call__(q_idx, kv_idx)` takes broadcastable int32 arrays of
absolute positions (query i of a chunk that starts at q_offset has index q_offset + i) and returns
a bool array that broadcasts to their common shape. The index arrays may be numpy (host compilation in `to_layout`) or jnp (kernels,
the reference); masks use only operators that work on both. Masks combine with `&`, `|` and `~`,
are hashable (so jit can treat them as static, and `to_layout` can cache their compiled layout),
and are traced into kernels for the blocks that are only partly visible. `to_layout`
(layouts.py) compiles a mask into a BlockLayout.

Document masks. A mask is a pure function of positions, so it cannot close over per-batch
segment ids without losing hashability. Document masking (packed sequences) is therefore given
as data, not as a Mask: `attend(..., segment_ids=, kv_segment_ids=)` applies it, and
`to_layout(mask, ..., segment_ids=, kv_segment_ids=)` folds it into a per-batch layout with jnp
(under jit). The two compose with any Mask: the allowed pairs are mask & same-segment.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np


class Mask:
  """Base class. Subclasses are frozen dataclasses implementing `__call__(q_idx, kv_idx)`."""

  def __call__(self, q_idx, kv_idx):
    raise NotImplementedError

  def __and__(self, other: "Mask") -> "Mask":
    return And(self, other)

  def __or__(self, other: "Mask") -> "Mask":
    return Or(self, other)

  def __invert__(self) -> "Mask":
    return Not(self)


@dataclasses.dataclass(frozen=True)
class And(Mask):
  left: Mask
  right: Mask

  def __call__(self, q_idx, kv_idx):
    return self.left(q_idx, kv_idx) & self.right(q_idx, kv_idx)


@dataclasses.dataclass(frozen=True)
class Or(Mask):
  left: Mask
  right: Mask

  def __call__(self, q_idx, kv_idx):
    return self.left(q_idx, kv_idx) | self.right(q_idx, kv_idx)


@dataclasses.dataclass(frozen=True)
class Not(Mask):
  inner: Mask

  def __call__(self, q_idx, kv_idx):
    return ~self.inner(q_idx, kv_idx)


@dataclasses.dataclass(frozen=True)
class Full(Mask):
  """Every pair allowed."""

  def __call__(self, q_idx, kv_idx):
    shape = np.broadcast_shapes(np.shape(q_idx), np.shape(kv_idx))
    host = isinstance(q_idx, np.ndarray) and isinstance(kv_idx, np.ndarray)
    return np.ones(shape, bool) if host else jnp.ones(shape, bool)


@dataclasses.dataclass(frozen=True)
class Causal(Mask):
  """Key position <= query position."""

  def __call__(self, q_idx, kv_idx):
    return kv_idx <= q_idx


@dataclasses.dataclass(frozen=True)
class SlidingWindow(Mask):
  """q_idx - left <= kv_idx <= q_idx + right (right=0: causal local attention, Mistral's window)."""
  left: int
  right: int = 0

  def __post_init__(self):
    if self.left < 0 or self.right < 0:
      raise ValueError(f"sliding_window needs left >= 0 and right >= 0; got left={self.left}, right={self.right}")

  def __call__(self, q_idx, kv_idx):
    return (kv_idx >= q_idx - self.left) & (kv_idx <= q_idx + self.right)


def _check_int(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name}={value!r}; accepted: a Python int >= {minimum} (masks are static)")
  return int(value)


@dataclasses.dataclass(frozen=True)
class Sinks(Mask):
  """The first `num` keys (attention sinks, StreamingLLM: Xiao et al. 2024) are visible to all."""
  num: int

  def __post_init__(self):
    _check_int("sinks: num", self.num, 0)

  def __call__(self, q_idx, kv_idx):
    return kv_idx < self.num        # broadcasts against q_idx wherever it is combined or used


@dataclasses.dataclass(frozen=True)
class Chunked(Mask):
  """Query and key in the same chunk of `size` positions (chunked/local attention, Llama 4)."""
  size: int

  def __post_init__(self):
    _check_int("chunked: size", self.size, 1)

  def __call__(self, q_idx, kv_idx):
    return (q_idx // self.size) == (kv_idx // self.size)


@dataclasses.dataclass(frozen=True)
class PrefixLM(Mask):
  """Bidirectional over the first `prefix_len` positions, causal after (T5/UniLM prefix LM)."""
  prefix_len: int

  def __post_init__(self):
    _check_int("prefix_lm: prefix_len", self.prefix_len, 0)

  def __call__(self, q_idx, kv_idx):
    return (kv_idx <= q_idx) | (kv_idx < self.prefix_len)


@dataclasses.dataclass(frozen=True)
class Strided(Mask):
  """Keys at a distance from the query that is a multiple of `stride` (Sparse Transformer's
  strided pattern, Child et al. 2019; combined with a window it is LongNet's dilated attention)."""
  stride: int

  def __post_init__(self):
    _check_int("strided: stride", self.stride, 1)

  def __call__(self, q_idx, kv_idx):
    return (q_idx - kv_idx) % self.stride == 0


def full() -> Mask:
  return Full()


def causal() -> Mask:
  return Causal()


def sliding_window(left: int, right: int = 0) -> Mask:
  """A window of `left` keys before and `right` after each query, the query itself included."""
  return SlidingWindow(int(left), int(right))


def sinks(num: int) -> Mask:
  """Keys 0..num-1 visible to every query; `sinks(4) | sliding_window(w)` is StreamingLLM's A-shape."""
  return Sinks(num)


def chunked(size: int) -> Mask:
  """Block-diagonal attention over chunks of `size`; `chunked(c) & causal()` is Llama 4's local layer."""
  return Chunked(size)


def prefix_lm(prefix_len: int) -> Mask:
  return PrefixLM(prefix_len)


def strided(stride: int) -> Mask:
  return Strided(stride)


def dilated_window(window: int, dilation: int) -> Mask:
  """Causal window of `window` visited keys spaced `dilation` apart (the query itself included)."""
  _check_int("dilated_window: window", window, 1)
  return SlidingWindow((int(window) - 1) * _check_int("dilated_window: dilation", dilation, 1)) & Strided(dilation)
