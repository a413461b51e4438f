"""experiments/benchmark_decode.py end to end at a toy size on the CPU, so a GPU run of it does not
die on the harness: the kernels cannot run here (their rows are logged as errors), the caches'
decode steps run through XLA and are timed and checked against their float32 path."""
import json

from experiments import benchmark_decode


def test_benchmark_decode_runs_and_logs_every_cache_row(tmp_path, capsys):
  benchmark_decode.main([
      "--config", "configs/benchmark_decode.py", "--config.lengths=(512,)", "--config.batch=2",
      "--config.q_heads=8", "--config.kv_heads=2", "--config.baselines=('xla',)",
      "--config.dense_sweep=((128,2,4,3),)", "--config.quant_sweep=((128,2,2,3,True),)",
      "--config.value_groups=(128,)", "--config.sparse_fractions=()", "--config.iters=2",
      "--config.repeats=1", f"--config.log_dir={tmp_path}"])
  rows = {r["impl"]: r for r in map(json.loads, (tmp_path / "benchmark.jsonl").read_text().splitlines())}
  for name in ("KIVIKernelCache int8 vg128 residual 128", "KIVIKernelCache int4 vg128 residual 128",
               "QuestKVCache per kv_head, block 128, 2 of 4 blocks",
               "LandmarkKVCache per kv_head, block 128, 2 of 4 blocks",
               "QuestKVCache per query_head, block 128, 2 of 4 blocks"):
    assert rows[name]["ms"] > 0 and rows[name]["err"] < 1e-2, rows[name]
  assert rows["DenseKVCache"]["ms"] > 0
  assert rows["QuestKVCache per kv_head, block 128, 2 of 4 blocks"]["ideal_ms"] == 0.5 * rows["DenseKVCache"]["ms"]
  assert "error" in rows["lcjax bk128 s2 w4 st3"]          # no GPU: the kernel row says why
  assert "error" in rows["ragged 0.0625 lcjax balanced bk128 s16"]
  out = capsys.readouterr().out
  assert "| 512 | cache API | QuestKVCache per kv_head, block 128, 2 of 4 blocks;" in out
