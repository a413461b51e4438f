"""Every KV-cache policy at several budgets: passkey accuracy by depth x length, perplexity,
memory and decode time, on the trained quickstart model.

    python -m experiments.evaluate_caches --config configs/evaluate_caches.py

For each (policy, value) a CacheConfig builds one cache per layer (lcjax.cache.make_caches). A
sequence is teacher-forced through the model, writing to and reading from the caches as generate()
does: prefilled in chunks of config.chunk tokens (the caches compress as they go), then its last
config.decode_tail or more tokens (the passkey answer among them) decoded one at a time, so a
query sees only what the policy kept; the same per-token scores as lcjax.eval give passkey accuracy (exact
match of the answer, by length and needle depth) and perplexity. Memory is the sum over layers of
memory_bytes() for one sequence of the evaluation length; decode time is the median of jitted
one-token steps after a prefill. Two perplexities: over the passkey examples' text (the quickstart
model's own domain) and over Python standard-library source (lcjax.eval's default, out of domain
for a model trained on passkey only). Writes results.json, results.md and heatmaps.png to work_dir.
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
import optax  # pylint: disable=wrong-import-position

from lcjax.cache import CacheConfig, make_caches  # pylint: disable=wrong-import-position
from lcjax.config import parse_config  # pylint: disable=wrong-import-position
from lcjax.eval import perplexity, plots, retrieval  # pylint: disable=wrong-import-position
from lcjax.models import llama  # pylint: disable=wrong-import-position
from lcjax.models.retrieval_heads import find_retrieval_heads  # pylint: disable=wrong-import-position

KEYS = ("experiment", "checkpoint_dir", "train_if_missing", "work_dir", "chunk", "examples_per_cell",
        "perplexity_examples", "decode_steps", "decode_tail", "policies", "only", "retrieval_head_probe")


def resolve_retrieval_heads(fixed: dict, params, model_cfg, probe: dict) -> dict:
  """fixed CacheConfig fields with retrieval_heads="detect" replaced by the heads RazorAttention's
  echo / induction probe finds in the model (lcjax.models.retrieval_heads; probe: its options)."""
  if fixed.get("retrieval_heads") != "detect":
    return fixed
  heads = find_retrieval_heads(params, model_cfg, jax.random.key(0), **probe)
  print(f"retrieval heads (per layer, KV heads): {heads}", flush=True)
  return {**fixed, "retrieval_heads": heads}


def load_params(cfg, checkpoint_dir: str, train_if_missing: bool):
  """The latest checkpoint's params under checkpoint_dir (training the experiment there first if
  there is none and train_if_missing)."""
  from lcjax.train.checkpoint import Checkpointer, abstract_like  # pylint: disable=import-outside-toplevel
  from lcjax.train.loop import default_model_fns, train  # pylint: disable=import-outside-toplevel
  from lcjax.train.optimizer import make_optimizer  # pylint: disable=import-outside-toplevel
  from lcjax.train.state import init_state  # pylint: disable=import-outside-toplevel
  from lcjax.sharding import make_mesh  # pylint: disable=import-outside-toplevel
  ckpt = Checkpointer(os.path.join(checkpoint_dir, "checkpoints"), asynchronous=False)
  if ckpt.latest_step() is None:
    if not train_if_missing:
      raise ValueError(f"config.checkpoint_dir={checkpoint_dir!r} has no checkpoint; train the quickstart "
                       "there or set config.train_if_missing=True")
    train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, work_dir=checkpoint_dir),
                              eval=dataclasses.replace(cfg.eval, tasks=())))
    ckpt = Checkpointer(os.path.join(checkpoint_dir, "checkpoints"), asynchronous=False)
  model = default_model_fns()
  tx, _ = make_optimizer(cfg.optimizer, cfg.train.num_steps)
  state, _ = init_state(jax.random.key(0), cfg.model, tx, make_mesh(cfg.mesh), init=model.init,
                        param_logical_axes=model.param_logical_axes)
  step = ckpt.latest_step()
  return ckpt.restore(step, abstract_like(state))["params"], step


def new_caches(cache_cfg: CacheConfig, model_cfg, batch: int, capacity: int):
  return make_caches(cache_cfg, num_layers=model_cfg.n_layers, kv_heads=model_cfg.n_kv_heads,
                     head_dim=model_cfg.head_dim, batch=batch, capacity=capacity, dtype=model_cfg.compute_dtype)


def make_cached_scorer(model_cfg, cache_cfg: CacheConfig, chunk: int, decode_tail: int):
  """score(params, batch) -> {"nll", "correct"} [B, T], teacher-forced through the caches.

  The first tokens (a whole number of chunks, leaving at least decode_tail) are prefilled in
  chunks of `chunk`; the rest are decoded one token at a time, as generate() would (the passkey
  answer must lie in that decoded tail: a ValueError says so otherwise).
  """

  def forward_through(params, tokens, caches, starts, width):
    b = tokens.shape[0]

    def step(caches, start):
      toks = jax.lax.dynamic_slice_in_dim(tokens, start, width, axis=1)
      positions = jnp.broadcast_to(start + jnp.arange(width, dtype=jnp.int32), (b, width))
      logits, caches = llama.forward(params, toks, positions, caches, cfg=model_cfg)
      return caches, logits.astype(jnp.float32)

    caches, logits = jax.lax.scan(step, caches, starts)
    return caches, jnp.moveaxis(logits, 0, 1).reshape(b, -1, logits.shape[-1])

  @jax.jit
  def score(params, tokens, targets):
    b, t = tokens.shape
    prefill = max(t - decode_tail, 0) // chunk * chunk
    caches = new_caches(cache_cfg, model_cfg, b, -(-t // 64) * 64)
    caches, head = forward_through(params, tokens, caches, jnp.arange(0, prefill, chunk, dtype=jnp.int32), chunk)
    _, tail = forward_through(params, tokens, caches, jnp.arange(prefill, t, dtype=jnp.int32), 1)
    logits = jnp.concatenate([head, tail], 1)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return {"nll": nll, "correct": jnp.argmax(logits, -1) == targets}

  def run(params, batch):
    tokens, targets = (np.asarray(batch[k], np.int32) for k in ("tokens", "targets"))
    t = tokens.shape[1]
    if "loss_mask" in batch and "answer_start" in batch:
      first_decoded = max(t - decode_tail, 0) // chunk * chunk
      if np.any((np.asarray(batch["loss_mask"]) > 0)[:, :first_decoded]):
        raise ValueError(f"config.decode_tail={decode_tail}: answers start before the decoded tail "
                         f"(position {first_decoded}); use a longer tail")
    out = score(params, tokens, targets)
    return {k: np.asarray(v) for k, v in out.items()}

  return run


class InDomainNLL:
  """Wraps a scorer; accumulates the NLL of every real token of the passkey examples scored."""

  def __init__(self, score):
    self.score, self.nll, self.count = score, 0.0, 0

  def __call__(self, params, batch):
    out = self.score(params, batch)
    real = (np.asarray(batch["segment_ids"]) > 0) & np.asarray(batch["valid"])[:, None]
    self.nll += float(np.sum(np.where(real, out["nll"], 0.0)))
    self.count += int(real.sum())
    return out

  @property
  def perplexity(self) -> float:
    return float(np.exp(self.nll / max(self.count, 1)))


def decode_ms(params, model_cfg, cache_cfg: CacheConfig, prompt_len: int, steps: int, chunk: int) -> float:
  """Median wall time (ms) of one jitted decode step (batch 1) after a prefill of prompt_len tokens."""
  caches = new_caches(cache_cfg, model_cfg, 1, -(-(prompt_len + steps) // 64) * 64)
  fwd = jax.jit(lambda p, tok, pos, c: llama.forward(p, tok, pos, c, cfg=model_cfg))
  rng = np.random.default_rng(0)
  for s in range(0, prompt_len, chunk):
    toks = jnp.asarray(rng.integers(0, 256, (1, chunk)), jnp.int32)
    _, caches = fwd(params, toks, jnp.arange(s, s + chunk, dtype=jnp.int32)[None], caches)
  times = []
  for s in range(steps):
    pos = prompt_len + s
    t0 = time.perf_counter()
    logits, caches = fwd(params, jnp.asarray([[65]], jnp.int32), jnp.asarray([[pos]], jnp.int32), caches)
    logits.block_until_ready()
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times[1:]))           # the first step compiles


def evaluate_one(cfg, params, cache_cfg: CacheConfig, config) -> dict:
  score = make_cached_scorer(cfg.model, cache_cfg, config.chunk, config.decode_tail)
  in_domain = InDomainNLL(score)
  passkey = retrieval.evaluate_retrieval("passkey", cfg, params, in_domain)
  ppl = perplexity.evaluate_perplexity(cfg, params, score)
  ppl["passkey_text_perplexity"] = in_domain.perplexity
  length = max(cfg.eval.lengths)
  dense = sum(c.memory_bytes() for c in new_caches(CacheConfig(), cfg.model, 1, length))
  memory = sum(c.memory_bytes() for c in new_caches(cache_cfg, cfg.model, 1, length))
  return {"passkey": passkey, "perplexity": ppl, "memory_bytes": memory, "memory_vs_dense": memory / dense,
          "decode_ms": decode_ms(params, cfg.model, cache_cfg, length // config.chunk * config.chunk - config.chunk,
                                 config.decode_steps, config.chunk)}


def results_table(rows: list[dict]) -> str:
  lines = ["| policy | setting | passkey acc | passkey-text ppl | stdlib ppl | memory (KiB) | vs dense | "
           "decode ms/step |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['policy']} | {r['field']}={r['value']} | {r['passkey']['accuracy']:.3f} | "
                 f"{r['perplexity']['passkey_text_perplexity']:.3f} | {r['perplexity']['perplexity']:.4g} | "
                 f"{r['memory_bytes'] / 1024:.1f} | "
                 f"{r['memory_vs_dense']:.2f} | {r['decode_ms']:.2f} |")
  return "\n".join(lines)


def plot_heatmaps(path: str, rows: list[dict]) -> None:
  cols = 4
  n = len(rows)
  fig, axes = plt.subplots(-(-n // cols), cols, figsize=(4.2 * cols, 3.2 * -(-n // cols)), squeeze=False)
  for ax, r in zip(axes.flat, rows):
    plots.plot_accuracy_heatmap(ax, r["passkey"])
    ax.set_title(f"{r['policy']} {r['field']}={r['value']}: {r['passkey']['accuracy']:.2f}", fontsize=9)
  for ax in list(axes.flat)[n:]:
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run(config) -> list[dict]:
  """Evaluates every (policy, value) of config; writes results.json (as it goes), results.md and
  heatmaps.png to config.work_dir and returns the rows."""
  unknown = sorted(set(config.keys()) - set(KEYS))
  if unknown:
    raise ValueError(f"config has unknown keys {unknown}; accepted: {KEYS}")
  cfg = parse_config(config.experiment)
  cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, examples_per_cell=config.examples_per_cell,
                                                          perplexity_examples=config.perplexity_examples))
  only = [p for p in config.only.split(",") if p] if config.only else list(config.policies)
  unknown = sorted(set(only) - set(config.policies))
  if unknown:
    raise ValueError(f"config.only names {unknown}, not in config.policies ({sorted(config.policies)})")
  params, step = load_params(cfg, config.checkpoint_dir, config.train_if_missing)
  os.makedirs(config.work_dir, exist_ok=True)
  rows = []
  for policy in only:                                 # in the order given
    field, values, fixed = config.policies[policy]
    fixed = resolve_retrieval_heads(dict(fixed), params, cfg.model, dict(config.retrieval_head_probe))
    for value in values:
      # The swept field may be `policy` itself (the dense reference row).
      cache_cfg = CacheConfig(**{"policy": policy, "max_chunk": config.chunk, **fixed, field: value})
      t0 = time.perf_counter()
      r = evaluate_one(cfg, params, cache_cfg, config)
      rows.append({"policy": policy, "field": field, "value": value, "cache_config": dataclasses.asdict(cache_cfg),
                   **r})
      print(f"{policy:10s} {field}={value}: passkey {r['passkey']['accuracy']:.3f} ppl "
            f"{r['perplexity']['passkey_text_perplexity']:.3f} / {r['perplexity']['perplexity']:.4g} mem {r['memory_vs_dense']:.2f}x decode {r['decode_ms']:.2f} ms "
            f"({time.perf_counter() - t0:.0f} s)", flush=True)
      with open(os.path.join(config.work_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"checkpoint_step": step, "chunk": config.chunk, "device": jax.devices()[0].device_kind,
                   "rows": rows}, f, indent=1, default=str)
  table = results_table(rows)
  with open(os.path.join(config.work_dir, "results.md"), "w", encoding="utf-8") as f:
    f.write(f"checkpoint step {step}, chunk {config.chunk}, device {jax.devices()[0].device_kind}\n\n{table}\n")
  plot_heatmaps(os.path.join(config.work_dir, "heatmaps.png"), rows)
  print(table)
  return rows


def main(argv):
  del argv
  run(flags.FLAGS.config)


if __name__ == "__main__":
  # Defined here, not at import, so that tests can import this module beside other experiments.
  config_flags.DEFINE_config_file("config", "configs/evaluate_caches.py", "Evaluation configuration.")
  app.run(main)
