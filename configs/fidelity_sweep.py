"""Fidelity sweep: attention recall and output error against compute, per sparse method and budget.

    python -m experiments.fidelity_sweep --config configs/fidelity_sweep.py [--config.block=64]

Sources of q/k/v: "synthetic" (random plus planted structure: heavy blocks, vertical lines with a
sink, slash lines) and "model" (a Llama-family model, randomly initialised unless a trained run
is named in model.checkpoint, run on Python standard-library source text, byte-level).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.sources = ("synthetic", "model")
  c.block = 32                         # block_q = block_kv for every method
  c.synthetic = dict(batch=1, seq_len=1024, q_heads=8, kv_heads=4, head_dim=64, seed=0,
                     planted_blocks=6, verticals=3, slash_offsets=(3, 17), gain=6.0)
  c.model = dict(config=dict(vocab_size=384, dim=256, n_layers=2, n_heads=8, n_kv_heads=4, hidden_dim=512,
                             max_seq_len=4096),
                 seed=0, layers=(0, 1), batch=1, seq_len=1024,
                 # A trained run instead of the random model above: its config file and work dir,
                 # e.g. config_file="configs/quickstart.py", work_dir="runs/quickstart".
                 checkpoint=dict(config_file="", work_dir=""))
  # method -> budgets: key blocks per query block for the top-k methods, window blocks for
  # streaming (plus one sink block), lines of each kind for vertical_slash, gamma for
  # flexprefill, the cluster threshold for centroid.
  c.methods = dict(
      streaming=(1, 2, 4, 8),
      block_topk=(1, 2, 4, 8),
      quest=(1, 2, 4, 8),
      landmark=(1, 2, 4, 8),
      sale=(1, 2, 4, 8),
      hip=(1, 2, 4, 8),
      vertical_slash=(2, 4, 8, 16),
      flexprefill=(0.3, 0.5, 0.7, 0.9),
      centroid=(0.5, 0.3, 0.2, 0.1),
  )
  c.flexprefill_tau = 0.1
  c.centroid_clusters = 32
  c.work_dir = "runs/fidelity_sweep"
  return c
