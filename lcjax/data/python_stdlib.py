"""Real text present on every machine: the Python standard library's source files, byte-level.

The corpus is every *.py file under `sysconfig.get_paths()["stdlib"]` of the running interpreter
(site-packages and dist-packages excluded), sorted by relative path; about 1,700 files and 32 MB
for CPython 3.12. One document per record, its raw bytes as tokens (no BOS/EOS: the pipeline
adds them). A file goes to the validation split when a hash of its relative path falls under
validation_fraction, so the split is by file, stable across machines and independent of which
other files exist; everything else is train.

Per record:
  tokens      uint8 [num_bytes]   the file's bytes (token ids 0..255; the pipeline casts to int32)
  path        text                the path relative to the stdlib directory, "/"-separated
  num_bytes   int32
Different interpreters have different standard libraries: the config records the Python
version and stdlib directory in its name, so two interpreters never share a cache entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import sys
import sysconfig

import numpy as np
import tensorflow_datasets as tfds

from lcjax.data import builder_base

_EXCLUDED_DIRS = ("site-packages", "dist-packages", "__pycache__")


def stdlib_dir() -> pathlib.Path:
  """The standard-library directory of the running interpreter."""
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def list_stdlib_files(root: str | pathlib.Path | None = None) -> list[str]:
  """Relative paths ("/"-separated, sorted) of the *.py files under `root` (default: stdlib)."""
  root = pathlib.Path(root) if root is not None else stdlib_dir()
  builder_base.require(root.is_dir(), "root", str(root), "an existing directory")
  paths = []
  for path in root.rglob("*.py"):
    rel = path.relative_to(root)
    if any(part in _EXCLUDED_DIRS for part in rel.parts) or not path.is_file():
      continue
    paths.append(rel.as_posix())
  return sorted(paths)


def split_of(rel_path: str, validation_fraction: float) -> str:
  """"validation" or "train" for a file, from a hash of its relative path alone."""
  bucket = int.from_bytes(hashlib.sha256(rel_path.encode()).digest()[:8], "big") / 2.0**64
  return "validation" if bucket < validation_fraction else "train"


@dataclasses.dataclass(eq=False)
class PythonStdlibConfig(tfds.core.BuilderConfig):
  """Parameters of the stdlib corpus (see the module docstring); use `python_stdlib_config()`.

  max_files: keep only the first max_files files of the sorted list (None: all), for tests and
  quick runs; the train/validation assignment of a file does not depend on it.
  """
  root: str = ""
  validation_fraction: float = 0.05
  max_files: int | None = None


def python_stdlib_config(*, root: str | None = None, validation_fraction: float = 0.05,
                         max_files: int | None = None) -> PythonStdlibConfig:
  """A checked PythonStdlibConfig whose name encodes every parameter and the interpreter."""
  root = str(root if root is not None else stdlib_dir())
  builder_base.require(pathlib.Path(root).is_dir(), "root", root, "an existing directory")
  builder_base.require(0.0 < validation_fraction < 1.0, "validation_fraction",
                       validation_fraction, "a float in (0, 1)")
  builder_base.require(max_files is None or (isinstance(max_files, int) and max_files > 0),
                       "max_files", max_files, "None or an int > 0")
  params = dict(root=root, validation_fraction=float(validation_fraction), max_files=max_files)
  version = f"py{sys.version_info.major}{sys.version_info.minor}"
  name = builder_base.config_name(f"{version}_{'all' if max_files is None else max_files}",
                                  dict(params, python=sys.version))
  return PythonStdlibConfig(name=name, description=f"Python stdlib sources {params}", **params)


def split_files(config: PythonStdlibConfig) -> dict[str, list[tuple[int, str]]]:
  """(index in the sorted list, relative path) of the files of each split."""
  files = list_stdlib_files(config.root)
  if config.max_files is not None:
    files = files[:config.max_files]
  out = {"train": [], "validation": []}
  for i, rel in enumerate(files):
    out[split_of(rel, config.validation_fraction)].append((i, rel))
  return out


def generate_split(config: PythonStdlibConfig, split: str):
  """Yields (key, record) for every file of `split`, in sorted path order."""
  root = pathlib.Path(config.root)
  for i, rel in split_files(config)[split]:
    data = (root / rel).read_bytes()
    yield i, {"tokens": np.frombuffer(data, dtype=np.uint8),
              "path": rel, "num_bytes": np.int32(len(data))}


class LcjaxPythonStdlib(tfds.core.GeneratorBasedBuilder):
  """The running interpreter's standard-library *.py files (lcjax.data.python_stdlib)."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [python_stdlib_config()]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "tokens": tfds.features.Tensor(shape=(None,), dtype=np.uint8),
            "path": tfds.features.Text(),
            "num_bytes": tfds.features.Scalar(dtype=np.int32),
        }),
        disable_shuffling=True,  # keep sorted path order
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    # TFDS cannot write an empty split (a few max_files may all fall in train).
    files = split_files(self.builder_config)
    return {split: self._generate_examples(split) for split in files if files[split]}

  def _generate_examples(self, split: str):
    yield from generate_split(self.builder_config, split)
