"""Sweep sparse-attention methods and budgets on q/k/v; write a table and a plot of fidelity vs compute.

    python -m experiments.fidelity_sweep --config configs/fidelity_sweep.py [--config.work_dir=...]

For every source of q/k/v (config.sources), method and budget: a layout from the method's
selector (lcjax.attention.selectors) or static mask, then lcjax.attention.fidelity's attention
recall, output relative error and fraction of FLOPs against dense causal attention. Writes
fidelity.csv, fidelity.md and fidelity.png under config.work_dir.
"""

from __future__ import annotations

import csv
import os

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

from lcjax.attention import fidelity, masks, to_layout  # pylint: disable=wrong-import-position
from lcjax.attention.selectors import (block_topk, centroid, flexprefill, hip, landmark, quest, sale,
                                       vertical_slash)  # pylint: disable=wrong-import-position

_CONFIG = config_flags.DEFINE_config_file("config", "configs/fidelity_sweep.py", "Sweep configuration.")
SOURCES = ("synthetic", "model")


def layout_for(name, q, k, budget, config):
  """The BlockLayout of method `name` at `budget` (all methods attend causally)."""
  block = dict(block_q=config.block, block_kv=config.block)
  if name == "streaming":        # StreamingLLM: one sink block and a window of `budget` blocks
    mask = (masks.sinks(config.block) | masks.sliding_window(budget * config.block - 1)) & masks.causal()
    return to_layout(mask, q.shape[1], k.shape[1], config.block, config.block, q_offset=k.shape[1] - q.shape[1])
  if name == "vertical_slash":
    return vertical_slash.select(q, k, budget, budget, **block)
  if name == "flexprefill":
    return flexprefill.select(q, k, budget, tau=config.flexprefill_tau, **block)
  if name == "centroid":
    centroids, assignments = centroid.kmeans(k, config.centroid_clusters)
    return centroid.select(q, k, centroids, assignments, budget, **block)
  topk = dict(block_topk=block_topk, quest=quest, landmark=landmark, sale=sale, hip=hip)
  if name not in topk:
    raise ValueError(f"config.methods.{name}: unknown method; accepted: streaming, vertical_slash, "
                     f"flexprefill, centroid, {', '.join(topk)}")
  return topk[name].select(q, k, budget, **block)


def synthetic_qkv(cfg, block: int):
  """Random q/k/v plus planted structure, float32 [B, T, H, D].

  Every planted query-key pair gains cfg.gain in the scaled logit (a weight e^gain times that of
  a random pair): vertical lines (key 0, the sink, and cfg.verticals random keys, seen by every
  query), slash lines (key t resembles query t + offset) and heavy blocks (a query block and an
  earlier key block share a direction).
  """
  keys = iter(jax.random.split(jax.random.key(cfg.seed), 16))
  shape_q = (cfg.batch, cfg.seq_len, cfg.q_heads, cfg.head_dim)
  shape_k = (cfg.batch, cfg.seq_len, cfg.kv_heads, cfg.head_dim)
  q, k, v = (jax.random.normal(next(keys), s) for s in (shape_q, shape_k, shape_k))
  group = cfg.q_heads // cfg.kv_heads
  # a shared direction d added to both sides adds |d|^2 / sqrt(D) = gain to the scaled logit
  shared = lambda key: jax.random.normal(key, (cfg.kv_heads, cfg.head_dim)) * (cfg.gain / cfg.head_dim ** 0.5) ** 0.5
  g = shared(next(keys))
  q_plain = q
  q = q + jnp.repeat(g, group, 0)
  columns = jnp.concatenate([jnp.zeros(1, jnp.int32),
                             jax.random.randint(next(keys), (cfg.verticals,), 1, cfg.seq_len)])
  k = k.at[:, columns].add(g)
  for offset in cfg.slash_offsets:     # q . (unit(q) * gain) / sqrt(D) ~ gain, as |q| ~ sqrt(D)
    q_dir = q_plain[:, offset:, ::group] / jnp.linalg.norm(q_plain[:, offset:, ::group], axis=-1, keepdims=True)
    k = k.at[:, :cfg.seq_len - offset].add(q_dir * cfg.gain)
  n = cfg.seq_len // block
  for key in jax.random.split(next(keys), cfg.planted_blocks):
    kq, kk, kd = jax.random.split(key, 3)
    i = int(jax.random.randint(kq, (), 1, n))
    j = int(jax.random.randint(kk, (), 0, i))
    w = shared(kd)
    q = q.at[:, i * block:(i + 1) * block].add(jnp.repeat(w, group, 0))
    k = k.at[:, j * block:(j + 1) * block].add(w)
  return q, k, v


def stdlib_tokens(batch: int, seq_len: int):
  """int32 [batch, seq_len]: bytes of the largest Python standard-library files, one per row."""
  from lcjax.data import python_stdlib, tokenizer  # pylint: disable=import-outside-toplevel
  root = python_stdlib.stdlib_dir()
  paths = sorted(python_stdlib.list_stdlib_files(root), key=lambda p: -os.path.getsize(root / p))
  rows = [tokenizer.encode((root / p).read_bytes()[:seq_len]) for p in paths[:batch]]
  return jnp.asarray(rows, jnp.int32), paths[:batch]


