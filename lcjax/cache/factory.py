"""make_caches: a CacheConfig and the model's dimensions -> one cache per layer.

    caches = make_caches(CacheConfig(policy="h2o", budget=128, window=32, max_chunk=256),
                         num_layers=L, kv_heads=H, head_dim=D, batch=B, capacity=max_len)

`capacity` is the longest sequence the caller will write (prompt + new tokens). Budgets are
clamped to it: a budget >= capacity can never evict, and clamping only saves memory. With
cla_share > 1 (cross-layer attention, the model option ModelConfig.cla_share) only the owner
layers get a cache, with their own layer's budget, and the others hold None: the model reads the
owner's cache (cross_layer.cla_owner) instead of writing its own. Policy "minicache" builds dense
caches; generate merges them after the prefill (minicache.merge_adjacent_layers).
"""

from __future__ import annotations

import jax.numpy as jnp

from lcjax.cache.config import CacheConfig
from lcjax.cache.cross_layer import cla_owner
from lcjax.cache.dense import DenseKVCache
from lcjax.cache.evicting import EvictingKVCache
from lcjax.cache.h2o import H2OPolicy
from lcjax.cache.kivi import KIVIKVCache
from lcjax.cache.kivi_kernel import KIVIKernelCache
from lcjax.cache.landmark import LandmarkKVCache
from lcjax.cache.linear_state import LinearStateCache
from lcjax.cache.merging import MergingKVCache
from lcjax.cache.mikv import MiKVCache
from lcjax.cache.pyramidkv import pyramid_budgets
from lcjax.cache.quest import QuestKVCache
from lcjax.cache.razor import RazorKVCache
from lcjax.cache.snapkv import SnapKVPolicy
from lcjax.cache.think import ThinKKVCache
from lcjax.cache.tova import TOVAPolicy
from lcjax.cache.window import SinkWindowKVCache


def layer_budget(cfg: CacheConfig, layer: int, num_layers: int, kv_heads: int, capacity: int):
  """The budget of one layer: an int, or a tuple of one int per KV head; clamped to capacity."""
  if cfg.head_budgets is not None:
    if len(cfg.head_budgets) != num_layers or any(len(h) != kv_heads for h in cfg.head_budgets):
      raise ValueError(f"head_budgets needs {num_layers} layers x {kv_heads} KV heads; got {cfg.head_budgets}")
    return tuple(min(int(x), capacity) for x in cfg.head_budgets[layer])
  if cfg.layer_budgets is not None:
    if len(cfg.layer_budgets) != num_layers:
      raise ValueError(f"layer_budgets has {len(cfg.layer_budgets)} entries; the model has {num_layers} layers")
    return min(int(cfg.layer_budgets[layer]), capacity)
  if cfg.budget_schedule == "pyramid" or cfg.policy == "pyramidkv":
    floor = cfg.obs_window + cfg.sinks
    return min(pyramid_budgets(cfg.budget, num_layers, beta=cfg.pyramid_beta, minimum=floor)[layer], capacity)
  return min(cfg.budget, capacity)


def make_cache(cfg: CacheConfig, layer: int, *, num_layers: int, kv_heads: int, head_dim: int, batch: int,
               capacity: int, dtype=jnp.float32):
  """The cache of one layer (see make_caches)."""
  p = cfg.policy
  budget = layer_budget(cfg, layer, num_layers, kv_heads, capacity)
  common = dict(dtype=dtype)
  chunk = dict(max_chunk=cfg.max_chunk)
  if p in ("dense", "minicache"):   # MiniCache merges dense caches after the prefill
    return DenseKVCache.create(batch, capacity, kv_heads, head_dim, dtype)
  if p in ("window", "streaming"):
    if not isinstance(budget, int):
      raise ValueError(f"policy={p!r} takes one window per layer, not per head: {budget}")
    return SinkWindowKVCache.create(batch, kv_heads, head_dim, window=budget,
                                    sinks=cfg.sinks if p == "streaming" else 0, **chunk, **common)
  evicting = {"h2o": lambda: H2OPolicy(sinks=0, window=cfg.window),
              "tova": lambda: TOVAPolicy(average_heads=cfg.average_heads),
              "snapkv": lambda: SnapKVPolicy(window=cfg.obs_window, kernel=cfg.pool_kernel, pooling=cfg.pooling),
              "pyramidkv": lambda: SnapKVPolicy(window=cfg.obs_window, kernel=cfg.pool_kernel, pooling=cfg.pooling)}
  if p in evicting:
    return EvictingKVCache.create(batch, kv_heads, head_dim, policy=evicting[p](), budget=budget, **chunk, **common)
  if p == "razor":
    heads = cfg.retrieval_heads[layer] if cfg.retrieval_heads else ()
    return RazorKVCache.create(batch, kv_heads, head_dim, capacity=capacity, sinks=cfg.sinks, window=cfg.window,
                               retrieval_heads=tuple(heads), **chunk, **common)
  if p == "think":
    return ThinKKVCache.create(batch, capacity, kv_heads, head_dim, channel_keep=cfg.channel_keep,
                               obs_window=cfg.obs_window, **common)
  if p in ("kivi", "gear"):
    rank = cfg.rank if (cfg.rank or p == "kivi") else 2
    return KIVIKVCache.create(batch, capacity, kv_heads, head_dim, bits=cfg.bits, group_size=cfg.group_size,
                              residual=cfg.residual, rank=rank, **chunk, **common)
  if p == "kivi_kernel":
    return KIVIKernelCache.create(batch, capacity, kv_heads, head_dim, bits=cfg.bits, group_size=cfg.group_size,
                                  value_group=cfg.value_group, residual=cfg.residual,
                                  int8_dots=cfg.int8_dots, **chunk, **common)
  if p == "mikv":
    return MiKVCache.create(batch, capacity, kv_heads, head_dim, budget=budget, window=cfg.window, bits=cfg.bits,
                            group_size=cfg.group_size, **chunk, **common)
  if p == "merge":
    return MergingKVCache.create(batch, capacity, kv_heads, head_dim, threshold=cfg.merge_threshold, **common)
  if p in ("quest", "landmark"):
    cls = QuestKVCache if p == "quest" else LandmarkKVCache
    return cls.create(batch, capacity, kv_heads, head_dim, block_size=cfg.block_size, top_blocks=cfg.top_blocks,
                      local_blocks=cfg.local_blocks, select_per=cfg.select_per, **common)
  if p == "linear":
    return LinearStateCache.create(batch, kv_heads, head_dim, feature_map=cfg.feature_map, **chunk, **common)
  raise ValueError(f"policy={p!r} has no cache constructor")


def make_caches(cfg: CacheConfig, *, num_layers: int, kv_heads: int, head_dim: int, batch: int,
                capacity: int, dtype=jnp.float32, cla_share: int = 1) -> list:
  """One cache per layer; with cla_share > 1, None for the layers that read their CLA group's
  first layer's cache (ModelConfig.cla_share)."""
  if num_layers < 1 or kv_heads < 1 or head_dim < 1 or batch < 1 or capacity < 1 or cla_share < 1:
    raise ValueError(f"num_layers={num_layers}, kv_heads={kv_heads}, head_dim={head_dim}, batch={batch}, "
                     f"capacity={capacity}, cla_share={cla_share}: all must be >= 1")
  return [make_cache(cfg, layer, num_layers=num_layers, kv_heads=kv_heads, head_dim=head_dim, batch=batch,
                     capacity=capacity, dtype=dtype) if cla_owner(layer, cla_share) == layer else None
          for layer in range(num_layers)]
