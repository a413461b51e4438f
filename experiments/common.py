"""What every entry point shares: the --config flag and turning it into a checked ExperimentConfig."""

from __future__ import annotations

import sys

from absl import logging
from ml_collections import config_flags

from lcjax.config import ConfigError, ExperimentConfig, parse_config

CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a configs/*.py file defining get_config(); override values with "
    "--config.section.key=value.", lock_config=True)


def quiet_logs(level=logging.WARNING) -> None:
  """Keeps orbax's and TFDS's INFO chatter (and TFDS's progress bars) out of the output."""
  logging.set_verbosity(level)
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    tfds.disable_progress_bar()
  except ImportError:
    pass


def load_config() -> ExperimentConfig:
  """The parsed --config, or exit(2) with the ConfigError (it names the key's path)."""
  if CONFIG.value is None:
    print("error: --config is required, e.g. --config configs/quickstart.py", file=sys.stderr)
    sys.exit(2)
  quiet_logs()
  try:
    return parse_config(CONFIG.value)
  except ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    sys.exit(2)
