"""Fidelity sweep on real q/k/v of the trained quickstart model (runs/quickstart), on Python
standard-library text, at the 256-byte context it was trained at.

    python -m experiments.fidelity_sweep --config configs/fidelity_sweep_quickstart.py

Train it first with `make quickstart` (the sweep names the run's work dir and fails clearly if it
holds no checkpoint). Methods and budgets as in configs/fidelity_sweep.py; blocks of 16 tokens.
"""

from configs import fidelity_sweep


def get_config():
  c = fidelity_sweep.get_config()
  c.sources = ("model",)
  c.block = 16
  c.model.seq_len = 256
  c.model.batch = 2
  c.model.checkpoint = dict(config_file="configs/quickstart.py", work_dir="runs/quickstart")
  c.work_dir = "runs/fidelity_sweep_quickstart"
  return c
