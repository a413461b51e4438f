"""Shared pieces of the selectors: input checks, pooling, top-k to block tables, kept blocks.

Conventions of every selector in this folder:
  q [B, Tq, Hq, D], k [B, Tk, Hkv, D] with Hq % Hkv == 0; the queries are the *last* Tq
  positions of the keys (prefill or chunked prefill: query i sits at absolute position
  Tk - Tq + i), so attend with `mask=causal(), q_offset=Tk - Tq` (or no mask when causal=False).
  The result is a BlockLayout with one entry per batch row and per *query* head, [B, Hq, ...].
  It always contains the blocks the method keeps regardless of scores (attention sinks, the
  local window, hence the diagonal), and its `full` table is the base mask's (causal or none),
  so kernels still apply the causal mask in the partly visible blocks.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.attention import masks
from lcjax.attention.api import validate_qkv
from lcjax.attention.layout import BlockLayout, _cdiv
from lcjax.attention.layouts import host_block_tables, static_int


def check_inputs(q, k, block_q, block_kv):
  """Validates shapes and block sizes; returns (block_q, block_kv) as ints."""
  validate_qkv(q, k, k)
  block_q, block_kv = static_int("block_q", block_q), static_int("block_kv", block_kv)
  if q.shape[1] > k.shape[1]:
    raise ValueError(f"q_len={q.shape[1]} > kv_len={k.shape[1]}; accepted: q_len <= kv_len "
                     "(queries are the last q_len key positions)")
  return block_q, block_kv


def check_budget(name: str, value, low: int, high: int) -> int:
  """A static int budget in [low, high], or ValueError naming it."""
  value = static_int(name, value, minimum=low)
  if value > high:
    raise ValueError(f"{name}={value}; accepted: an int in [{low}, {high}]")
  return value


def check_fraction(name: str, value, low: float = 0.0, high: float = 1.0) -> float:
  """A static float in (low, high], or ValueError naming it."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
      or not low < value <= high:
    raise ValueError(f"{name}={value!r}; accepted: a static float in ({low}, {high}]")
  return float(value)


def repeat_kv(x, q_heads: int):
  """[B, T, Hkv, D] -> [B, T, Hq, D]: each kv head serves q_heads // Hkv query heads."""
  return jnp.repeat(x, q_heads // x.shape[2], axis=2)


def pool(x, block: int):
  """Mean over blocks of `block` positions (the last block averages its valid positions only).

  x [B, T, H, D] -> float32 [B, ceil(T / block), H, D].
  """
  batch, length, heads, dim = x.shape
  n = _cdiv(length, block)
  padded = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, n * block - length), (0, 0), (0, 0)))
  sums = padded.reshape(batch, n, block, heads, dim).sum(2)
  counts = jnp.minimum(block, length - block * jnp.arange(n)).astype(jnp.float32)
  return sums / counts[None, :, None, None]


def max_over_query_blocks(scores, block_q: int):
  """[B, H, Tq, N] -> [B, H, ceil(Tq / block_q), N]: max over the queries of each block."""
  batch, heads, q_len, n = scores.shape
  n_q = _cdiv(q_len, block_q)
  padded = jnp.pad(scores, ((0, 0), (0, 0), (0, n_q * block_q - q_len), (0, 0)), constant_values=-jnp.inf)
  return padded.reshape(batch, heads, n_q, block_q, n).max(3)


def scatter_true(shape, indices, values=None):
  """bool array of `shape`, True (or `values`, shaped like indices) at `indices` on the last axis."""
  rows = int(np.prod(shape[:-1]))
  idx = indices.reshape(rows, -1)
  vals = True if values is None else values.reshape(rows, -1)
  out = jnp.zeros((rows, shape[-1]), bool).at[jnp.arange(rows)[:, None], idx].set(vals)
  return out.reshape(shape)


def topk_mask(scores, k: int):
  """bool, shape of scores: the k largest entries along the last axis that are > -inf."""
  _, idx = jax.lax.top_k(scores, k)
  return scatter_true(scores.shape, idx) & (scores > -jnp.inf)


def cumulative_mask(probs, threshold: float):
  """bool, shape of probs: the fewest largest entries whose sum reaches `threshold` (per row)."""
  order = jnp.argsort(-probs, axis=-1)
  ranked = jnp.take_along_axis(probs, order, axis=-1)
  keep = (jnp.cumsum(ranked, axis=-1) - ranked) < threshold
  keep &= ranked > 0
  return scatter_true(probs.shape, order, keep)


