"""Typed, frozen config sections: data, optimizer, train, eval, mesh (the model's is ModelConfig).

Each section checks its own values in `__post_init__` (raising ValueError naming the field, its
value and what is accepted); `lcjax.config.experiment` checks the constraints across sections.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal


# Per-task example options that config.eval.task_options may set (the rest of a builder's options,
# lengths/depths/counts, are the evaluation's own); lcjax.eval.retrieval reads the same table.
EVAL_TASK_OPTIONS = {"passkey": ("digits",), "mqar": ("num_kv_pairs", "vocab_size", "power_a", "random_non_queries")}


def require(ok: bool, field: str, value: Any, accepted: str) -> None:
  if not ok:
    raise ValueError(f"{field}={value!r} is not accepted; {accepted}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh shape: data x fsdp x tensor (a one-device mesh by default).

  data: pure data parallelism (batch split, parameters replicated).
  fsdp: batch split AND parameters/optimizer state sharded (ZeRO-3 style).
  tensor: model parallelism over heads, MLP hidden units and vocabulary.
  """
  data: int = 1
  fsdp: int = 1
  tensor: int = 1

  def __post_init__(self):
    for name in ("data", "fsdp", "tensor"):
      require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")

  @property
  def size(self) -> int:
    return self.data * self.fsdp * self.tensor

  @property
  def batch_shards(self) -> int:
    """How many ways the batch is split (data x fsdp)."""
    return self.data * self.fsdp


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What the training iterator reads.

  task: dataset name, one of lcjax.data's tasks (e.g. "passkey", "mqar", "python_stdlib").
  seq_len: tokens per training row. batch_size: GLOBAL rows per optimizer step.
  seed: seeds the shuffle/packing order of the training iterator.
  data_dir: where lcjax.data caches built datasets (None: $LCJAX_DATA_DIR or ~/.cache/lcjax/data).
  pack: first-fit pack several examples per row; False: one example per row, padded.
  loss_on: "all" tokens or only the "answer" tokens (task datasets).
  options: task-specific keyword arguments of the dataset builder (lcjax.data.build_dataset),
    e.g. {"lengths": (128, 256), "digits": 3, "num_train": 20000} for passkey; checked there.
  """
  task: str = "passkey"
  seq_len: int = 256
  batch_size: int = 16
  seed: int = 0
  data_dir: str | None = None
  pack: bool = False
  loss_on: Literal["all", "answer"] = "all"
  options: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    require(self.seq_len >= 2, "seq_len", self.seq_len, "must be >= 2")
    require(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with linear warm-up then cosine decay, global-norm clipping, gradient accumulation.

  The learning rate rises linearly from 0 to learning_rate over warmup_steps, then follows a
  cosine down to learning_rate * min_lr_ratio at decay_steps (None: train.num_steps).
  grad_accum_steps: the global batch is split into this many micro-batches, scanned in one step.
  """
  learning_rate: float = 3e-4
  warmup_steps: int = 100
  decay_steps: int | None = None
  min_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float | None = 1.0
  grad_accum_steps: int = 1

  def __post_init__(self):
    require(self.learning_rate > 0, "learning_rate", self.learning_rate, "must be > 0")
    require(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")
    require(self.decay_steps is None or self.decay_steps >= 1, "decay_steps", self.decay_steps,
            "must be None or >= 1")
    require(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
    require(0.0 <= self.b1 < 1.0, "b1", self.b1, "must be in [0, 1)")
    require(0.0 <= self.b2 < 1.0, "b2", self.b2, "must be in [0, 1)")
    require(self.eps > 0, "eps", self.eps, "must be > 0")
    require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
    require(self.clip_norm is None or self.clip_norm > 0, "clip_norm", self.clip_norm,
            "must be None (no clipping) or > 0")
    require(self.grad_accum_steps >= 1, "grad_accum_steps", self.grad_accum_steps, "must be >= 1")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The training loop.

  work_dir: metrics (TensorBoard + metrics.jsonl), checkpoints/ and plots; a restart with the same
    work_dir resumes from its latest checkpoint.
  checkpoint_every: save every this many steps (and at the last step); keep_checkpoints: keep N.
  eval_every: run the eval section every this many steps (0: only after the last step).
  Mixed precision lives in the model section: config.model.dtype="bfloat16" computes in bf16
  while config.model.param_dtype="float32" keeps parameters (and AdamW's moments) in float32.
  """
  num_steps: int = 1000
  work_dir: str = "runs/default"
  seed: int = 0
  log_every: int = 10
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  async_checkpointing: bool = True
  eval_every: int = 0
  progress_bar: bool = True

  def __post_init__(self):
    require(self.num_steps >= 1, "num_steps", self.num_steps, "must be >= 1")
    require(bool(self.work_dir), "work_dir", self.work_dir, "must be a non-empty path")
    require(self.log_every >= 1, "log_every", self.log_every, "must be >= 1")
    require(self.checkpoint_every >= 1, "checkpoint_every", self.checkpoint_every, "must be >= 1")
    require(self.keep_checkpoints >= 1, "keep_checkpoints", self.keep_checkpoints, "must be >= 1")
    require(self.eval_every >= 0, "eval_every", self.eval_every, "must be >= 0 (0: at the end only)")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Evaluation after (or during) training.

  tasks: which evaluations to run: "passkey", "mqar" (accuracy by context length x depth) and/or
    "perplexity" (text perplexity by token-position bucket, on data.task's held-out split or
    perplexity_task).
  lengths: context lengths (tokens); depths: fractions in [0, 1] where the needle sits.
  examples_per_cell: examples per (length, depth) cell.
  method: "teacher_forced" (argmax of every answer token given the true prefix; exact match of
    the whole answer) or "greedy" (generate() decodes the answer; exact match).
  position_buckets: number of equal-width token-position buckets for perplexity.
  task_options: per-task keyword arguments for the eval loaders, e.g. {"passkey": {"digits": 4}}.
  """
  tasks: tuple[str, ...] = ("passkey",)
  lengths: tuple[int, ...] = (128, 256)
  depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
  examples_per_cell: int = 16
  batch_size: int = 16
  method: Literal["teacher_forced", "greedy"] = "teacher_forced"
  perplexity_task: str = "python_stdlib"
  perplexity_examples: int = 32
  position_buckets: int = 8
  seed: int = 1234
  task_options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    known = ("passkey", "mqar", "perplexity")
    for t in self.tasks:
      require(t in known, "tasks", self.tasks, f"each must be one of {known}")
    require(all(n >= 2 for n in self.lengths), "lengths", self.lengths, "each must be >= 2")
    require(all(0.0 <= d <= 1.0 for d in self.depths), "depths", self.depths, "each must be in [0, 1]")
    require(self.examples_per_cell >= 1, "examples_per_cell", self.examples_per_cell, "must be >= 1")
    require(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
    require(self.perplexity_examples >= 1, "perplexity_examples", self.perplexity_examples, "must be >= 1")
    require(self.position_buckets >= 1, "position_buckets", self.position_buckets, "must be >= 1")
    for task, options in self.task_options.items():
      require(task in EVAL_TASK_OPTIONS, "task_options", self.task_options,
              f"keys among {tuple(EVAL_TASK_OPTIONS)} (got {task!r})")
      unknown = sorted(set(options) - set(EVAL_TASK_OPTIONS[task]))
      require(not unknown, f"task_options.{task}", options,
              f"unknown key(s) {unknown}; accepted keys: {EVAL_TASK_OPTIONS[task]}")
