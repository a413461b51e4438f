"""attend(): one entry point for exact attention over masks and block layouts.

Dispatches to the Pallas kernels (lcjax/attention/pallas_backend.py, when it can serve the call on
the current backend) or to the XLA reference (lcjax/attention/reference.py).
"""

from __future__ import annotations

import jax

from lcjax.attention.layout import BlockLayout
from lcjax.attention.masks import Mask
from lcjax.attention.reference import ScoreMod, attention_reference

IMPLEMENTATIONS = ("auto", "xla", "pallas")


def validate_qkv(q, k, v) -> None:
  """Raises ValueError naming the argument when shapes can't be attended together."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [batch, len, heads, head_dim]; got q{q.shape}, k{k.shape}, v{v.shape}")
  if k.shape[:3] != v.shape[:3]:
    raise ValueError(f"k and v must agree on batch, length and heads; got k{k.shape}, v{v.shape}")
  if q.shape[0] != k.shape[0]:
    raise ValueError(f"q batch {q.shape[0]} != k batch {k.shape[0]}")
  if q.shape[3] != k.shape[3]:
    raise ValueError(f"q head_dim {q.shape[3]} != k head_dim {k.shape[3]}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"q heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]}) for GQA/MQA")


def validate_layout(layout: BlockLayout, q, k) -> None:
  if layout.q_len != q.shape[1] or layout.kv_len != k.shape[1]:
    raise ValueError(f"layout was built for q_len={layout.q_len}, kv_len={layout.kv_len}; "
                     f"got q_len={q.shape[1]}, kv_len={k.shape[1]}")
  b, h = layout.kv_counts.shape[:2]
  if b not in (1, q.shape[0]):
    raise ValueError(f"layout batch {b} must be 1 or the batch size {q.shape[0]}")
  if q.shape[2] % h:
    raise ValueError(f"layout heads {h} must divide q heads {q.shape[2]} (use 1, kv_heads or q_heads)")
  if layout.kv_counts.shape[2] != layout.num_q_blocks:
    raise ValueError(f"layout has {layout.kv_counts.shape[2]} query blocks; block_q={layout.block_q} "
                     f"and q_len={layout.q_len} need {layout.num_q_blocks}")


def attend(q, k, v, *, mask: Mask | None = None, layout: BlockLayout | None = None,
           score_mod: ScoreMod | None = None, scale: float | None = None, segment_ids=None,
           kv_segment_ids=None, q_offset=0, kv_valid_len=None, return_lse: bool = False,
           implementation: str = "auto"):
  """Exact softmax attention over the pairs that mask, layout and segment ids allow.

  Args:
    q: [B, Tq, Hq, D]; k, v: [B, Tk, Hkv, D]; Hq % Hkv == 0 (GQA/MQA). bf16, fp16 or fp32.
    mask: a lcjax.attention.masks.Mask over absolute indices (query i is at q_offset + i).
    layout: a BlockLayout restricting the key blocks each query block visits.
    score_mod: f(scores, b, h, q_idx, kv_idx) -> scores on float32 logits (soft-capping, ALiBi).
    scale: logit scale, default D ** -0.5.
    segment_ids, kv_segment_ids: int32 [B, Tq] / [B, Tk]: attend only within a segment.
    q_offset: int or int32 [B], absolute index of the first query.
    kv_valid_len: int32 [B]: keys at or past it are ignored (a cache's fill level).
    return_lse: also return the float32 log-sum-exp [B, Hq, Tq].
    implementation: "auto" (Pallas where it serves the call, else XLA), "xla" or "pallas".
  Returns:
    out [B, Tq, Hq, D] in q.dtype (zeros for rows that see nothing), and lse if asked.
  """
  validate_qkv(q, k, v)
  if layout is not None:
    validate_layout(layout, q, k)
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
