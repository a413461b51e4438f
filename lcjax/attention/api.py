"""attend(): one entry point for exact attention over masks and block layouts.

Dispatches to the Pallas kernels (lcjax/attention/pallas_backend.py, when it can serve the call on
the current backend) or to the XLA reference (lcjax/attention/reference.py).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from lcjax.attention.layout import BlockLayout
from lcjax.attention.masks import Mask
from lcjax.attention.reference import ScoreMod, attention_reference

IMPLEMENTATIONS = ("auto", "xla", "pallas")


def validate_qkv(q, k, v) -> None:
  """Raises ValueError naming the argument when shapes can't be attended together."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(f"{name} has shape {getattr(x, 'shape', None)}; accepted: a 4-d array "
                       "[batch, len, heads, head_dim]")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} has dtype {x.dtype}; accepted: bfloat16, float16 or float32")
  if k.shape[:3] != v.shape[:3]:
    raise ValueError(f"k and v must agree on batch, length and heads; got k{k.shape}, v{v.shape}")
  if q.shape[0] != k.shape[0]:
    raise ValueError(f"q batch {q.shape[0]} != k batch {k.shape[0]}; accepted: equal batch sizes")
  if q.shape[3] != k.shape[3]:
    raise ValueError(f"q head_dim {q.shape[3]} != k head_dim {k.shape[3]}; accepted: equal head dims")
  if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
    raise ValueError(f"q heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]}) for GQA/MQA")


def validate_layout(layout: BlockLayout, q, k) -> None:
  """Raises ValueError when the layout was not built for these q, k shapes."""
  if not isinstance(layout, BlockLayout):
    raise ValueError(f"layout={type(layout).__name__}; accepted: a lcjax.attention.BlockLayout")
  for name in ("block_q", "block_kv"):
    value = getattr(layout, name)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"layout.{name}={value!r}; accepted: a static int >= 1")
  if layout.q_len != q.shape[1] or layout.kv_len != k.shape[1]:
    raise ValueError(f"layout was built for q_len={layout.q_len}, kv_len={layout.kv_len}; "
                     f"got q_len={q.shape[1]}, kv_len={k.shape[1]}")
  b, h = layout.kv_counts.shape[:2]
  if b not in (1, q.shape[0]):
    raise ValueError(f"layout batch {b} must be 1 or the batch size {q.shape[0]}")
  if h == 0 or q.shape[2] % h:
    raise ValueError(f"layout heads {h} must divide q heads {q.shape[2]} (use 1, kv_heads or q_heads)")
  if layout.kv_counts.shape[2] != layout.num_q_blocks:
    raise ValueError(f"layout has {layout.kv_counts.shape[2]} query blocks; block_q={layout.block_q} "
                     f"and q_len={layout.q_len} need {layout.num_q_blocks}")
  if layout.q_counts.shape[2] != layout.num_kv_blocks:
    raise ValueError(f"layout has {layout.q_counts.shape[2]} key blocks; block_kv={layout.block_kv} "
                     f"and kv_len={layout.kv_len} need {layout.num_kv_blocks}")
  if layout.kv_full.shape != layout.kv_indices.shape:
    raise ValueError(f"layout.kv_full has shape {layout.kv_full.shape}; accepted: the shape of "
                     f"layout.kv_indices {layout.kv_indices.shape}")


