"""Linear-attention benchmark (issue 5): B1, H16, D128, bf16, causal, at 8k and 32k tokens.

PYTHONPATH=. python3 -m experiments.benchmark_linear --config configs/benchmark_linear.py
"""

CONFIG = dict(
    batch=1, heads=16, head_dim=128, lengths=(8192, 32768),
    # (chunk_size, block_v, num_warps, num_stages) tried; the best forward is reported.
    sweep=((64, 32, 4, 3), (64, 16, 4, 3), (64, 16, 4, 4), (64, 32, 4, 4), (64, 16, 2, 3), (128, 16, 4, 3),
           (32, 16, 4, 4)),
    check_len=8192,
    fla=False,                  # flash-linear-attention autotunes for minutes: off by default
    iters=20, repeats=5,
    log_dir="",
)


def get_config():
  """An ml_collections.ConfigDict where ml_collections is installed (not on the GPU machine)."""
  try:
    import ml_collections
  except ImportError:
    return dict(CONFIG)
  return ml_collections.ConfigDict(CONFIG)
