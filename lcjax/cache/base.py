"""The KV-cache protocol (docs/architecture.md, "KV caches").

A cache is a registered pytree of fixed capacity, so that jit compiles once; it is updated
functionally and owns the attention over what it holds, because how it reads decides the speed.

    cache = cache.update(k_new, v_new, q=q_new, num_new=n)   # prefill chunk or decode step
    out   = cache.attend(q, scale=...)                        # attention over the cache
    cache.memory_bytes()                                      # bytes the cache's arrays occupy
    cache.logical_axes()                                      # optional: logical axis names per array

Conventions: k_new, v_new [B, T, Hkv, D]; q [B, T, Hq, D]; `lengths` int32 [B] counts the tokens
each sequence has written so far (its absolute position), and the queries passed to attend() are
the last T tokens written, at absolute positions lengths - T ... lengths - 1.

Sharding: `cache_logical_axes(cache)` gives the cache's pytree with, in place of each array, a
tuple of logical axis names (lcjax.sharding's rules map them to mesh axes). A cache that defines
`logical_axes()` says it itself (DenseKVCache: k, v ("batch", "cache_seq", "kv_heads",
"head_dim"), lengths ("batch",)); any other gets `default_logical_axes`: every array's first dim
is the batch (true of every cache here), the rest replicated.
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

  # Optional (not required by isinstance): `logical_axes(self)` -> the cache's pytree with a tuple
  # of logical axis names in place of each array; cache_logical_axes() falls back to the default.


# Logical axes of a cache's key/value slots [B, C, Hkv, D] (lcjax.sharding's rules table names them).
KV_AXES = ("batch", "cache_seq", "kv_heads", "head_dim")


def default_logical_axes(cache):
  """The cache's pytree with ("batch", None, ...) in place of each array (() for a scalar): batch
  split over the data axes, everything else replicated. Works on ShapeDtypeStruct leaves too."""
  return jax.tree.map(lambda x: ("batch",) + (None,) * (len(x.shape) - 1) if len(x.shape) else (), cache)


def cache_logical_axes(cache):
  """Logical axes of a cache's arrays: its own `logical_axes()` if it has one, else the default;
  None for None (a layer that reads another layer's cache under cross-layer sharing)."""
  if cache is None:
    return None
  own = getattr(cache, "logical_axes", None)
  return own() if callable(own) else default_logical_axes(cache)


def tree_bytes(tree) -> int:
  """Bytes held by the array leaves of a pytree (static: shapes and dtypes only)."""
  return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))
