"""The training loop: sharded init or resume, jitted steps, metrics, checkpoints, evaluation.

    train(cfg)   # cfg: lcjax.config.ExperimentConfig

Everything goes under cfg.train.work_dir: config.json (the resolved config), metrics.jsonl and
tensorboard/ (metrics), checkpoints/<step>/ (orbax: state + data iterator position), eval/
(evaluation results and plots). Started again with the same work_dir, it resumes from the latest
checkpoint: parameters, optimizer state, step and the data iterator's position are restored, so
the finished run matches an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
import tqdm

from lcjax.config import ConfigError, ExperimentConfig, to_dict
from lcjax.sharding import batch_sharding, make_mesh, replicated
from lcjax.train.checkpoint import Checkpointer
from lcjax.train.metrics import MetricsWriter
from lcjax.train.optimizer import make_optimizer
from lcjax.train.state import abstract_state, init_state
from lcjax.train.step import BATCH_KEYS, jit_train_step, train_step


class ModelFns(NamedTuple):
  """The model functions the loop needs (lcjax.models' by default; tests pass small ones).

  generate is optional: evaluation with config.eval.method="greedy" needs it.
  """
  init: Callable
  forward: Callable
  param_logical_axes: Callable
  generate: Callable | None = None


def default_model_fns() -> ModelFns:
  from lcjax import models  # pylint: disable=import-outside-toplevel
  from lcjax.models.generate import generate  # pylint: disable=import-outside-toplevel
  return ModelFns(models.init, models.forward, models.param_logical_axes, generate)


def default_train_iterator(cfg: ExperimentConfig):
  from lcjax.train.data import make_train_iterator  # pylint: disable=import-outside-toplevel
  return make_train_iterator(cfg)


def place_batch(batch: dict, sharding) -> dict:
  """Host numpy rows of this process -> global jax.Arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k], np.int32) if k != "loss_mask"
                                                    else np.asarray(batch[k], np.float32))
          for k in BATCH_KEYS}


def check_config(cfg: ExperimentConfig, *, check_data: bool = True) -> None:
  """What parse_config cannot check alone, raised as ConfigError naming the key's path before any
  model code runs: the schedule's warm-up against its decay length and, with check_data, the
  options of an in-repo dataset (checked by its builder's config factory; nothing is built)."""
  from lcjax import data as lcdata  # pylint: disable=import-outside-toplevel
  try:
    make_optimizer(cfg.optimizer, cfg.train.num_steps)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  if not check_data:
    return
  extra = sorted(set(cfg.data.options) - {"text_key"})
  if cfg.data.task not in lcdata.TASKS and extra:
    raise ConfigError(f"config.data.task={cfg.data.task!r} is not an lcjax dataset, and a TFDS catalog dataset "
                      f"takes no config.data.options {extra}; accepted: task one of {lcdata.TASKS}, or a "
                      "catalog name with options {text_key} only")
  if cfg.data.task in lcdata.TASKS:
    try:
      lcdata.task_config(cfg.data.task, **dict(cfg.data.options))
    except (ValueError, TypeError) as e:
      raise ConfigError(f"config.data.options (task={cfg.data.task!r}): {e}") from e


