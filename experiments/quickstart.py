"""Quickstart: train a small byte-level Llama on passkey retrieval, evaluate it, plot, summarise.

    python -m experiments.quickstart --config configs/quickstart.py [--config.train.num_steps=...]

(without --config it runs configs/quickstart.py). On a 2-core CPU it finishes in a few minutes and
leaves under config.train.work_dir (default runs/quickstart): checkpoints/, metrics.jsonl,
tensorboard/, eval/results.json and eval/eval.png. It ends with the accuracy table (context
length x needle depth, against chance). Restarted with the same work dir, it resumes.
"""

import os
import sys
import time

T_START = time.perf_counter()

from experiments import common  # pylint: disable=wrong-import-position
from lcjax.config import load_config_file  # pylint: disable=wrong-import-position
from lcjax.eval import format_results  # pylint: disable=wrong-import-position
from lcjax.train import train  # pylint: disable=wrong-import-position

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "quickstart.py")


def embedded_config():
  return load_config_file(DEFAULT_CONFIG)


def main(argv):
  del argv
  if common.CONFIG.value is None:
    common.quiet_logs()
    cfg = common.parse_or_exit(embedded_config())
  else:
    cfg = common.load_config()
  # Datasets are built once (cached); their "custom data configuration" warnings are noise here.
  common.quiet_logs(common.logging.ERROR)
  if not {"passkey", "mqar"} & set(cfg.eval.tasks):
    sys.exit("config.eval.tasks must include 'passkey' or 'mqar' for the quickstart summary")
  result = train(cfg)
  work_dir = os.path.abspath(cfg.train.work_dir)
  wall = time.perf_counter() - T_START
  print()
  print("=" * 72)
  print(f"quickstart: {cfg.data.task}, {cfg.model.n_layers} layers x dim {cfg.model.dim}, "
        f"steps {result.start_step}..{cfg.train.num_steps}, batch {cfg.data.batch_size} x {cfg.data.seq_len}")
  if result.final_metrics:
    print(f"final train loss {result.final_metrics['train/loss']:.4f}, "
          f"{result.final_metrics['train/tokens_per_second']:.0f} tokens/s")
  print(format_results(result.eval_results))
  print(f"checkpoint: {work_dir}/checkpoints/{cfg.train.num_steps}")
  print(f"plot:       {work_dir}/eval/eval.png")
  print(f"results:    {work_dir}/eval/results.json")
  print(f"wall time:  {wall:.1f} s (training loop + eval {result.wall_seconds:.1f} s)")
  print("=" * 72)


if __name__ == "__main__":
  common.run(main, default_config=DEFAULT_CONFIG)
