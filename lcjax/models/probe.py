"""What one decoder layer attends with: its q, k, v on given tokens (for fidelity sweeps, selector
studies and head probes such as RazorAttention's retrieval-head detection)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lcjax.models import llama, rope
from lcjax.models.config import ModelConfig


def layer_qkv(params, cfg: ModelConfig, tokens, layer: int):
  """q [B, T, Hq, D], k, v [B, T, Hkv, D] (RoPE applied) that layer `layer` attends with.

  The first `layer` layers run as a model of their own, each with its configured attention method
  (llama.forward_hidden with a unit final norm gives the normalised residual stream); the layer's
  attn_norm and projections are then applied as in llama's decoder layer. tokens: int32 [B, T] at
  positions 0 .. T-1.
  """
  if cfg.cla_share > 1:
    raise ValueError(f"cfg.cla_share={cfg.cla_share}; accepted: 1 (layer_qkv reads each layer's own wk, wv)")
  if not 0 <= layer < cfg.n_layers:
    raise ValueError(f"layer={layer}; accepted: 0 .. {cfg.n_layers - 1}")
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  if layer == 0:
    x = jnp.take(params["embed"], tokens, axis=0).astype(cfg.compute_dtype)
    normed = llama.rms_norm(x, jnp.ones(x.shape[-1], x.dtype), cfg.norm_eps)
  else:
    trunk_cfg = dataclasses.replace(cfg, n_layers=layer, attention=cfg.layer_attention[:layer])
    trunk = dict(params, layers=params["layers"][:layer], final_norm=jnp.ones_like(params["final_norm"]))
    normed, _ = llama.forward_hidden(trunk, tokens, positions, cfg=trunk_cfg)
  p = params["layers"][layer]
  h = normed * p["attn_norm"].astype(normed.dtype)
  cos, sin = rope.rope_cos_sin(positions, head_dim=cfg.head_dim, theta=cfg.rope_theta, scaling=cfg.rope_scaling,
                               max_seq_len=cfg.max_seq_len)
  return _project(p, h, cos, sin)


@jax.jit
def _project(p, h, cos, sin):
  q, k, v = (jnp.einsum("btd,dhk->bthk", h, p[w].astype(h.dtype)) for w in ("wq", "wk", "wv"))
  if "bq" in p:
    q, k, v = q + p["bq"].astype(h.dtype), k + p["bk"].astype(h.dtype), v + p["bv"].astype(h.dtype)
  return rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin), v
