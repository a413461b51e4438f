"""Fidelity of a sparse layout against dense attention: recall, output error, compute.

For q, k, v and a BlockLayout (from a selector or a mask), compared with dense attention under
the same base mask:
  attention_recall   share of the dense attention mass that falls on pairs the layout keeps,
                     averaged over query rows (rows with no allowed key are skipped);
  output_error       ||o_sparse - o_dense||_F / ||o_dense||_F;
  flops_fraction     query-key pairs in the visited blocks over those dense attention visits
                     with the same block sizes (what a block-sparse kernel computes: a block is
                     paid for whole, padding excluded), averaged over heads.
The dense map is materialised: meant for analysis at moderate lengths, not for speed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.attention.layout import BlockLayout
from lcjax.attention.layouts import to_layout
from lcjax.attention.masks import Mask
from lcjax.attention.reference import allowed_pairs, attention_reference


def _offset(q, k, q_offset):
  return k.shape[1] - q.shape[1] if q_offset is None else q_offset


def dense_probabilities(q, k, *, mask: Mask | None, scale=None, q_offset=None):
  """float32 [B, Hq, Tq, Tk] softmax probabilities of dense attention under `mask`."""
  batch, q_len, q_heads, dim = q.shape
  scale = dim ** -0.5 if scale is None else scale
  kr = jnp.repeat(k, q_heads // k.shape[2], axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), kr.astype(jnp.float32)) * scale
  ok = allowed_pairs(batch=batch, q_len=q_len, kv_len=k.shape[1], q_heads=q_heads, mask=mask,
                     q_offset=_offset(q, k, q_offset))
  s = jnp.where(ok, s, -jnp.inf)
  m = jnp.max(s, -1, keepdims=True)
  p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
  return p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)


def attention_recall(q, k, layout: BlockLayout, *, mask: Mask | None, scale=None, q_offset=None):
  """Mean over rows of the dense attention mass kept by `layout` (float32 scalar in [0, 1])."""
  probs = dense_probabilities(q, k, mask=mask, scale=scale, q_offset=q_offset)
  keep = allowed_pairs(batch=q.shape[0], q_len=q.shape[1], kv_len=k.shape[1], q_heads=q.shape[2],
                       mask=mask, layout=layout, q_offset=_offset(q, k, q_offset))
  kept = jnp.sum(jnp.where(keep, probs, 0.0), -1)
  has_keys = probs.sum(-1) > 0
  return jnp.sum(jnp.where(has_keys, kept, 0.0)) / jnp.maximum(has_keys.sum(), 1)


def output_error(q, k, v, layout: BlockLayout, *, mask: Mask | None, scale=None, q_offset=None):
  """||attend(layout) - attend(dense)||_F / ||attend(dense)||_F (float32 scalar)."""
  kwargs = dict(mask=mask, scale=scale, q_offset=_offset(q, k, q_offset))
  dense = attention_reference(q, k, v, **kwargs).astype(jnp.float32)
  sparse = attention_reference(q, k, v, layout=layout, **kwargs).astype(jnp.float32)
  return jnp.linalg.norm(sparse - dense) / jnp.maximum(jnp.linalg.norm(dense), 1e-30)


def _pairs_computed(visible, layout_like: BlockLayout):
  """Query-key pairs inside the visible blocks, per [B, H]: float64 numpy."""
  bq, bk = layout_like.block_q, layout_like.block_kv
  rows = np.minimum(bq, layout_like.q_len - bq * np.arange(layout_like.num_q_blocks))
  cols = np.minimum(bk, layout_like.kv_len - bk * np.arange(layout_like.num_kv_blocks))
  return (np.asarray(visible, np.float64) * (rows[:, None] * cols[None, :])).sum((-2, -1))


def flops_fraction(layout: BlockLayout, *, mask: Mask | None, q_offset=None) -> float:
  """Pairs computed by `layout` over pairs computed by the dense layout of `mask` (mean over heads)."""
  offset = layout.kv_len - layout.q_len if q_offset is None else q_offset
  dense = to_layout(mask, layout.q_len, layout.kv_len, layout.block_q, layout.block_kv, q_offset=offset)
  dense_pairs = _pairs_computed(dense.block_mask()[0], dense)
  return float(np.mean(_pairs_computed(layout.block_mask()[0], layout) / dense_pairs))


def evaluate(q, k, v, layout: BlockLayout, *, mask: Mask | None, scale=None, q_offset=None) -> dict:
  """All three measures, plus the layout's block density, as Python floats."""
  kwargs = dict(mask=mask, scale=scale, q_offset=q_offset)
  return dict(recall=float(attention_recall(q, k, layout, **kwargs)),
              output_error=float(output_error(q, k, v, layout, **kwargs)),
              flops_fraction=flops_fraction(layout, mask=mask, q_offset=q_offset),
              density=float(jnp.mean(layout.density())))
