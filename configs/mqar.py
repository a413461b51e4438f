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
  c.optimizer = dict(learning_rate=1e-3, warmup_steps=200, weight_decay=0.1, clip_norm=1.0)
  c.train = dict(num_steps=4000, work_dir="runs/mqar", log_every=50, checkpoint_every=500, eval_every=1000)
  c.eval = dict(tasks=("mqar",), lengths=(128, 256), examples_per_cell=64, batch_size=32)
  c.mesh = dict(data=1, fsdp=1, tensor=1)
  return c
