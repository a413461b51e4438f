"""H2O: heavy hitters (accumulated attention) plus recent tokens.

Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models" (NeurIPS 2023, arXiv:2306.14048). A token's score is the attention it has received, summed
over every query so far (the prompt's rows at prefill, then one row per decoded token); the cache
keeps the `window` most recent tokens plus the highest-scoring ("heavy hitter") others.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lcjax.cache.evicting import EvictionPolicy


@dataclasses.dataclass(frozen=True)
class H2OPolicy(EvictionPolicy):
  """window: recent tokens always kept (the paper's recent budget); the rest of the budget goes
  to heavy hitters."""

  def observe(self, cache, q, num_new, t):
    # Sum over the chunk's queries; GQA heads that share a KV head are averaged (as kvpress does).
    return cache.score + jnp.moveaxis(self.probs(cache, q, num_new).sum(2), 1, 2)
