"""Hugging Face Llama / Mistral / Qwen2 checkpoints (config.json + safetensors) -> (params, cfg).

Reads single-file (`model.safetensors`) and sharded (`model.safetensors.index.json`) checkpoints
with the safetensors numpy backend, tensor by tensor. HF Linear weights are [out, in]; lcjax keeps
[in, out] with heads split out, so they are transposed and reshaped here. RoPE needs no
permutation: lcjax rotates with HF's rotate_half convention.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from lcjax.models.config import ModelConfig
from lcjax.models.llama import param_shapes
from lcjax.models.rope import DynamicNTKScaling, Llama3Scaling, LinearScaling, YarnScaling

FAMILIES = ("llama", "mistral", "qwen2")
# Buffers some older checkpoints carry that lcjax recomputes.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def rope_scaling_from_hf(rope: dict | None, max_position_embeddings: int):
  """A lcjax.models.rope scaling (or None) from HF's rope_parameters / rope_scaling dict."""
  if not rope:
    return None
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind == "default":
    return None
  if kind == "linear":
    return LinearScaling(float(rope["factor"]))
  if kind == "dynamic":
    return DynamicNTKScaling(float(rope["factor"]))
  if kind == "yarn":
    original = rope.get("original_max_position_embeddings") or max_position_embeddings
    factor = rope.get("factor") or max_position_embeddings / original
    return YarnScaling(float(factor), original_max_position_embeddings=int(original),
                       beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1),
                       attention_factor=rope.get("attention_factor"), mscale=rope.get("mscale"),
                       mscale_all_dim=rope.get("mscale_all_dim"), truncate=bool(rope.get("truncate", True)))
  if kind == "llama3":
    return Llama3Scaling(float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
                         high_freq_factor=float(rope["high_freq_factor"]),
                         original_max_position_embeddings=int(rope.get("original_max_position_embeddings")
                                                              or max_position_embeddings))
  raise ValueError(f"config.json rope type {kind!r}; accepted: default, linear, dynamic, yarn, llama3")


def _sliding_window_from_hf(hf: dict, family: str) -> int | None:
  if family == "llama":
    return None
  if family == "mistral":
    return hf.get("sliding_window", 4096)
  # Qwen2: a window only with use_sliding_window, on the layers from max_window_layers on.
  if not hf.get("use_sliding_window", False) or hf.get("sliding_window") is None:
    return None
  n_layers = hf["num_hidden_layers"]
  layer_types = hf.get("layer_types") or [
      "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention" for i in range(n_layers)]
  if set(layer_types) == {"sliding_attention"}:
    return hf["sliding_window"]
  if set(layer_types) == {"full_attention"}:
    return None
  raise ValueError(f"config.json layer_types={layer_types}: a sliding window on some layers only is not "
                   "supported; accepted: the same attention on every layer")


def config_from_hf(hf: dict, dtype=jnp.float32) -> ModelConfig:
  """ModelConfig from a parsed config.json (transformers v4 `rope_scaling` or v5 `rope_parameters`)."""
  family = hf.get("model_type")
  if family not in FAMILIES:
    raise ValueError(f"config.json model_type={family!r}; accepted: {FAMILIES}")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"config.json hidden_act={hf['hidden_act']!r}; accepted: 'silu'")
  if family != "qwen2" and hf.get("attention_bias", False):
    raise ValueError("config.json attention_bias=true (biases on q, k, v and o) is not supported for "
                     f"{family}; accepted: false")
  if hf.get("mlp_bias", False):
    raise ValueError("config.json mlp_bias=true is not supported; accepted: false")
  rope = hf.get("rope_parameters") or hf.get("rope_scaling")
  theta = (rope or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
  max_pos = int(hf.get("max_position_embeddings", 4096))
  if (rope or {}).get("partial_rotary_factor", 1.0) != 1.0:
    raise ValueError(f"config.json partial_rotary_factor={rope['partial_rotary_factor']}; accepted: 1.0")
  name = jnp.dtype(dtype).name
  return ModelConfig(
      vocab_size=int(hf["vocab_size"]), dim=int(hf["hidden_size"]), n_layers=int(hf["num_hidden_layers"]),
      n_heads=int(hf["num_attention_heads"]),
      n_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
      head_dim=hf.get("head_dim"), hidden_dim=int(hf["intermediate_size"]),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
      rope_scaling=rope_scaling_from_hf(rope, max_pos), max_seq_len=max_pos,
      sliding_window=_sliding_window_from_hf(hf, family),
      qkv_bias=family == "qwen2" and bool(hf.get("attention_bias", True)),   # Qwen2 always has them in HF
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)), dtype=name, param_dtype=name)


