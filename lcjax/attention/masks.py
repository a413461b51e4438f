"""Masks: which (query, key) pairs may attend, as pure functions of absolute indices.

A mask is a small frozen object whose `__call__(q_idx, kv_idx)` takes broadcastable int32 arrays of
absolute positions (query i of a chunk that starts at q_offset has index q_offset + i) and returns
a bool array. Masks combine with `&`, `|` and `~`, are hashable (so jit can treat them as static),
and are traced into kernels for the blocks that are only partly visible. `to_layout` (layouts.py)
compiles a mask into a BlockLayout.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


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
    return jnp.ones(jnp.broadcast_shapes(jnp.shape(q_idx), jnp.shape(kv_idx)), bool)


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


def full() -> Mask:
  return Full()


def causal() -> Mask:
  return Causal()


def sliding_window(left: int, right: int = 0) -> Mask:
  """A window of `left` keys before and `right` after each query, the query itself included."""
  return SlidingWindow(int(left), int(right))
