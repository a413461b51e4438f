"""RazorAttention's retrieval heads: the KV heads that must keep the whole cache.

Tang et al., "RazorAttention: Efficient KV Cache Compression Through Retrieval Heads"
(arXiv:2407.15891). A few heads copy from far away; the paper finds them on a probe of random
tokens repeated once: on the second copy an *echo* head attends to the earlier occurrence of the
current token (position t - L) and an *induction* head to the token that followed it (t - L + 1).
It protects the top 15 % of heads by induction score and the top 1 % by echo score; every other
head keeps sinks + a recent window (lcjax.cache.razor). The cache budgets are per KV head, so a
KV head scores the most of the query heads it serves.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lcjax.models.config import ModelConfig
from lcjax.models.probe import layer_qkv


def probe_tokens(key, batch: int, probe_len: int, low: int, high: int):
  """int32 [batch, 2 * probe_len]: random tokens in [low, high), then the same tokens again."""
  first = jax.random.randint(key, (batch, probe_len), low, high, dtype=jnp.int32)
  return jnp.concatenate([first, first], axis=1)


@jax.jit
def _copy_scores(q, k):
  """Mean attention of the second copy's queries to the echo / induction positions.

  q [B, 2L, Hq, D], k [B, 2L, Hkv, D] -> (echo, induction) float32 [Hq].
  """
  batch, t, hq, d = q.shape
  length = t // 2
  k = jnp.repeat(k, hq // k.shape[2], axis=2)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * d ** -0.5
  causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
  probs = jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1)
  rows = jnp.arange(length, t)                                  # queries of the second copy
  echo = probs[:, :, rows, rows - length]                       # [B, Hq, L]
  induction = probs[:, :, rows[:-1], rows[:-1] - length + 1]    # the last query has no successor
  return echo.mean(axis=(0, 2)), induction.mean(axis=(0, 2))


def retrieval_head_scores(params, cfg: ModelConfig, key, *, probe_len: int = 64, batch: int = 4,
                          low: int = 0, high: int | None = None):
  """(echo, induction) float32 numpy [n_layers, n_kv_heads]: per KV head, the largest score of its
  query heads on a repeated random probe of probe_len tokens drawn from [low, high) (default the
  whole vocabulary)."""
  high = cfg.vocab_size if high is None else high
  if probe_len < 2 or batch < 1 or not 0 <= low < high <= cfg.vocab_size:
    raise ValueError(f"probe_len={probe_len}, batch={batch}, [low, high)=[{low}, {high}); accepted: "
                     f"probe_len >= 2, batch >= 1, 0 <= low < high <= vocab_size={cfg.vocab_size}")
  tokens = probe_tokens(key, batch, probe_len, low, high)
  group = cfg.n_heads // cfg.n_kv_heads
  echo, induction = [], []
  for layer in range(cfg.n_layers):
    q, k, _ = layer_qkv(params, cfg, tokens, layer)
    e, i = _copy_scores(q, k)
    echo.append(np.asarray(e).reshape(cfg.n_kv_heads, group).max(axis=1))
    induction.append(np.asarray(i).reshape(cfg.n_kv_heads, group).max(axis=1))
  return np.stack(echo), np.stack(induction)


def top_heads(scores, fraction: float) -> set[tuple[int, int]]:
  """The ceil(fraction * heads) (layer, head) pairs of largest score (none for fraction 0)."""
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"fraction={fraction}; accepted: 0 <= fraction <= 1")
  count = math.ceil(fraction * scores.size)
  order = np.argsort(-scores, axis=None, kind="stable")[:count]
  return {tuple(int(i) for i in np.unravel_index(flat, scores.shape)) for flat in order}


def find_retrieval_heads(params, cfg: ModelConfig, key, *, induction_fraction: float = 0.15,
                         echo_fraction: float = 0.01, **probe) -> tuple[tuple[int, ...], ...]:
  """Per layer, the KV heads to protect (CacheConfig.retrieval_heads): the top induction_fraction
  of all heads by induction score and the top echo_fraction by echo score (probe: see
  retrieval_head_scores)."""
  echo, induction = retrieval_head_scores(params, cfg, key, **probe)
  chosen = top_heads(induction, induction_fraction) | top_heads(echo, echo_fraction)
  return tuple(tuple(sorted(h for l, h in chosen if l == layer)) for layer in range(cfg.n_layers))
