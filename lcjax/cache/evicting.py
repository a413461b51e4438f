"""An evicting cache: fixed slots per KV head, a scoring policy decides which tokens stay.

Each (sequence, KV head) keeps at most `budgets[h]` tokens, each slot with its token's absolute
position (masks are evaluated on positions; keys are cached after RoPE, see slots.py) and a float32
statistic that the policy maintains (accumulated attention for H2O, the observation window's
attention for SnapKV...). The policy only defines how to score: `observe` updates the statistic
from the queries of a chunk, `priority` turns it into a keep-priority (kvpress's "a press only
defines its score").

Compression is lazy, which is what the papers do and bounds peak memory during chunked prefill:
  update(k, v, q):  1. compress: keep, per head, the budgets[h] highest-priority tokens (the
                       policy's sinks and recent window are always kept first);
                    2. write the T new tokens into the max_chunk headroom slots;
                    3. observe: the policy scores every slot with the chunk's queries.
So attend() sees budget + T tokens: H2O's "k cached tokens plus the new one", SnapKV's full
attention over a prompt chunk before it is compressed. Capacity = max(budgets) + max_chunk.

Defined behaviours: a full cache is normal (the policy evicts); a budget at least as long as the
sequence keeps everything (the cache then equals DenseKVCache); an update of more than max_chunk
tokens, or sinks + window larger than a budget, is a ValueError. Ties in priority keep the more
recent token.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.cache.base import KV_AXES
from lcjax.cache.slots import attend_slots, resolve_num_new, slot_probs, slot_visibility, group_mean


@dataclasses.dataclass(frozen=True)
class EvictionPolicy:
  """Base scoring policy. Subclasses override `observe` (and maybe `priority`).

  sinks: the first `sinks` positions are always kept; window: the last `window` positions are
  always kept.
  """
  sinks: int = 0
  window: int = 0

  def priority(self, cache: "EvictingKVCache"):
    """float32 [B, C, Hkv]: higher is kept first (forced and empty slots are handled by the cache)."""
    return cache.score

  def observe(self, cache: "EvictingKVCache", q, num_new, t: int):
    """New statistic float32 [B, C, Hkv] after the chunk's t tokens were written."""
    return cache.score

  def probs(self, cache, q, num_new):
    """Attention float32 [B, Hkv, T, C] of the chunk's queries over the slots (group-averaged)."""
    if q is None:
      raise ValueError(f"{type(self).__name__} scores tokens with the queries: pass q= to update()")
    visible = slot_visibility(jnp.moveaxis(cache.pos, 1, 2), q_heads=q.shape[2])
    return group_mean(slot_probs(q, cache.k, visible, cache.lengths, num_new=num_new), cache.kv_heads)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["k", "v", "pos", "score", "lengths"],
                   meta_fields=["policy", "budgets", "max_chunk"])
