"""config.data -> lcjax.data's checkpointable grain iterator of this process's training rows."""

from __future__ import annotations

import jax

from lcjax import data as lcdata


def train_source(data_cfg):
  """The training split of config.data.task, built (once, cached) with config.data.options.

  The builders check the options; their ValueError is re-raised naming config.data.
  """
  try:
    return lcdata.build_dataset(data_cfg.task, "train", data_cfg.data_dir, **dict(data_cfg.options))
  except ValueError as e:
    raise ValueError(f"config.data (task={data_cfg.task!r}, options={dict(data_cfg.options)}): {e}") from e


def make_train_iterator(cfg):
  """Batches of cfg.data.batch_size / process_count rows per process (dicts of numpy [B, T])."""
  dc = cfg.data
  count, index = jax.process_count(), jax.process_index()
  if dc.batch_size % count:
    raise ValueError(f"config.data.batch_size={dc.batch_size} is not divisible by the {count} processes; "
                     f"accepted: a multiple of {count}")
  return lcdata.make_train_iterator(
      train_source(dc), seq_len=dc.seq_len, batch_size=dc.batch_size // count, seed=dc.seed,
      shard_index=index, shard_count=count, pack=dc.pack, loss_on=dc.loss_on)