def write_config(cfg: ExperimentConfig, work_dir: str) -> None:
  with open(os.path.join(work_dir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(to_dict(cfg), f, indent=2, default=str)


@dataclasses.dataclass
class TrainResult:
  state: dict
  start_step: int          # the step training (re)started from: 0, or the restored checkpoint's
  final_metrics: dict      # the last logged train metrics (host floats)
  eval_results: dict | None
  wall_seconds: float


def train(cfg: ExperimentConfig, *, model: ModelFns | None = None,
          make_train_iter: Callable[[ExperimentConfig], Any] | None = None,
          evaluate: Callable | None = None) -> TrainResult:
  """Trains cfg.model on cfg.data for cfg.train.num_steps optimizer steps (resuming if possible).

  evaluate(cfg, params, model, work_dir=, step=, writer=) -> dict, run every cfg.train.eval_every
  steps and at the end when cfg.eval.tasks is non-empty (default lcjax.eval.evaluate).
  """
  t_start = time.perf_counter()
  check_config(cfg, check_data=make_train_iter is None)
  model = model or default_model_fns()
  make_train_iter = make_train_iter or default_train_iterator
  if evaluate is None and cfg.eval.tasks:
    from lcjax.eval import evaluate  # pylint: disable=import-outside-toplevel
  tc = cfg.train
  work_dir = os.path.abspath(tc.work_dir)
  os.makedirs(work_dir, exist_ok=True)
  is_main = jax.process_index() == 0
  if is_main:
    write_config(cfg, work_dir)

  mesh = make_mesh(cfg.mesh)
  tx, schedule = make_optimizer(cfg.optimizer, tc.num_steps)
  data_iter = make_train_iter(cfg)
  ckpt = Checkpointer(os.path.join(work_dir, "checkpoints"), keep=tc.keep_checkpoints,
                      asynchronous=tc.async_checkpointing)
  if ckpt.latest_step() is None:
    state, shardings = init_state(jax.random.key(tc.seed), cfg.model, tx, mesh, init=model.init,
                                  param_logical_axes=model.param_logical_axes)
  else:  # resume: params, optimizer state, step and the data iterator's position
    target, shardings = abstract_state(cfg.model, tx, mesh, init=model.init,
                                       param_logical_axes=model.param_logical_axes)
    state = ckpt.restore(ckpt.latest_step(), target, data_iter)
  start_step = int(state["step"])

  step_fn = jit_train_step(
      functools.partial(train_step, forward=model.forward, model_cfg=cfg.model, tx=tx, schedule=schedule,
                        accum=cfg.optimizer.grad_accum_steps),
      shardings, batch_sharding(mesh), replicated(mesh))
  in_sharding = batch_sharding(mesh)
  writer = MetricsWriter(work_dir, enabled=is_main)
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  final_metrics: dict = {}
  eval_results = None

  def run_eval(step):
    return evaluate(cfg, state["params"], model, work_dir=work_dir, step=step, writer=writer)

  bar = tqdm.tqdm(total=tc.num_steps, initial=start_step, disable=not (tc.progress_bar and is_main),
                  desc="train", dynamic_ncols=True)
  t_log, steps_since_log = time.perf_counter(), 0
  try:
    for step in range(start_step, tc.num_steps):
      batch = place_batch(next(data_iter), in_sharding)
      state, metrics = step_fn(state, batch)
      done = step + 1
      steps_since_log += 1
      bar.update(1)
      if done % tc.log_every == 0 or done == tc.num_steps:
        metrics = {f"train/{k}": float(v) for k, v in jax.device_get(metrics).items()}
        elapsed = time.perf_counter() - t_log
        metrics["train/steps_per_second"] = steps_since_log / elapsed
        metrics["train/tokens_per_second"] = steps_since_log * tokens_per_step / elapsed
        writer.write(done, metrics)
        bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", acc=f"{metrics['train/token_accuracy']:.3f}")
        final_metrics = metrics
        t_log, steps_since_log = time.perf_counter(), 0
      if done % tc.checkpoint_every == 0 or done == tc.num_steps:
        ckpt.save(done, state, data_iter)
      if evaluate is not None and tc.eval_every and done % tc.eval_every == 0 and done != tc.num_steps:
        run_eval(done)
        t_log, steps_since_log = time.perf_counter(), 0
    bar.close()
    ckpt.wait()
    if evaluate is not None:
      eval_results = run_eval(int(state["step"]))
  finally:
    ckpt.close()
    writer.close()
  return TrainResult(state=state, start_step=start_step, final_metrics=final_metrics,
                     eval_results=eval_results, wall_seconds=time.perf_counter() - t_start)
