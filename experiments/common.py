"""What every entry point shares: the --config flag and turning it into a checked ExperimentConfig."""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from lcjax.config import ConfigError, ExperimentConfig, parse_config

CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a configs/*.py file defining get_config(); override values with "
    "--config.section.key=value.", lock_config=True)


def load_config() -> ExperimentConfig:
  """The parsed --config, or exit(2) with the ConfigError (it names the key's path)."""
  if CONFIG.value is None:
    print("error: --config is required, e.g. --config configs/quickstart.py", file=sys.stderr)
    sys.exit(2)
  try:
    return parse_config(CONFIG.value)
  except ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    sys.exit(2)
