"""Functional Llama-family decoder (Llama, Mistral, Qwen2), generation and Hugging Face import.

  config.py             ModelConfig (frozen, hashable: a static jit argument)
  rope.py               RoPE and its long-context scalings (linear, dynamic NTK, YaRN, llama3)
  attention_methods.py  per-layer attention methods by name (attention_fn_for)
  llama.py              init, param_logical_axes, init_caches, forward
  sampling.py           greedy / temperature / top-k / top-p
  generate.py           generate(): chunked prefill + lax.while_loop decode under one jit
  hf_import.py          load_hf_checkpoint: HF safetensors checkpoints -> (params, cfg)
  probe.py              layer_qkv: the q, k, v one layer attends with
  retrieval_heads.py    RazorAttention's echo / induction probe -> retrieval heads per layer
"""
from lcjax.models import rope
from lcjax.models.attention_methods import attention_fn_for
from lcjax.models.config import ModelConfig
from lcjax.models.hf_import import load_hf_checkpoint
from lcjax.models.llama import (forward, forward_hidden, init, init_caches, logits_from_hidden,
                                param_logical_axes, param_shapes)
