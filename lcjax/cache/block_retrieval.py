"""A dense KV store read through per-block summaries: the shared base of Quest and landmark caches.

Every token is kept (retrieval saves reads, not memory); keys are grouped in blocks of block_size
positions, each with a summary. At a decode step (T == 1) each query head scores the blocks from
their summaries, reads the `top_blocks` best plus the `local_blocks` most recent, and runs exact
attention over those blocks only. select_per="query_head" (the papers, which use one KV head per
query head) picks blocks per query head; select_per="kv_head" picks one set per KV head for all
query heads of its GQA group, from the group's largest score per block (for Quest the bound on
the largest logit any head of the group can have in the block), so each selected KV block is read
once per group instead of once per query head choosing it. Prefill chunks (T > 1) attend densely (causal), as the papers do.
A subclass defines the summaries (`summarize`) and the block score (`block_scores`).

Decode steps on the Pallas path (implementation "auto" on a GPU, or "pallas") read exactly the
selected blocks with the block-sparse decode kernel (lcjax/attention/decode_backend.py), one
block list per selecting head; the XLA path masks the unselected ones.
Under GQA with per-query-head selection the kernel reads a KV block once per query head that
lists it: up to group x the selected fraction (BENCHMARKS.md run 17: 3.6-3.8x the fraction of
DenseKVCache's time at group 4; per KV head 1.2-1.8x, the selection in XLA included).
Capacity: positions >= capacity cannot be stored: those sequences' outputs become NaN.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lcjax.attention import BlockLayout, attend, decode_backend, masks
from lcjax.cache.dense import write_rows
from lcjax.cache.slots import attend_slots, resolve_num_new

SELECT_PER = ("query_head", "kv_head")


def check_retrieval_args(capacity: int, block_size: int, select_per: str):
  if capacity % block_size:
    raise ValueError(f"block_size={block_size} must divide capacity={capacity}")
  if select_per not in SELECT_PER:
    raise ValueError(f"select_per={select_per!r}; accepted: {SELECT_PER}")


def block_valid(lengths, num_blocks: int, block_size: int):
  """bool [B, nB]: the block holds at least one written token."""
  return jnp.arange(num_blocks)[None] * block_size < lengths[:, None]


def select_block_lists(scores, lengths, block_size: int, top_blocks: int, local_blocks: int):
  """The top_blocks best-scoring valid blocks plus the local_blocks most recent, as block lists.

  scores: float32 [B, H, nB] (H: query or KV heads).
  Returns (indices int32 [B, H, k] ascending, the padding past counts repeating the last valid
  index as BlockLayout's lists do; counts int32 [B, H]), k = min(top_blocks + local_blocks, nB).
  Exactly k blocks are chosen where k are valid (ties broken by top_k), all valid ones otherwise.
  Built from top_k's indices: no [B, H, nB] mask is compressed (a second sort over nB).
  """
  nb = scores.shape[-1]
  valid = block_valid(lengths, nb, block_size)[:, None]
  last = (lengths - 1) // block_size
  local = (jnp.arange(nb)[None] > (last - local_blocks)[:, None]) & (jnp.arange(nb)[None] <= last[:, None])
  s = jnp.where(valid, scores, -jnp.inf)
  s = jnp.where(local[:, None], jnp.inf, s)
  k = min(top_blocks + local_blocks, nb)
  best, order = jax.lax.top_k(s, k)
  chosen = best > -jnp.inf                                           # invalid blocks score -inf
  counts = chosen.sum(-1).astype(jnp.int32)
  # Ascending, not top_k's score order: per query head, unsorted lists made the step 15 % slower
  # (the group's heads stop reading shared blocks at about the same time; BENCHMARKS.md run 17).
  indices = jnp.sort(jnp.where(chosen, order, nb), axis=-1)          # chosen first, ascending
  pad = jnp.take_along_axis(indices, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
  indices = jnp.where(jnp.arange(k) < counts[..., None], indices, pad)
  return jnp.minimum(indices, nb - 1).astype(jnp.int32), counts       # no valid block: index 0..nB-1, count 0


def lists_to_mask(indices, counts, num_blocks: int):
  """bool [B, H, nB] from block lists (indices [B, H, k], counts [B, H])."""
  listed = jnp.arange(indices.shape[-1]) < counts[..., None]
  return ((indices[..., None] == jnp.arange(num_blocks)) & listed[..., None]).any(-2)


class BlockRetrievalCache:
  """Mixin: subclasses are registered dataclasses with fields k, v, lengths (plus their
  summaries) and static block_size, top_blocks, local_blocks, select_per."""

  def summarize(self, k, lengths):
    raise NotImplementedError

  def block_scores(self, q):
    """float32 [B, Hq, nB] for a decode query q [B, 1, Hq, D]."""
    raise NotImplementedError

  @property
  def num_blocks(self) -> int:
    return self.k.shape[1] // self.block_size

  def update(self, k_new, v_new, *, q=None, num_new=None):
    del q
    num_new = resolve_num_new(self.lengths, k_new.shape[1], num_new)
    k = write_rows(self.k, k_new.astype(self.k.dtype), self.lengths)
    v = write_rows(self.v, v_new.astype(self.v.dtype), self.lengths)
    lengths = self.lengths + num_new
    # Recomputed from all keys for clarity; an incremental update only touches the written blocks.
    return dataclasses.replace(self, k=k, v=v, lengths=lengths, **self.summarize(k, lengths))

  def selected_block_lists(self, q):
    """(indices int32 [B, H, k], counts int32 [B, H]) for a decode query q [B, 1, Hq, D]
    (select_block_lists): H = Hq (select_per="query_head") or Hkv ("kv_head": the group's
    largest score per block)."""
    scores = self.block_scores(q)
    if self.select_per == "kv_head":
      b, hq, nb = scores.shape
      scores = scores.reshape(b, self.k.shape[2], hq // self.k.shape[2], nb).max(2)
    return select_block_lists(scores, self.lengths, self.block_size, self.top_blocks, self.local_blocks)

  def selected_blocks(self, q):
    """bool [B, H, nB]: the same selection as a block mask (the XLA path, tests)."""
    return lists_to_mask(*self.selected_block_lists(q), self.num_blocks)

  def decode_layout(self, q) -> BlockLayout:
    """The selection for a decode query q [B, 1, Hq, D] as a decode BlockLayout (heads Hq or Hkv),
    what the block-sparse decode kernel reads."""
    indices, counts = self.selected_block_lists(q)
    return BlockLayout.from_kv_lists(indices[:, :, None], counts[:, :, None], block_q=1,
                                     block_kv=self.block_size, q_len=1, kv_len=self.k.shape[1])

  def attend(self, q, *, scale: float | None = None, implementation: str = "auto"):
    poison = self.lengths > self.k.shape[1]
    if q.shape[1] > 1:
      out = attend(q, self.k, self.v, mask=masks.causal(), scale=scale, q_offset=self.lengths - q.shape[1],
                   kv_valid_len=self.lengths, implementation=implementation)
      return jnp.where(poison[:, None, None, None], jnp.nan, out)
    bs = self.block_size
    if (decode_backend.uses_kernels(implementation)
        and decode_backend.decode_unsupported_reason(q, self.k, self.v, bs) is None):
      out = decode_backend.decode_attend(q, self.k, self.v, self.lengths, layout=self.decode_layout(q),
                                         scale=scale, implementation=implementation)
      return jnp.where(poison[:, None, None, None], jnp.nan, out)
    chosen = self.selected_blocks(q)                                   # [B, Hq or Hkv, nB]
    group = q.shape[2] // chosen.shape[1]

    def visible(b, hq, q_pos, slot):
      return chosen[b, hq // group, slot // bs] & (slot <= q_pos)

    return attend_slots(q, self.k, self.v, visible, self.lengths, scale=scale, poison=poison,
                        implementation=implementation)
