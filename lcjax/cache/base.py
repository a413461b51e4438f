"""The KV-cache protocol (docs/architecture.md, "KV caches").

A cache is a registered pytree of fixed capacity, so that jit compiles once; it is updated
functionally and owns the attention over what it holds, because how it reads decides the speed.

    cache = cache.update(k_new, v_new, q=q_new, num_new=n)   # prefill chunk or decode step
    out   = cache.attend(q, scale=...)                        # attention over the cache
    cache.memory_bytes()                                      # bytes the cache's arrays occupy

Conventions: k_new, v_new [B, T, Hkv, D]; q [B, T, Hq, D]; `lengths` int32 [B] counts the tokens
each sequence has written so far (its absolute position), and the queries passed to attend() are
the last T tokens written, at absolute positions lengths - T ... lengths - 1.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax
import numpy as np


@runtime_checkable
class KVCache(Protocol):
  lengths: jax.Array

  def update(self, k_new, v_new, *, q=None, num_new=None) -> "KVCache":
    """Writes T new tokens per sequence (only the first num_new[b] of them count, int32 [B])."""
    ...

  def attend(self, q, *, scale: float | None = None):
    """Attention of q [B, T, Hq, D] (the last T tokens written) over the cache: [B, T, Hq, D]."""
    ...

  def memory_bytes(self) -> int:
    ...


def tree_bytes(tree) -> int:
  """Bytes held by the array leaves of a pytree (static: shapes and dtypes only)."""
  return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))
