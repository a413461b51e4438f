"""KV-cache pytrees and compression policies (one policy per file; factory.make_caches builds them)."""
from lcjax.cache.base import KVCache, cache_logical_axes, default_logical_axes, tree_bytes
from lcjax.cache.dense import DenseKVCache
from lcjax.cache.config import CacheConfig, POLICIES
from lcjax.cache.factory import make_cache, make_caches
from lcjax.cache.cross_layer import cla_owner, cla_owners
from lcjax.cache.evicting import EvictingKVCache, EvictionPolicy
from lcjax.cache.h2o import H2OPolicy
from lcjax.cache.kivi import KIVIKVCache
from lcjax.cache.kivi_kernel import KIVIKernelCache
from lcjax.cache.landmark import LandmarkKVCache
from lcjax.cache.linear_state import LinearStateCache
from lcjax.cache.merging import MergingKVCache
from lcjax.cache.minicache import MiniCacheKV, merge_layer_pair
from lcjax.cache.mikv import MiKVCache
from lcjax.cache.pyramidkv import pyramid_budgets
from lcjax.cache.quest import QuestKVCache
from lcjax.cache.razor import RazorKVCache
from lcjax.cache.snapkv import SnapKVPolicy
from lcjax.cache.think import ThinKKVCache
from lcjax.cache.tova import TOVAPolicy
from lcjax.cache.window import SinkWindowKVCache
