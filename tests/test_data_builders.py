"""lcjax.data builders: passkey, MQAR, python_stdlib (TFDS, array_record, no TensorFlow)."""

import importlib.util
import pathlib
import sys

import numpy as np
import pytest

import lcjax.data as D
from lcjax.data import mqar
from lcjax.data import passkey
from lcjax.data import python_stdlib
from lcjax.data import tokenizer

PASSKEY = dict(lengths=(128, 200, 300), digits=5, num_train=30, num_validation=12, num_test=12)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("lcjax_data"))


def _records(source):
  return [source[i] for i in range(len(source))]


def test_builds_without_tensorflow(data_dir):
  assert importlib.util.find_spec("tensorflow") is None
  source = D.build_dataset("passkey", "train", data_dir, **PASSKEY)
  assert len(source) == PASSKEY["num_train"]
  assert source[3]["tokens"].dtype == np.int32
  assert "tensorflow" not in sys.modules
  files = list(pathlib.Path(data_dir).glob("lcjax_passkey/*/1.0.0/*.array_record*"))
  assert files, "expected array_record shards"


def test_tokenizer_round_trip():
  text = "déjà vu \x00 ok"
  ids = tokenizer.encode(text)
  assert ids.dtype == np.int32 and ids.max() < 256
  assert tokenizer.decode(ids) == text
  with_special = np.concatenate([[tokenizer.BOS_ID], ids, [tokenizer.EOS_ID, tokenizer.PAD_ID]])
  assert tokenizer.decode(with_special) == text
  assert len({tokenizer.BOS_ID, tokenizer.EOS_ID, tokenizer.PAD_ID}) == 3
  assert tokenizer.PADDED_VOCAB_SIZE >= tokenizer.VOCAB_SIZE == 259
  with pytest.raises(ValueError, match="ids"):
    tokenizer.decode([300])


def test_passkey_deterministic_by_seed(data_dir, tmp_path):
  a = _records(D.build_dataset("passkey", "validation", data_dir, **PASSKEY))
  b = _records(D.build_dataset("passkey", "validation", str(tmp_path), **PASSKEY))
  c = _records(D.build_dataset("passkey", "validation", str(tmp_path), **PASSKEY, seed=1))
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert any(not np.array_equal(x["tokens"], z["tokens"]) for x, z in zip(a, c))
  # The stored records are exactly what the generator yields, in order.
  generated = [r for _, r in passkey.generate_split(passkey.passkey_config(**PASSKEY),
                                                    "validation")]
  for x, g in zip(a, generated):
    np.testing.assert_array_equal(x["tokens"], g["tokens"])
    assert int(x["passkey"]) == int(g["passkey"])


@pytest.mark.parametrize("depths", [None, (0.0, 0.5, 1.0)])
def test_passkey_answer_in_text_at_depth(data_dir, depths):
  kwargs = dict(PASSKEY, depths=depths)
  records = _records(D.build_dataset("passkey", "train", data_dir, **kwargs))
  filler_lengths = []
  for r in records:
    tokens, digits = r["tokens"], int(r["answer_length"])
    key = f"{int(r['passkey']):0{digits}d}"
    text = tokenizer.decode(tokens)
    assert len(tokens) == int(r["context_length"]) in PASSKEY["lengths"]
    assert digits == PASSKEY["digits"]
    assert text.endswith(passkey.QUESTION + key)
    start = int(r["answer_start"])
    assert tokenizer.decode(tokens[start:start + digits]) == key
    assert start + digits == len(tokens)
    needle = passkey.NEEDLE.format(key=key)
    at = int(r["needle_start"])
    assert text[at:at + len(needle)] == needle
    assert text.count(key) == 3  # twice in the needle, once as the answer
    # The needle sits at the sentence boundary nearest the requested depth of the filler.
    filler_len = len(tokens) - len(needle) - len(passkey.QUESTION) - digits
    sentence = max(len(s) for s in passkey.FILLER_SENTENCES) + 1
    assert abs(at - float(r["depth"]) * filler_len) <= sentence
    filler_lengths.append(filler_len)
  depths_seen = np.array([float(r["depth"]) for r in records])
  if depths is None:
    assert 0 <= depths_seen.min() and depths_seen.max() <= 1 and len(set(depths_seen)) > 10
  else:  # every (length, depth) cell holds the same number of examples
    cells = {(int(r["context_length"]), float(r["depth"])) for r in records}
    assert len(cells) == 9
    counts = [sum((int(r["context_length"]), float(r["depth"])) == c for r in records)
              for c in cells]
    assert set(counts) == {len(records) // 9} or max(counts) - min(counts) <= 1


def test_passkey_splits_disjoint(data_dir):
  seen = {}
  for split in ("train", "validation", "test"):
    keys = {r["tokens"].tobytes() for r in _records(D.build_dataset("passkey", split, data_dir,
                                                                    **PASSKEY))}
    for other, other_keys in seen.items():
      assert not keys & other_keys, (split, other)
    seen[split] = keys


def test_passkey_bad_arguments():
  with pytest.raises(ValueError, match="lengths"):
    passkey.passkey_config(lengths=(10,))
  with pytest.raises(ValueError, match="depths"):
    passkey.passkey_config(depths=(1.5,))
  with pytest.raises(ValueError, match="digits"):
    passkey.passkey_config(digits=0)


def test_mqar_scored_positions_hold_the_values(data_dir):
  kwargs = dict(lengths=(64, 96), num_kv_pairs=6, vocab_size=64, num_train=20,
                num_validation=8, num_test=8)
  records = _records(D.build_dataset("mqar", "train", data_dir, **kwargs))
  again = _records(D.build_dataset("mqar", "train", data_dir, **kwargs))
  other_seed = _records(D.build_dataset("mqar", "train", data_dir, **kwargs, seed=3))
  assert all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(records, again))
  assert not all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(records, other_seed))
  for r in records:
    tokens, positions, n = r["tokens"], r["answer_positions"], int(r["num_kv_pairs"])
    assert len(tokens) == int(r["context_length"]) and n == 6 and len(positions) == n
    assert tokens.min() >= 0 and tokens.max() < 64
    keys, values = tokens[0:2 * n:2], tokens[1:2 * n:2]
    assert np.all((1 <= keys) & (keys < 32)) and np.all((32 <= values) & (values < 64))
    assert len(set(keys.tolist())) == n
    table = dict(zip(keys.tolist(), values.tolist()))
    assert np.all(positions >= 2 * n + 1) and np.all(np.diff(positions) > 0)
    queried = tokens[positions - 1].tolist()
    assert sorted(queried) == sorted(table)  # every key queried exactly once
    assert all(tokens[p] == table[tokens[p - 1]] for p in positions)
  val = {r["tokens"].tobytes() for r in _records(D.build_dataset("mqar", "validation", data_dir,
                                                                 **kwargs))}
  assert not val & {r["tokens"].tobytes() for r in records}


