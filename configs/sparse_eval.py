"""Sparse attention on the trained quickstart model, without retraining.

    python -m experiments.sparse_eval --config configs/sparse_eval.py [--config.only=quest,hip]

The quickstart's contexts are short (128-256 bytes in configs/quickstart.py), so blocks are 16
tokens (8-16 key blocks): with the usual 64-token blocks every method would be (nearly) dense.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.checkpoint_dir = "runs/quickstart"       # the trained run's work dir (latest checkpoint under checkpoints/)
  # The config file the checkpoint was trained with ("" = checkpoint_dir/config.json, which any
  # later run started in that work dir overwrites, even one that fails at start-up).
  c.run_config = "configs/quickstart.py"
  c.work_dir = "runs/sparse_eval"
  c.sparse_layers = (0, 1)                   # layers that get the sparse method; the rest stay dense
  c.examples_per_cell = 16                   # passkey examples per (length, depth) cell
  c.fidelity_examples = 16                   # eval examples (at the longest length) for fidelity
  # AttentionOptions shared by every method (lcjax.models.attention_methods).
  # Eval rows are unpacked and right-padded, so HyperAttention (no segment support) may ignore
  # the scorer's segment_ids (AttentionOptions.ignore_segment_ids).
  c.options = dict(block_size=16, ignore_segment_ids=True)
  # method -> the AttentionOptions field(s) swept (a name, or comma-separated names set to the same
  # value), the grid of values, and options fixed for this method. Values run from sparse to nearly dense.
  c.methods = dict(
      sliding_window=dict(field="window", grid=(16, 32, 64, 128), fixed={}),
      streaming=dict(field="window", grid=(16, 32, 64, 128), fixed=dict(sink_tokens=4)),
      block_topk=dict(field="budget", grid=(1, 2, 4, 8), fixed={}),
      quest=dict(field="budget", grid=(1, 2, 4, 8), fixed={}),
      sale=dict(field="budget", grid=(1, 2, 4, 8), fixed={}),
      hip=dict(field="budget", grid=(1, 2, 4, 8), fixed={}),
      landmark=dict(field="budget", grid=(1, 2, 4, 8), fixed={}),
      # MInference's defaults (30 sinks, a 100-token window) would cover a 128-token context.
      vertical_slash=dict(field="n_vertical,n_slash", grid=(1, 2, 4, 8, 16),
                          fixed=dict(sink_tokens=4, local_tokens=16, last_q=16)),
      flexprefill=dict(field="gamma", grid=(0.2, 0.35, 0.5, 0.7, 0.9), fixed={}),
      # 64 clusters of the 128-256 keys: fewer keys per cluster, so fewer blocks per kept cluster.
      centroid=dict(field="centroid_threshold", grid=(0.5, 0.3, 0.1, 0.03), fixed=dict(centroid_clusters=64)),
      # HyperAttention recurses down to hyper_min_seq_len; below it everything is exact.
      hyper=dict(field="hyper_block_size", grid=(16, 32, 64),
                 fixed=dict(hyper_min_seq_len=64, hyper_sample_size=16, hyper_lsh_bits=4)),
  )
  c.only = ""                                # comma-separated subset of methods ("" = all)
  return c
