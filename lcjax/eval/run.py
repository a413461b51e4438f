"""evaluate(): every evaluation of config.eval on a set of params, written under the work dir.

Writes <work_dir>/eval/results_step<N>.json and <work_dir>/eval/eval_step<N>.png (plus
results.json / eval.png copies of the latest), logs eval/... scalars, and returns the results.
"""

from __future__ import annotations

import json
import os
import shutil

from lcjax.eval import perplexity, plots, retrieval
from lcjax.eval.scoring import make_greedy_answerer, make_scorer
from lcjax.sharding import make_mesh
from lcjax.train.metrics import METRICS_FILE, read_jsonl


def evaluate(cfg, params, model, *, work_dir: str, step: int, writer=None, mesh=None) -> dict:
  """Runs config.eval.tasks ("passkey", "mqar", "perplexity") on params; returns {task: result}."""
  mesh = mesh or make_mesh(cfg.mesh)
  score = make_scorer(model.forward, cfg.model, mesh)
  generate = getattr(model, "generate", None)
  answer = make_greedy_answerer(generate, cfg.model, mesh) if generate is not None else None
  results = {}
  for task in cfg.eval.tasks:
    if task == "perplexity":
      results[task] = perplexity.evaluate_perplexity(cfg, params, score)
    else:
      results[task] = retrieval.evaluate_retrieval(task, cfg, params, score, answer)
  scalars = {}
  for task, r in results.items():
    if task == "perplexity":
      scalars.update({"eval/perplexity": r["perplexity"], "eval/bits_per_byte": r["bits_per_byte"]})
    else:
      scalars[f"eval/{task}/accuracy"] = r["accuracy"]
      scalars[f"eval/{task}/query_accuracy"] = r["query_accuracy"]
      for length in r["lengths"]:
        cell = [c for c in r["cells"] if c["length"] == length]
        scalars[f"eval/{task}/accuracy_len{length}"] = sum(c["accuracy"] * c["n"] for c in cell) / max(
            sum(c["n"] for c in cell), 1)
  if writer is not None:
    writer.write(step, scalars)
  out_dir = os.path.join(work_dir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  json_path = os.path.join(out_dir, f"results_step{step}.json")
  with open(json_path, "w", encoding="utf-8") as f:
    json.dump({"step": step, "results": results}, f, indent=2)
  png_path = plots.plot_run(os.path.join(out_dir, f"eval_step{step}.png"),
                            train_rows=read_jsonl(os.path.join(work_dir, METRICS_FILE)), results=results,
                            title=f"{os.path.basename(os.path.normpath(work_dir))} at step {step}")
  shutil.copyfile(json_path, os.path.join(out_dir, "results.json"))
  shutil.copyfile(png_path, os.path.join(out_dir, "eval.png"))
  return results


def format_results(results: dict) -> str:
  """The summary tables of evaluate()'s results."""
  parts = []
  for task, r in results.items():
    parts.append(perplexity.format_table(r) if task == "perplexity" else retrieval.format_table(r))
  return "\n\n".join(parts)