@dataclasses.dataclass(frozen=True)
class EvictingKVCache:
  """k, v: [B, C, Hkv, D]; pos: int32 [B, C, Hkv] (-1: empty); score: float32 [B, C, Hkv];
  lengths: int32 [B]. Slot c of head h holds the token at position pos[b, c, h]."""
  k: jax.Array
  v: jax.Array
  pos: jax.Array
  score: jax.Array
  lengths: jax.Array
  policy: EvictionPolicy
  budgets: tuple[int, ...]
  max_chunk: int

  @classmethod
  def create(cls, batch: int, kv_heads: int, head_dim: int, *, policy: EvictionPolicy,
             budget: int | tuple[int, ...], max_chunk: int = 1, dtype=jnp.float32) -> "EvictingKVCache":
    budgets = (int(budget),) * kv_heads if np.isscalar(budget) else tuple(int(x) for x in budget)
    if len(budgets) != kv_heads:
      raise ValueError(f"budget={budget}: need one int or one per KV head ({kv_heads})")
    if min(budgets) < 1 or max_chunk < 1:
      raise ValueError(f"budget={budget}, max_chunk={max_chunk}: need every budget >= 1 and max_chunk >= 1")
    if policy.sinks + policy.window > min(budgets):
      raise ValueError(f"budget={budget}: every budget must hold the policy's sinks + window "
                       f"({policy.sinks} + {policy.window})")
    slots = max(budgets) + max_chunk
    shape = (batch, slots, kv_heads, head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
               jnp.full((batch, slots, kv_heads), -1, jnp.int32),
               jnp.zeros((batch, slots, kv_heads), jnp.float32), jnp.zeros((batch,), jnp.int32),
               policy, budgets, max_chunk)

  @property
  def kv_heads(self) -> int:
    return self.k.shape[2]

  @property
  def max_budget(self) -> int:
    return max(self.budgets)

  def compress(self):
    """Keeps budgets[h] tokens per head, compacted into slots [0, budget).

    Returns (cache, evicted_pos): evicted_pos int32 [B, C, Hkv] is the position of the token a slot
    (in the new order) held before it was just dropped, -1 elsewhere; the dropped tokens' k, v stay
    readable in the returned arrays until the next write (MiKV and RazorAttention collect them).
    """
    valid = self.pos >= 0
    pri = self.policy.priority(self).astype(jnp.float32)
    forced = (self.pos < self.policy.sinks) | (self.pos >= self.lengths[:, None, None] - self.policy.window)
    pri = jnp.where(valid, jnp.where(forced, jnp.inf, pri), -jnp.inf)
    # Sort by priority, ties broken towards the more recent token (two stable sorts).
    by_pos = jnp.argsort(-self.pos, axis=1, stable=True)
    order = jnp.take_along_axis(by_pos, jnp.argsort(-jnp.take_along_axis(pri, by_pos, 1), axis=1,
                                                    stable=True), 1)
    take = lambda x: jnp.take_along_axis(x, order if x.ndim == 3 else order[..., None], 1)
    k, v, pos, score, valid = take(self.k), take(self.v), take(self.pos), take(self.score), take(valid)
    keep = valid & (jnp.arange(k.shape[1])[None, :, None] < jnp.asarray(self.budgets)[None, None, :])
    cache = dataclasses.replace(self, k=k, v=v, pos=jnp.where(keep, pos, -1), score=jnp.where(keep, score, 0.0))
    return cache, jnp.where(valid & ~keep, pos, -1)

  def write(self, k_new, v_new, num_new):
    """Writes the T new tokens into the headroom slots [max_budget, max_budget + T)."""
    b, t, h = k_new.shape[:3]
    if t > self.max_chunk:
      raise ValueError(f"update of {t} tokens exceeds max_chunk={self.max_chunk} of this cache; "
                       "create it with max_chunk >= the prefill chunk")
    start = self.max_budget
    p = self.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
    p = jnp.where(jnp.arange(t)[None] < num_new[:, None], p, -1)
    put = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype), start, axis=1)
    return dataclasses.replace(
        self, k=put(self.k, k_new), v=put(self.v, v_new),
        pos=put(self.pos, jnp.broadcast_to(p[..., None], (b, t, h))),
        score=put(self.score, jnp.zeros((b, t, h), jnp.float32)), lengths=self.lengths + num_new)

  def update(self, k_new, v_new, *, q=None, num_new=None) -> "EvictingKVCache":
    t = k_new.shape[1]
    num_new = resolve_num_new(self.lengths, t, num_new)
    cache, _ = self.compress()
    cache = cache.write(k_new, v_new, num_new)
    return dataclasses.replace(cache, score=self.policy.observe(cache, q, num_new, t))

  def visibility(self, q_heads: int):
    return slot_visibility(jnp.moveaxis(self.pos, 1, 2), q_heads=q_heads)

  def attend(self, q, *, scale: float | None = None, implementation: str = "xla"):
    return attend_slots(q, self.k, self.v, self.visibility(q.shape[2]), self.lengths, scale=scale,
                        implementation=implementation)

  def memory_bytes(self) -> int:
    """Bytes of a ragged per-head layout: (budgets[h] + max_chunk) slots of k, v (their dtype),
    position (int32) and score (float32) for each head, plus lengths. With equal budgets this is
    exactly what the arrays allocate; with per-head budgets the padded arrays allocate more
    (allocated_bytes)."""
    b, _, _, d = self.k.shape
    per_slot = 2 * d * self.k.dtype.itemsize + 4 + 4
    return int(b * sum(x + self.max_chunk for x in self.budgets) * per_slot + self.lengths.nbytes)

  def logical_axes(self) -> "EvictingKVCache":
    """This cache's structure with logical axis names in place of its arrays (lcjax.sharding)."""
    slot = KV_AXES[:3]
    return dataclasses.replace(self, k=KV_AXES, v=KV_AXES, pos=slot, score=slot, lengths=("batch",))

  def allocated_bytes(self) -> int:
    return int(sum(x.nbytes for x in (self.k, self.v, self.pos, self.score, self.lengths)))

  def kept_positions(self):
    """int32 [B, C, Hkv] positions held (-1 for empty slots): for tests and analysis."""
    return self.pos
