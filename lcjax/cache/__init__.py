"""KV-cache pytrees and compression policies."""
from lcjax.cache.base import KVCache, tree_bytes
from lcjax.cache.dense import DenseKVCache