def base_tables(q_len, kv_len, block_q, block_kv, causal: bool, sink_tokens: int, local_tokens: int):
  """Host tables [nQ, nK]: (allowed by the base mask, fully visible under it, always kept)."""
  # More sinks or a wider window than there are keys is harmless: clip.
  sink_tokens = min(static_int("sink_tokens", sink_tokens, minimum=0), kv_len)
  local_tokens = min(static_int("local_tokens", local_tokens, minimum=1), kv_len)
  offset = kv_len - q_len
  base = masks.causal() if causal else None
  allowed, full = host_block_tables(base or masks.full(), q_len, kv_len, block_q, block_kv, offset)
  window = masks.sliding_window(local_tokens - 1, 0 if causal else local_tokens - 1)
  keep = masks.sinks(sink_tokens) | window
  keep = keep & base if causal else keep
  kept, _ = host_block_tables(keep, q_len, kv_len, block_q, block_kv, offset)
  return allowed, full, kept


def finish(visible, *, q_len, kv_len, block_q, block_kv, causal, sink_tokens, local_tokens):
  """Restricts a [B, H, nQ, nK] selection to the base mask, adds the kept blocks, builds the layout."""
  # More sinks or a wider window than there are keys is harmless: clip.
  sink_tokens = min(static_int("sink_tokens", sink_tokens, minimum=0), kv_len)
  local_tokens = min(static_int("local_tokens", local_tokens, minimum=1), kv_len)
  allowed, full, kept = base_tables(q_len, kv_len, block_q, block_kv, causal, sink_tokens, local_tokens)
  visible = (visible & allowed) | kept
  return BlockLayout.from_block_mask(visible, visible & full, block_q=block_q, block_kv=block_kv,
                                     q_len=q_len, kv_len=kv_len)


def query_positions(q_len: int, kv_len: int):
  """Absolute positions of the queries, int32 [Tq]."""
  return jnp.arange(kv_len - q_len, kv_len, dtype=jnp.int32)


def masked_scores(q, k, *, scale, causal: bool, kv_len: int):
  """Scaled float32 logits [B, Hq, Tq, Tk] with -inf where the base mask forbids the pair."""
  s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), repeat_kv(k, q.shape[2]).astype(jnp.float32))
  s = s * scale
  if causal:
    ok = query_positions(q.shape[1], kv_len)[:, None] >= jnp.arange(kv_len)[None, :]
    s = jnp.where(ok, s, -jnp.inf)
  return s


def block_sums(probs, block_kv: int):
  """[..., Tk] -> [..., ceil(Tk / block_kv)]: sums over key blocks."""
  n = _cdiv(probs.shape[-1], block_kv)
  pad = [(0, 0)] * (probs.ndim - 1) + [(0, n * block_kv - probs.shape[-1])]
  return jnp.pad(probs, pad).reshape(*probs.shape[:-1], n, block_kv).sum(-1)


def columns_and_diagonals_to_blocks(columns, diagonals, *, q_len, kv_len, block_q, block_kv):
  """Key columns and diagonals (offset q_pos - k_pos) chosen per head -> block table.

  columns, diagonals: bool [B, H, Tk] (diagonal o at index o). Returns bool [B, H, nQ, nK]: a
  column lights its key block for every query block; a diagonal lights every block it crosses.
  """
  n_q, n_kv = _cdiv(q_len, block_q), _cdiv(kv_len, block_kv)
  col_blocks = block_sums(columns.astype(jnp.int32), block_kv) > 0          # [B, H, nK]
  q_start = kv_len - q_len + block_q * np.arange(n_q)
  q_end = np.minimum(q_start + block_q, kv_len) - 1
  k_start = block_kv * np.arange(n_kv)
  k_end = np.minimum(k_start + block_kv, kv_len) - 1
  lo = np.clip(q_start[:, None] - k_end[None, :], 0, kv_len)                 # offsets crossing (i, j)
  hi = np.clip(q_end[:, None] - k_start[None, :], -1, kv_len - 1)
  prefix = jnp.pad(jnp.cumsum(diagonals.astype(jnp.int32), -1), ((0, 0), (0, 0), (1, 0)))
  crossed = (prefix[..., hi + 1] - prefix[..., lo]) > 0
  crossed &= jnp.asarray(hi >= lo)
  return col_blocks[:, :, None, :] | crossed


def topk_layout(scores, budget: int, *, q_len, kv_len, block_q, block_kv, causal, sink_tokens,
                local_tokens):
  """Block scores [B, H, nQ, nK] -> layout of the `budget` best allowed blocks plus the kept ones."""
  allowed, _, kept = base_tables(q_len, kv_len, block_q, block_kv, causal, sink_tokens, local_tokens)
  scores = jnp.where(allowed & ~kept, scores, -jnp.inf)
  return finish(topk_mask(scores, budget), q_len=q_len, kv_len=kv_len, block_q=block_q,
                block_kv=block_kv, causal=causal, sink_tokens=sink_tokens, local_tokens=local_tokens)
