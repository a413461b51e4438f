"""Builds the golden Hugging Face fixtures of tests/test_hf_import.py (needs torch + transformers).

Run with a separate venv that has them (the lcjax venv does not):

  python -m venv /tmp/hfvenv && /tmp/hfvenv/bin/pip install torch transformers safetensors numpy
  /tmp/hfvenv/bin/python scripts/make_hf_fixtures.py [--out tests/fixtures/hf]

For each family (tiny random models, GQA/MQA, 2 layers) it writes <out>/<family>/ with the
save_pretrained checkpoint and expected.npz holding:
  tokens [2, 40] int32, logits [2, 40, vocab] float32 (one forward, no cache),
  prompts [3, 12] int32 right-padded, prompt_lengths [3] int32,
  generated [3, 32] int32: transformers' greedy generate of each prompt alone (do_sample=False),
  min_margin: the smallest top-1 minus top-2 logit on the greedy paths (ties would make the
    comparison fragile; weights are drawn wide enough to keep it well above float32 noise).
and <out>/rope.npz with transformers' ROPE_INIT_FUNCTIONS on several rope configs.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

VOCAB, DIM, HIDDEN, LAYERS, HEADS = 128, 64, 96, 2, 4
SEQ, PROMPT_LENGTHS, NEW_TOKENS = 40, (12, 7, 10), 32

FAMILIES = {
    # Llama 3.1-style rope scaling with a small original context, so all three frequency bands occur.
    "llama": dict(cls="LlamaForCausalLM", config="LlamaConfig", shard=None, kwargs=dict(
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=32))),
    # Sliding window (8) far shorter than the sequences, MQA, YaRN, and a sharded checkpoint.
    "mistral": dict(cls="MistralForCausalLM", config="MistralConfig", shard="60KB", kwargs=dict(
        num_key_value_heads=1, max_position_embeddings=128, sliding_window=8, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                             original_max_position_embeddings=32))),
    # q/k/v biases, tied embeddings, dynamic NTK past max_position_embeddings=32.
    "qwen2": dict(cls="Qwen2ForCausalLM", config="Qwen2Config", shard=None, kwargs=dict(
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="dynamic", rope_theta=1000000.0, factor=2.0))),
}

ROPE_CASES = {
    "default": dict(rope_type="default", rope_theta=10000.0),
    "linear": dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
    "dynamic": dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0),
    "yarn": dict(rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=64),
    "yarn_mscale": dict(rope_type="yarn", rope_theta=50000.0, factor=16.0, original_max_position_embeddings=64,
                        mscale=0.707, mscale_all_dim=1.0, beta_fast=24.0, beta_slow=2.0),
    "yarn_untruncated": dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64,
                             attention_factor=1.3, truncate=False),
    "llama3": dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64),
}
ROPE_HEAD_DIM, ROPE_MAX_POS, DYNAMIC_SEQ_LENS = 32, 256, (100, 256, 300, 1000)


def build_family(family: str, seed: int = 0):
  """A tiny random transformers model of the family, float32, eager attention, eval mode."""
  spec = FAMILIES[family]
  config = getattr(transformers, spec["config"])(
      vocab_size=VOCAB, hidden_size=DIM, intermediate_size=HIDDEN, num_hidden_layers=LAYERS,
      num_attention_heads=HEADS, rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None, pad_token_id=None,
      **spec["kwargs"])
  torch.manual_seed(seed)
  model = getattr(transformers, spec["cls"])(config).to(torch.float32).eval()
  model.config._attn_implementation = "eager"
  # Wider than the HF init, so greedy decoding has clear winners.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1 + 0.2 * torch.randn_like(p))
      elif name.endswith("embed_tokens.weight"):
        # Tied: smaller, or the residual stream keeps predicting its own input token.
        p.copy_((0.3 if config.tie_word_embeddings else 1.0) * torch.randn_like(p))
      elif name.endswith("lm_head.weight"):
        p.copy_(0.5 * torch.randn_like(p))
      else:
        p.copy_((0.3 if config.tie_word_embeddings else 0.15) * torch.randn_like(p))
  return model


def greedy(model, prompt: np.ndarray):
  """transformers' greedy generate of one prompt: (new tokens [NEW_TOKENS], min top-2 margin)."""
  out = model.generate(torch.from_numpy(prompt[None].astype(np.int64)), max_new_tokens=NEW_TOKENS,
                       do_sample=False, pad_token_id=0, eos_token_id=None, output_scores=True,
                       return_dict_in_generate=True)
  scores = torch.stack(out.scores, 1)[0]
  top2 = torch.topk(scores, 2, dim=-1).values
  return out.sequences[0, len(prompt):].numpy(), float((top2[:, 0] - top2[:, 1]).min())


