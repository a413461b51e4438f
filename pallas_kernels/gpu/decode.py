"""Split-KV decode attention (FlashDecoding) over a long dense cache, dense or block-sparse.

Decoding is memory-bound: the kernel's job is to read every cached byte once at full bandwidth.
Each program of the grid (batch, kv_head, split) owns one KV head of one sequence and a
contiguous share of its key blocks; it packs all the query rows of that KV head (the GQA group
times the few query tokens) into one [rows, D] tile, so K and V are read once for the group.
Each split writes a normalised partial output and its log-sum-exp; `merge_splits` combines them.

Two schedules share the kernel (`schedule=`):
  "splits"    FlashDecoding: every (batch, kv head) gets num_splits programs, whatever its length.
  "balanced"  Lean attention's aim (equal work per program) in FlashInfer's form: the batch's key
              tiles are cut into chunks of one size, chunk = ceil(all tiles / programs), so in a
              ragged batch a long sequence gets many programs and a short one few; no program
              spans two (batch, head) pairs, and `merge_segments` combines each pair's chunks.
              The same program budget as "splits" (num_splits x B x heads).

Shapes and conventions (the cache layout of lcjax.cache.DenseKVCache):
  q        [B, T, Hq, D]         the last T tokens written, at positions lengths - T .. lengths - 1
  k, v     [B, C, Hkv, D]        C = capacity; only the first lengths[b] rows are valid
  lengths  int32 [B]             tokens written per sequence (ragged batch)
Query t of sequence b sees keys 0 .. lengths[b] - T + t (causal among the T new tokens).
Softmax statistics and accumulation are float32; the dots take the cache's dtype.

Block-sparse decode visits only listed key blocks per (batch, kv head):
  block_indices int32 [B, Hkv, max_blocks]   key block numbers (block_size keys each)
  block_counts  int32 [B, Hkv]               how many entries of block_indices are valid
(a BlockLayout's kv_indices[:, :, 0] / kv_counts[:, :, 0] with one query block), or per query
head, [B, Hq, max_blocks] / [B, Hq] (Quest-style selection per query head): then each program
serves one query head and K/V blocks are read once per query head that lists them. Indices are
clamped to the cache and lengths past the capacity read only the capacity (never out of bounds).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

NUM_SMS = 132  # H100 SXM; only used to pick a default number of splits.


def _cdiv(a, b):
  return -(-a // b)


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def default_num_splits(batch: int, kv_heads: int, num_blocks: int, waves: int = 4) -> int:
  """At most `waves` programs per SM (rounded down: a few programs past a full wave cost a whole
  extra wave; 17 splits at B8 Hkv8 made an int4 decode step 16-21 % slower than 16,
  BENCHMARKS.md run 11), never more splits than key blocks."""
  return int(max(1, min(waves * NUM_SMS // (batch * kv_heads), num_blocks)))


def pick_block_k(capacity: int, preferred: int = 128) -> int:
  """Largest power of two <= preferred (>= 16) dividing the capacity."""
  bk = preferred
  while bk >= 16:
    if capacity % bk == 0:
      return bk
    bk //= 2
  raise ValueError(f"cache capacity must be a multiple of 16 for the Pallas decode kernels; got {capacity}")


def pack_queries(q, kv_heads: int):
  """q [B, T, Hq, D] -> [B, Hkv, rows, D], row = t * group + g, zero-padded to rows (a power of 2 >= 16)."""
  batch, q_len, q_heads, head_dim = q.shape
  group = q_heads // kv_heads
  rows = max(16, _next_pow2(q_len * group))
  qp = q.reshape(batch, q_len, kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
  qp = qp.reshape(batch, kv_heads, q_len * group, head_dim)
  return jnp.pad(qp, ((0, 0), (0, 0), (0, rows - q_len * group), (0, 0))), rows


def unpack_rows(x, q_len: int, q_heads: int):
  """[B, Hkv, rows, ...] -> [B, T, Hq, ...] (inverse of pack_queries' row order)."""
  batch, kv_heads = x.shape[:2]
  group = q_heads // kv_heads
  x = x[:, :, :q_len * group].reshape(batch, kv_heads, q_len, group, *x.shape[3:])
  x = jnp.moveaxis(x, 2, 1)
  return x.reshape(batch, q_len, q_heads, *x.shape[4:])


def merge_splits(o, lse):
  """Log-sum-exp merge of split partials.

  Args:
    o: float32 [..., S, rows, D] normalised partial outputs; lse: float32 [..., S, rows]
      (-inf where a split saw no key).
  Returns:
    (out float32 [..., rows, D], lse float32 [..., rows]); rows that saw nothing are 0 / -inf.
  """
  m_safe = _finite_or_zero(jnp.max(lse, axis=-2))
  w = jnp.exp(lse - m_safe[..., None, :])                       # 0 for empty splits
  return _normalise_merge(jnp.sum(w[..., None] * o, axis=-3), jnp.sum(w, axis=-2), m_safe)


def _finite_or_zero(m):
  return jnp.where(jnp.isfinite(m), m, 0.0)                     # rows no split saw: 0


def _normalise_merge(weighted, l, m_safe):
  """The merge's last step, shared by merge_splits and merge_segments: out = weighted / l and
  lse = m + log l, 0 / -inf where nothing was seen (l = 0)."""
  seen = l > 0
  l_safe = jnp.where(seen, l, 1.0)
  return weighted / l_safe[..., None], jnp.where(seen, m_safe + jnp.log(l_safe), -jnp.inf)


def online_softmax_step(carry, s, mask, v_dot):
  """One flash step. s: float32 [rows, bk] logits, mask bool [rows, bk]; v_dot(p) -> [rows, D]."""
  o, m, l = carry
  s = jnp.where(mask, s, -jnp.inf)
  m_new = jnp.maximum(m, s.max(axis=-1))
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)             # rows that saw nothing yet
  alpha = jnp.exp(m - m_safe)
  p = jnp.where(mask, jnp.exp(s - m_safe[:, None]), 0.0)
  l = alpha * l + p.sum(axis=-1)
  o = alpha[:, None] * o + v_dot(p)
  return o, m_new, l


