"""The quickstart really learns: a short run of experiments.quickstart retrieves passkeys far above chance.

Runs the entry point as a subprocess on a shortened schedule (250 steps of 16 x 128 bytes,
3-digit keys) and checks its summary table, results JSON, checkpoint and plot.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quickstart_learns_passkey_retrieval(tmp_path):
  work = tmp_path / "run"
  cmd = [sys.executable, "-m", "experiments.quickstart", "--config", "configs/quickstart.py",
         f"--config.train.work_dir={work}", f"--config.data.data_dir={tmp_path / 'data'}",
         "--config.train.num_steps=250", "--config.train.progress_bar=False",
         "--config.data.seq_len=128", "--config.data.batch_size=16", "--config.data.options.lengths=(112, 128)",
         "--config.data.options.digits=3", "--config.data.options.num_train=4000",
         "--config.model.dim=128", "--config.model.n_layers=2", "--config.model.hidden_dim=512",
         "--config.optimizer.learning_rate=0.001", "--config.optimizer.warmup_steps=100",
         "--config.eval.lengths=(112, 128)", "--config.eval.depths=(0.0, 0.5, 1.0)",
         "--config.eval.examples_per_cell=8"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "passkey accuracy" in proc.stdout and "chance 0.001111" in proc.stdout, proc.stdout
  results = json.load(open(work / "eval" / "results.json"))["results"]["passkey"]
  assert len(results["cells"]) == 6 and all(c["n"] == 8 for c in results["cells"])
  # Chance is 1/900 for a 3-digit key; a model that did not learn to retrieve scores ~0.
  assert results["accuracy"] >= 0.5, results
  assert (work / "checkpoints" / "250").is_dir()
  assert (work / "eval" / "eval.png").stat().st_size > 10_000
