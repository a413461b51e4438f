"""Decode-kernel benchmark (issue 5): B8, 32 query heads, 8 KV heads, D128, bf16, full caches.

python -m experiments.benchmark_decode --config configs/benchmark_decode.py [--config.lengths=32768]
"""

CONFIG = dict(
    batch=8, q_heads=32, kv_heads=8, head_dim=128,
    lengths=(32768, 131072),
    # (block_k, num_splits, num_warps, num_stages) tried for the dense kernel; best one reported.
    dense_sweep=((64, 8, 4, 4), (128, 16, 4, 3), (64, 16, 4, 3)),
    # (block_k, num_splits, num_warps, num_stages, int8_mma) for the int8 / int4 kernels.
    # At B8 Hkv8: 6 splits = one wave of 3 programs per SM (the int8-key default), 8 = int4's
    # default on int8 dots (4 per SM), 16 = the float16-dot default (8 per SM).
    quant_sweep=((128, 6, 2, 3, True), (128, 8, 2, 3, True), (128, 16, 2, 3, True),
                 (128, 16, 4, 3, True), (128, 16, 4, 3, False)),
    # (bits, block_k, num_splits, stages) of the Mosaic GPU kernel (decode_quant_mgpu); its
    # defaults: block_k 128 (int8) / 256 (int4), 4 splits (one wave of 2 programs per SM at B8
    # Hkv8), 2 stages.
    mosaic_sweep=((8, 128, 4, 2), (8, 128, 4, 3), (4, 256, 4, 2), (4, 256, 6, 2), (4, 128, 6, 3)),
    key_group=128, value_groups=(128, 64),   # int4: groups within one nibble half, or all of D
    # (bits, value_group) of the KIVIKernelCache decode steps timed through the cache API
    # (key group = key_group), beside DenseKVCache; () skips them.
    kivi_caches=((8, 128), (4, 128)), kivi_residual=128,
    # (policy, block_size, fraction of blocks read, select_per) of the Quest / landmark decode
    # steps timed through the cache API, against fraction x DenseKVCache; () skips them.
    retrieval_caches=(("quest", 128, 0.125, "kv_head"), ("landmark", 128, 0.125, "kv_head"),
                      ("quest", 128, 0.125, "query_head")),
    sparse_fractions=(0.125, 0.25), sparse_block=128,
    # Ragged batches (one sequence at the full length, the others at this fraction of it): the
    # dense kernel's two schedules (splits, balanced) with ragged_config, and cuDNN; () skips them.
    ragged_fractions=(1 / 16,), ragged_config=(128, 16, 4, 3),
    # (block_k, num_splits, num_warps, num_stages) for the block-sparse kernel; best one reported.
    sparse_sweep=((64, 2, 4, 4), (128, 2, 4, 3), (128, 2, 4, 4), (64, 4, 4, 4), (128, 4, 4, 3)),
    iters=30, repeats=5,
    baselines=("cudnn", "xla", "jax_pallas"),
    mode="benchmark",            # or "profile": one call of each kernel, for ncu
    profile_config=(128, 16, 4, 3),
    log_dir="",   # where the JSONL log goes (default $OUT or /tmp)
)


def get_config():
  """An ml_collections.ConfigDict where ml_collections is installed (not on the GPU machine)."""
  try:
    import ml_collections
  except ImportError:
    return dict(CONFIG)
  return ml_collections.ConfigDict(CONFIG)
