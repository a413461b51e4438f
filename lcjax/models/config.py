"""ModelConfig: the static description of a Llama-family decoder (Llama, Mistral, Qwen2).

Frozen and hashable, so it can be a static argument of jit.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lcjax.cache.config import CacheConfig
from lcjax.cache.cross_layer import cla_owners
from lcjax.models.attention_methods import ATTENTION_METHODS, AttentionOptions
from lcjax.models.rope import ROPE_SCALINGS, RopeScaling

FLOAT_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of the decoder.

  Attributes:
    vocab_size, dim, n_layers, n_heads, n_kv_heads, head_dim: sizes (n_heads % n_kv_heads == 0).
      head_dim None means dim // n_heads.
    hidden_dim: the SwiGLU MLP's inner size.
    norm_eps: RMSNorm epsilon.
    rope_theta: RoPE base; rope_scaling: None or a scaling from lcjax.models.rope.
    max_seq_len: the model's max_position_embeddings (the reference length of the scalings).
    sliding_window: None or the number of keys each query sees, itself included (Mistral).
    qkv_bias: q, k and v projections have biases (Qwen2).
    tie_embeddings: the output projection is the token embedding's transpose.
    dtype: compute dtype ("float32", "bfloat16", "float16"); param_dtype: storage dtype of params.
    attention: per-layer attention-method names (lcjax.models.attention_methods), or a single
      name for every layer; `layer_attention` gives the per-layer tuple either way.
    attention_options: the methods' options (AttentionOptions: block size, budget, window, ...),
      shared by every layer.
    landmark_block_size: None, or landmark attention's block: the no-cache forward inserts a
      landmark token (landmark_token_id) after every landmark_block_size tokens, runs the layers
      on that stream and drops the landmark positions from the outputs (lcjax.attention.landmark).
    landmark_token_id: the landmark token's id (< vocab_size), required with landmark_block_size.
    remat: recompute each layer's activations in the backward pass (jax.checkpoint).
    cla_share: cross-layer attention (CLA, Brandon et al. 2024): groups of cla_share adjacent
      layers use the keys and values computed by the group's first layer (`kv_owners`); the other
      layers have no wk/wv (bk/bv) and, when decoding, read the owner's cache. 1: no sharing.
    cache: the KV cache generate() builds when it is given none (lcjax.cache.CacheConfig, or a
      dict of its fields; experiment configs: config.model.cache). Default: dense.
  """
  vocab_size: int
  dim: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  hidden_dim: int
  head_dim: int | None = None
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  max_seq_len: int = 4096
  sliding_window: int | None = None
  qkv_bias: bool = False
  tie_embeddings: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention: tuple[str, ...] | str = "dense"
  remat: bool = False
  attention_options: AttentionOptions = dataclasses.field(default_factory=AttentionOptions)
  landmark_block_size: int | None = None
  landmark_token_id: int | None = None
  cla_share: int = 1
  cache: CacheConfig = dataclasses.field(default_factory=CacheConfig)

  def __post_init__(self):
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "max_seq_len"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"ModelConfig.{name}={value!r}; accepted: an int > 0")
    divisors = lambda n: [d for d in range(1, n + 1) if n % d == 0]
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"ModelConfig.n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads} "
                       f"(GQA/MQA); accepted: n_kv_heads one of {divisors(self.n_heads)}, or n_heads a multiple "
                       f"of {self.n_kv_heads}")
    if self.head_dim is None:
      if self.dim % self.n_heads:
        raise ValueError(f"ModelConfig.dim={self.dim} is not divisible by n_heads={self.n_heads}; accepted: "
                         f"n_heads one of {divisors(self.dim)[-6:]} (or any, with head_dim set explicitly)")
      object.__setattr__(self, "head_dim", self.dim // self.n_heads)
    if not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim={self.head_dim!r}; accepted: an even int > 0 (RoPE rotates pairs)")
    if not self.norm_eps > 0:
      raise ValueError(f"ModelConfig.norm_eps={self.norm_eps!r}; accepted: a float > 0")
    if not self.rope_theta > 1:
      raise ValueError(f"ModelConfig.rope_theta={self.rope_theta!r}; accepted: a float > 1")
    if self.rope_scaling is not None and not isinstance(self.rope_scaling, ROPE_SCALINGS):
      raise ValueError(f"ModelConfig.rope_scaling={self.rope_scaling!r}; accepted: None or one of "
                       f"{[c.__name__ for c in ROPE_SCALINGS]} (lcjax.models.rope)")
    if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
      raise ValueError(f"ModelConfig.sliding_window={self.sliding_window!r}; accepted: None or an int > 0")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in FLOAT_DTYPES:
        raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}; accepted: {FLOAT_DTYPES}")
    if not isinstance(self.attention, str):
      object.__setattr__(self, "attention", tuple(self.attention))   # hashable
      if len(self.attention) != self.n_layers:
        raise ValueError(f"ModelConfig.attention has {len(self.attention)} entries; accepted: one per layer "
                         f"(n_layers={self.n_layers}) or a single name")
    for name in self.layer_attention:
      if name not in ATTENTION_METHODS:
        raise ValueError(f"ModelConfig.attention contains {name!r}; accepted: {sorted(ATTENTION_METHODS)}")
    if isinstance(self.attention_options, dict):
      accepted = [f.name for f in dataclasses.fields(AttentionOptions)]
      unknown = sorted(set(self.attention_options) - set(accepted))
      if unknown:
        raise ValueError(f"ModelConfig.attention_options has unknown keys {unknown}; accepted: {accepted}")
      object.__setattr__(self, "attention_options", AttentionOptions(**self.attention_options))
    if not isinstance(self.attention_options, AttentionOptions):
      raise ValueError(f"ModelConfig.attention_options={self.attention_options!r}; accepted: an "
                       "AttentionOptions (lcjax.models.attention_methods) or a dict of its fields")
    if self.landmark_block_size is not None:
      if not isinstance(self.landmark_block_size, int) or isinstance(self.landmark_block_size, bool) \
          or self.landmark_block_size < 1:
        raise ValueError(f"ModelConfig.landmark_block_size={self.landmark_block_size!r}; accepted: None or "
                         "an int >= 1")
      if not isinstance(self.landmark_token_id, int) or not 0 <= self.landmark_token_id < self.vocab_size:
        raise ValueError(f"ModelConfig.landmark_token_id={self.landmark_token_id!r}; accepted: an int in "
                         f"[0, vocab_size={self.vocab_size}) when landmark_block_size is set")
    elif "landmark_grouped" in self.layer_attention:
      raise ValueError("ModelConfig.attention contains 'landmark_grouped', which needs "
                       "ModelConfig.landmark_block_size; accepted: an int >= 1 there")
    if not isinstance(self.cla_share, int) or isinstance(self.cla_share, bool) or self.cla_share < 1:
      raise ValueError(f"ModelConfig.cla_share={self.cla_share!r}; accepted: an int >= 1 (1: every layer "
                       "computes its own K/V)")
    self._check_cache()

  def _check_cache(self) -> None:
    if isinstance(self.cache, dict):
      accepted = [f.name for f in dataclasses.fields(CacheConfig)]
      unknown = sorted(set(self.cache) - set(accepted))
      if unknown:
        raise ValueError(f"ModelConfig.cache has unknown keys {unknown}; accepted: {accepted}")
      try:
        object.__setattr__(self, "cache", CacheConfig(**self.cache))
      except ValueError as e:
        raise ValueError(f"ModelConfig.cache.{e}") from None
    if not isinstance(self.cache, CacheConfig):
      raise ValueError(f"ModelConfig.cache={self.cache!r}; accepted: a CacheConfig (lcjax.cache) or a dict "
                       "of its fields")
    try:
      self.cache.check_layers(self.n_layers, self.n_kv_heads)
    except ValueError as e:
      raise ValueError(f"ModelConfig.cache.{e}") from None
    if self.cache.policy == "minicache" and self.cla_share > 1:
      raise ValueError(f"ModelConfig.cache.policy='minicache' merges adjacent layers' caches, but "
                       f"cla_share={self.cla_share} already shares them; accepted: cla_share=1, or another policy")
    if self.sliding_window is not None and self.cache.policy != "dense":
      raise ValueError(f"ModelConfig.cache.policy={self.cache.policy!r} with sliding_window={self.sliding_window}: "
                       "only the dense cache applies the model's sliding window; accepted: policy 'dense' "
                       "(or pass generate() caches built by hand)")

  @property
  def layer_attention(self) -> tuple[str, ...]:
    """The attention-method name of each layer."""
    if isinstance(self.attention, str):
      return (self.attention,) * self.n_layers
    return self.attention

  @property
  def kv_owners(self) -> tuple[int, ...]:
    """Per layer, the layer whose keys and values it uses (itself unless cla_share > 1)."""
    return cla_owners(self.n_layers, self.cla_share)

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self):
    return jnp.dtype(self.param_dtype)