def write_family(family: str, out_dir: str) -> None:
  path = os.path.join(out_dir, family)
  os.makedirs(path, exist_ok=True)
  model = build_family(family)
  shard = FAMILIES[family]["shard"]
  model.save_pretrained(path, safe_serialization=True, **({"max_shard_size": shard} if shard else {}))
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, VOCAB, (2, SEQ)).astype(np.int32)
  with torch.no_grad():
    logits = model(torch.from_numpy(tokens.astype(np.int64))).logits.float().numpy()
  prompts = np.zeros((len(PROMPT_LENGTHS), max(PROMPT_LENGTHS)), np.int32)
  generated, margins = [], []
  for b, n in enumerate(PROMPT_LENGTHS):
    prompts[b, :n] = rng.integers(0, VOCAB, n)
    # Fresh model per prompt: dynamic NTK rope keeps state between calls in transformers.
    new, margin = greedy(build_family(family), prompts[b, :n])
    generated.append(new)
    margins.append(margin)
  np.savez_compressed(os.path.join(path, "expected.npz"), tokens=tokens, logits=logits, prompts=prompts,
                      prompt_lengths=np.array(PROMPT_LENGTHS, np.int32),
                      generated=np.stack(generated).astype(np.int32), min_margin=np.float32(min(margins)))
  files = sorted(os.listdir(path))
  size = sum(os.path.getsize(os.path.join(path, f)) for f in files)
  print(f"{family}: {files}, {size / 1024:.0f} KiB, min greedy margin {min(margins):.3f}")


def write_rope(out_dir: str) -> None:
  arrays, cases = {}, {}
  for name, rope in ROPE_CASES.items():
    config = transformers.LlamaConfig(hidden_size=ROPE_HEAD_DIM * 2, num_attention_heads=2,
                                      max_position_embeddings=ROPE_MAX_POS, rope_parameters=dict(rope))
    cases[name] = rope
    if rope["rope_type"] == "default":
      inv_freq, factor = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding \
          .compute_default_rope_parameters(config)
    else:
      inv_freq, factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, "cpu")
    arrays[f"{name}/inv_freq"] = inv_freq.numpy()
    arrays[f"{name}/attention_factor"] = np.float32(factor)
    if rope["rope_type"] == "dynamic":
      for n in DYNAMIC_SEQ_LENS:
        inv, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, "cpu", seq_len=torch.tensor(n))
        arrays[f"{name}/inv_freq@{n}"] = inv.numpy()
  arrays["cases"] = np.array(json.dumps(dict(cases=cases, head_dim=ROPE_HEAD_DIM, max_position_embeddings=ROPE_MAX_POS,
                                             dynamic_seq_lens=DYNAMIC_SEQ_LENS)))
  np.savez_compressed(os.path.join(out_dir, "rope.npz"), **arrays)
  print(f"rope: {sorted(cases)}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "hf"))
  parser.add_argument("--families", nargs="*", default=sorted(FAMILIES))
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  print(f"torch {torch.__version__}, transformers {transformers.__version__}")
  for family in args.families:
    write_family(family, args.out)
  write_rope(args.out)


if __name__ == "__main__":
  main()
