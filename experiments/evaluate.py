"""Evaluate a checkpoint: python -m experiments.evaluate --config configs/<file>.py [--step=N].

Restores the params of config.train.work_dir's latest (or --step) checkpoint and runs
config.eval; results and a plot go to <work_dir>/eval/.
"""

import os

from absl import flags

from experiments import common
from lcjax.eval import evaluate, format_results
from lcjax.sharding import make_mesh
from lcjax.train import Checkpointer, abstract_state, default_model_fns, make_optimizer

STEP = flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")


def restore_params(cfg, model, mesh, step=None):
  """(params, step) of a checkpoint under cfg.train.work_dir, in their training shardings."""
  ckpt = Checkpointer(os.path.join(os.path.abspath(cfg.train.work_dir), "checkpoints"), asynchronous=False)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise SystemExit(f"no checkpoint under {cfg.train.work_dir}/checkpoints; train first")
  tx, _ = make_optimizer(cfg.optimizer, cfg.train.num_steps)
  target, _ = abstract_state(cfg.model, tx, mesh, init=model.init, param_logical_axes=model.param_logical_axes)
  state = ckpt.restore(step, target)
  ckpt.close()
  return state["params"], step


def main(argv):
  del argv
  cfg = common.load_config()
  if not cfg.eval.tasks:
    raise SystemExit("config.eval.tasks is empty: nothing to evaluate")
  model = default_model_fns()
  mesh = make_mesh(cfg.mesh)
  params, step = restore_params(cfg, model, mesh, STEP.value)
  results = evaluate(cfg, params, model, work_dir=os.path.abspath(cfg.train.work_dir), step=step, mesh=mesh)
  print(format_results(results))
  print(f"results and plot: {cfg.train.work_dir}/eval/results_step{step}.json, eval_step{step}.png")


if __name__ == "__main__":
  common.run(main)
