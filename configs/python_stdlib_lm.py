"""Byte-level language model on the Python standard library's source; perplexity by position.

    python -m experiments.train --config configs/python_stdlib_lm.py
    python -m experiments.evaluate --config configs/python_stdlib_lm.py

Documents are packed into rows of seq_len bytes (segment ids keep them apart); evaluation is the
held-out files' perplexity in position buckets (does the model use longer context?).
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = dict(vocab_size=384, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=768,
                 max_seq_len=2048, rope_theta=10000.0, dtype="float32", param_dtype="float32")
  c.data = dict(task="python_stdlib", seq_len=512, batch_size=16, seed=0, pack=True, loss_on="all",
                data_dir=placeholder(str), options=dict(validation_fraction=0.05))
  c.optimizer = dict(learning_rate=1e-3, warmup_steps=200, decay_steps=placeholder(int), min_lr_ratio=0.1,
                     b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0, grad_accum_steps=1)
  c.train = dict(num_steps=5000, work_dir="runs/python_stdlib_lm", seed=0, log_every=50,
                 checkpoint_every=500, keep_checkpoints=3, async_checkpointing=True, eval_every=1000,
                 progress_bar=True)
  c.eval = dict(tasks=("perplexity",), perplexity_task="python_stdlib", perplexity_examples=64,
                position_buckets=8, batch_size=16, seed=1234)
  c.mesh = dict(data=1, fsdp=1, tensor=1)
  return c
