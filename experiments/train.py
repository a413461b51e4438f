"""Train any config: python -m experiments.train --config configs/<file>.py [--config.a.b=value].

Resumes from the latest checkpoint in config.train.work_dir; evaluates at the end (and every
config.train.eval_every steps) when config.eval.tasks is non-empty.
"""

from experiments import common
from lcjax.eval import format_results
from lcjax.train import train


def main(argv):
  del argv
  cfg = common.load_config()
  result = train(cfg)
  print(f"trained steps {result.start_step}..{cfg.train.num_steps} in {result.wall_seconds:.1f} s; "
        f"work dir {cfg.train.work_dir}")
  if result.final_metrics:
    print("final train metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in result.final_metrics.items()))
  if result.eval_results:
    print(format_results(result.eval_results))


if __name__ == "__main__":
  common.run(main)
