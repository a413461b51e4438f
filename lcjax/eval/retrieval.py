"""Passkey and MQAR accuracy by context length (x needle depth for passkey).

Methods (config.eval.method):
- "teacher_forced": one forward pass over the example with its true answer; the example counts
  as retrieved when argmax(logits) equals the target at EVERY answer position. For an exact
  match of the whole answer this equals greedy decoding: if every argmax given the true prefix
  is right, greedy decoding produces exactly the true answer, and conversely.
- "greedy": lcjax.models.generate decodes answer_length tokens greedily after the prompt (a
  KV-cache prefill + decode loop), compared with the answer (passkey only).
MQAR is always teacher-forced (its answers are single tokens interleaved with the context) and
also reported per query (the fraction of answer values predicted).
"""

from __future__ import annotations

import collections
from typing import Callable

import numpy as np

from lcjax import data as lcdata
from lcjax.config.sections import EVAL_TASK_OPTIONS


def example_options(task: str, cfg) -> dict:
  """The training data's example options (e.g. passkey digits), overridden by eval.task_options."""
  options = {}
  if cfg.data.task == task:
    options = {k: v for k, v in cfg.data.options.items() if k in EVAL_TASK_OPTIONS[task]}
  extra = dict(cfg.eval.task_options.get(task, {}))
  unknown = sorted(set(extra) - set(EVAL_TASK_OPTIONS[task]))
  if unknown:
    raise ValueError(f"config.eval.task_options.{task} has unknown keys {unknown}; "
                     f"accepted: {EVAL_TASK_OPTIONS[task]}")
  options.update(extra)
  return options


def chance_accuracy(task: str, options: dict) -> float:
  """Accuracy of guessing: passkey exact match of a uniform key (first digit 1-9); MQAR per query."""
  if task == "passkey":
    digits = options.get("digits", 5)
    return 1.0 / (9 * 10 ** (digits - 1)) if digits > 1 else 0.1
  vocab = options.get("vocab_size", 256)
  return 1.0 / (vocab - vocab // 2)


def eval_source(task: str, length: int, cfg, options: dict):
  """The test split of `task` at one length: examples_per_cell per depth (passkey) or in all (MQAR)."""
  ec = cfg.eval
  if task == "passkey":
    n = ec.examples_per_cell * len(ec.depths)
    kwargs = dict(lengths=(length,), depths=tuple(ec.depths))
  else:
    n = ec.examples_per_cell
    kwargs = dict(lengths=(length,))
  return lcdata.build_dataset(task, "test", cfg.data.data_dir, num_train=1, num_validation=1, num_test=n,
                              seed=ec.seed, **kwargs, **options)


def evaluate_retrieval(task: str, cfg, params, score: Callable, answer: Callable | None = None) -> dict:
  """Accuracy of `task` ("passkey" or "mqar") for every eval length (x depth).

  Returns {"task", "method", "chance", "accuracy", "lengths", "depths", "cells": [{"length",
  "depth", "n", "accuracy", "query_accuracy"}]} (depth None for MQAR).
  """
  if task not in EVAL_TASK_OPTIONS:
    raise ValueError(f"task={task!r}; accepted: {tuple(EVAL_TASK_OPTIONS)}")
  greedy = task == "passkey" and cfg.eval.method == "greedy"
  if greedy and answer is None:
    raise ValueError("config.eval.method='greedy' needs a greedy answerer (lcjax.models.generate)")
  options = example_options(task, cfg)
  cells: dict[tuple, list] = collections.defaultdict(list)
  for length in cfg.eval.lengths:
    source = eval_source(task, length, cfg, options)
    for batch in lcdata.task_eval_batches(source, seq_len=length, batch_size=cfg.eval.batch_size):
      mask = batch["loss_mask"] > 0
      if greedy:
        decoded = answer(params, batch)
        correct = np.zeros(mask.shape, bool)
        for b in range(len(decoded)):
          s, n = int(batch["answer_start"][b]), int(batch["answer_length"][b])
          correct[b, s:s + n] = decoded[b, :n] == batch["targets"][b, s:s + n]
      else:
        correct = score(params, batch)["correct"]
      wrong = np.sum(mask & ~correct, axis=1)
      scored = np.sum(mask, axis=1)
      for b in np.nonzero(batch["valid"])[0]:
        depth = round(float(batch["depth"][b]), 4) if task == "passkey" else None
        cells[(length, depth)].append((wrong[b] == 0, 1.0 - wrong[b] / max(scored[b], 1)))
  rows = []
  for (length, depth), results in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0.0)):
    exact, per_query = zip(*results)
    rows.append({"length": length, "depth": depth, "n": len(results), "accuracy": float(np.mean(exact)),
                 "query_accuracy": float(np.mean(per_query))})
  total = sum(r["n"] for r in rows)
  return {
      "task": task, "method": "greedy_decoding_exact_match" if greedy else "teacher_forced_argmax_exact_match",
      "options": options,
      "chance": chance_accuracy(task, options),
      "accuracy": float(sum(r["accuracy"] * r["n"] for r in rows) / max(total, 1)),
      "query_accuracy": float(sum(r["query_accuracy"] * r["n"] for r in rows) / max(total, 1)),
      "lengths": list(cfg.eval.lengths), "depths": list(cfg.eval.depths) if task == "passkey" else None,
      "cells": rows,
  }


def format_table(result: dict) -> str:
  """Accuracy table: one row per length, one column per depth (passkey), plus chance."""
  lines = [f"{result['task']} accuracy ({result['method']}), chance {result['chance']:.4g}"]
  by = {(r["length"], r["depth"]): r for r in result["cells"]}
  if result["depths"]:
    depths = sorted({r["depth"] for r in result["cells"]})
    lines.append("length \\ depth " + "".join(f"{d:>8.2f}" for d in depths) + "     all")
    for length in result["lengths"]:
      row = [by[(length, d)] for d in depths if (length, d) in by]
      mean = sum(r["accuracy"] * r["n"] for r in row) / max(sum(r["n"] for r in row), 1)
      lines.append(f"{length:>14d} " + "".join(f"{r['accuracy']:>8.3f}" for r in row) + f"{mean:>8.3f}")
  else:
    lines.append(f"{'length':>8} {'exact':>8} {'per-query':>10}")
    for length in result["lengths"]:
      r = by[(length, None)]
      lines.append(f"{length:>8d} {r['accuracy']:>8.3f} {r['query_accuracy']:>10.3f}")
  n = sum(r["n"] for r in result["cells"])
  if result["depths"]:
    lines.append(f"overall {result['accuracy']:.3f} over {n} examples ({result['accuracy'] / result['chance']:.0f}x chance)")
  else:  # MQAR: chance is per query
    lines.append(f"overall exact {result['accuracy']:.3f}, per-query {result['query_accuracy']:.3f} over {n} examples "
                 f"({result['query_accuracy'] / result['chance']:.1f}x per-query chance)")
  return "\n".join(lines)
