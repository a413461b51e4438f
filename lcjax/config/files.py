"""Loading a config file: a Python file (configs/*.py) whose get_config() returns the ConfigDict."""

from __future__ import annotations

import importlib.util
import os


def load_config_file(path: str):
  """get_config() of the Python file at path (config_flags' "file.py:argument" form accepted).

  Raises FileNotFoundError / ValueError naming the path when it is missing or not a config file.
  """
  if not os.path.exists(path) and ":" in path:
    path = path.split(":", 1)[0]
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} does not exist; accepted: a configs/*.py file defining get_config()")
  spec = importlib.util.spec_from_file_location("lcjax_config_file", path)
  if spec is None or spec.loader is None:
    raise ValueError(f"config file {path!r} is not a Python file; accepted: a configs/*.py file defining get_config()")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not callable(getattr(module, "get_config", None)):
    raise ValueError(f"config file {path!r} defines no get_config(); accepted: a configs/*.py file defining it")
  return module.get_config()
