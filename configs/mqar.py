"""Multi-query associative recall (Zoology's MQAR): per-query accuracy by context length.

    python -m experiments.train --config configs/mqar.py
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = dict(vocab_size=384, dim=128, n_layers=2, n_heads=4, n_kv_heads=4, hidden_dim=512,
                 max_seq_len=512, dtype="float32", param_dtype="float32")
  c.data = dict(task="mqar", seq_len=256, batch_size=32, seed=0, pack=False, loss_on="answer",
                data_dir=placeholder(str),
                options=dict(lengths=(128, 256), num_kv_pairs=16, vocab_size=256, num_train=50000))
  c.optimizer = dict(learning_rate=1e-3, warmup_steps=200, decay_steps=placeholder(int), min_lr_ratio=0.1,
                     b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0, grad_accum_steps=1)
  c.train = dict(num_steps=4000, work_dir="runs/mqar", seed=0, log_every=50, checkpoint_every=500,
                 keep_checkpoints=3, async_checkpointing=True, eval_every=1000, progress_bar=True)
  c.eval = dict(tasks=("mqar",), lengths=(128, 256), depths=(0.0,), examples_per_cell=64, batch_size=32,
                method="teacher_forced", seed=1234, task_options={})
  c.mesh = dict(data=1, fsdp=1, tensor=1)
  return c
