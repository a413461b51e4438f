"""Every sparse attention method at several budgets on a trained model, without retraining.

    python -m experiments.sparse_eval --config configs/sparse_eval.py [--config.only=quest,hip]

For each method and value of its swept option (config.methods), the trained run's ModelConfig
gets that method in config.sparse_layers (lcjax.models.attention_methods; the other layers stay
dense) and:
  * passkey accuracy, teacher-forced exactly as lcjax.eval does (every answer digit's argmax
    right), over the run's eval lengths x depths;
  * fidelity on the model's real q/k/v: the dense model's q, k, v of every sparse layer on
    passkey examples of the longest eval length, compared with dense causal attention
    (lcjax.attention.fidelity): attention recall, output relative error, the fraction of dense
    causal attention's block pairs computed ("density", what a block-sparse kernel pays) and
    the layout's block density. HyperAttention has no layout: only its output error.
Writes results.json, results.md and accuracy_vs_density.png under config.work_dir.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from lcjax import data as lcdata  # pylint: disable=wrong-import-position
from lcjax import train  # pylint: disable=wrong-import-position
from lcjax.attention import attend, fidelity, masks, to_layout  # pylint: disable=wrong-import-position
from lcjax.config import load_config_file, parse_config  # pylint: disable=wrong-import-position
from lcjax.eval import retrieval  # pylint: disable=wrong-import-position
from lcjax.eval.scoring import make_scorer  # pylint: disable=wrong-import-position
from lcjax.models import llama  # pylint: disable=wrong-import-position
from lcjax.models.probe import layer_qkv  # pylint: disable=wrong-import-position
from lcjax.models import attention_methods as am  # pylint: disable=wrong-import-position
from lcjax.sharding import make_mesh  # pylint: disable=wrong-import-position

KEYS = ("run_config", "checkpoint_dir", "work_dir", "sparse_layers", "examples_per_cell", "fidelity_examples",
        "options", "methods", "only")
METHOD_KEYS = ("field", "grid", "fixed")
SWEEPABLE = am.SPARSE_SOFTMAX_METHODS + ("hyper",)


def load_run_config(config_file: str, checkpoint_dir: str):
  """The parsed ExperimentConfig the checkpoint was trained with: config_file (a configs/*.py
  file) when given, else checkpoint_dir/config.json (written by the train loop)."""
  if not config_file:
    path = os.path.join(checkpoint_dir, "config.json")
    if not os.path.exists(path):
      raise ValueError(f"config.run_config is empty and {path} does not exist; accepted: the run's config "
                       "file, or a checkpoint_dir written by lcjax.train (with config.json)")
    with open(path, encoding="utf-8") as f:
      return parse_config(json.load(f))
  return parse_config(load_config_file(config_file))


def restore_params(run_cfg, work_dir: str):
  """(params, step) of the latest checkpoint under work_dir/checkpoints of a run trained with run_cfg."""
  tx, _ = train.make_optimizer(run_cfg.optimizer, run_cfg.train.num_steps)
  target, _ = train.abstract_state(run_cfg.model, tx, make_mesh(run_cfg.mesh), init=llama.init,
                                   param_logical_axes=llama.param_logical_axes)
  checkpointer = train.Checkpointer(os.path.join(work_dir, "checkpoints"), asynchronous=False)
  step = checkpointer.latest_step()
  if step is None:
    raise ValueError(f"config.checkpoint_dir={work_dir!r} holds no checkpoint; accepted: the work dir of a "
                     "finished training run (train it with `make quickstart`)")
  state = checkpointer.restore(step, target)
  checkpointer.close()
  return state["params"], step


def capture_qkv(params, cfg, tokens, layer: int):
  """q, k, v [B, T, H, D] (RoPE applied) that layer `layer` of the dense model attends with."""
  return layer_qkv(params, dataclasses.replace(cfg, attention="dense"), tokens, layer)


def check_config(config) -> list[str]:
  """Validates the sweep config; returns the methods to run, in config order."""
  unknown = sorted(set(config.keys()) - set(KEYS))
  if unknown:
    raise ValueError(f"config has unknown keys {unknown}; accepted: {KEYS}")
  fields = {f.name for f in dataclasses.fields(am.AttentionOptions)}
  for name, spec in config.methods.items():
    if name not in SWEEPABLE:
      raise ValueError(f"config.methods.{name}: unknown method; accepted: {SWEEPABLE}")
    bad = sorted(set(spec.keys()) - set(METHOD_KEYS))
    if bad:
      raise ValueError(f"config.methods.{name} has unknown keys {bad}; accepted: {METHOD_KEYS}")
    for field in list(spec.field.split(",")) + list(spec.fixed.keys()):
      if field not in fields:
        raise ValueError(f"config.methods.{name}: {field!r} is not an AttentionOptions field; accepted: "
                         f"{sorted(fields)}")
  only = [m for m in config.only.split(",") if m]
  missing = sorted(set(only) - set(config.methods.keys()))
  if missing:
    raise ValueError(f"config.only={config.only!r} names {missing}; accepted: {list(config.methods.keys())}")
  return [m for m in config.methods.keys() if not only or m in only]


def method_model_config(model_cfg, method: str, options: am.AttentionOptions, sparse_layers) -> object:
  """model_cfg with `method` in sparse_layers (the others unchanged) and `options`."""
  bad = [i for i in sparse_layers if not 0 <= i < model_cfg.n_layers]
  if bad:
    raise ValueError(f"config.sparse_layers={tuple(sparse_layers)}; accepted: layer indices in "
                     f"[0, {model_cfg.n_layers})")
  attention = tuple(method if i in sparse_layers else name for i, name in enumerate(model_cfg.layer_attention))
  return dataclasses.replace(model_cfg, attention=attention, attention_options=options)


def passkey_accuracy(run_cfg, model_cfg, params, mesh, examples_per_cell: int) -> dict:
  """lcjax.eval's teacher-forced passkey evaluation of params under model_cfg."""
  cfg = dataclasses.replace(run_cfg, model=model_cfg,
                            eval=dataclasses.replace(run_cfg.eval, examples_per_cell=examples_per_cell,
                                                     method="teacher_forced"))
  score = make_scorer(llama.forward, model_cfg, mesh)
  return retrieval.evaluate_retrieval("passkey", cfg, params, score)


def fidelity_tokens(run_cfg, n: int):
  """int32 [n', L] inputs of the first n passkey eval examples at the longest eval length L."""
  length = max(run_cfg.eval.lengths)
  options = retrieval.example_options("passkey", run_cfg)
  ecfg = dataclasses.replace(run_cfg, eval=dataclasses.replace(run_cfg.eval, examples_per_cell=max(
      1, -(-n // len(run_cfg.eval.depths)))))
  source = retrieval.eval_source("passkey", length, ecfg, options)
  batch = next(iter(lcdata.task_eval_batches(source, seq_len=length, batch_size=n)))
  keep = np.asarray(batch["valid"], bool)
  return jnp.asarray(np.asarray(batch["tokens"])[keep], jnp.int32)


_select_layout = jax.jit(am.select_layout, static_argnums=0, static_argnames="cfg")


def layout_of(method: str, q, k, model_cfg):
  """The BlockLayout `method` computes attention over (None for HyperAttention)."""
  o = model_cfg.attention_options
  t = q.shape[1]
  if method in ("sliding_window", "streaming"):
    window = masks.sliding_window(o.window - 1)
    sinks = 4 if o.sink_tokens is None else o.sink_tokens
    shape = window | masks.sinks(sinks) if method == "streaming" and sinks else window
    return to_layout(shape & masks.causal(), t, t, o.block_size, o.block_size)
  if method == "hyper":
    return None
  return _select_layout(method, q, k, cfg=model_cfg)


def layer_fidelity(method: str, q, k, v, model_cfg, layer: int) -> dict:
  """Fidelity of `method` against dense causal attention on one layer's q, k, v."""
  layout = layout_of(method, q, k, model_cfg)
  scale = model_cfg.head_dim ** -0.5
  if layout is not None:
    return fidelity.evaluate(q, k, v, layout, mask=masks.causal(), scale=scale)
  out = am.attention_fn_for(method)(q, k, v, cfg=model_cfg, layer=layer).astype(jnp.float32)
  dense = attend(q, k, v, mask=masks.causal(), scale=scale).astype(jnp.float32)
  err = float(jnp.linalg.norm(out - dense) / jnp.linalg.norm(dense))
  return dict(recall=float("nan"), output_error=err, flops_fraction=float("nan"), density=float("nan"))


def run(config) -> dict:
  methods = check_config(config)
  run_cfg = load_run_config(config.run_config, config.checkpoint_dir)
  params, step = restore_params(run_cfg, config.checkpoint_dir)
  mesh = make_mesh(run_cfg.mesh)
  base_options = dict(config.options)
  am.AttentionOptions(**base_options)        # fails early, naming the field
  sparse_layers = tuple(config.sparse_layers)
  tokens = fidelity_tokens(run_cfg, config.fidelity_examples)
  qkv = {layer: capture_qkv(params, run_cfg.model, tokens, layer) for layer in sparse_layers}

  rows = []

  def record(method, field, value, model_cfg):
    t0 = time.perf_counter()
    acc = passkey_accuracy(run_cfg, model_cfg, params, mesh, config.examples_per_cell)
    per_layer = {} if method == "dense" else {
        layer: layer_fidelity(method, *qkv[layer], model_cfg, layer) for layer in sparse_layers}
    mean = lambda key: float(np.mean([f[key] for f in per_layer.values()])) if per_layer else 1.0
    by_length = {}
    for length in acc["lengths"]:
      cells = [c for c in acc["cells"] if c["length"] == length]
      by_length[str(length)] = sum(c["accuracy"] * c["n"] for c in cells) / max(sum(c["n"] for c in cells), 1)
    row = dict(method=method, field=field, value=value, accuracy=acc["accuracy"], accuracy_by_length=by_length,
               n=sum(c["n"] for c in acc["cells"]), chance=acc["chance"],
               recall=mean("recall"), output_error=0.0 if method == "dense" else mean("output_error"),
               flops_fraction=mean("flops_fraction"), block_density=mean("density"),
               per_layer={str(k): v for k, v in per_layer.items()}, seconds=time.perf_counter() - t0)
    print(f"{method:>15} {field}={value}: accuracy {row['accuracy']:.3f}  density {row['flops_fraction']:.3f}  "
          f"recall {row['recall']:.3f}  output error {row['output_error']:.3g}  ({row['seconds']:.0f} s)", flush=True)
    rows.append(row)

  record("dense", "-", "-", method_model_config(run_cfg.model, "dense", am.AttentionOptions(**base_options), ()))
  for method in methods:
    spec = config.methods[method]
    fields = spec.field.split(",")
    for value in spec.grid:
      options = am.AttentionOptions(**{**base_options, **dict(spec.fixed), **{f: value for f in fields}})
      record(method, spec.field, value, method_model_config(run_cfg.model, method, options, sparse_layers))
  return dict(checkpoint_dir=config.checkpoint_dir, checkpoint_step=step, run_config=config.run_config or
              os.path.join(config.checkpoint_dir, "config.json"),
              sparse_layers=list(sparse_layers), options=base_options, eval_lengths=list(run_cfg.eval.lengths),
              fidelity_examples=int(tokens.shape[0]), fidelity_length=int(tokens.shape[1]),
              device=jax.devices()[0].device_kind, rows=rows)


def results_table(results: dict) -> str:
  """The markdown table of run()'s rows."""
  lengths = results["eval_lengths"]
  head = (["method", "swept option", "density", "block density", "recall", "output rel. error", "passkey acc."]
          + [f"acc. @{n}" for n in lengths])
  f3 = lambda x: "n/a" if x != x else f"{x:.3f}"   # NaN -> n/a
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in results["rows"]:
    option = "-" if r["method"] == "dense" else f"{r['field']}={r['value']}"
    cells = [r["method"], option, f3(r["flops_fraction"]), f3(r["block_density"]), f3(r["recall"]),
             f"{r['output_error']:.3g}", f3(r["accuracy"])] + [f3(r["accuracy_by_length"][str(n)]) for n in lengths]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(path: str, results: dict) -> None:
  """Passkey accuracy and attention recall against density, one line per method."""
  rows = results["rows"]
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
  dense = next(r for r in rows if r["method"] == "dense")
  markers = "os^vD<>ph*"
  for i, method in enumerate(dict.fromkeys(r["method"] for r in rows if r["method"] != "dense")):
    style = dict(marker=markers[i % len(markers)], ms=4, label=method)
    pts = sorted((r["flops_fraction"], r["accuracy"], r["recall"]) for r in rows if r["method"] == method)
    if all(p[0] != p[0] for p in pts):
      continue   # no layout, no density (HyperAttention): table only
    axes[0].plot([p[0] for p in pts], [p[1] for p in pts], **style)
    axes[1].plot([p[0] for p in pts], [p[2] for p in pts], **style)
  axes[0].axhline(dense["accuracy"], color="k", ls="--", lw=1, label="dense")
  axes[0].axhline(dense["chance"], color="gray", ls=":", lw=1, label="chance")
  axes[0].set(xlabel="density (fraction of dense causal block pairs computed)", ylabel="passkey accuracy",
              title=f"quickstart model, step {results['checkpoint_step']}, no retraining", ylim=(-0.02, 1.02))
  axes[1].set(xlabel="density (fraction of dense causal block pairs computed)", ylabel="attention recall",
              title=f"real q/k/v, layers {results['sparse_layers']}, length {results['fidelity_length']}")
  for ax in axes:
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_outputs(results: dict, work_dir: str) -> None:
  os.makedirs(work_dir, exist_ok=True)
  with open(os.path.join(work_dir, "results.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(work_dir, "results.md"), "w", encoding="utf-8") as f:
    f.write(f"checkpoint {results['checkpoint_dir']} step {results['checkpoint_step']}, sparse layers "
            f"{results['sparse_layers']}, options {results['options']}, device {results['device']}\n\n")
    f.write(results_table(results) + "\n")
  plot(os.path.join(work_dir, "accuracy_vs_density.png"), results)


def main(argv):
  del argv
  config = flags.FLAGS.config
  results = run(config)
  write_outputs(results, config.work_dir)
  print(results_table(results))
  print(f"wrote {config.work_dir}/results.json, results.md, accuracy_vs_density.png")


if __name__ == "__main__":
  # Defined here, not at import, so that tests can import this module beside other experiments.
  config_flags.DEFINE_config_file("config", "configs/sparse_eval.py", "Sparse-eval configuration.")
  app.run(main)
