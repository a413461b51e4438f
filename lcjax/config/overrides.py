"""Command-line overrides (`--config.a.b=value`) checked against a config's keys, before absl parses them.

ml_collections' config_flags only overrides keys that exist and reports a misspelt one with a
traceback; `override_errors` names the full path and the accepted keys instead.
"""

from __future__ import annotations

import difflib
from typing import Sequence


def override_errors(argv: Sequence[str], config) -> list[str]:
  """Messages for the `--config.a.b[=value]` overrides of argv that name no key of `config`."""
  errors = []
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    dotted = arg[len("--config."):].split("=", 1)[0]
    node, path = config, "config"
    for key in dotted.split("."):
      if "[" in key:   # an index into a list/tuple: left to ml_collections
        break
      keys = list(node.keys()) if hasattr(node, "keys") else None
      if keys is None:
        errors.append(f"--config.{dotted}: {path} is a value ({type(node).__name__}), not a section; "
                      f"accepted: --{path}=value")
        break
      if key not in keys:
        close = difflib.get_close_matches(key, [str(k) for k in keys], n=1)
        errors.append(f"--config.{dotted}: unknown key {path}.{key}"
                      f"{f' (did you mean {path}.{close[0]}?)' if close else ''}; accepted keys of {path}: "
                      f"{', '.join(sorted(str(k) for k in keys))}")
        break
      node, path = node[key], f"{path}.{key}"
  return errors
