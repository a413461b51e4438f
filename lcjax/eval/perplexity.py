"""Text perplexity by token position: does the model use longer context?

The first seq_len tokens of held-out documents at least seq_len long (so that every bucket
averages the same documents), positions from 0; the per-token NLL is averaged within equal-width
position buckets. Bytes are tokens here, so bits per byte = mean NLL / ln 2.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from lcjax import data as lcdata


def bucket_edges(seq_len: int, buckets: int) -> np.ndarray:
  """buckets + 1 increasing int edges over [0, seq_len] (fewer buckets if seq_len < buckets)."""
  return np.unique(np.linspace(0, seq_len, min(buckets, seq_len) + 1).round().astype(int))


def evaluate_perplexity(cfg, params, score: Callable, *, task: str | None = None,
                        seq_len: int | None = None) -> dict:
  """Perplexity of the validation split of `task` (default config.eval.perplexity_task).

  Returns {"task", "seq_len", "documents", "tokens", "nll", "perplexity", "bits_per_byte",
  "buckets": [{"start", "end", "nll", "perplexity"}]}.
  """
  task = task or cfg.eval.perplexity_task
  seq_len = seq_len or cfg.data.seq_len
  options = dict(cfg.data.options) if cfg.data.task == task else {}
  source = lcdata.build_dataset(task, "validation", cfg.data.data_dir, **options)
  batches = lcdata.text_eval_batches(source, seq_len=seq_len, batch_size=cfg.eval.batch_size,
                                     min_length=seq_len, limit=cfg.eval.perplexity_examples)
  nll_sum = np.zeros(seq_len)
  count = np.zeros(seq_len)
  documents = 0
  for batch in batches:
    out = score(params, batch)
    mask = (batch["loss_mask"] > 0) & batch["valid"][:, None]
    nll_sum += np.sum(np.where(mask, out["nll"], 0.0), axis=0)
    count += np.sum(mask, axis=0)
    documents += int(np.sum(batch["valid"]))
  if documents == 0:
    raise ValueError(f"no validation document of {task!r} has >= seq_len={seq_len} tokens; "
                     "accepted: a smaller seq_len")
  edges = bucket_edges(seq_len, cfg.eval.position_buckets)
  buckets = []
  for lo, hi in zip(edges[:-1], edges[1:]):
    n = count[lo:hi].sum()
    nll = float(nll_sum[lo:hi].sum() / max(n, 1))
    buckets.append({"start": int(lo), "end": int(hi), "nll": nll, "perplexity": math.exp(nll)})
  nll = float(nll_sum.sum() / max(count.sum(), 1))
  return {"task": task, "seq_len": seq_len, "documents": documents, "tokens": int(count.sum()), "nll": nll,
          "perplexity": math.exp(nll), "bits_per_byte": nll / math.log(2), "buckets": buckets}


def format_table(result: dict) -> str:
  lines = [f"{result['task']} perplexity by position ({result['documents']} documents of {result['seq_len']} "
           f"tokens): overall {result['perplexity']:.3f} ({result['bits_per_byte']:.3f} bits/byte)",
           f"{'positions':>14} {'nll':>8} {'ppl':>8}"]
  for b in result["buckets"]:
    lines.append(f"{b['start']:>6d}-{b['end'] - 1:<7d} {b['nll']:>8.4f} {b['perplexity']:>8.3f}")
  return "\n".join(lines)
