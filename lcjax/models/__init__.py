"""Functional Llama-family decoder (Llama, Mistral, Qwen2), generation and Hugging Face import."""
from lcjax.models.config import ModelConfig
from lcjax.models.llama import forward, forward_hidden, init, init_caches, logits_from_hidden, param_logical_axes
from lcjax.models import rope
