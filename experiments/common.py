"""What every entry point shares: the --config flag and turning it into a checked ExperimentConfig.

    if __name__ == "__main__":
      common.run(main)          # instead of absl's app.run(main)

`run` checks every `--config.a.b=value` override against the config file's keys before absl
parses the flags, so that a misspelt key fails with its full path and the accepted keys (rather
than ml_collections' traceback). `load_config` parses the config into typed dataclasses and checks,
before any model code runs, what needs more than the config itself: the learning-rate schedule
against the number of steps, and the data options against the in-repo dataset builders.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from absl import app
from absl import logging
from ml_collections import config_flags

from lcjax.config import ConfigError, ExperimentConfig, load_config_file, override_errors, parse_config
from lcjax.train import check_config

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


def fail(message: str) -> None:
  print(f"config error: {message}", file=sys.stderr)
  sys.exit(2)


def _config_file_of(argv: Sequence[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _load_config_file(path: str):
  try:
    return load_config_file(path)
  except (FileNotFoundError, ValueError) as e:
    fail(f"--config={path!r}: {e}")


def run(main: Callable, default_config: str | None = None) -> None:
  """absl's app.run(main), after checking the --config.* overrides against the config file's keys.

  default_config: the config file used when --config is not given (the quickstart's embedded one).
  """
  argv = sys.argv[1:]
  path = _config_file_of(argv) or default_config
  if path is not None and any(a.startswith("--config.") for a in argv):
    errors = override_errors(argv, _load_config_file(path))
    if errors:
      fail("\n  ".join(errors))
  app.run(main)


def parse_or_exit(config) -> ExperimentConfig:
  """parse_config + lcjax.train.check_config, or exit(2) printing the ConfigError."""
  try:
    cfg = parse_config(config)
    check_config(cfg)
    return cfg
  except ConfigError as e:
    fail(str(e))
    raise  # unreachable


def load_config() -> ExperimentConfig:
  """The parsed and checked --config, or exit(2) with the ConfigError (it names the key's path)."""
  if CONFIG.value is None:
    print("error: --config is required, e.g. --config configs/quickstart.py", file=sys.stderr)
    sys.exit(2)
  quiet_logs()
  return parse_or_exit(CONFIG.value)
