"""Rotary position embeddings (RoPE) with the long-context frequency scalings.

The scalings follow transformers' `ROPE_INIT_FUNCTIONS` (modeling_rope_utils.py, v5):

  LinearScaling      position interpolation (Chen et al. 2023): every frequency divided by factor.
  DynamicNTKScaling  NTK-aware base growth once the sequence passes max_seq_len; like transformers,
                     the sequence length is max(positions) + 1 of the current forward call.
  YarnScaling        YaRN (Peng et al. 2023): per-frequency blend of interpolation and
                     extrapolation, plus an attention factor multiplying cos and sin.
  Llama3Scaling      Llama 3.1's piecewise low/high-frequency scaling.

Rotation uses the Hugging Face "rotate_half" convention (the two halves of head_dim are the real
and imaginary parts), so HF q_proj/k_proj weights load without a permutation.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np


def _require_positive(owner: str, **values) -> None:
  for name, value in values.items():
    if value is None or not value > 0:
      raise ValueError(f"{owner}.{name}={value!r}; accepted: a number > 0")


@dataclasses.dataclass(frozen=True)
class LinearScaling:
  factor: float

  def __post_init__(self):
    _require_positive("LinearScaling", factor=self.factor)


@dataclasses.dataclass(frozen=True)
class DynamicNTKScaling:
  factor: float

  def __post_init__(self):
    _require_positive("DynamicNTKScaling", factor=self.factor)


@dataclasses.dataclass(frozen=True)
class YarnScaling:
  """original_max_position_embeddings None means the model's max_seq_len (as transformers)."""
  factor: float
  original_max_position_embeddings: int | None = None
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  attention_factor: float | None = None    # None: derived from factor (and mscale, mscale_all_dim)
  mscale: float | None = None
  mscale_all_dim: float | None = None
  truncate: bool = True

  def __post_init__(self):
    _require_positive("YarnScaling", factor=self.factor, beta_fast=self.beta_fast, beta_slow=self.beta_slow)
    if self.original_max_position_embeddings is not None:
      _require_positive("YarnScaling", original_max_position_embeddings=self.original_max_position_embeddings)
    if self.attention_factor is not None:
      _require_positive("YarnScaling", attention_factor=self.attention_factor)


@dataclasses.dataclass(frozen=True)
class Llama3Scaling:
  """original_max_position_embeddings None means the model's max_seq_len (as transformers)."""
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int | None = None

  def __post_init__(self):
    _require_positive("Llama3Scaling", factor=self.factor, low_freq_factor=self.low_freq_factor,
                      high_freq_factor=self.high_freq_factor)
    if self.high_freq_factor <= self.low_freq_factor:
      raise ValueError(f"Llama3Scaling.high_freq_factor={self.high_freq_factor} must be > "
                       f"low_freq_factor={self.low_freq_factor}")
    if self.original_max_position_embeddings is not None:
      _require_positive("Llama3Scaling", original_max_position_embeddings=self.original_max_position_embeddings)


RopeScaling = LinearScaling | DynamicNTKScaling | YarnScaling | Llama3Scaling
ROPE_SCALINGS = (LinearScaling, DynamicNTKScaling, YarnScaling, Llama3Scaling)


def _default_inv_freq(head_dim: int, theta: float) -> np.ndarray:
  # float32 like transformers, so that frequencies agree to the last bit where possible.
  exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  return (1.0 / np.power(np.float32(theta), exponent)).astype(np.float32)


def _yarn_inv_freq(head_dim: int, theta: float, s: YarnScaling, max_seq_len: int):
  original = s.original_max_position_embeddings or max_seq_len

  def mscale_of(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  if s.attention_factor is not None:
    attention_factor = s.attention_factor
  elif s.mscale and s.mscale_all_dim:
    attention_factor = mscale_of(s.factor, s.mscale) / mscale_of(s.factor, s.mscale_all_dim)
  else:
    attention_factor = mscale_of(s.factor)

  def correction_dim(rotations):   # the dimension that turns `rotations` times over `original`
    return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

  low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
  if s.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, head_dim - 1)
  if low == high:
    high += 0.001   # avoid a zero-width ramp
  ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  extrapolation_weight = (1 - ramp).astype(np.float32)
  pos_freqs = np.power(np.float32(theta), np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))
  inv_freq = (1.0 / (s.factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
  return inv_freq.astype(np.float32), float(attention_factor)


def _llama3_inv_freq(head_dim: int, theta: float, s: Llama3Scaling, max_seq_len: int) -> np.ndarray:
  inv_freq = _default_inv_freq(head_dim, theta)
  old_context = s.original_max_position_embeddings or max_seq_len
  low_freq_wavelen = old_context / s.low_freq_factor
  high_freq_wavelen = old_context / s.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
  smooth = (old_context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


def static_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None, max_seq_len: int):
  """(inv_freq float32 [head_dim // 2] numpy, attention_factor float) for position-independent RoPE.

  Dynamic NTK returns its frequencies at sequence length max_seq_len (= unscaled).
  """
  if scaling is None or isinstance(scaling, DynamicNTKScaling):
    return _default_inv_freq(head_dim, theta), 1.0
  if isinstance(scaling, LinearScaling):
    return (_default_inv_freq(head_dim, theta) / np.float32(scaling.factor)).astype(np.float32), 1.0
  if isinstance(scaling, YarnScaling):
    return _yarn_inv_freq(head_dim, theta, scaling, max_seq_len)
  if isinstance(scaling, Llama3Scaling):
    return _llama3_inv_freq(head_dim, theta, scaling, max_seq_len), 1.0
  raise ValueError(f"rope scaling {scaling!r}; accepted: None or one of {[c.__name__ for c in ROPE_SCALINGS]}")


def dynamic_ntk_inv_freq(head_dim: int, theta: float, factor: float, max_seq_len: int, seq_len):
  """float32 [head_dim // 2] for a traced seq_len (int32 scalar): the base grows past max_seq_len."""
  seq_len = jnp.maximum(jnp.asarray(seq_len, jnp.float32), float(max_seq_len))
  base = theta * ((factor * seq_len / max_seq_len) - (factor - 1)) ** (head_dim / (head_dim - 2))
  exponent = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  return 1.0 / base ** exponent


def rope_cos_sin(positions, *, head_dim: int, theta: float, scaling: RopeScaling | None, max_seq_len: int):
  """cos, sin float32 [B, T, head_dim] for int32 positions [B, T] (attention factor included)."""
  if isinstance(scaling, DynamicNTKScaling):
    # As transformers: the current call's length decides the base, for the whole batch.
    inv_freq = dynamic_ntk_inv_freq(head_dim, theta, scaling.factor, max_seq_len, jnp.max(positions) + 1)
    attention_factor = 1.0
  else:
    inv_freq, attention_factor = static_inv_freq(head_dim, theta, scaling, max_seq_len)
    inv_freq = jnp.asarray(inv_freq)
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq            # [B, T, head_dim // 2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb) * attention_factor, jnp.sin(emb) * attention_factor


def apply_rope(x, cos, sin):
  """x [B, T, H, head_dim] rotated by cos, sin [B, T, head_dim] (rotate_half convention), in x.dtype."""
  half = x.shape[-1] // 2
  xf = x.astype(jnp.float32)
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  return (xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)
