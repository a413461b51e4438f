"""Passkey retrieval (Mohtashami & Jaggi, "Landmark Attention", 2023), byte-level.

An example is filler text with one needle sentence at a chosen depth, then the question, then
the answer digits:

    ...s is blue. The sun is yellow. Here we go. There and back again. The grass is green. ...
    The pass key is 38207. Remember it. 38207 is the pass key. The sky is blue. ...
    ... There and back again. What is the pass key? The pass key is 38207

`tokens` are the bytes of that text (int32 [context_length], no BOS: the pipeline adds it), so
that context_length == the configured length exactly. The filler is cropped at its start
(beginning mid-sentence, like a crop of a long document) and ends on a whole sentence; the
needle sits at the sentence boundary nearest to depth * (filler length).

Per example the record holds:
  tokens          int32 [context_length]  the byte ids
  answer_start    int32                   index in tokens of the first answer digit
  answer_length   int32                   number of answer digits (== config.digits)
  needle_start    int32                   index in tokens of the needle sentence
  depth           float32                 the requested depth in [0, 1] (0: needle first)
  context_length  int32                   len(tokens)
  passkey         int64                   the answer as a number
Lengths cycle over config.lengths and depths over config.depths (length fastest), so that
num_examples = len(lengths) * len(depths) * k gives k examples per (length, depth) cell; with
depths=None the depth is uniform in [0, 1].
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from lcjax.data import builder_base

FILLER_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.",
                    "Here we go.", "There and back again.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is "


def min_length(digits: int) -> int:
  """The shortest context (bytes) that holds the needle, the question and the answer."""
  return len(NEEDLE.format(key="0" * digits)) + len(QUESTION) + digits


def _filler(length: int) -> tuple[bytes, np.ndarray]:
  """Filler of exactly `length` bytes ending on a whole sentence, and its sentence starts.

  Returns (text, starts): starts int64 holds every index where a sentence may be inserted
  without cutting one: the sentence starts and `length` (0 only where the crop starts on a
  whole sentence, so that the needle never precedes a sentence fragment).
  """
  cycle = " ".join(FILLER_SENTENCES) + " "
  reps = length // len(cycle) + 2
  text = (cycle * reps).encode()[-length:] if length else b""
  starts = [length]
  offset = len(cycle) * reps - length  # index in the repeated cycle where the crop starts
  pos = 0
  for _ in range(reps):
    for sentence in FILLER_SENTENCES:
      begin = pos - offset
      if 0 <= begin < length:
        starts.append(begin)
      pos += len(sentence) + 1
  return text, np.unique(np.asarray(starts, dtype=np.int64))


def passkey_example(passkey: int, *, length: int, depth: float, digits: int) -> dict:
  """One passkey example of exactly `length` bytes with `passkey` (`digits` digits) at `depth`.

  Returns the record described in the module docstring (without the config-level fields).
  """
  builder_base.require(isinstance(digits, (int, np.integer)) and digits >= 1, "digits", digits,
                       "an int >= 1")
  builder_base.require(0 <= passkey < 10**digits, "passkey", passkey,
                       f"0 <= passkey < 10**{digits}")
  builder_base.require(length >= min_length(digits), "length", length,
                       f">= {min_length(digits)} (needle + question + answer for digits={digits})")
  builder_base.require(0.0 <= depth <= 1.0, "depth", depth, "a float in [0, 1]")
  key = f"{passkey:0{digits}d}"
  needle = NEEDLE.format(key=key).encode()
  question = QUESTION.encode()
  filler_len = length - len(needle) - len(question) - digits
  filler, starts = _filler(filler_len)
  at = int(starts[np.argmin(np.abs(starts - depth * filler_len))])
  text = filler[:at] + needle + filler[at:] + question + key.encode()
  assert len(text) == length, (len(text), length)
  tokens = np.frombuffer(text, dtype=np.uint8).astype(np.int32)
  return {
      "tokens": tokens,
      "answer_start": np.int32(length - digits),
      "answer_length": np.int32(digits),
      "needle_start": np.int32(at),
      "depth": np.float32(depth),
      "context_length": np.int32(length),
      "passkey": np.int64(passkey),
  }


@dataclasses.dataclass(eq=False)
class PasskeyConfig(tfds.core.BuilderConfig):
  """Parameters of a passkey dataset (see the module docstring); use `passkey_config()`."""
  lengths: tuple[int, ...] = (256, 512, 1024)
  depths: tuple[float, ...] | None = None
  digits: int = 5
  num_train: int = 2048
  num_validation: int = 256
  num_test: int = 256
  seed: int = 0


def passkey_config(*, lengths=(256, 512, 1024), depths=None, digits: int = 5,
                   num_train: int = 2048, num_validation: int = 256, num_test: int = 256,
                   seed: int = 0) -> PasskeyConfig:
  """A checked PasskeyConfig whose name encodes every parameter."""
  lengths = builder_base.check_lengths(lengths)
  builder_base.require(isinstance(digits, (int, np.integer)) and 1 <= digits <= 18, "digits",
                       digits, "an int in [1, 18]")
  shortest = min_length(int(digits))
  builder_base.require(min(lengths) >= shortest, "lengths", lengths,
                       f"every length >= {shortest} for digits={digits}")
  if depths is not None:
    if isinstance(depths, (int, float)):
      depths = (depths,)
    depths = tuple(float(d) for d in depths)
    builder_base.require(len(depths) > 0 and all(0.0 <= d <= 1.0 for d in depths), "depths",
                         depths, "None (uniform) or a non-empty tuple of floats in [0, 1]")
  params = dict(lengths=lengths, depths=depths, digits=int(digits),
                num_train=builder_base.check_count(num_train, "num_train"),
                num_validation=builder_base.check_count(num_validation, "num_validation"),
                num_test=builder_base.check_count(num_test, "num_test"),
                seed=builder_base.check_count(seed, "seed"))
  builder_base.require(params["num_train"] + params["num_validation"] + params["num_test"] > 0,
                       "num_train + num_validation + num_test",
                       params["num_train"] + params["num_validation"] + params["num_test"], "> 0")
  name = builder_base.config_name(f"len{min(lengths)}-{max(lengths)}_d{digits}", params)
  return PasskeyConfig(name=name, description=f"passkey retrieval {params}", **params)


def generate_split(config: PasskeyConfig, split: str):
  """Yields (key, record) for every example of `split`, deterministically from config.seed."""
  num = {"train": config.num_train, "validation": config.num_validation,
         "test": config.num_test}[split]
  lengths = config.lengths
  for i in range(num):
    rng = builder_base.example_rng(config.seed, split, i)
    length = lengths[i % len(lengths)]
    if config.depths is None:
      depth = float(rng.uniform(0.0, 1.0))
    else:
      depth = config.depths[(i // len(lengths)) % len(config.depths)]
    low = 10 ** (config.digits - 1) if config.digits > 1 else 0
    passkey = int(rng.integers(low, 10**config.digits))
    yield i, passkey_example(passkey, length=length, depth=depth, digits=config.digits)


class LcjaxPasskey(tfds.core.GeneratorBasedBuilder):
  """Passkey retrieval at configurable lengths and depths (lcjax.data.passkey)."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [passkey_config()]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "answer_start": tfds.features.Scalar(dtype=np.int32),
            "answer_length": tfds.features.Scalar(dtype=np.int32),
            "needle_start": tfds.features.Scalar(dtype=np.int32),
            "depth": tfds.features.Scalar(dtype=np.float32),
            "context_length": tfds.features.Scalar(dtype=np.int32),
            "passkey": tfds.features.Scalar(dtype=np.int64),
        }),
        disable_shuffling=True,  # keep generation order: example i is record i
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    # TFDS cannot write an empty split: a split asked to hold 0 examples is left out.
    config = self.builder_config
    counts = {"train": config.num_train, "validation": config.num_validation,
              "test": config.num_test}
    return {split: self._generate_examples(split) for split, n in counts.items() if n > 0}

  def _generate_examples(self, split: str):
    yield from generate_split(self.builder_config, split)

