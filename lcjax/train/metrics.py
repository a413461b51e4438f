"""Metrics to TensorBoard event files (tensorboardX, no TensorFlow) and a JSONL log.

    writer = MetricsWriter(work_dir)
    writer.write(step, {"train/loss": 2.3, ...})
    writer.close()
    read_jsonl(work_dir / "metrics.jsonl")  # [{"step": ..., "train/loss": ...}, ...], last per step

A resumed run appends; rows of steps the killed run logged after its last checkpoint are logged
again, and read_jsonl keeps the last row per (step, key).
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import tensorboardX

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:

  def __init__(self, work_dir: str | os.PathLike, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(os.fspath(work_dir), METRICS_FILE)
    if enabled:
      os.makedirs(os.fspath(work_dir), exist_ok=True)
      self.tb = tensorboardX.SummaryWriter(os.path.join(os.fspath(work_dir), "tensorboard"))
      self.jsonl = open(self.path, "a", encoding="utf-8")

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "time": time.time()}
    for k, v in scalars.items():
      v = float(np.asarray(v))
      row[k] = v if math.isfinite(v) else str(v)
      self.tb.add_scalar(k, v, int(step))
    self.jsonl.write(json.dumps(row) + "\n")
    self.jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self.tb.close()
      self.jsonl.close()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  """Rows of a metrics.jsonl sorted by step, one per step (later rows override earlier ones)."""
  by_step: dict[int, dict] = {}
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if line:
        row = json.loads(line)
        by_step.setdefault(row["step"], {}).update(row)
  return [by_step[s] for s in sorted(by_step)]
