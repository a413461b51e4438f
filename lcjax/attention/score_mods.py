"""Score modifiers: functions applied to the scaled float32 logits before masking.

A score_mod has the signature of lcjax.attention.reference.ScoreMod,
`f(scores, b, h, q_idx, kv_idx) -> scores`, where scores are float32 [B, Hq, Tq, Tk] (already
multiplied by the scale) and the int32 index arrays broadcast against them (h is the *query*
head, q_idx and kv_idx are absolute positions). Like masks, score mods are frozen dataclasses:
hashable, so jit and the kernels may treat them as static.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SoftCap:
  """Logit soft-capping, cap * tanh(s / cap) (Gemma 2; Grok-1 uses cap=30)."""
  cap: float

  def __post_init__(self):
    if not (isinstance(self.cap, (int, float)) and math.isfinite(self.cap) and self.cap > 0):
      raise ValueError(f"soft_cap: cap={self.cap!r}; accepted: a finite float > 0")

  def __call__(self, scores, b, h, q_idx, kv_idx):
    return self.cap * jnp.tanh(scores / self.cap)


def alibi_slopes(num_heads: int) -> tuple[float, ...]:
  """ALiBi head slopes (Press et al. 2022, "Train Short, Test Long"), as in their reference code.

  For a power of two n the slopes are 2^(-8/n * (i + 1)); otherwise the slopes of the closest
  smaller power of two followed by every other slope of the next power of two.
  """
  if not isinstance(num_heads, int) or num_heads < 1:
    raise ValueError(f"alibi_slopes: num_heads={num_heads!r}; accepted: an int >= 1")
  def power_of_two(n):
    return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]
  p = 2 ** int(math.floor(math.log2(num_heads)))
  slopes = power_of_two(p)
  if p < num_heads:
    slopes += power_of_two(2 * p)[0::2][:num_heads - p]
  return tuple(slopes)


@dataclasses.dataclass(frozen=True)
class Alibi:
  """ALiBi: adds slope[h] * (kv_idx - q_idx), a linear penalty on distance (negative for the past).

  slopes: one per *query* head; build with `alibi(num_heads)` for the paper's slopes.
  """
  slopes: tuple[float, ...]

  def __call__(self, scores, b, h, q_idx, kv_idx):
    if scores.shape[1] != len(self.slopes):
      raise ValueError(f"alibi: {len(self.slopes)} slopes for {scores.shape[1]} query heads; "
                       "accepted: one slope per query head")
    slope = jnp.asarray(self.slopes, scores.dtype)[h]
    return scores + slope * (kv_idx - q_idx).astype(scores.dtype)


@dataclasses.dataclass(frozen=True)
class Compose:
  """Applies mods left to right: Compose((a, b))(s) == b(a(s))."""
  mods: tuple

  def __call__(self, scores, b, h, q_idx, kv_idx):
    for mod in self.mods:
      scores = mod(scores, b, h, q_idx, kv_idx)
    return scores


def soft_cap(cap: float) -> SoftCap:
  return SoftCap(float(cap) if isinstance(cap, int) else cap)


def alibi(num_heads: int, slopes=None) -> Alibi:
  """ALiBi over `num_heads` query heads, with the paper's slopes unless `slopes` is given."""
  slopes = alibi_slopes(num_heads) if slopes is None else tuple(float(s) for s in slopes)
  if len(slopes) != num_heads:
    raise ValueError(f"alibi: slopes has {len(slopes)} entries; accepted: num_heads={num_heads}")
  return Alibi(slopes)


def compose(*mods) -> Compose:
  return Compose(tuple(mods))
