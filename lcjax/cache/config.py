"""CacheConfig: one frozen dataclass that names the cache policy and its knobs.

One config line swaps the policy (`CacheConfig(policy="snapkv", budget=128)`); `make_caches`
(factory.py) turns it into one cache per layer. Fields unused by a policy are ignored. A model
carries one as `ModelConfig.cache` (experiment configs: `config.model.cache`), from which
`generate` builds its caches. Cross-layer attention (CLA) is a model option, not a cache policy:
`ModelConfig.cla_share`.
"""

from __future__ import annotations

import dataclasses

from lcjax.cache.block_retrieval import SELECT_PER

POLICIES = ("dense", "window", "streaming", "h2o", "tova", "snapkv", "pyramidkv", "razor", "think",
            "kivi", "kivi_kernel", "gear", "mikv", "merge", "quest", "landmark", "linear", "minicache")
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
    value_group, int8_dots: "kivi_kernel" (KIVI int8 / int4 in the quantised decode kernel's
      layout): channels per value scale (None: group_size; int4 needs a divisor of head_dim / 2
      or head_dim itself, the fastest), and whether the kernel uses int8 tensor-core dots (fast,
      ~1 % error against the dequantised cache) or float16 dots (~0.4 %, about bf16 dense speed).
    channel_keep: ThinK, fraction of key channels kept.
    merge_threshold: KV merging, cosine similarity above which a key joins the previous slot.
    block_size, top_blocks: Quest / landmark retrieval (tokens per block, blocks read per step).
    local_blocks: Quest / landmark, most recent blocks always read.
    select_per: Quest / landmark, "query_head" (the papers: one block set per query head) or
      "kv_head" (one set per KV head from its GQA group's largest score per block; the decode
      kernel then reads each selected block once per group, not once per query head choosing it).
    feature_map: linear attention's feature map ("elu1" or "relu").
    max_chunk: largest number of tokens one update() writes (the prefill chunk); sets headroom.
      generate() sets it to its own prefill chunk when it builds the caches.
    minicache_start: MiniCache ("minicache": dense caches during the prefill, then generate merges
      layers (s, s+1), (s+2, s+3), ... from s = minicache_start; None: the paper's middle-depth
      start, min(n_layers // 2, n_layers - 2)); an odd last layer stays dense.
    minicache_t: MiniCache's SLERP interpolation t (the paper: 0.6).
    minicache_gamma: MiniCache's retention threshold, the top fraction of each head's angular
      distance range whose tokens are kept exactly (lcjax/cache/minicache.py).
    minicache_max_retained: MiniCache, exactly kept tokens per (sequence, KV head) at most.
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
  value_group: int | None = None
  int8_dots: bool = True
  channel_keep: float = 0.5
  merge_threshold: float = 0.9
  block_size: int = 16
  top_blocks: int = 4
  local_blocks: int = 1
  select_per: str = "query_head"
  feature_map: str = "elu1"
  max_chunk: int = 1
  minicache_start: int | None = None
  minicache_t: float = 0.6
  minicache_gamma: float = 0.05
  minicache_max_retained: int = 16

  def __post_init__(self):
    if self.policy not in POLICIES:
      raise ValueError(f"policy={self.policy!r}; accepted: {POLICIES}")
    if self.budget_schedule not in SCHEDULES:
      raise ValueError(f"budget_schedule={self.budget_schedule!r}; accepted: {SCHEDULES}")
    for name in ("budget", "max_chunk", "block_size", "top_blocks", "group_size", "minicache_max_retained"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
    if self.select_per not in SELECT_PER:
      raise ValueError(f"select_per={self.select_per!r}; accepted: {SELECT_PER}")
    if not 0.0 < self.channel_keep <= 1.0:
      raise ValueError(f"channel_keep={self.channel_keep}: must be in (0, 1]")
    if self.minicache_start is not None and self.minicache_start < 0:
      raise ValueError(f"minicache_start={self.minicache_start}; accepted: None (the middle layer) or an int >= 0")
    for name in ("minicache_t", "minicache_gamma"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"{name}={getattr(self, name)}; accepted: a float in [0, 1]")

  def check_layers(self, num_layers: int, kv_heads: int) -> None:
    """Raises ValueError when a per-layer field does not fit a model of num_layers x kv_heads."""
    if self.layer_budgets is not None and len(self.layer_budgets) != num_layers:
      raise ValueError(f"layer_budgets has {len(self.layer_budgets)} entries; accepted: one per layer "
                       f"({num_layers})")
    if self.head_budgets is not None and (len(self.head_budgets) != num_layers
                                          or any(len(h) != kv_heads for h in self.head_budgets)):
      raise ValueError(f"head_budgets={self.head_budgets}; accepted: {num_layers} layers x {kv_heads} KV heads")
    if self.retrieval_heads and len(self.retrieval_heads) != num_layers:
      raise ValueError(f"retrieval_heads has {len(self.retrieval_heads)} entries; accepted: () or one tuple "
                       f"of KV heads per layer ({num_layers})")
    if self.policy == "minicache":
      if num_layers < 2:
        raise ValueError(f"policy='minicache' merges pairs of adjacent layers; the model has {num_layers} layer")
      if self.minicache_start is not None and self.minicache_start > num_layers - 2:
        raise ValueError(f"minicache_start={self.minicache_start}; accepted: None or an int in "
                         f"[0, {num_layers - 2}] (the first layer of a pair of the {num_layers} layers)")

  def minicache_first_layer(self, num_layers: int) -> int:
    """The first merged layer: minicache_start, or min(num_layers // 2, num_layers - 2) when None."""
    return min(num_layers // 2, num_layers - 2) if self.minicache_start is None else self.minicache_start