def capture_qkv(params, cfg, tokens, layer: int):
  """q, k, v [B, T, H, D] (RoPE applied) that layer `layer` of the Llama decoder attends with."""
  from lcjax.models.probe import layer_qkv  # pylint: disable=import-outside-toplevel
  return layer_qkv(params, cfg, tokens, layer)


def load_run_config(config_file: str):
  """The parsed ExperimentConfig of a training run's config file (e.g. configs/quickstart.py)."""
  from lcjax.config import load_config_file, parse_config  # pylint: disable=import-outside-toplevel
  return parse_config(load_config_file(config_file))


def restore_params(run_cfg, work_dir: str):
  """(params, step) of the latest checkpoint under work_dir/checkpoints of a run trained with run_cfg."""
  from lcjax import train  # pylint: disable=import-outside-toplevel
  from lcjax.models import llama  # pylint: disable=import-outside-toplevel
  from lcjax.sharding.mesh import make_mesh  # pylint: disable=import-outside-toplevel
  tx, _ = train.make_optimizer(run_cfg.optimizer, run_cfg.train.num_steps)
  target, _ = train.abstract_state(run_cfg.model, tx, make_mesh(run_cfg.mesh), init=llama.init,
                                   param_logical_axes=llama.param_logical_axes)
  checkpointer = train.Checkpointer(os.path.join(work_dir, "checkpoints"), asynchronous=False)
  step = checkpointer.latest_step()
  if step is None:
    raise ValueError(f"config.model.checkpoint.work_dir={work_dir!r} holds no checkpoint; accepted: the "
                     "work dir of a finished training run (with a checkpoints/ folder)")
  state = checkpointer.restore(step, target)
  checkpointer.close()
  return state["params"], step


def model_and_params(model_config):
  """(ModelConfig, params, description): a trained run's when model.checkpoint is set, else random init."""
  from lcjax.models import ModelConfig, init  # pylint: disable=import-outside-toplevel
  ckpt = model_config.checkpoint
  if ckpt.config_file:
    if not ckpt.work_dir:
      raise ValueError("config.model.checkpoint.work_dir is empty; accepted: the run's work dir")
    run_cfg = load_run_config(ckpt.config_file)
    params, step = restore_params(run_cfg, ckpt.work_dir)
    return run_cfg.model, params, f"trained ({ckpt.work_dir}, step {step})"
  cfg = ModelConfig(**model_config.config.to_dict())
  return cfg, init(jax.random.key(model_config.seed), cfg), f"random init (seed {model_config.seed})"


def qkv_sources(config):
  """Yields (label, q, k, v) for every configured source."""
  for source in config.sources:
    if source not in SOURCES:
      raise ValueError(f"config.sources has {source!r}; accepted: {SOURCES}")
    if source == "synthetic":
      yield "synthetic", *synthetic_qkv(config.synthetic, config.block)
    else:
      cfg, params, description = model_and_params(config.model)
      tokens, paths = stdlib_tokens(config.model.batch, config.model.seq_len)
      print(f"model source: {description}, text from {paths}")
      for layer in config.model.layers:
        yield f"model-L{layer}", *capture_qkv(params, cfg, tokens, layer)


def run(config) -> list[dict]:
  rows = []
  for label, q, k, v in qkv_sources(config):
    for name, budgets in config.methods.items():
      for budget in budgets:
        layout = layout_for(name, q, k, budget, config)
        row = dict(source=label, method=name, budget=budget,
                   **fidelity.evaluate(q, k, v, layout, mask=masks.causal()))
        print(" ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                       for key, value in row.items()), flush=True)
        rows.append(row)
  return rows


def write_outputs(rows: list[dict], work_dir: str) -> None:
  os.makedirs(work_dir, exist_ok=True)
  fields = list(rows[0])
  with open(os.path.join(work_dir, "fidelity.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
  fmt = lambda x: f"{x:.3f}" if isinstance(x, float) else str(x)
  with open(os.path.join(work_dir, "fidelity.md"), "w") as f:
    f.write("| " + " | ".join(fields) + " |\n|" + "---|" * len(fields) + "\n")
    f.writelines("| " + " | ".join(fmt(r[c]) for c in fields) + " |\n" for r in rows)
  sources = list(dict.fromkeys(r["source"] for r in rows))
  fig, axes = plt.subplots(2, len(sources), figsize=(4.5 * len(sources), 8), squeeze=False)
  for col, source in enumerate(sources):
    for method in dict.fromkeys(r["method"] for r in rows):
      pts = sorted((r["flops_fraction"], r["recall"], r["output_error"]) for r in rows
                   if r["source"] == source and r["method"] == method)
      axes[0, col].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method, ms=3)
      axes[1, col].plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=method, ms=3)
    axes[0, col].set(title=source, xlabel="fraction of dense FLOPs", ylabel="attention recall")
    axes[1, col].set(xlabel="fraction of dense FLOPs", ylabel="output relative error", yscale="log")
    for ax in axes[:, col]:
      ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(work_dir, "fidelity.png"), dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  config = _CONFIG.value
  rows = run(config)
  write_outputs(rows, config.work_dir)
  print(f"wrote {config.work_dir}/fidelity.csv, fidelity.md, fidelity.png")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
