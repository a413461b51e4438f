"""MiniCache: merge the KV caches of two adjacent layers by magnitude and direction.

Liu et al., "MiniCache: KV Cache Compression in Depth Dimension for Large Language Models"
(NeurIPS 2024, arXiv:2405.14366). In the middle-to-deep layers, a token's key (value) at layer l-1
and layer l point in similar directions. Each token's pair of vectors is stored as one shared
direction e = SLERP(x_{l-1}/|x_{l-1}|, x_l/|x_l|; t) plus the two magnitudes, and restored as
|x| * e. Token retention: pairs whose angular distance d = arccos(cos(x_{l-1}, x_l)) / pi is large
cannot be merged without loss and are kept exactly. We retain the tokens with
d >= d_max - gamma * (d_max - d_min) (d_min, d_max over the sequence, per head), i.e. gamma is
the top fraction of the distance range kept; this is our reading of the paper's threshold. At most
`max_retained` tokens per head are kept (the most distant ones).

Use: run the prefill with DenseKVCache, then `merge_layer_pair(cache_a, cache_b)` gives the two
layers' MiniCacheKV; tokens written afterwards (decoding) go to a per-layer full-precision tail of
`tail` slots. The shared direction is held by both layers' pytrees (one array, not copied under
jit); memory_bytes counts it in the first layer of the pair only, so the sum over layers is right.
Capacity: a sequence longer than merged_len + tail outputs NaN.

`merge_adjacent_layers` applies the merge to a model's list of caches (layers s, s+1; s+2, s+3;
...); generate() calls it after the prefill when ModelConfig.cache.policy is "minicache".
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lcjax.cache.dense import DenseKVCache
from lcjax.cache.slots import attend_slots, resolve_num_new, slot_visibility


def slerp(u0, u1, t: float):
  """Spherical interpolation of unit vectors [..., D] (linear where they are nearly parallel)."""
  cos = jnp.clip((u0 * u1).sum(-1, keepdims=True), -1.0, 1.0)
  omega = jnp.arccos(cos)
  so = jnp.sin(omega)
  small = so < 1e-6
  w0 = jnp.where(small, 1.0 - t, jnp.sin((1.0 - t) * omega) / jnp.where(small, 1.0, so))
  w1 = jnp.where(small, t, jnp.sin(t * omega) / jnp.where(small, 1.0, so))
  return w0 * u0 + w1 * u1


def merge_vectors(xa, xb, valid, *, t: float = 0.6, gamma: float = 0.05):
  """Merges two layers' vectors xa, xb [B, S, H, D] (valid bool [B, S]).

  Returns (direction float32 [B, S, H, D], norm_a, norm_b float32 [B, S, H], distance float32
  [B, S, H], retain bool [B, S, H]).
  """
  xa, xb = xa.astype(jnp.float32), xb.astype(jnp.float32)
  na, nb = jnp.linalg.norm(xa, axis=-1), jnp.linalg.norm(xb, axis=-1)
  ua, ub = xa / jnp.maximum(na, 1e-12)[..., None], xb / jnp.maximum(nb, 1e-12)[..., None]
  direction = slerp(ua, ub, t)
  direction = direction / jnp.maximum(jnp.linalg.norm(direction, axis=-1, keepdims=True), 1e-12)
  dist = jnp.arccos(jnp.clip((ua * ub).sum(-1), -1.0, 1.0)) / jnp.pi
  v = valid[..., None]
  dmin = jnp.where(v, dist, jnp.inf).min(1, keepdims=True)
  dmax = jnp.where(v, dist, -jnp.inf).max(1, keepdims=True)
  retain = v & (dist >= dmax - gamma * (dmax - dmin))
  return direction, na, nb, dist, retain


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["dir_k", "dir_v", "mag_k", "mag_v", "ret_pos", "ret_k", "ret_v", "merged_len",
                                "tail_k", "tail_v", "lengths"],
                   meta_fields=["owns_shared"])
@dataclasses.dataclass(frozen=True)
class MiniCacheKV:
  """One layer's view. dir_k, dir_v: [B, C, Hkv, D] shared directions; mag_k, mag_v: float32
  [B, C, Hkv]; ret_pos: int32 [B, R, Hkv] retained positions (-1 none, shared by the pair);
  ret_k, ret_v: [B, R, Hkv, D] this layer's exact vectors; merged_len: int32 [B];
  tail_k, tail_v: [B, tail, Hkv, D] tokens written after the merge (slot = position - merged_len)."""
  dir_k: jax.Array
  dir_v: jax.Array
  mag_k: jax.Array
  mag_v: jax.Array
  ret_pos: jax.Array
  ret_k: jax.Array
  ret_v: jax.Array
  merged_len: jax.Array
  tail_k: jax.Array
  tail_v: jax.Array
  lengths: jax.Array
  owns_shared: bool

  def update(self, k_new, v_new, *, q=None, num_new=None) -> "MiniCacheKV":
    del q
    b, t = k_new.shape[:2]
    num_new = resolve_num_new(self.lengths, t, num_new)
    slot = self.lengths[:, None] - self.merged_len[:, None] + jnp.arange(t)[None]
    slot = jnp.where(jnp.arange(t)[None] < num_new[:, None], slot, self.tail_k.shape[1])
    rows = jnp.arange(b)[:, None]
    return dataclasses.replace(
        self, tail_k=self.tail_k.at[rows, slot].set(k_new.astype(self.tail_k.dtype), mode="drop"),
        tail_v=self.tail_v.at[rows, slot].set(v_new.astype(self.tail_v.dtype), mode="drop"),
        lengths=self.lengths + num_new)

  def restored(self):
    """(k, v) float32 [B, C, Hkv, D]: magnitude * direction, retained tokens exact."""
    b, c, h, _ = self.dir_k.shape
    out = []
    for d, m, r in ((self.dir_k, self.mag_k, self.ret_k), (self.dir_v, self.mag_v, self.ret_v)):
      x = d.astype(jnp.float32) * m[..., None]
      pi = jnp.where(self.ret_pos >= 0, self.ret_pos, c)
      x = x.at[jnp.arange(b)[:, None, None], pi, jnp.arange(h)[None, None]].set(r.astype(jnp.float32), mode="drop")
      out.append(x)
    return tuple(out)

  def attend(self, q, *, scale: float | None = None, implementation: str = "xla"):
    k, v = self.restored()
    c, tail = k.shape[1], self.tail_k.shape[1]
    k = jnp.concatenate([k, self.tail_k.astype(jnp.float32)], 1).astype(q.dtype)
    v = jnp.concatenate([v, self.tail_v.astype(jnp.float32)], 1).astype(q.dtype)
    merged_pos = jnp.where(jnp.arange(c)[None] < self.merged_len[:, None], jnp.arange(c)[None], -1)
    tail_pos = self.merged_len[:, None] + jnp.arange(tail)[None]
    pos = jnp.concatenate([merged_pos, jnp.where(tail_pos < self.lengths[:, None], tail_pos, -1)], 1)
    return attend_slots(q, k, v, slot_visibility(pos[:, None], q_heads=q.shape[2]), self.lengths, scale=scale,
                        poison=self.lengths > self.merged_len + tail, implementation=implementation)

  def memory_bytes(self) -> int:
    shared = (self.dir_k, self.dir_v, self.ret_pos) if self.owns_shared else ()
    own = (self.mag_k, self.mag_v, self.ret_k, self.ret_v, self.merged_len, self.tail_k, self.tail_v, self.lengths)
    return int(sum(x.nbytes for x in shared + own))


def merge_layer_pair(cache_a: DenseKVCache, cache_b: DenseKVCache, *, t: float = 0.6, gamma: float = 0.05,
                     max_retained: int = 16, tail: int = 64):
  """Merges two adjacent layers' prefilled dense caches into two MiniCacheKV views.

  Args:
    cache_a, cache_b: layers l-1 and l after the prefill (same lengths, shapes).
    t: SLERP interpolation (the paper uses 0.6).
    gamma: retention threshold, fraction of the distance range (see the module docstring).
    max_retained: retained tokens per (sequence, head) at most.
    tail: slots for the tokens written after the merge.
  """
  if cache_a.k.shape != cache_b.k.shape:
    raise ValueError(f"cache shapes differ: {cache_a.k.shape} vs {cache_b.k.shape}")
  if not 0.0 <= t <= 1.0 or not 0.0 <= gamma <= 1.0 or max_retained < 1 or tail < 1:
    raise ValueError(f"t={t}, gamma={gamma}, max_retained={max_retained}, tail={tail}: need t, gamma in "
                     "[0, 1], max_retained >= 1, tail >= 1")
  b, c, h, d = cache_a.k.shape
  valid = jnp.arange(c)[None] < cache_a.lengths[:, None]
  views = {}
  for name in ("k", "v"):
    views[name] = merge_vectors(getattr(cache_a, name), getattr(cache_b, name), valid, t=t, gamma=gamma)
  # Retained positions: the union of the key and value criteria, most distant first.
  dist = jnp.maximum(views["k"][3], views["v"][3])
  retain = views["k"][4] | views["v"][4]
  score = jnp.where(retain, dist, -1.0)
  r = min(max_retained, c)
  top_score, top_pos = jax.lax.top_k(jnp.moveaxis(score, 1, 2), r)                 # [B, H, R]
  ret_pos = jnp.moveaxis(jnp.where(top_score >= 0, top_pos, -1), 1, 2).astype(jnp.int32)   # [B, R, H]
  gather = lambda x: jnp.take_along_axis(x, jnp.maximum(ret_pos, 0)[..., None], 1)
  dt = cache_a.k.dtype
  tail_buf = jnp.zeros((b, tail, h, d), dt)
  out = []
  for i, cache in enumerate((cache_a, cache_b)):
    out.append(MiniCacheKV(views["k"][0].astype(dt), views["v"][0].astype(dt), views["k"][1 + i], views["v"][1 + i],
                           ret_pos, gather(cache.k), gather(cache.v), cache.lengths, tail_buf, tail_buf,
                           cache.lengths, owns_shared=(i == 0)))
  return tuple(out)


def merge_adjacent_layers(caches, *, start_layer: int, t: float = 0.6, gamma: float = 0.05,
                          max_retained: int = 16, tail: int = 64, length: int | None = None) -> list:
  """MiniCache over a model: layers (s, s+1), (s+2, s+3), ... from s = start_layer merged pairwise.

  Args:
    caches: one prefilled DenseKVCache per layer (k, v [B, C, Hkv, D], no sliding window); layers
      before start_layer, and an odd last layer, are returned unchanged.
    start_layer: the first layer of the first merged pair, in [0, len(caches) - 2].
    t, gamma, max_retained, tail: as merge_layer_pair.
    length: None, or the cache slots merged (static, <= C, >= every sequence's lengths): the
      merged arrays are [B, length, ...] instead of [B, C, ...].
  Returns:
    The list of caches, MiniCacheKV at the merged layers.
  """
  n = len(caches)
  if not 0 <= start_layer <= n - 2:
    raise ValueError(f"start_layer={start_layer}; accepted: an int in [0, {n - 2}] for {n} layers")
  out = list(caches)
  for a in range(start_layer, n - 1, 2):
    pair = []
    for layer in (a, a + 1):
      cache = caches[layer]
      if not isinstance(cache, DenseKVCache) or cache.window is not None:
        got = type(cache).__name__ if not isinstance(cache, DenseKVCache) else f"DenseKVCache(window={cache.window})"
        raise ValueError(f"caches[{layer}] is {got}; accepted: a DenseKVCache without a sliding window "
                         "(MiniCache merges full caches)")
      if length is not None:
        if not 1 <= length <= cache.capacity:
          raise ValueError(f"length={length}; accepted: None or an int in [1, capacity={cache.capacity}]")
        cache = dataclasses.replace(cache, k=cache.k[:, :length], v=cache.v[:, :length])
      pair.append(cache)
    out[a], out[a + 1] = merge_layer_pair(*pair, t=t, gamma=gamma, max_retained=max_retained, tail=tail)
  return out