def _hf_names(cfg: ModelConfig) -> dict:
  """HF tensor name -> (lcjax path, HF shape, converter from the HF array to the lcjax array)."""
  d, hq, hkv, hd, f, v = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim, cfg.vocab_size
  same = lambda x: x
  t = lambda x: x.T
  heads_in = lambda h: (lambda x: x.T.reshape(d, h, hd))           # [h*hd, d] -> [d, h, hd]
  names = {
      "model.embed_tokens.weight": (("embed",), (v, d), same),
      "model.norm.weight": (("final_norm",), (d,), same),
  }
  if not cfg.tie_embeddings:
    names["lm_head.weight"] = (("lm_head",), (v, d), t)
  for i in range(cfg.n_layers):
    pre = f"model.layers.{i}."
    layer = lambda name: ("layers", i, name)
    names.update({
        pre + "input_layernorm.weight": (layer("attn_norm"), (d,), same),
        pre + "post_attention_layernorm.weight": (layer("mlp_norm"), (d,), same),
        pre + "self_attn.q_proj.weight": (layer("wq"), (hq * hd, d), heads_in(hq)),
        pre + "self_attn.k_proj.weight": (layer("wk"), (hkv * hd, d), heads_in(hkv)),
        pre + "self_attn.v_proj.weight": (layer("wv"), (hkv * hd, d), heads_in(hkv)),
        pre + "self_attn.o_proj.weight": (layer("wo"), (d, hq * hd), lambda x: x.T.reshape(hq, hd, d)),
        pre + "mlp.gate_proj.weight": (layer("w_gate"), (f, d), t),
        pre + "mlp.up_proj.weight": (layer("w_up"), (f, d), t),
        pre + "mlp.down_proj.weight": (layer("w_down"), (d, f), t),
    })
    if cfg.qkv_bias:
      names.update({
          pre + "self_attn.q_proj.bias": (layer("bq"), (hq * hd,), lambda x: x.reshape(hq, hd)),
          pre + "self_attn.k_proj.bias": (layer("bk"), (hkv * hd,), lambda x: x.reshape(hkv, hd)),
          pre + "self_attn.v_proj.bias": (layer("bv"), (hkv * hd,), lambda x: x.reshape(hkv, hd)),
      })
  return names


def _tensor_files(path: str) -> dict:
  """HF tensor name -> safetensors file holding it."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    return {name: os.path.join(path, file) for name, file in weight_map.items()}
  single = os.path.join(path, "model.safetensors")
  if not os.path.exists(single):
    raise ValueError(f"path={path!r} has neither model.safetensors nor model.safetensors.index.json")
  with safe_open(single, framework="np") as f:
    return {name: single for name in f.keys()}


def _set(tree, path, value):
  for key in path[:-1]:
    tree = tree[key]
  tree[path[-1]] = value


def load_hf_checkpoint(path: str, dtype=jnp.float32):
  """Loads a HF Llama/Mistral/Qwen2 checkpoint directory.

  Args:
    path: a directory with config.json and model.safetensors (or a sharded index and shards).
    dtype: the params' dtype, also the config's compute and param dtype.
  Returns:
    (params, cfg): the lcjax.models.llama pytree and its ModelConfig.
  Raises:
    ValueError naming the tensor when one is missing, unexpected or of the wrong shape.
  """
  with open(os.path.join(path, "config.json")) as f:
    cfg = config_from_hf(json.load(f), dtype)
  expected = _hf_names(cfg)
  files = _tensor_files(path)
  tied_head = {"lm_head.weight"} if cfg.tie_embeddings else set()   # some tied checkpoints still save it
  unexpected = sorted(n for n in files if n not in expected and n not in tied_head
                      and not n.endswith(IGNORED_SUFFIXES))
  if unexpected:
    raise ValueError(f"checkpoint {path!r} has unexpected tensors {unexpected[:5]}"
                     f"{' ...' if len(unexpected) > 5 else ''} for a {cfg.n_layers}-layer config")
  missing = sorted(n for n in expected if n not in files)
  if missing:
    raise ValueError(f"checkpoint {path!r} is missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")

  params = {"layers": [{} for _ in range(cfg.n_layers)]}
  by_file = {}
  for name, file in files.items():
    if name in expected:
      by_file.setdefault(file, []).append(name)
  for file, names in by_file.items():
    with safe_open(file, framework="np") as f:
      for name in names:
        target, hf_shape, convert = expected[name]
        array = f.get_tensor(name)
        if tuple(array.shape) != hf_shape:
          raise ValueError(f"tensor {name!r} has shape {tuple(array.shape)}; the config needs {hf_shape}")
        _set(params, target, jnp.asarray(convert(np.asarray(array)), dtype))
  got = jax.tree.map(lambda x: tuple(x.shape), params)
  if got != param_shapes(cfg):   # a bug in the name table above, never the checkpoint's fault
    raise RuntimeError(f"converted params do not match lcjax.models.llama's layout: {got} vs {param_shapes(cfg)}")
  return params, cfg
