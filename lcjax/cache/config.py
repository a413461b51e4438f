"""CacheConfig: one frozen dataclass that names the cache policy and its knobs.

One config line swaps the policy (`CacheConfig(policy="snapkv", budget=128)`); `make_caches`
(factory.py) turns it into one cache per layer. Fields unused by a policy are ignored.
"""

from __future__ import annotations

import dataclasses

POLICIES = ("dense", "window", "streaming", "h2o", "tova", "snapkv", "pyramidkv", "razor", "think",
            "kivi", "gear", "mikv", "merge", "quest", "landmark", "linear")
SCHEDULES = ("uniform", "pyramid")


@dataclasses.dataclass(frozen=True)
class CacheConfig:
  """Attributes:
    policy: one of POLICIES.
    budget: tokens kept per KV head (evicting policies, MiKV's full-precision set); for "window"
      and "streaming" the window. A budget >= the sequence capacity keeps everything.
    layer_budgets: one budget per layer (overrides budget and budget_schedule).
    head_budgets: per layer, one budget per KV head (overrides layer_budgets).
    budget_schedule: "uniform" or "pyramid" (PyramidKV's schedule, average = budget).
    pyramid_beta: PyramidKV's beta.
    sinks: attention-sink tokens always kept (StreamingLLM, RazorAttention, H2O's optional sinks).
    window: recent tokens always kept (H2O's recent budget, RazorAttention, MiKV).
    obs_window, pool_kernel, pooling: SnapKV / PyramidKV / ThinK observation window and pooling.
    average_heads: TOVA averages the score over the layer's heads (the paper) or not.
    retrieval_heads: RazorAttention, per layer the KV heads that keep everything.
    bits, group_size, residual, rank: KIVI / GEAR / MiKV quantization (rank > 0 adds GEAR's
      low-rank residual; policy "gear" with rank 0 uses rank 2).
    channel_keep: ThinK, fraction of key channels kept.
    merge_threshold: KV merging, cosine similarity above which a key joins the previous slot.
    block_size, top_blocks: Quest / landmark retrieval (tokens per block, blocks read per step).
    local_blocks: Quest / landmark, most recent blocks always read.
    feature_map: linear attention's feature map ("elu1" or "relu").
    max_chunk: largest number of tokens one update() writes (the prefill chunk); sets headroom.
    cla_share: cross-layer attention (CLA): layers in groups of cla_share share one cache.
  """
  policy: str = "dense"
  budget: int = 256
  layer_budgets: tuple[int, ...] | None = None
  head_budgets: tuple[tuple[int, ...], ...] | None = None
  budget_schedule: str = "uniform"
  pyramid_beta: float = 20.0
  sinks: int = 4
  window: int = 32
  obs_window: int = 8
  pool_kernel: int = 7
  pooling: str = "max"
  average_heads: bool = True
  retrieval_heads: tuple[tuple[int, ...], ...] = ()
  bits: int = 8
  group_size: int = 32
  residual: int = 32
  rank: int = 0
  channel_keep: float = 0.5
  merge_threshold: float = 0.9
  block_size: int = 16
  top_blocks: int = 4
  local_blocks: int = 1
  feature_map: str = "elu1"
  max_chunk: int = 1
  cla_share: int = 1

  def __post_init__(self):
    if self.policy not in POLICIES:
      raise ValueError(f"policy={self.policy!r}; accepted: {POLICIES}")
    if self.budget_schedule not in SCHEDULES:
      raise ValueError(f"budget_schedule={self.budget_schedule!r}; accepted: {SCHEDULES}")
    for name in ("budget", "max_chunk", "cla_share", "block_size", "top_blocks", "group_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
    if not 0.0 < self.channel_keep <= 1.0:
      raise ValueError(f"channel_keep={self.channel_keep}: must be in (0, 1]")
