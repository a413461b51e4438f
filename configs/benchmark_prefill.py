"""Sweep of the prefill/training benchmark (issue 4): python -m experiments.benchmark_prefill
--config configs/benchmark_prefill.py. Returns an ml_collections.ConfigDict where that package is
installed, else a plain dict with the same keys (the GPU machine has no ml_collections)."""


def get_config():
  config = dict(
      batch=1, heads=16, kv_heads=16, head_dim=128, dtype="bfloat16",
      # Dense forward: (sequence length, causal).
      dense_fwd=[(16384, True), (32768, True), (16384, False), (32768, False)],
      # Dense forward + backward, causal.
      dense_fwdbwd=[8192, 32768],
      # Block-sparse: random 128x128 block tables plus the diagonal, one per head.
      sparse_seq=32768, sparse_densities=[0.05, 0.10, 0.25], sparse_backward=True,
      # Baselines beside lcjax: cudnn, xla (<= xla_max_seq), jax_triton (jax ops.gpu.attention),
      # jax_mgpu (jax ops.gpu.attention_mgpu forward, no softmax scale: timing only).
      baselines=["cudnn", "xla", "jax_triton"],
      lcjax_kernels=["auto", "triton"],
      xla_max_seq=16384,
      check_seq=4096,      # correctness against the XLA reference at this length
      samples=7, calls_per_sample=5,
  )
  try:
    import ml_collections  # pylint: disable=import-outside-toplevel
    return ml_collections.ConfigDict(config)
  except ImportError:
    return config
