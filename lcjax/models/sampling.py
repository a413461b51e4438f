"""Next-token sampling: greedy, temperature, top-k and top-p (nucleus), as in transformers' warpers."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def validate_sampling(temperature: float, top_k: int | None, top_p: float | None, vocab_size: int) -> None:
  if not temperature >= 0:
    raise ValueError(f"temperature={temperature!r}; accepted: 0 (greedy) or a float > 0")
  if top_k is not None and not (isinstance(top_k, int) and 1 <= top_k <= vocab_size):
    raise ValueError(f"top_k={top_k!r}; accepted: None or an int in [1, vocab_size={vocab_size}]")
  if top_p is not None and not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p!r}; accepted: None or a float in (0, 1]")


def filter_top_k(logits, k: int):
  """Logits [..., V] with everything below the k-th largest set to -inf (ties at the k-th kept)."""
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits < kth, -jnp.inf, logits)


def filter_top_p(logits, p: float):
  """Logits [..., V] keeping the smallest set of largest tokens whose probability reaches p.

  A token is kept when the probability of the tokens ranked above it is < p (so the top token
  always stays); ties at the threshold are kept.
  """
  sorted_desc = -jnp.sort(-logits, axis=-1)
  probs = jax.nn.softmax(sorted_desc, axis=-1)
  mass_above = jnp.cumsum(probs, axis=-1) - probs
  n_keep = jnp.sum(mass_above < p, axis=-1, keepdims=True)
  threshold = jnp.take_along_axis(sorted_desc, n_keep - 1, axis=-1)
  return jnp.where(logits < threshold, -jnp.inf, logits)


def sample_logits(logits, key, *, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None):
  """int32 [B] tokens from float32 logits [B, V]: argmax when temperature == 0, else a draw from
  softmax(logits / temperature) restricted by top-k, then top-p (the transformers order)."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None:
    logits = filter_top_k(logits, top_k)
  if top_p is not None and top_p < 1:
    logits = filter_top_p(logits, top_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
