"""KV-cache evaluation: every policy at several budgets on the trained quickstart model.

    python -m experiments.evaluate_caches --config configs/evaluate_caches.py \
        [--config.checkpoint_dir=runs/quickstart] [--config.chunk=1]

`experiment` is the quickstart config (model, data, eval); its checkpoint is read from
checkpoint_dir (trained there first when train_if_missing). Each entry of `policies` is
policy -> (name of the swept CacheConfig field, values, other CacheConfig fields);
retrieval_heads="detect" takes RazorAttention's echo/induction probe's heads on the loaded model.
"""

import ml_collections

from configs import quickstart


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.experiment = quickstart.get_config()
  c.experiment.train.progress_bar = False
  c.checkpoint_dir = "runs/quickstart"
  c.train_if_missing = True
  c.work_dir = "runs/evaluate_caches"
  # Prefill chunk (tokens per update; the evicting caches hold budget + chunk while prefilling),
  # and the tokens at the end of each sequence decoded one at a time (the passkey answer's).
  c.chunk = 32
  c.decode_tail = 16
  c.examples_per_cell = 16
  c.perplexity_examples = 32
  c.decode_steps = 16                   # timed decode steps per configuration
  # Policies to run, in this order (a ConfigDict iterates its keys sorted); "" = all of them.
  c.only = "dense,streaming,h2o,snapkv,tova,pyramidkv,razor,kivi,kivi_kernel,gear,mikv,think,quest,landmark,merge,window"
  budgets = (16, 32, 64)
  c.policies = dict(
      dense=("policy", ("dense",), dict()),     # the full cache, for reference
      window=("budget", budgets, dict()),
      streaming=("budget", budgets, dict(sinks=4)),
      h2o=("budget", budgets, dict(window=8)),
      tova=("budget", budgets, dict()),
      snapkv=("budget", budgets, dict(obs_window=8, pool_kernel=7)),
      pyramidkv=("budget", budgets, dict(obs_window=8, pool_kernel=7)),
      razor=("window", (12, 28, 60), dict(sinks=4, retrieval_heads="detect")),
      think=("channel_keep", (0.25, 0.5, 0.75), dict(obs_window=8)),
      kivi=("bits", (8, 4, 2), dict(group_size=16, residual=16)),
      kivi_kernel=("bits", (8, 4), dict(group_size=16, residual=16)),
      gear=("bits", (4, 2), dict(group_size=16, residual=16, rank=2)),
      mikv=("budget", budgets, dict(window=8, bits=2, group_size=16)),
      merge=("merge_threshold", (0.95, 0.9, 0.8), dict()),
      quest=("top_blocks", (1, 2, 4), dict(block_size=16)),
      landmark=("top_blocks", (1, 2, 4), dict(block_size=16)),
  )
  # RazorAttention's probe for retrieval_heads="detect" (lcjax.models.retrieval_heads): the paper's
  # 15 % induction + 1 % echo heads, on a repeated random probe of byte tokens.
  c.retrieval_head_probe = dict(induction_fraction=0.15, echo_fraction=0.01, probe_len=64, batch=4, low=0, high=256)
  return c
