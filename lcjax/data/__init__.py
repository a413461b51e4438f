"""lcjax datasets: TFDS builders kept in the repo, written as array_record, read with grain.

    source = build_dataset("passkey", "train", data_dir, lengths=(256, 512, 1024))
    it = make_train_iterator(source, seq_len=1024, batch_size=8, seed=0, pack=False)
    batch = next(it)   # dict of numpy arrays, see lcjax.data.pipeline
    state = it.get_state(); ...; it.set_state(state)

Nothing here imports TensorFlow or needs the internet for the lcjax datasets ("passkey",
"mqar", "python_stdlib"); any other name is looked up in the TFDS catalog with
`tfds.data_source`, which needs that dataset prepared in array_record format under data_dir
(or downloadable).
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import tensorflow_datasets as tfds

from lcjax.data import mqar
from lcjax.data import passkey
from lcjax.data import python_stdlib
from lcjax.data.builder_base import prepare
from lcjax.data.evaluation import iter_examples
from lcjax.data.evaluation import task_eval_batches
from lcjax.data.evaluation import text_eval_batches
from lcjax.data.pipeline import make_train_dataset
from lcjax.data.pipeline import make_train_iterator
from lcjax.data.text_source import ByteTokenizedSource
from lcjax.data.tokenizer import BOS_ID
from lcjax.data.tokenizer import decode
from lcjax.data.tokenizer import encode
from lcjax.data.tokenizer import EOS_ID
from lcjax.data.tokenizer import PAD_ID
from lcjax.data.tokenizer import PADDED_VOCAB_SIZE
from lcjax.data.tokenizer import VOCAB_SIZE

# name -> (builder class, config factory taking the task keyword arguments)
_BUILDERS = {
    "passkey": (passkey.LcjaxPasskey, passkey.passkey_config),
    "mqar": (mqar.LcjaxMqar, mqar.mqar_config),
    "python_stdlib": (python_stdlib.LcjaxPythonStdlib, python_stdlib.python_stdlib_config),
}
TASKS = tuple(_BUILDERS)


def default_data_dir() -> str:
  """$LCJAX_DATA_DIR, else ~/.cache/lcjax/data."""
  return os.environ.get("LCJAX_DATA_DIR", os.path.expanduser("~/.cache/lcjax/data"))


def task_config(name: str, **task_kwargs: Any):
  """The checked builder config of lcjax dataset `name` (nothing is built).

  task_kwargs go to the config factory of the task (passkey.passkey_config, mqar.mqar_config,
  python_stdlib.python_stdlib_config), which rejects bad values; unknown keys are rejected here
  with the accepted ones listed.
  """
  if name not in _BUILDERS:
    raise ValueError(f"name={name!r} is not an lcjax dataset; accepted: {TASKS}")
  _, make_config = _BUILDERS[name]
  accepted = sorted(inspect.signature(make_config).parameters)
  unknown = sorted(set(task_kwargs) - set(accepted))
  if unknown:
    raise ValueError(f"unknown option(s) {unknown} for dataset {name!r}; accepted: {accepted}")
  return make_config(**task_kwargs)


def build_builder(name: str, data_dir: str | None = None, **task_kwargs: Any):
  """Builds the lcjax dataset `name` (once, cached under data_dir) and returns its TFDS builder.

  task_kwargs are checked by `task_config`.
  """
  config = task_config(name, **task_kwargs)
  return prepare(_BUILDERS[name][0], config, data_dir or default_data_dir())


def build_dataset(name: str, split: str, data_dir: str | None = None, **task_kwargs: Any):
  """Builds `name` if needed and returns the random-access source of `split`.

  Args:
    name: "passkey", "mqar", "python_stdlib", or a TFDS catalog name (e.g. "pg19"), which is
      read with tfds.data_source and must be available in array_record format.
    split: "train", "validation" or "test" ("python_stdlib" has no "test"); catalog datasets
      accept TFDS split strings.
    data_dir: where datasets are cached (default: default_data_dir()).
    **task_kwargs: parameters of the lcjax dataset (see its config factory), e.g. lengths,
      depths, digits, num_train, seed for "passkey". For a catalog dataset only text_key:
      the text feature to byte-tokenize into "tokens" (e.g. text_key="book_text" for pg19).

  Returns:
    A sequence: len(source) records, source[i] a dict of numpy arrays (and bytes for text
    features), as described in the task's module docstring.
  """
  data_dir = data_dir or default_data_dir()
  if name in _BUILDERS:
    builder = build_builder(name, data_dir, **task_kwargs)
    splits = tuple(builder.info.splits.keys())
    if split not in splits:
      raise ValueError(f"split={split!r} is not a split of {name!r} with these task_kwargs "
                       f"(splits asked to hold 0 examples are not built); accepted: {splits}")
    return builder.as_data_source(split=split)
  text_key = task_kwargs.pop("text_key", None)
  if task_kwargs:
    raise ValueError(f"task_kwargs={task_kwargs!r} given for catalog dataset {name!r}; "
                     "accepted: only text_key (the text feature to byte-tokenize)")
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir)
  except Exception as e:  # tfds raises many kinds: not found, not prepared, no network
    raise ValueError(
        f"name={name!r} is neither an lcjax dataset {TASKS} nor a TFDS catalog dataset "
        f"available under data_dir={data_dir!r} in array_record format ({type(e).__name__}: "
        f"{(str(e).strip().splitlines() or [''])[0]}). Catalog builders that need TensorFlow (e.g. pg19) can only be prepared where "
        "tensorflow and the internet are available.") from e
  return source if text_key is None else ByteTokenizedSource(source, text_key)


__all__ = [
    "BOS_ID", "ByteTokenizedSource", "EOS_ID", "PAD_ID", "PADDED_VOCAB_SIZE", "TASKS",
    "VOCAB_SIZE", "build_builder", "build_dataset", "task_config", "decode", "default_data_dir", "encode",
    "iter_examples", "make_train_dataset", "make_train_iterator", "task_eval_batches",
    "text_eval_batches",
]
