"""Kill -9 and resume: a run SIGKILLed after a checkpoint and restarted ends with the same params.

The training runs as `python -m experiments.train` subprocesses on a tiny config:
  A: uninterrupted, N steps.
  B: killed with SIGKILL as soon as its first checkpoint is complete on disk, then restarted
     with the same work dir; it must resume from that checkpoint (params, optimizer state, step
     and the grain iterator's position) and finish.
The final checkpoints of A and B must hold identical parameters and optimizer state.
"""
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from lcjax.train import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 120

CONFIG = textwrap.dedent("""
    import ml_collections

    def get_config():
      c = ml_collections.ConfigDict()
      c.model = dict(vocab_size=384, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=64, max_seq_len=128)
      c.data = dict(task="passkey", seq_len=96, batch_size=4, seed=3, pack=False, loss_on="all",
                    data_dir={data_dir!r}, options=dict(lengths=(96,), digits=1, num_train=64,
                                                        num_validation=1, num_test=1))
      c.optimizer = dict(learning_rate=3e-3, warmup_steps=5)
      c.train = dict(num_steps={num_steps}, work_dir="", log_every=5, checkpoint_every=10,
                     keep_checkpoints=2, async_checkpointing=True, progress_bar=False)
      c.eval = dict(tasks=())
      return c
""")


def command(config_path, work_dir):
  return [sys.executable, "-m", "experiments.train", "--config", config_path,
          f"--config.train.work_dir={work_dir}"]


def env():
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
              PYTHONUNBUFFERED="1")


def complete_steps(work_dir):
  """Steps whose checkpoint directory is final (orbax renames a temporary directory when done)."""
  d = os.path.join(work_dir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def final_state(work_dir):
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.join(work_dir, "checkpoints", str(NUM_STEPS), "state"))


@pytest.mark.slow
def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path):
  config_path = tmp_path / "tiny.py"
  config_path.write_text(CONFIG.format(data_dir=str(tmp_path / "data"), num_steps=NUM_STEPS))
  run_a, run_b = str(tmp_path / "a"), str(tmp_path / "b")

  done = subprocess.run(command(str(config_path), run_a), cwd=ROOT, env=env(), capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]

  proc = subprocess.Popen(command(str(config_path), run_b), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  try:
    while not complete_steps(run_b) and proc.poll() is None and time.time() < deadline:
      time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    proc.wait(timeout=60)
  killed_at = complete_steps(run_b)
  assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
  assert killed_at and max(killed_at) < NUM_STEPS, killed_at

  done = subprocess.run(command(str(config_path), run_b), cwd=ROOT, env=env(), capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"trained steps {max(killed_at)}..{NUM_STEPS}" in done.stdout, done.stdout

  a, b = final_state(run_a), final_state(run_b)
  assert int(a["step"]) == int(b["step"]) == NUM_STEPS
  leaves_a, leaves_b = _leaves(a), _leaves(b)
  assert len(leaves_a) == len(leaves_b) > 10
  for (path, x), (_, y) in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(x, y, err_msg=path)  # bit-identical on CPU
  # The restarted run also logged the same losses as the uninterrupted one after the restart.
  loss_a = {r["step"]: r["train/loss"] for r in read_jsonl(os.path.join(run_a, "metrics.jsonl"))}
  loss_b = {r["step"]: r["train/loss"] for r in read_jsonl(os.path.join(run_b, "metrics.jsonl"))}
  assert loss_a == loss_b


def _leaves(tree, path=""):
  if isinstance(tree, dict):
    return [leaf for k in sorted(tree) for leaf in _leaves(tree[k], f"{path}/{k}")]
  if isinstance(tree, (list, tuple)):
    return [leaf for i, v in enumerate(tree) for leaf in _leaves(v, f"{path}/{i}")]
  return [(path, np.asarray(tree))]
