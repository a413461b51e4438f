"""Evaluation-side loaders: validation examples in a fixed order, with their metadata.

Both loaders yield batches in the training format of lcjax.data.pipeline (tokens, targets,
loss_mask, segment_ids, positions: [B, T]; one example per row, never packed, never cut)
plus per-row metadata [B]:

  example_index  int64    index of the record in the source (-1 on filler rows)
  valid          bool     False on the filler rows that complete the last batch
  <field>        ...      every scalar field of the record (zeros on filler rows):
                          passkey: context_length, depth, needle_start, answer_start,
                          answer_length, passkey; MQAR: context_length, num_kv_pairs;
                          text: num_bytes

task_eval_batches (passkey, MQAR): loss_mask marks the answer tokens by default, so that an
example is answered when argmax(logits) == targets at every masked position (accuracy by
context_length x depth); MQAR's per-query accuracy is the same comparison per masked position.

text_eval_batches (python_stdlib): the first seq_len targets of each document, positions from
0, so that the loss at position t is the loss with t tokens of context (perplexity by position
bucket); min_length drops shorter documents, so that every bucket averages the same documents.

The order is the source's (record 0 first), every batch has batch_size rows (the last one is
completed with filler rows), and shard_index/shard_count split the records across hosts.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import grain
import numpy as np

from lcjax.data import pipeline
from lcjax.data import tokenizer


def _scalar_fields(record: dict) -> dict[str, np.ndarray]:
  """The record's numeric scalar fields (metadata such as depth or context_length)."""
  out = {}
  for key, value in record.items():
    value = np.asarray(value)
    if value.ndim == 0 and value.dtype.kind in "biuf":
      out[key] = value
  return out


def _row(source: Sequence[dict], index: int, *, seq_len: int, loss_on: str, add_bos: bool,
         cut: bool) -> dict[str, np.ndarray]:
  record = source[index]
  example = pipeline.shift_example(record, loss_on=loss_on, add_bos=add_bos)
  n = len(example["targets"])
  if n > seq_len:
    if not cut:
      raise ValueError(f"seq_len={seq_len} is shorter than example {index} ({n} positions); "
                       f"accepted: seq_len >= {n}")
    example = {k: v[:seq_len] for k, v in example.items()}
  row = pipeline.pad_example(example, seq_len)
  row.update(_scalar_fields(record))
  row["example_index"] = np.int64(index)
  row["valid"] = np.bool_(True)
  return row


def _batch_fn(batch_size: int):
  """Stacks rows, completing a short last batch with filler rows (valid False, loss_mask 0)."""

  def stack(rows: Sequence[dict]) -> dict[str, np.ndarray]:
    rows = list(rows)
    if len(rows) < batch_size:
      filler = {k: np.zeros_like(v) for k, v in rows[0].items()}
      filler["tokens"] = np.full_like(rows[0]["tokens"], tokenizer.PAD_ID)
      filler["targets"] = np.full_like(rows[0]["targets"], tokenizer.PAD_ID)
      filler["example_index"] = np.int64(-1)
      rows += [filler] * (batch_size - len(rows))
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

  return stack


def _batches(source, indices, *, seq_len, batch_size, loss_on, add_bos, cut):
  if not isinstance(seq_len, int) or seq_len < 1:
    raise ValueError(f"seq_len={seq_len!r} is invalid; accepted: an int >= 1")
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r} is invalid; accepted: an int >= 1")
  indices = list(indices)
  if not indices:
    return iter(())
  ds = grain.MapDataset.source(indices).map(
      lambda i: _row(source, i, seq_len=seq_len, loss_on=loss_on, add_bos=add_bos, cut=cut))
  return iter(ds.batch(batch_size, batch_fn=_batch_fn(batch_size)))


def _shard_indices(num: int, shard_index: int, shard_count: int, limit: int | None):
  if not (isinstance(shard_count, int) and shard_count >= 1 and isinstance(shard_index, int)
          and 0 <= shard_index < shard_count):
    raise ValueError(f"shard_index={shard_index!r}, shard_count={shard_count!r} are invalid; "
                     "accepted: ints with 0 <= shard_index < shard_count")
  indices = range(num) if limit is None else range(min(num, limit))
  return indices[shard_index::shard_count]


def task_eval_batches(source: Sequence[dict], *, seq_len: int, batch_size: int,
                      loss_on: str = "answer", add_bos: bool = True, limit: int | None = None,
                      shard_index: int = 0, shard_count: int = 1) -> Iterator[dict]:
  """Batches of task examples (passkey, MQAR) with their metadata; see the module docstring.

  limit: only the first `limit` records. An example longer than seq_len raises ValueError.
  """
  indices = _shard_indices(len(source), shard_index, shard_count, limit)
  return _batches(source, indices, seq_len=seq_len, batch_size=batch_size, loss_on=loss_on,
                  add_bos=add_bos, cut=False)


def text_eval_batches(source: Sequence[dict], *, seq_len: int, batch_size: int,
                      min_length: int | None = None, add_bos: bool = True,
                      limit: int | None = None, shard_index: int = 0,
                      shard_count: int = 1) -> Iterator[dict]:
  """Batches of the first seq_len tokens of each document; see the module docstring.

  min_length: keep only documents with at least this many tokens (e.g. seq_len, so that every
  position bucket averages the same documents). limit: only the first `limit` kept documents.
  """
  if min_length is None:
    kept = range(len(source))
  else:
    kept = [i for i in range(len(source)) if len(source[i]["tokens"]) >= min_length]
  kept = list(kept)[slice(None, limit)]
  indices = [kept[i] for i in _shard_indices(len(kept), shard_index, shard_count, None)]
  indices = [i for i in indices if len(source[i]["tokens"]) > 0]
  return _batches(source, indices, seq_len=seq_len, batch_size=batch_size, loss_on="all",
                  add_bos=add_bos, cut=True)


def iter_examples(source: Sequence[dict], *, limit: int | None = None) -> Iterator[dict]:
  """The raw records in source order (with "example_index"), for custom evaluations."""
  for i in range(len(source) if limit is None else min(len(source), limit)):
    yield dict(source[i], example_index=i)
