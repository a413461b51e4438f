"""The grain training pipeline: shard by host, shuffle, repeat, split/pack or pad, batch.

Every batch is a dict of numpy arrays, B = batch_size (rows of this host), T = seq_len:

  tokens       int32   [B, T]  model inputs: BOS, then the example's tokens shifted right
  targets      int32   [B, T]  the token to predict at each position (targets[t] = tokens[t+1]
                               within a segment; the last input predicts the last token)
  loss_mask    float32 [B, T]  1.0 where the target counts in the loss, else 0.0
  segment_ids  int32   [B, T]  1, 2, ... for the examples packed into a row; 0 on padding
  positions    int32   [B, T]  position of each token within its segment (0 at its start,
                               0 on padding)
Padding positions hold PAD_ID in tokens and targets.

Convention. An example with tokens x[0..n) (a record's "tokens", with EOS appended when
add_eos) becomes inputs [BOS, x0, ..., x(n-2)] and targets [x0, ..., x(n-1)]: n positions,
every token a target exactly once, and index i of the record's tokens is index i of targets
(answer_start and answer_positions index both). Without BOS (add_bos=False): inputs x[:-1],
targets x[1:], n - 1 positions.

Documents (records without answer fields, e.g. python_stdlib) longer than seq_len are cut
into consecutive windows of seq_len targets, whose inputs carry the previous token, so no
token is lost; each window is its own segment with positions from 0. Task examples (passkey,
MQAR) are never cut (that would separate question from needle): one longer than seq_len
raises ValueError.

The iterator returned by make_train_iterator is a grain DatasetIterator: get_state() returns
a small JSON-serializable dict and set_state() on a fresh iterator built with the same
arguments resumes exactly (grain.checkpoint.CheckpointSave/CheckpointRestore wrap this for
orbax).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import grain
import numpy as np

from lcjax.data import tokenizer

LOSS_ON = ("all", "answer")
BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def is_task_example(record: dict) -> bool:
  """True for records that carry answer fields (passkey, MQAR), False for plain documents."""
  return "answer_positions" in record or "answer_start" in record


def scored_mask(record: dict, loss_on: str) -> np.ndarray:
  """Which of the record's tokens count in the loss: bool [len(tokens)].

  loss_on="all": every token; "answer": the answer span (answer_start, answer_length) or the
  answer_positions of a task example.
  """
  n = len(record["tokens"])
  if loss_on == "all":
    return np.ones(n, dtype=bool)
  if loss_on != "answer":
    raise ValueError(f"loss_on={loss_on!r} is invalid; accepted: {LOSS_ON}")
  mask = np.zeros(n, dtype=bool)
  if "answer_positions" in record:
    mask[np.asarray(record["answer_positions"], dtype=np.int64)] = True
  elif "answer_start" in record:
    start = int(record["answer_start"])
    mask[start:start + int(record["answer_length"])] = True
  else:
    raise ValueError(f"loss_on='answer' needs records with answer_positions or answer_start/"
                     f"answer_length; this record has keys {sorted(record)}; accepted: a task "
                     "dataset (passkey, mqar) or loss_on='all'")
  return mask


def shift_example(record: dict, *, loss_on: str = "all", add_bos: bool = True,
                  add_eos: bool = False) -> dict[str, np.ndarray]:
  """inputs int32 [n], targets int32 [n], loss_mask bool [n] of one record (module docstring)."""
  tokens = np.asarray(record["tokens"]).astype(np.int32)
  scored = scored_mask(record, loss_on)
  if add_eos:
    tokens = np.append(tokens, np.int32(tokenizer.EOS_ID))
    scored = np.append(scored, loss_on == "all")
  if add_bos:
    inputs = np.concatenate([np.asarray([tokenizer.BOS_ID], np.int32), tokens[:-1]])
    return {"inputs": inputs, "targets": tokens, "loss_mask": scored}
  return {"inputs": tokens[:-1], "targets": tokens[1:], "loss_mask": scored[1:]}


@dataclasses.dataclass(frozen=True)
class _ToWindows(grain.experimental.FlatMapTransform):
  """Record -> its example, cut into windows of at most seq_len positions (documents only)."""
  seq_len: int
  loss_on: str
  add_bos: bool
  add_eos: bool
  max_fan_out: int = 2**31 - 1  # required by FlatMap; FlatMapIterDataset does not bound it

  def flat_map(self, record: dict) -> Sequence[dict[str, np.ndarray]]:
    example = shift_example(record, loss_on=self.loss_on, add_bos=self.add_bos,
                            add_eos=self.add_eos)
    n = len(example["targets"])
    if n == 0:
      return []
    if is_task_example(record) and n > self.seq_len:
      raise ValueError(f"seq_len={self.seq_len} is shorter than a task example of {n} positions "
                       f"(context_length {len(record['tokens'])}); accepted: seq_len >= {n} "
                       "(task examples are never cut)")
    return [{k: v[i:i + self.seq_len] for k, v in example.items()}
            for i in range(0, n, self.seq_len)]


def _pad(x: np.ndarray, length: int, value) -> np.ndarray:
  return np.concatenate([x, np.full(length - len(x), value, dtype=x.dtype)])


def pad_example(example: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
  """One example of n <= seq_len positions (shift_example's) -> one padded batch row [seq_len]."""
  n = len(example["targets"])
  if n > seq_len:
    raise ValueError(f"seq_len={seq_len} is shorter than the example ({n} positions); "
                     f"accepted: seq_len >= {n}")
  return {
      "tokens": _pad(example["inputs"], seq_len, tokenizer.PAD_ID),
      "targets": _pad(example["targets"], seq_len, tokenizer.PAD_ID),
      "loss_mask": _pad(example["loss_mask"].astype(np.float32), seq_len, 0.0),
      "segment_ids": _pad(np.ones(n, np.int32), seq_len, 0),
      "positions": _pad(np.arange(n, dtype=np.int32), seq_len, 0),
  }


@dataclasses.dataclass(frozen=True)
class _PadRow(grain.transforms.Map):
  """One window -> one padded row with a single segment."""
  seq_len: int

  def map(self, example: dict) -> dict[str, np.ndarray]:
    return pad_example(example, self.seq_len)


class _FromPacked(grain.transforms.Map):
  """A packed row from grain's packer -> the batch-row format (PAD on padding)."""

  def map(self, packed: dict) -> dict[str, np.ndarray]:
    segment_ids = packed["inputs_segment_ids"].astype(np.int32)
    real = segment_ids > 0
    return {
        "tokens": np.where(real, packed["inputs"], tokenizer.PAD_ID).astype(np.int32),
        "targets": np.where(real, packed["targets"], tokenizer.PAD_ID).astype(np.int32),
        "loss_mask": (packed["loss_mask"] & real).astype(np.float32),
        "segment_ids": segment_ids,
        "positions": packed["inputs_positions"].astype(np.int32),
    }


def _check_int(value: Any, name: str, low: int) -> int:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
    raise ValueError(f"{name}={value!r} is invalid; accepted: an int >= {low}")
  return int(value)


def make_train_dataset(source: Sequence[dict], *, seq_len: int, batch_size: int, seed: int,
                       shard_index: int = 0, shard_count: int = 1, shuffle: bool = True,
                       num_epochs: int | None = None, pack: bool = True, loss_on: str = "all",
                       add_bos: bool = True, add_eos: bool = False,
                       num_packing_bins: int | None = None, shuffle_window: int = 128,
                       read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
  """The training pipeline as a grain IterDataset of batches (see make_train_iterator)."""
  seq_len = _check_int(seq_len, "seq_len", 1)
  batch_size = _check_int(batch_size, "batch_size", 1)
  seed = _check_int(seed, "seed", 0)
  shard_count = _check_int(shard_count, "shard_count", 1)
  shard_index = _check_int(shard_index, "shard_index", 0)
  if shard_index >= shard_count:
    raise ValueError(f"shard_index={shard_index} is invalid; accepted: 0 <= shard_index < "
                     f"shard_count={shard_count}")
  if num_epochs is not None:
    num_epochs = _check_int(num_epochs, "num_epochs", 1)
  shuffle_window = _check_int(shuffle_window, "shuffle_window", 1)
  if loss_on not in LOSS_ON:
    raise ValueError(f"loss_on={loss_on!r} is invalid; accepted: {LOSS_ON}")
  if len(source) < shard_count:
    raise ValueError(f"shard_count={shard_count} exceeds the {len(source)} records of the source; "
                     "accepted: shard_count <= len(source)")

  # Host sharding first: each host reads a disjoint, strided subset of the records.
  ds = grain.MapDataset.source(source)[shard_index::shard_count]
  if shuffle:
    ds = ds.shuffle(seed=seed)  # reshuffled every epoch (grain folds the epoch into the seed)
  ds = ds.repeat(num_epochs)
  read_options = read_options or grain.ReadOptions(num_threads=2, prefetch_buffer_size=16)
  it = ds.to_iter_dataset(read_options)
  it = grain.experimental.FlatMapIterDataset(
      it, _ToWindows(seq_len=seq_len, loss_on=loss_on, add_bos=add_bos, add_eos=add_eos))
  if shuffle and shuffle_window > 1:
    # The windows of one long document come out together; spread them over many batches.
    it = grain.experimental.WindowShuffleIterDataset(it, window_size=shuffle_window, seed=seed)
  if pack:
    bins = batch_size if num_packing_bins is None else _check_int(num_packing_bins,
                                                                   "num_packing_bins", 1)
    it = grain.experimental.FirstFitPackIterDataset(
        it, length_struct={"inputs": seq_len, "targets": seq_len, "loss_mask": seq_len},
        num_packing_bins=bins, seed=seed, shuffle_bins=shuffle)
    it = it.map(_FromPacked())
  else:
    it = it.map(_PadRow(seq_len))
  return it.batch(batch_size, drop_remainder=True)


def make_train_iterator(source: Sequence[dict], *, seq_len: int, batch_size: int, seed: int,
                        shard_index: int = 0, shard_count: int = 1, shuffle: bool = True,
                        num_epochs: int | None = None, pack: bool = True, loss_on: str = "all",
                        add_bos: bool = True, add_eos: bool = False,
                        num_packing_bins: int | None = None, shuffle_window: int = 128,
                        read_options: grain.ReadOptions | None = None):
  """A checkpointable iterator of training batches (format in the module docstring).

  Args:
    source: random-access records with "tokens" (lcjax.data.build_dataset's result, or any
      sequence of such dicts).
    seq_len: T, positions per row.
    batch_size: B, rows per batch on this host (the global batch is B * shard_count).
    seed: seeds the shuffle and the order of packed rows; same arguments, same batches.
    shard_index, shard_count: this host's share, records shard_index::shard_count; pass
      jax.process_index(), jax.process_count().
    shuffle: shuffle records (differently every epoch) and packed rows.
    num_epochs: passes over this host's records; None: forever.
    pack: first-fit pack examples into rows (several segments per row); False: one example
      (or document window) per row, padded.
    loss_on: "all" tokens, or "answer" tokens only (task datasets).
    add_bos: put BOS first (see the module docstring); add_eos: append EOS to every example.
    num_packing_bins: rows the packer fills at once (default batch_size); more bins, less
      padding, more mixing across epochs.
    read_options: grain.ReadOptions for reading records (default: 2 threads, 16 prefetched).

  Returns:
    A grain DatasetIterator: next() gives a batch; get_state()/set_state() checkpoint it.
    With num_epochs set, a final partial batch is dropped and StopIteration follows.
  """
  return iter(make_train_dataset(
      source, seq_len=seq_len, batch_size=batch_size, seed=seed, shard_index=shard_index,
      shard_count=shard_count, shuffle=shuffle, num_epochs=num_epochs, pack=pack,
      loss_on=loss_on, add_bos=add_bos, add_eos=add_eos, num_packing_bins=num_packing_bins,
      shuffle_window=shuffle_window, read_options=read_options))