def test_mqar_bad_arguments():
  with pytest.raises(ValueError, match="length"):
    mqar.mqar_config(lengths=(16,), num_kv_pairs=8)
  with pytest.raises(ValueError, match="vocab_size"):
    mqar.mqar_config(vocab_size=1000)


def test_python_stdlib_split_by_file(data_dir):
  kwargs = dict(max_files=40, validation_fraction=0.3)
  train = _records(D.build_dataset("python_stdlib", "train", data_dir, **kwargs))
  val = _records(D.build_dataset("python_stdlib", "validation", data_dir, **kwargs))
  train_paths = [r["path"].decode() for r in train]
  val_paths = [r["path"].decode() for r in val]
  files = python_stdlib.list_stdlib_files()[:40]
  assert not set(train_paths) & set(val_paths)
  assert sorted(train_paths + val_paths) == files
  assert train_paths == sorted(train_paths)
  assert len(val) > 0 and len(train) > 0
  root = python_stdlib.stdlib_dir()
  for r in train[:5] + val[:5]:
    path = r["path"].decode()
    assert python_stdlib.split_of(path, 0.3) == ("train" if path in train_paths else "validation")
    assert r["tokens"].tobytes() == (root / path).read_bytes()
    assert int(r["num_bytes"]) == len(r["tokens"])
  assert all("site-packages" not in p for p in files)
  with pytest.raises(ValueError, match="split"):
    D.build_dataset("python_stdlib", "test", data_dir, **kwargs)


def test_build_dataset_errors(data_dir):
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['no_such_option'\].*accepted: \[.*'digits'"):
    D.build_dataset("passkey", "train", data_dir, no_such_option=1)
  with pytest.raises(ValueError, match="no_such_dataset_xyz"):
    D.build_dataset("no_such_dataset_xyz", "train", data_dir)


def test_empty_split_is_not_built(data_dir):
  kwargs = dict(PASSKEY, num_train=0, num_test=0, depths=(0.0, 1.0), num_validation=12)
  source = D.build_dataset("passkey", "validation", data_dir, **kwargs)
  cells = [(int(source[i]["context_length"]), float(source[i]["depth"])) for i in range(12)]
  assert sorted(set(cells)) == [(l, d) for l in PASSKEY["lengths"] for d in (0.0, 1.0)]
  assert all(cells.count(c) == 2 for c in set(cells))
  with pytest.raises(ValueError, match="split='train'"):
    D.build_dataset("passkey", "train", data_dir, **kwargs)


def test_byte_tokenized_source_feeds_the_pipeline():
  texts = ["alpha beta", "déjà", ""]
  source = D.ByteTokenizedSource([{"book_text": t.encode(), "id": i} for i, t in enumerate(texts)],
                                 "book_text")
  assert len(source) == 3
  for i, t in enumerate(texts):
    assert tokenizer.decode(source[i]["tokens"]) == t and source[i]["id"] == i
  with pytest.raises(ValueError, match="text_key"):
    D.ByteTokenizedSource([{"text": b"x"}], "book_text")[0]
  batch = next(D.make_train_iterator(source, seq_len=8, batch_size=2, seed=0, shuffle=False,
                                     pack=False))
  assert tokenizer.decode(batch["targets"][0]) == "alpha be"
