"""lcjax.data grain pipeline and evaluation loaders: packing, sharding, state round trip."""

import collections
import json

import numpy as np
import pytest

import lcjax.data as D
from lcjax.data import evaluation
from lcjax.data import pipeline
from lcjax.data import tokenizer

BOS, PAD = tokenizer.BOS_ID, tokenizer.PAD_ID
PASSKEY = dict(lengths=(128, 200), digits=4, num_train=24, num_validation=10, num_test=4)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("lcjax_data"))


def _documents(num, seed, max_len=70):
  """Random byte documents, some empty, some longer than the test seq_len."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(0, max_len, size=num)
  lengths[:2] = (0, 3 * max_len)
  return [{"tokens": rng.integers(0, 256, size=n).astype(np.uint8)} for n in lengths]


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _segments(batches):
  """Yields (inputs, targets, loss_mask, positions) of every segment of every row."""
  for batch in batches:
    for row in range(batch["tokens"].shape[0]):
      seg = batch["segment_ids"][row]
      for s in np.unique(seg[seg > 0]):
        where = seg == s
        yield (batch["tokens"][row][where], batch["targets"][row][where],
               batch["loss_mask"][row][where], batch["positions"][row][where])


def _check_row_format(batch, seq_len, batch_size):
  assert set(batch) == set(pipeline.BATCH_KEYS)
  for k in pipeline.BATCH_KEYS:
    assert batch[k].shape == (batch_size, seq_len), k
  for k in ("tokens", "targets", "segment_ids", "positions"):
    assert batch[k].dtype == np.int32, k
  assert batch["loss_mask"].dtype == np.float32
  pad = batch["segment_ids"] == 0
  assert np.all(batch["tokens"][pad] == PAD) and np.all(batch["targets"][pad] == PAD)
  assert np.all(batch["loss_mask"][pad] == 0) and np.all(batch["positions"][pad] == 0)
  for row in batch["segment_ids"]:  # segments are 1, 2, ... in order, padding at the end
    real = row[row > 0]
    assert np.all(np.diff(real) >= 0) and (real.size == 0 or real[0] == 1)
    assert np.all(np.diff(np.unique(real)) == 1)
    assert np.all(row[real.size:] == 0)


@pytest.mark.parametrize("shuffle", [False, True])
def test_packing_loses_no_token(shuffle):
  seq_len = 32
  docs = _documents(40, seed=1)
  it = D.make_train_iterator(docs, seq_len=seq_len, batch_size=1, seed=5, shuffle=shuffle,
                             num_epochs=1, pack=True, num_packing_bins=4)
  batches = list(it)
  for b in batches:
    _check_row_format(b, seq_len, 1)
  got = collections.Counter()
  for inputs, targets, mask, positions in _segments(batches):
    np.testing.assert_array_equal(positions, np.arange(len(positions)))  # reset per segment
    assert np.all(mask == 1.0)
    got[(inputs.tobytes(), targets.tobytes())] += 1
  expected = collections.Counter()
  for d in docs:
    x = d["tokens"].astype(np.int32)
    if len(x) == 0:
      continue
    inputs = np.concatenate([[BOS], x[:-1]]).astype(np.int32)
    for i in range(0, len(x), seq_len):  # windows of seq_len targets, previous token as input
      expected[(inputs[i:i + seq_len].tobytes(), x[i:i + seq_len].tobytes())] += 1
  assert got == expected
  # Several segments share rows: packing happened.
  assert max(b["segment_ids"].max() for b in batches) >= 2


def test_pad_mode_and_answer_loss(data_dir):
  source = D.build_dataset("passkey", "train", data_dir, **PASSKEY)
  it = D.make_train_iterator(source, seq_len=200, batch_size=4, seed=0, pack=False,
                             loss_on="answer", num_epochs=1, shuffle=False)
  batches = list(it)
  assert len(batches) == PASSKEY["num_train"] // 4
  for b_index, b in enumerate(batches):
    _check_row_format(b, 200, 4)
    for row in range(4):
      r = source[4 * b_index + row]
      n = len(r["tokens"])
      np.testing.assert_array_equal(b["tokens"][row, :n], np.concatenate([[BOS], r["tokens"][:-1]]))
      np.testing.assert_array_equal(b["targets"][row, :n], r["tokens"])
      assert np.all(b["segment_ids"][row, :n] == 1) and np.all(b["segment_ids"][row, n:] == 0)
      scored = np.flatnonzero(b["loss_mask"][row])
      start = int(r["answer_start"])
      np.testing.assert_array_equal(scored, np.arange(start, start + PASSKEY["digits"]))
      assert tokenizer.decode(b["targets"][row, scored]) == f"{int(r['passkey']):04d}"
  all_tokens = next(D.make_train_iterator(source, seq_len=200, batch_size=4, seed=0, pack=False,
                                          loss_on="all"))
  np.testing.assert_array_equal(all_tokens["loss_mask"], all_tokens["segment_ids"] > 0)
  with pytest.raises(ValueError, match="seq_len=150"):
    next(D.make_train_iterator(source, seq_len=150, batch_size=4, seed=0, pack=False,
                               shuffle=False))
  with pytest.raises(ValueError, match="loss_on"):
    next(D.make_train_iterator(_documents(4, 0), seq_len=16, batch_size=1, seed=0,
                               loss_on="answer"))


def test_same_seed_same_batches_other_seed_other_batches():
  docs = _documents(30, seed=2)
  kwargs = dict(seq_len=24, batch_size=3, pack=True)
  a = _take(D.make_train_iterator(docs, seed=7, **kwargs), 5)
  b = _take(D.make_train_iterator(docs, seed=7, **kwargs), 5)
  c = _take(D.make_train_iterator(docs, seed=8, **kwargs), 5)
  _assert_batches_equal(a, b)
  assert any(not np.array_equal(x["targets"], y["targets"]) for x, y in zip(a, c))


@pytest.mark.parametrize("pack", [False, True])
def test_host_shards_partition_the_records(pack):
  rng = np.random.default_rng(3)
  docs = [{"tokens": np.concatenate([np.frombuffer(f"doc{i:03d}".encode(), np.uint8),
                                     rng.integers(0, 256, size=rng.integers(0, 20))])
          .astype(np.uint8)} for i in range(24)]
  seen = []
  for shard in range(3):
    # batch_size 1: with num_epochs set, a final partial batch would be dropped.
    it = D.make_train_iterator(docs, seq_len=32, batch_size=1, seed=0, shard_index=shard,
                               shard_count=3, num_epochs=1, pack=pack, num_packing_bins=2)
    ids = [tokenizer.decode(targets[:6]) for _, targets, _, _ in _segments(list(it))]
    seen.append(ids)
  assert all(len(ids) == len(set(ids)) for ids in seen)
  assert not set(seen[0]) & set(seen[1]) and not set(seen[1]) & set(seen[2])
  assert not set(seen[0]) & set(seen[2])
  assert sorted(sum(seen, [])) == [f"doc{i:03d}" for i in range(24)]
  with pytest.raises(ValueError, match="shard_index"):
    D.make_train_iterator(docs, seq_len=8, batch_size=1, seed=0, shard_index=3, shard_count=3)


@pytest.mark.parametrize("pack", [True, False])
def test_iterator_state_round_trip(pack):
  # Long documents (windows + window shuffle + packer mid-batch) over several epochs.
  docs = _documents(12, seed=4, max_len=90)
  kwargs = dict(seq_len=24, batch_size=3, seed=11, pack=pack, shuffle_window=8)
  it = D.make_train_iterator(docs, **kwargs)
  _take(it, 7)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  expected = _take(it, 9)
  fresh = D.make_train_iterator(docs, **kwargs)
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 9), expected)
  # Restoring does not disturb the original either.
  again = D.make_train_iterator(docs, **kwargs)
  _assert_batches_equal(_take(again, 16)[7:], expected)


def test_task_eval_batches_carry_metadata(data_dir):
  kwargs = dict(PASSKEY, depths=(0.0, 0.5, 1.0))
  source = D.build_dataset("passkey", "validation", data_dir, **kwargs)
  batches = list(D.task_eval_batches(source, seq_len=200, batch_size=4))
  assert len(batches) == 3  # 10 examples: 4 + 4 + 2 (+ 2 filler rows)
  valid = np.concatenate([b["valid"] for b in batches])
  index = np.concatenate([b["example_index"] for b in batches])
  np.testing.assert_array_equal(valid, np.arange(12) < 10)
  np.testing.assert_array_equal(index, np.where(np.arange(12) < 10, np.arange(12), -1))
  assert np.all(batches[-1]["loss_mask"][2:] == 0)
  for b in batches:
    for row in np.flatnonzero(b["valid"]):
      r = source[int(b["example_index"][row])]
      for key in ("context_length", "depth", "answer_start", "answer_length", "passkey"):
        assert b[key][row] == r[key], key
      scored = np.flatnonzero(b["loss_mask"][row])
      start = int(r["answer_start"])
      np.testing.assert_array_equal(scored, np.arange(start, start + int(r["answer_length"])))
      np.testing.assert_array_equal(b["targets"][row, scored], r["tokens"][scored])


def test_text_eval_batches_first_window_with_positions():
  docs = _documents(20, seed=6, max_len=60)
  min_length = 40
  kept = [i for i, d in enumerate(docs) if len(d["tokens"]) >= min_length]
  batches = list(D.text_eval_batches(docs, seq_len=32, batch_size=4, min_length=min_length))
  index = np.concatenate([b["example_index"] for b in batches])
  np.testing.assert_array_equal(index[index >= 0], kept)
  for b in batches:
    for row in np.flatnonzero(b["valid"]):
      x = docs[int(b["example_index"][row])]["tokens"]
      np.testing.assert_array_equal(b["targets"][row], x[:32])
      np.testing.assert_array_equal(b["tokens"][row], np.concatenate([[BOS], x[:31]]))
      np.testing.assert_array_equal(b["positions"][row], np.arange(32))
      assert np.all(b["loss_mask"][row] == 1)
  records = list(evaluation.iter_examples(docs, limit=3))
  assert [r["example_index"] for r in records] == [0, 1, 2]


def test_mqar_answer_loss_marks_the_values(data_dir):
  source = D.build_dataset("mqar", "train", data_dir, lengths=(64,), num_kv_pairs=4,
                           vocab_size=32, num_train=6, num_validation=2, num_test=2)
  batch = next(D.make_train_iterator(source, seq_len=64, batch_size=6, seed=0, pack=False,
                                     loss_on="answer", shuffle=False))
  for row in range(6):
    r = source[row]
    np.testing.assert_array_equal(np.flatnonzero(batch["loss_mask"][row]), r["answer_positions"])
    # The input at a scored position is the queried key, its target the key's value.
    keys = batch["tokens"][row, r["answer_positions"]]
    table = dict(zip(r["tokens"][0:8:2].tolist(), r["tokens"][1:8:2].tolist()))
    values = batch["targets"][row, r["answer_positions"]].tolist()
    assert [table[k] for k in keys.tolist()] == values


def test_orbax_checkpoint_of_the_iterator(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  import grain  # pylint: disable=g-import-not-at-top
  docs = _documents(16, seed=9)
  kwargs = dict(seq_len=16, batch_size=2, seed=3)
  it = D.make_train_iterator(docs, **kwargs)
  _take(it, 4)
  manager = ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("data",))
  manager.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  manager.wait_until_finished()
  expected = _take(it, 3)
  fresh = D.make_train_iterator(docs, **kwargs)
  manager.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  _assert_batches_equal(_take(fresh, 3), expected)
