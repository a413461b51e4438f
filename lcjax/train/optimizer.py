"""AdamW with linear warm-up and cosine decay, global-norm clipping (optax)."""

from __future__ import annotations

import jax
import optax


def make_schedule(opt_cfg, num_steps: int) -> optax.Schedule:
  """0 -> learning_rate linearly over warmup_steps, then cosine to learning_rate * min_lr_ratio.

  The cosine ends at opt_cfg.decay_steps (counted from step 0, warm-up included), default
  num_steps; after it the rate stays at its end value.
  """
  decay_steps = opt_cfg.decay_steps or num_steps
  if opt_cfg.warmup_steps >= decay_steps:
    raise ValueError(f"config.optimizer.warmup_steps={opt_cfg.warmup_steps} must be < the decay length "
                     f"{decay_steps} (config.optimizer.decay_steps or config.train.num_steps)")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt_cfg.learning_rate, warmup_steps=opt_cfg.warmup_steps,
      decay_steps=decay_steps, end_value=opt_cfg.learning_rate * opt_cfg.min_lr_ratio)


def decay_mask(params):
  """Weight decay on matrices only: not on norm scales or biases (vectors)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(opt_cfg, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer of config.optimizer and its learning-rate schedule (for logging)."""
  schedule = make_schedule(opt_cfg, num_steps)
  parts = []
  if opt_cfg.clip_norm is not None:
    parts.append(optax.clip_by_global_norm(opt_cfg.clip_norm))
  parts.append(optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                           weight_decay=opt_cfg.weight_decay, mask=decay_mask))
  return optax.chain(*parts), schedule
