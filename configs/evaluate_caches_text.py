"""KV-cache evaluation on a text model: every policy at several budgets on a small byte-level LM
trained on Python standard-library source (the quickstart's size: 2 layers, dim 128, 256 bytes).

    python -m experiments.evaluate_caches --config configs/evaluate_caches_text.py

Trains the model into runs/stdlib_lm_small first if it holds no checkpoint (800 steps). The
perplexity column is the one to read here (held-out stdlib files, the model's own domain); the
passkey columns are reported but the model was never trained to retrieve.
"""

from configs import evaluate_caches, python_stdlib_lm


def get_config():
  c = evaluate_caches.get_config()
  lm = python_stdlib_lm.get_config()
  lm.model.update(dim=128, n_layers=2, n_heads=4, n_kv_heads=4, hidden_dim=512, max_seq_len=256)
  lm.data.seq_len = 256
  lm.optimizer.warmup_steps = 100
  lm.train.update(num_steps=800, work_dir="runs/stdlib_lm_small", checkpoint_every=400, eval_every=0,
                  progress_bar=False)
  lm.eval.update(tasks=(), lengths=(128, 192, 256), perplexity_examples=32)
  c.experiment = lm
  c.checkpoint_dir = "runs/stdlib_lm_small"
  c.work_dir = "runs/evaluate_caches_text"
  c.examples_per_cell = 4
  return c
