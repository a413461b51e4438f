"""Multi-query associative recall (MQAR; Arora et al., "Zoology", 2023; used by Based).

An example of length L with N key-value pairs follows Zoology's `multiquery_ar`:

    k1 v1 k2 v2 ... kN vN | . . . k3 v3 . . k1 v1 . . . . kN vN . . .
    <---- 2N tokens -----> <----------- L - 2N query tokens ---------->

Keys are drawn without replacement from [1, vocab_size // 2), values from
[vocab_size // 2, vocab_size). Every key is queried once in the second part, at slot
`2 * gap` with gaps drawn without replacement from a power law that favours short gaps
(p(gap) ~ power_a * gap**(power_a - 1)); the token after each queried key is its value, and
those value positions are the scored ones (a model must predict v from the context so far).
Unlike Zoology, the value is written into the sequence (next-token-prediction form), so that
targets == tokens shifted by one as in every lcjax dataset. Other positions are noise: 0, or,
with random_non_queries, uniform tokens from [0, vocab_size) as in Zoology.

Per example the record holds:
  tokens            int32 [context_length]  token ids in [0, vocab_size)
  answer_positions  int32 [num_kv_pairs]    indices in tokens of the scored values, ascending
  num_kv_pairs      int32
  context_length    int32
Lengths cycle over config.lengths. vocab_size <= 256 keeps the ids inside the byte range of
lcjax.data.tokenizer, so that one model vocabulary serves every lcjax dataset.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from lcjax.data import builder_base


def mqar_example(rng: np.random.Generator, *, length: int, num_kv_pairs: int, vocab_size: int,
                 power_a: float = 0.01, random_non_queries: bool = True) -> dict:
  """One MQAR example (see the module docstring) drawn with `rng`."""
  builder_base.require(4 <= vocab_size <= 256, "vocab_size", vocab_size, "an int in [4, 256]")
  half = vocab_size // 2
  builder_base.require(1 <= num_kv_pairs <= half - 1, "num_kv_pairs", num_kv_pairs,
                       f"an int in [1, vocab_size // 2 - 1 = {half - 1}]")
  builder_base.require(length >= 4 * num_kv_pairs, "length", length,
                       f">= 4 * num_kv_pairs = {4 * num_kv_pairs} (as in Zoology)")
  builder_base.require(0.0 < power_a <= 1.0, "power_a", power_a, "a float in (0, 1]")
  keys = rng.choice(np.arange(1, half), size=num_kv_pairs, replace=False)
  values = rng.choice(np.arange(half, vocab_size), size=num_kv_pairs, replace=False)
  context = 2 * num_kv_pairs
  space = (length - context) // 2  # query slots of two tokens (key, value)
  p = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
  gaps = rng.choice(space, size=num_kv_pairs, replace=False, p=p / p.sum())
  if random_non_queries:
    tokens = rng.integers(0, vocab_size, size=length).astype(np.int32)
  else:
    tokens = np.zeros(length, dtype=np.int32)
  tokens[0:context:2] = keys
  tokens[1:context:2] = values
  tokens[context + 2 * gaps] = keys
  tokens[context + 2 * gaps + 1] = values
  answer_positions = np.sort(context + 2 * gaps + 1).astype(np.int32)
  return {
      "tokens": tokens,
      "answer_positions": answer_positions,
      "num_kv_pairs": np.int32(num_kv_pairs),
      "context_length": np.int32(length),
  }


@dataclasses.dataclass(eq=False)
class MqarConfig(tfds.core.BuilderConfig):
  """Parameters of an MQAR dataset (see the module docstring); use `mqar_config()`."""
  lengths: tuple[int, ...] = (256,)
  num_kv_pairs: int = 16
  vocab_size: int = 256
  power_a: float = 0.01
  random_non_queries: bool = True
  num_train: int = 4096
  num_validation: int = 256
  num_test: int = 256
  seed: int = 0


def mqar_config(*, lengths=(256,), num_kv_pairs: int = 16, vocab_size: int = 256,
                power_a: float = 0.01, random_non_queries: bool = True, num_train: int = 4096,
                num_validation: int = 256, num_test: int = 256, seed: int = 0) -> MqarConfig:
  """A checked MqarConfig whose name encodes every parameter."""
  lengths = builder_base.check_lengths(lengths)
  # Drawing one example checks num_kv_pairs, vocab_size, power_a and the shortest length.
  mqar_example(np.random.default_rng(0), length=min(lengths), num_kv_pairs=num_kv_pairs,
               vocab_size=vocab_size, power_a=power_a, random_non_queries=random_non_queries)
  params = dict(lengths=lengths, num_kv_pairs=int(num_kv_pairs), vocab_size=int(vocab_size),
                power_a=float(power_a), random_non_queries=bool(random_non_queries),
                num_train=builder_base.check_count(num_train, "num_train"),
                num_validation=builder_base.check_count(num_validation, "num_validation"),
                num_test=builder_base.check_count(num_test, "num_test"),
                seed=builder_base.check_count(seed, "seed"))
  builder_base.require(params["num_train"] + params["num_validation"] + params["num_test"] > 0,
                       "num_train + num_validation + num_test",
                       params["num_train"] + params["num_validation"] + params["num_test"], "> 0")
  name = builder_base.config_name(f"len{min(lengths)}-{max(lengths)}_kv{num_kv_pairs}", params)
  return MqarConfig(name=name, description=f"MQAR {params}", **params)


def generate_split(config: MqarConfig, split: str):
  """Yields (key, record) for every example of `split`, deterministically from config.seed."""
  num = {"train": config.num_train, "validation": config.num_validation,
         "test": config.num_test}[split]
  for i in range(num):
    rng = builder_base.example_rng(config.seed, split, i)
    yield i, mqar_example(rng, length=config.lengths[i % len(config.lengths)],
                          num_kv_pairs=config.num_kv_pairs, vocab_size=config.vocab_size,
                          power_a=config.power_a, random_non_queries=config.random_non_queries)


class LcjaxMqar(tfds.core.GeneratorBasedBuilder):
  """Multi-query associative recall at configurable lengths (lcjax.data.mqar)."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [mqar_config()]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "answer_positions": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "num_kv_pairs": tfds.features.Scalar(dtype=np.int32),
            "context_length": tfds.features.Scalar(dtype=np.int32),
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
