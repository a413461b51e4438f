"""Dense KV cache: every token kept, at full precision, in a fixed-capacity buffer."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lcjax.attention import attend, decode_backend, masks
from lcjax.cache.base import KV_AXES, tree_bytes


def write_rows(buffer, new, start):
  """buffer [B, C, ...] <- new [B, T, ...] at rows start[b] .. start[b] + T - 1 (start int32 [B]).

  Rows that fall past the capacity C are dropped, never clamped: a dynamic_update_slice would move
  the whole write back to fit and silently overwrite earlier tokens. A cache whose `lengths` then
  exceed C must say so (DenseKVCache, ThinK and the block-retrieval caches return NaN).
  """
  b, t = new.shape[:2]
  rows = jnp.asarray(start, jnp.int32)[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
  return buffer.at[jnp.arange(b)[:, None], rows].set(new.astype(buffer.dtype), mode="drop")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v", "lengths"],
                   meta_fields=["window"])
@dataclasses.dataclass(frozen=True)
class DenseKVCache:
  """k, v: [B, capacity, Hkv, D]; lengths: int32 [B] tokens written per sequence.

  window: if set, queries see only the last `window` keys (Mistral's sliding window); the buffer
  still keeps everything (the ring-buffer cache in lcjax.cache saves the memory).
  """
  k: jax.Array
  v: jax.Array
  lengths: jax.Array
  window: int | None = None

  @classmethod
  def create(cls, batch: int, capacity: int, kv_heads: int, head_dim: int, dtype=jnp.float32,
             window: int | None = None) -> "DenseKVCache":
    shape = (batch, capacity, kv_heads, head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32), window)

  @property
  def capacity(self) -> int:
    return self.k.shape[1]

  def update(self, k_new, v_new, *, q=None, num_new=None) -> "DenseKVCache":
    """Writes k_new, v_new [B, T, Hkv, D] at each sequence's length.

    Writing past the capacity is an error the caller must prevent (generate checks
    prompt + new tokens <= capacity up front); rows past it are dropped and attend() then returns
    NaN for that sequence (never a silently wrong answer).
    """
    del q
    t = k_new.shape[1]
    num_new = jnp.full_like(self.lengths, t) if num_new is None else jnp.asarray(num_new, jnp.int32)
    k = write_rows(self.k, k_new.astype(self.k.dtype), self.lengths)
    v = write_rows(self.v, v_new.astype(self.v.dtype), self.lengths)
    return dataclasses.replace(self, k=k, v=v, lengths=self.lengths + num_new)

  def attend(self, q, *, scale: float | None = None, implementation: str = "auto"):
    """q [B, T, Hq, D]: the last T tokens written (positions lengths - T .. lengths - 1).

    Decode steps (a few tokens, no window) go to the split-KV decode kernel (on a GPU with "auto";
    pallas_kernels.gpu.decode), prefill chunks to `attend`.
    """
    if (self.window is None and decode_backend.uses_kernels(implementation)
        and decode_backend.decode_unsupported_reason(q, self.k, self.v) is None):
      out = decode_backend.decode_attend(q, self.k, self.v, self.lengths, scale=scale,
                                         implementation=implementation)
    else:
      mask = masks.causal() if self.window is None else masks.sliding_window(self.window - 1)
      out = attend(q, self.k, self.v, mask=mask, scale=scale, q_offset=self.lengths - q.shape[1],
                   kv_valid_len=self.lengths, implementation=implementation)
    # A sequence that overflowed the capacity lost tokens: NaN, not a silently wrong answer.
    return jnp.where((self.lengths > self.capacity)[:, None, None, None], jnp.nan, out)

  def memory_bytes(self) -> int:
    return tree_bytes((self.k, self.v, self.lengths))

  def logical_axes(self) -> "DenseKVCache":
    """This cache's structure with logical axis names in place of its arrays (lcjax.sharding)."""
    return dataclasses.replace(self, k=KV_AXES, v=KV_AXES, lengths=("batch",))
