"""The recurrent state of linear attention as a cache: constant memory, whatever the length.

Katharopoulos et al., "Transformers are RNNs: Fast Autoregressive Transformers with Linear
Attention" (ICML 2020, arXiv:2006.16236): with sim(q, k) = phi(q) . phi(k), causal attention is an
RNN whose state S = sum_j phi(k_j) v_j^T (and z = sum_j phi(k_j)) replaces the KV cache.

Wraps lcjax.attention.linear.recurrent (its state and scan). The cache holds the state before the
last update plus that update's raw keys and values (max_chunk rows), because attend() is called
after update() with the chunk's queries and each of them must see only the keys up to itself;
the next update folds the chunk into the state. Only layers trained with linear attention
should use it (a softmax-trained model's heads are not linear ones).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lcjax.attention.linear import feature_maps
from lcjax.attention.linear.recurrent import LinearAttentionState, init_state, recurrent_linear_attention
from lcjax.cache.slots import resolve_num_new

FEATURE_MAPS = {"elu1": feature_maps.elu_plus_one, "relu": feature_maps.relu}


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["state", "k_last", "v_last", "n_last", "lengths"],
                   meta_fields=["feature_map"])
@dataclasses.dataclass(frozen=True)
class LinearStateCache:
  """state: LinearAttentionState (kv float32 [B, Hkv, D, Dv], normalizer [B, Hkv, D]) before the
  last update; k_last, v_last: [B, max_chunk, Hkv, D] the last update's tokens; n_last: int32 [B]."""
  state: LinearAttentionState
  k_last: jax.Array
  v_last: jax.Array
  n_last: jax.Array
  lengths: jax.Array
  feature_map: str

  @classmethod
  def create(cls, batch: int, kv_heads: int, head_dim: int, *, max_chunk: int = 1,
             feature_map: str = "elu1", dtype=jnp.float32) -> "LinearStateCache":
    if feature_map not in FEATURE_MAPS:
      raise ValueError(f"feature_map={feature_map!r}; accepted: {tuple(FEATURE_MAPS)}")
    buf = jnp.zeros((batch, max_chunk, kv_heads, head_dim), dtype)
    return cls(init_state(batch, kv_heads, head_dim, head_dim), buf, buf, jnp.zeros((batch,), jnp.int32),
               jnp.zeros((batch,), jnp.int32), feature_map)

  def _phi(self, x):
    return FEATURE_MAPS[self.feature_map](x)

  def _valid_last(self):
    return jnp.arange(self.k_last.shape[1])[None] < self.n_last[:, None]

  def update(self, k_new, v_new, *, q=None, num_new=None) -> "LinearStateCache":
    del q
    b, t, h, _ = k_new.shape
    m = self.k_last.shape[1]
    if t > m:
      raise ValueError(f"update of {t} tokens exceeds max_chunk={m}; create the cache with a larger max_chunk")
    num_new = resolve_num_new(self.lengths, t, num_new)
    phi_k = self._phi(self.k_last)
    _, state = recurrent_linear_attention(jnp.zeros_like(phi_k), phi_k, self.v_last, state=self.state,
                                          valid=self._valid_last())
    pad = lambda x: jnp.pad(x.astype(self.k_last.dtype), ((0, 0), (0, m - t), (0, 0), (0, 0)))
    return dataclasses.replace(self, state=state, k_last=pad(k_new), v_last=pad(v_new), n_last=num_new,
                               lengths=self.lengths + num_new)

  def attend(self, q, *, scale: float | None = None, implementation: str = "xla"):
    """q [B, T, Hq, D]: the T tokens of the last update (T <= max_chunk). scale is unused (the
    feature map replaces the softmax)."""
    del scale, implementation
    t = q.shape[1]
    out, _ = recurrent_linear_attention(self._phi(q), self._phi(self.k_last[:, :t]), self.v_last[:, :t],
                                        state=self.state, valid=self._valid_last()[:, :t])
    return out.astype(q.dtype)

  def memory_bytes(self) -> int:
    return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(self)))