def validate_arguments(q, k, *, mask, score_mod, scale, segment_ids, kv_segment_ids, q_offset,
                       kv_valid_len) -> None:
  """Raises ValueError naming the first argument attend() cannot take."""
  batch, q_len, kv_len = q.shape[0], q.shape[1], k.shape[1]
  if mask is not None and not isinstance(mask, Mask):
    raise ValueError(f"mask={mask!r}; accepted: a lcjax.attention.masks.Mask or None")
  if score_mod is not None and not callable(score_mod):
    raise ValueError(f"score_mod={score_mod!r}; accepted: a callable f(scores, b, h, q_idx, kv_idx)")
  if isinstance(scale, (int, float)) and not (math.isfinite(scale) and scale > 0):
    raise ValueError(f"scale={scale!r}; accepted: None or a finite number > 0")
  if segment_ids is not None and tuple(segment_ids.shape) != (batch, q_len):
    raise ValueError(f"segment_ids has shape {segment_ids.shape}; accepted: [batch={batch}, q_len={q_len}]")
  if kv_segment_ids is not None:
    if segment_ids is None:
      raise ValueError("kv_segment_ids was given without segment_ids; accepted: both, or segment_ids alone")
    if tuple(kv_segment_ids.shape) != (batch, kv_len):
      raise ValueError(f"kv_segment_ids has shape {kv_segment_ids.shape}; accepted: [batch={batch}, kv_len={kv_len}]")
  elif segment_ids is not None and q_len != kv_len:
    raise ValueError(f"segment_ids alone needs q_len == kv_len (got {q_len}, {kv_len}); "
                     "accepted: also pass kv_segment_ids [batch, kv_len]")
  if np.shape(q_offset) not in ((), (batch,)):
    raise ValueError(f"q_offset has shape {np.shape(q_offset)}; accepted: an int, a scalar or [batch={batch}]")
  if kv_valid_len is not None and np.shape(kv_valid_len) not in ((), (batch,)):
    raise ValueError(f"kv_valid_len has shape {np.shape(kv_valid_len)}; accepted: None, a scalar or [batch={batch}]")


def attend(q, k, v, *, mask: Mask | None = None, layout: BlockLayout | None = None,
           score_mod: ScoreMod | None = None, scale: float | None = None, segment_ids=None,
           kv_segment_ids=None, q_offset=0, kv_valid_len=None, return_lse: bool = False,
           implementation: str = "auto"):
  """Exact softmax attention over the pairs that mask, layout and segment ids allow.

  Args:
    q: [B, Tq, Hq, D]; k, v: [B, Tk, Hkv, D]; Hq % Hkv == 0 (GQA/MQA). bf16, fp16 or fp32.
    mask: a lcjax.attention.masks.Mask over absolute indices (query i is at q_offset + i).
    layout: a BlockLayout restricting the key blocks each query block visits.
    score_mod: f(scores, b, h, q_idx, kv_idx) -> scores on the scaled float32 logits, e.g.
      lcjax.attention.score_mods.soft_cap(50.0) or alibi(Hq).
    scale: logit scale, default D ** -0.5.
    segment_ids, kv_segment_ids: int32 [B, Tq] / [B, Tk]: attend only within a segment.
    q_offset: int or int32 [B], absolute index of the first query.
    kv_valid_len: int32 scalar or [B]: keys at or past it are ignored (a cache's fill level).
    return_lse: also return the float32 log-sum-exp [B, Hq, Tq].
    implementation: "auto" (Pallas where it serves the call, else XLA), "xla" or "pallas".
  Returns:
    out [B, Tq, Hq, D] in q.dtype (zeros for rows that see nothing), and lse if asked.
  """
  validate_qkv(q, k, v)
  if layout is not None:
    validate_layout(layout, q, k)
  validate_arguments(q, k, mask=mask, score_mod=score_mod, scale=scale, segment_ids=segment_ids,
                     kv_segment_ids=kv_segment_ids, q_offset=q_offset, kv_valid_len=kv_valid_len)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r}; accepted: {IMPLEMENTATIONS}")
  kwargs = dict(mask=mask, layout=layout, score_mod=score_mod, scale=scale, segment_ids=segment_ids,
                kv_segment_ids=kv_segment_ids, q_offset=q_offset, kv_valid_len=kv_valid_len,
                return_lse=return_lse)
  if implementation in ("auto", "pallas"):
    try:
      from lcjax.attention import pallas_backend
    except ImportError:
      pallas_backend = None
    reason = "lcjax.attention.pallas_backend is not available" if pallas_backend is None else \
        pallas_backend.unsupported_reason(q, k, v, **kwargs)
    if reason is None:
      return pallas_backend.attend_pallas(q, k, v, **kwargs)
    if implementation == "pallas":
      raise ValueError(f"implementation='pallas' cannot serve this call: {reason}")
  return attention_reference(q, k, v, **kwargs)
