"""Landmark attention, training form: the grouped softmax over blocks closed by landmark tokens.

Mohtashami & Jaggi 2023, "Landmark Attention: Random-Access Infinite Context Length for
Transformers". The token stream is cut into blocks of `block_size` ordinary tokens, each closed
by a landmark token, so position p of the stream is a landmark when p % (block_size + 1) ==
block_size. A causal query i in block g(i) sees
  * the tokens of its own block (j <= i) directly, and the landmarks of the earlier blocks, in
    one softmax over their logits: p_j;
  * the ordinary tokens of an earlier block b through b's landmark: token j of b gets
    p_{landmark b} * softmax over b's ordinary tokens of the logits (a second, per-block softmax).
Landmarks of earlier blocks carry no value; their weight is handed to their block, so every row
still sums to 1. Training this way teaches a landmark's key to score its block, which is what
landmark-token retrieval (a selector, lcjax.attention.selectors) exploits at inference.

Model integration (for lcjax/models; a model config switch `landmark_block_size: int | None` and
`landmark_token_id: int`, the vocabulary having a row for the landmark token):

    ins = insert_landmarks(tokens, block_size=bs, landmark_id=cfg.landmark_token_id,
                           positions=positions)          # [B, T'] tokens, positions, is_landmark
    x = embed(ins.tokens)                               # rotary embeddings at ins.positions
    ... in every attention layer: out = landmark_attention(q, k, v, block_size=bs)
    logits = remove_landmarks(logits, block_size=bs)     # [B, T, V]: aligned with the original
                                                         # tokens and targets; loss as usual
Landmark outputs are dropped, so targets need no change, and the token before a landmark still
predicts the next ordinary token.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def _check_block_size(block_size) -> None:
  if not isinstance(block_size, int) or block_size < 1:
    raise ValueError(f"block_size must be a positive int (ordinary tokens per block); got {block_size!r}")


def landmark_mask(length: int, block_size: int) -> np.ndarray:
  """bool [length]: which positions of a stream with landmarks inserted are landmarks."""
  _check_block_size(block_size)
  return np.arange(length) % (block_size + 1) == block_size


@functools.partial(jax.jit, static_argnames=("block_size", "scale"))
def landmark_weights(q, k, *, block_size: int, scale: float | None = None):
  """The grouped-softmax attention weights, float32 [B, Hq, T, T]; rows sum to 1.

  Args:
    q: [B, T, Hq, D]; k: [B, T, Hkv, D] over a stream with landmarks inserted (module docstring).
    block_size: ordinary tokens per block (the stride of landmarks is block_size + 1).
    scale: logit scale, default D ** -0.5.
  """
  _check_block_size(block_size)
  if q.ndim != 4 or k.ndim != 4 or q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or \
      q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
    raise ValueError(f"q [B, T, Hq, D] and k [B, T, Hkv, D] with Hq % Hkv == 0 expected; "
                     f"got q{q.shape}, k{k.shape}")
  b, t, hq, d = q.shape
  stride = block_size + 1
  nb = -(-t // stride)
  scale = d ** -0.5 if scale is None else scale
  kf = jnp.repeat(k.astype(jnp.float32), hq // k.shape[2], axis=2)
  kf = jnp.pad(kf, ((0, 0), (0, nb * stride - t), (0, 0), (0, 0)))       # padded keys: all future
  s = jnp.einsum("bihd,bjhd->bhij", q.astype(jnp.float32), kf) * scale
  s = s.reshape(b, hq, t, nb, stride)                                      # key j = (block, slot)
  i = jnp.arange(t)[:, None, None]
  blk, slot = jnp.arange(nb)[None, :, None], jnp.arange(stride)[None, None, :]
  visible = blk * stride + slot <= i                                       # causal, [T, nb, stride]
  same = blk == i // stride
  is_landmark = slot == block_size
  # 1) One softmax over own-block tokens and the landmarks of earlier blocks.
  direct = visible & (same | is_landmark)
  p = jax.nn.softmax(jnp.where(direct, s, -jnp.inf), axis=(-2, -1))
  gate = jnp.where(visible & ~same & is_landmark, p, 0.0).sum(-1, keepdims=True)   # [.., nb, 1]
  # 2) Per earlier block, a softmax over its ordinary tokens, scaled by its landmark's weight.
  inner = visible & ~same & ~is_landmark
  s_in = jnp.where(inner, s, -jnp.inf)
  m = jnp.max(s_in, axis=-1, keepdims=True)
  e = jnp.exp(s_in - jnp.where(jnp.isfinite(m), m, 0.0))
  inner_p = e / jnp.maximum(e.sum(-1, keepdims=True), 1e-30)              # empty groups: zeros
  w = jnp.where(direct & same, p, 0.0) + gate * inner_p
  return w.reshape(b, hq, t, nb * stride)[..., :t]


@functools.partial(jax.jit, static_argnames=("block_size", "scale"))
def landmark_attention(q, k, v, *, block_size: int, scale: float | None = None):
  """Landmark attention's training form (module docstring), dense O(T^2) in XLA.

  Args:
    q: [B, T, Hq, D]; k: [B, T, Hkv, D]; v: [B, T, Hkv, Dv]; Hq % Hkv == 0; T any length (a
      trailing block without its landmark is the last block, seen directly).
    block_size: ordinary tokens per block.
    scale: logit scale, default D ** -0.5.
  Returns:
    [B, T, Hq, Dv] in q.dtype.
  """
  if v.shape[:3] != k.shape[:3]:
    raise ValueError(f"k {k.shape} and v {v.shape} must agree on batch, length and heads")
  w = landmark_weights(q, k, block_size=block_size, scale=scale)
  b, hq, t, _ = w.shape
  hkv = k.shape[2]
  w = w.reshape(b, hkv, hq // hkv, t, t)
  out = jnp.einsum("bhgij,bjhd->bihgd", w, v.astype(jnp.float32))
  return out.reshape(b, t, hq, v.shape[-1]).astype(q.dtype)


class LandmarkInputs(NamedTuple):
  """tokens [B, T'], positions int32 [B, T'], is_landmark bool [T'], T' = T + T // block_size."""
  tokens: jax.Array
  positions: jax.Array
  is_landmark: np.ndarray


def _source_index(length: int, block_size: int) -> np.ndarray:
  """int [T']: for each stream position, the original token index it holds (landmarks: the
  index of the last token of the block they close)."""
  p = np.arange(length)
  return p - p // (block_size + 1) - landmark_mask(length, block_size)


def insert_landmarks(tokens, *, block_size: int, landmark_id: int, positions=None) -> LandmarkInputs:
  """Inserts a landmark token after every block_size tokens (none after a trailing partial block).

  Args:
    tokens: int [B, T].
    landmark_id: the landmark token's id.
    positions: None or int [B, T]. None: positions 0 .. T'-1 of the new stream (the landmark
      takes a position like any token, as in the paper's training code). Given: ordinary tokens
      keep theirs and a landmark takes the position of the last token of its block.
  Returns:
    LandmarkInputs.
  """
  _check_block_size(block_size)
  b, t = tokens.shape
  length = t + t // block_size
  is_lm = landmark_mask(length, block_size)
  src = _source_index(length, block_size)
  new_tokens = jnp.where(is_lm[None], jnp.asarray(landmark_id, tokens.dtype), tokens[:, src])
  if positions is None:
    new_positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
  else:
    if positions.shape != tokens.shape:
      raise ValueError(f"positions must match tokens {tokens.shape}; got {positions.shape}")
    new_positions = jnp.asarray(positions, jnp.int32)[:, src]
  return LandmarkInputs(new_tokens, new_positions, is_lm)


def remove_landmarks(x, *, block_size: int, axis: int = 1):
  """Drops the landmark positions of x along `axis` (length T' -> T): model outputs (logits,
  hidden states) back onto the original tokens and their targets."""
  _check_block_size(block_size)
  length = x.shape[axis]
  if length % (block_size + 1) == block_size:
    raise ValueError(f"length {length} along axis {axis} cannot come from insert_landmarks with "
                     f"block_size={block_size} (it would end on a missing landmark)")
  keep = np.flatnonzero(~landmark_mask(length, block_size))
  return jnp.take(x, keep, axis=axis)