def finish(o_ref, lse_ref, carry):
  """Writes the normalised partial output and its log-sum-exp (0 / -inf for empty rows).

  A tuple accumulator holds consecutive column slices of the output, in order.
  """
  o, m, l = carry
  nonempty = l > 0
  l_safe = jnp.where(nonempty, l, 1.0)
  col = 0
  for acc in (o if isinstance(o, tuple) else (o,)):
    o_ref[:, pl.ds(col, acc.shape[1])] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    col += acc.shape[1]
  lse_ref[...] = jnp.where(nonempty, m + jnp.log(l_safe), -jnp.inf)


def query_positions(length, rows: int, group: int, q_len: int):
  """Absolute position of each packed row's query token ([rows] int32); -1 for padding rows."""
  r = lax.broadcasted_iota(jnp.int32, (rows,), 0)
  pos = length - q_len + r // group
  return jnp.where(r < q_len * group, pos, -1)


def split_range(total, num_splits: int, split):
  """[lo, hi) of `total` items handled by `split` when they are shared evenly."""
  per = (total + num_splits - 1) // num_splits
  lo = split * per
  return lo, jnp.maximum(jnp.minimum(lo + per, total), lo)


SCHEDULES = ("splits", "balanced")


def balanced_schedule(tiles, num_programs: int):
  """Cuts every segment's key tiles into chunks of one size, about num_programs chunks in all.

  Args:
    tiles: int32 [S] key tiles of each segment (a (batch, head) pair), traced.
    num_programs: the program budget.
  Returns:
    (segment, lo, hi) int32 [num_programs + S] each: chunk c reads tiles [lo, hi) of `segment`.
    chunk = ceil(sum(tiles) / num_programs) tiles, so a segment has at most tiles / chunk + 1
    chunks and all fit; chunks past the last are empty (lo = hi = 0).
  """
  num_segments = tiles.shape[0]
  chunk = jnp.maximum(1, (tiles.sum() + num_programs - 1) // num_programs)
  counts = (tiles + chunk - 1) // chunk
  ends = jnp.cumsum(counts)
  c = jnp.arange(num_programs + num_segments, dtype=jnp.int32)
  segment = jnp.minimum(jnp.searchsorted(ends, c, side="right"), num_segments - 1).astype(jnp.int32)
  live = c < ends[-1]
  lo = jnp.where(live, (c - ends[segment] + counts[segment]) * chunk, 0)
  hi = jnp.where(live, jnp.minimum(lo + chunk, tiles[segment]), 0)
  return segment, lo.astype(jnp.int32), hi.astype(jnp.int32)


def merge_segments(o, lse, segment, num_segments: int):
  """merge_splits over chunks grouped by segment: o float32 [P, rows, D], lse [P, rows] (-inf
  for empty chunks), segment int32 [P] -> ([num_segments, rows, D], [num_segments, rows]);
  segments with no chunk are 0 / -inf."""
  m_safe = _finite_or_zero(jax.ops.segment_max(lse, segment, num_segments=num_segments))
  w = jnp.exp(lse - m_safe[segment])                              # 0 for empty chunks
  return _normalise_merge(jax.ops.segment_sum(w[..., None] * o, segment, num_segments=num_segments),
                          jax.ops.segment_sum(w, segment, num_segments=num_segments), m_safe)


def dense_tiles(length, block_k: int, num_tiles: int):
  """Key tiles a sequence of `length` tokens reads. A length past the capacity is the caller's
  bug; never read past the buffer because of it."""
  return jnp.minimum((length + block_k - 1) // block_k, num_tiles)


def _decode_kernel(len_ref, *refs, scale, block_k, num_splits, group, q_len, sparse, tiles_per_block,
                   balanced, heads, kv_group):
  refs = list(refs)
  sched_ref = refs.pop(0) if balanced else None
  idx_ref, cnt_ref = (refs.pop(0), refs.pop(0)) if sparse else (None, None)
  q_ref, k_ref, v_ref, o_ref, lse_ref = refs
  if balanced:
    # Whole arrays: which (batch, head) this program reads comes from the schedule table.
    i = pl.program_id(0)
    segment, lo, hi = sched_ref[0, i], sched_ref[1, i], sched_ref[2, i]
    b, h = segment // heads, segment % heads
    q = q_ref[b, h, :, :]
    kv_tile = lambda ref, start: ref[b, pl.ds(start, block_k), h // kv_group, :]
    capacity = k_ref.shape[1]
  else:
    b, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    q = q_ref[...]
    kv_tile = lambda ref, start: ref[pl.ds(start, block_k), :]
    capacity = k_ref.shape[0]
  rows, head_dim = q.shape
  length = len_ref[b]
  qpos = query_positions(length, rows, group, q_len)
  num_tiles = capacity // block_k
  if not balanced:
    total = cnt_ref[b, h] * tiles_per_block if sparse else dense_tiles(length, block_k, num_tiles)
    lo, hi = split_range(total, num_splits, split)

  def body(i, carry):
    if sparse:
      blk = jnp.clip(idx_ref[b, h, i // tiles_per_block], 0, num_tiles // tiles_per_block - 1)
      start = (blk * tiles_per_block + i % tiles_per_block) * block_k
    else:
      start = i * block_k
    start = pl.multiple_of(start, block_k)
    k = kv_tile(k_ref, start)
    s = plgpu.dot(q, k, trans_b=True) * scale
    kpos = start + lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
    mask = kpos <= qpos[:, None]
    v = kv_tile(v_ref, start)
    return online_softmax_step(carry, s, mask, lambda p: plgpu.dot(p.astype(v.dtype), v))

  carry = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
           jnp.zeros((rows,), jnp.float32))
  finish(o_ref, lse_ref, lax.fori_loop(lo, hi, body, carry))


def validate_decode_args(q, k, v, lengths):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be 4-D [batch, len, heads, head_dim]; got q{q.shape}, k{k.shape}, v{v.shape}")
  if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0]:
    raise ValueError(f"q{q.shape}, k{k.shape}, v{v.shape} disagree on batch, capacity or kv heads")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"q heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")
  if lengths.shape != (q.shape[0],):
    raise ValueError(f"lengths must be int32 [batch={q.shape[0]}]; got shape {lengths.shape}")
  if q.shape[-1] % 16:
    raise ValueError(f"head_dim must be a multiple of 16; got {q.shape[-1]}")


@functools.partial(jax.jit, static_argnames=(
    "scale", "block_size", "block_k", "num_splits", "schedule", "num_warps", "num_stages", "interpret",
    "return_lse"))
def decode_attention(q, k, v, lengths, block_indices=None, block_counts=None, *,
                     scale: float | None = None, block_size: int | None = None,
                     block_k: int | None = None, num_splits: int | None = None,
                     schedule: str = "splits", num_warps: int = 4, num_stages: int = 3,
                     interpret: bool = False, return_lse: bool = False):
  """Decode attention of a few new query tokens over a long dense KV cache.

  Args:
    q: [B, T, Hq, D]; k, v: [B, C, Hkv, D] (same dtype as q); lengths: int32 [B].
    block_indices, block_counts: optional int32 [B, Hkv, max_blocks] / [B, Hkv] (or [B, Hq, ...]
      / [B, Hq], one list per query head) for block-sparse decode over key blocks of
      `block_size` keys (a multiple of the tile).
    scale: logit scale, default D ** -0.5.
    block_k: keys per tile (default the largest of 128, 64, ... dividing C and block_size).
    num_splits: KV splits per (batch, kv head); default at most 8 (dense) or 4 (sparse) programs per SM.
    schedule: "splits" or "balanced" (module docstring): with "balanced", num_splits x B x heads
      programs share the batch's tiles evenly.
  Returns:
    out [B, T, Hq, D] in q.dtype (zero for queries that see no key), and with return_lse the
    float32 log-sum-exp [B, Hq, T].
  """
  validate_decode_args(q, k, v, lengths)
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule={schedule!r}; accepted: {SCHEDULES}")
  batch, q_len, q_heads, head_dim = q.shape
  capacity, kv_heads = k.shape[1], k.shape[2]
  group = q_heads // kv_heads
  scale = head_dim ** -0.5 if scale is None else scale
  sparse = block_indices is not None
  if sparse:
    if block_counts is None or block_size is None:
      raise ValueError("block-sparse decode needs block_indices, block_counts and block_size")
    list_heads = block_indices.shape[1] if block_indices.ndim == 3 else -1
    if (list_heads not in (kv_heads, q_heads) or block_indices.shape[0] != batch
        or block_counts.shape != (batch, list_heads)):
      raise ValueError(f"block_indices must be [B={batch}, Hkv={kv_heads} or Hq={q_heads}, n] and "
                       f"block_counts [B, same heads]; got {block_indices.shape} and {block_counts.shape}")
  bk = block_k or pick_block_k(math.gcd(capacity, block_size) if sparse else capacity)
  if capacity % bk or (sparse and block_size % bk):
    raise ValueError(f"block_k={bk} must divide the capacity {capacity}"
                     + (f" and block_size {block_size}" if sparse else ""))
  if sparse and capacity % block_size:
    raise ValueError(f"block_size={block_size} must divide the cache capacity {capacity}")
  tiles_per_block = block_size // bk if sparse else 1
  max_tiles = block_indices.shape[-1] * tiles_per_block if sparse else capacity // bk
  # Programs per (batch, list head): a KV head (its query heads packed together) or, for lists
  # per query head, one query head reading KV head h // group.
  per_query_head = sparse and block_indices.shape[1] == q_heads and q_heads != kv_heads
  prog_heads, kv_of = (q_heads, lambda h: h // group) if per_query_head else (kv_heads, lambda h: h)
  # Dense: 8 programs per SM (16 splits at B8 Hkv8, the fastest measured at 128k); block-sparse
  # lists are short, 4.
  splits = num_splits or default_num_splits(batch, prog_heads, max_tiles, waves=4 if sparse else 8)

  qp, rows = pack_queries(q, prog_heads)
  balanced = schedule == "balanced"
  kernel = functools.partial(_decode_kernel, scale=scale, block_k=bk, num_splits=splits,
                             group=q_heads // prog_heads, q_len=q_len, sparse=sparse,
                             tiles_per_block=tiles_per_block, balanced=balanced, heads=prog_heads,
                             kv_group=prog_heads // kv_heads)
  whole = lambda x: pl.BlockSpec(x.shape, lambda *program: (0,) * x.ndim)    # one block: the array
  lengths = lengths.astype(jnp.int32)
  lists = []
  if sparse:
    block_indices = block_indices.astype(jnp.int32)
    block_counts = block_counts.astype(jnp.int32)
    lists = [block_indices, block_counts]
  if balanced:
    tiles = (block_counts * tiles_per_block if sparse
             else jnp.broadcast_to(dense_tiles(lengths, bk, capacity // bk)[:, None], (batch, prog_heads)))
    segment, lo, hi = balanced_schedule(tiles.reshape(-1), splits * batch * prog_heads)
    grid = (segment.shape[0],)
    args = [lengths, jnp.stack([segment, lo, hi]), *lists, qp, k, v]
    in_specs = [whole(x) for x in args]
    out_specs = [pl.BlockSpec((None, rows, head_dim), lambda i: (i, 0, 0)),
                 pl.BlockSpec((None, rows), lambda i: (i, 0))]
    out_shape = [jax.ShapeDtypeStruct((grid[0], rows, head_dim), jnp.float32),
                 jax.ShapeDtypeStruct((grid[0], rows), jnp.float32)]
  else:
    grid = (batch, prog_heads, splits)
    kv_spec = pl.BlockSpec((None, capacity, None, head_dim), lambda b, h, j: (b, 0, kv_of(h), 0))
    args = [lengths, *lists, qp, k, v]
    in_specs = ([whole(x) for x in (lengths, *lists)]
                + [pl.BlockSpec((None, None, rows, head_dim), lambda b, h, j: (b, h, 0, 0)), kv_spec, kv_spec])
    out_specs = [pl.BlockSpec((None, None, None, rows, head_dim), lambda b, h, j: (b, h, j, 0, 0)),
                 pl.BlockSpec((None, None, None, rows), lambda b, h, j: (b, h, j, 0))]
    out_shape = [jax.ShapeDtypeStruct((batch, prog_heads, splits, rows, head_dim), jnp.float32),
                 jax.ShapeDtypeStruct((batch, prog_heads, splits, rows), jnp.float32)]
  o, lse = pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="lcjax_sparse_decode" if sparse else "lcjax_decode",
  )(*args)
  n = q_len * (q_heads // prog_heads)       # drop the padding rows before the merge reads them
  if balanced:
    out, lse = merge_segments(o[..., :n, :], lse[..., :n], segment, batch * prog_heads)
    out, lse = out.reshape(batch, prog_heads, n, head_dim), lse.reshape(batch, prog_heads, n)
  else:
    out, lse = merge_splits(o[..., :n, :], lse[..., :n])
  out = unpack_rows(out, q_len, q_heads).astype(q.dtype)
  if return_lse:
    return out, jnp.moveaxis(unpack_rows(lse, q_len, q_heads), 1, 2)
  return out
