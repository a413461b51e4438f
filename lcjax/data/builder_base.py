"""What the TFDS builders in lcjax/data share: config names, per-example seeds, preparation.

The builders are `tfds.core.GeneratorBasedBuilder`s written as array_record and read back as
random-access sources (`builder.as_data_source()`), which works without TensorFlow installed.
A builder config holds every parameter of the generated data, and its name is derived from
those parameters, so that different parameters are cached under different directories of
data_dir (`<data_dir>/<builder name>/<config name>/<version>/`) and the same parameters are
built once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

# Each split draws from its own random stream: (seed, split id, example index).
SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
  """The random generator of example `index` of `split`: independent of every other example.

  Seeding each example separately (rather than one stream per split) makes example i the same
  whatever the number of examples asked for, and splits disjoint streams of one seed.
  """
  return np.random.default_rng([int(seed), SPLIT_IDS[split], int(index)])


def config_params(config: tfds.core.BuilderConfig) -> dict[str, Any]:
  """The data parameters of a config: its dataclass fields other than BuilderConfig's own."""
  base = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
  return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in base}


def config_name(prefix: str, params: dict[str, Any]) -> str:
  """A directory-safe config name: a readable prefix plus a hash of every parameter."""
  canonical = json.dumps(params, sort_keys=True, default=list)
  digest = hashlib.sha256(canonical.encode()).hexdigest()[:10]
  return f"{prefix}_{digest}"


def require(ok: bool, name: str, value: Any, accepted: str) -> None:
  """Raises ValueError naming the argument, its value and what is accepted, unless ok."""
  if not ok:
    raise ValueError(f"{name}={value!r} is invalid; accepted: {accepted}")


def check_lengths(lengths: Any, name: str = "lengths") -> tuple[int, ...]:
  """Returns `lengths` as a tuple of positive ints (one int is accepted too)."""
  if isinstance(lengths, (int, np.integer)):
    lengths = (int(lengths),)
  lengths = tuple(lengths)
  require(len(lengths) > 0 and all(isinstance(x, (int, np.integer)) and x > 0 for x in lengths),
          name, lengths, "a non-empty tuple of positive ints")
  return tuple(int(x) for x in lengths)


def check_count(value: Any, name: str) -> int:
  require(isinstance(value, (int, np.integer)) and value >= 0, name, value, "an int >= 0")
  return int(value)


def prepare(builder_cls: type[tfds.core.GeneratorBasedBuilder], config: tfds.core.BuilderConfig,
            data_dir: str) -> tfds.core.GeneratorBasedBuilder:
  """Builds the dataset of `config` under data_dir unless it is there, and returns the builder.

  Writing is done by TFDS into a temporary directory renamed on completion, so an interrupted
  build leaves nothing that a later call would mistake for a finished one.
  """
  # TFDS refuses a config object that is not the registered one under the same name.
  registered = {c.name for c in builder_cls.BUILDER_CONFIGS}
  chosen = config.name if config.name in registered else config
  def make():
    return builder_cls(config=chosen, data_dir=str(data_dir), file_format="array_record")

  builder = make()
  if not builder.is_prepared():
    try:
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    except Exception:
      # Another process (another host, or the evaluator) may have finished the same build
      # first and won the final rename; its result is as good as ours.
      builder = make()
      if not builder.is_prepared():
        raise
  return builder
