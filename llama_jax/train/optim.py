"""Optimizers and learning-rate schedules of the Llama 2 recipe, built from optax.

Llama 2 paper, Sec. 2.2 and 3.1-3.2: AdamW (b1 0.9, b2 0.95, eps 1e-5), weight decay 0.1,
gradient clipping at global norm 1.0, cosine decay to 10% of the peak (SFT, reward models) or a
constant LR (PPO).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import optax

SCHEDULES = ("cosine", "constant")
# Schedule length of a dry run's optimizer (any value: the schedule does not change memory).
PLANNING_STEPS = 1000


def warmup_steps_for(opt: Mapping[str, Any], total_steps: int) -> int:
  """Warmup length: max(``warmup_steps``, ceil(``warmup_frac`` * total_steps))."""
  frac = float(opt.get("warmup_frac", 0.0))
  return max(int(opt.get("warmup_steps", 0)), -(-int(frac * total_steps * 1000) // 1000))


def make_schedule(opt: Mapping[str, Any], total_steps: int) -> optax.Schedule:
  """LR schedule from the ``optimizer`` config block.

  ``cosine``: linear warmup to ``lr`` then cosine decay to ``final_lr_ratio * lr`` at
  ``total_steps``; ``constant``: linear warmup then ``lr``.

  Raises:
    ValueError: naming the field, for an unknown schedule, a non-positive LR or total_steps.
  """
  lr = float(opt["lr"])
  if lr <= 0:
    raise ValueError(f"optimizer.lr must be > 0, got {lr}")
  if total_steps <= 0:
    raise ValueError(f"total training steps must be > 0, got {total_steps}")
  schedule = opt.get("schedule", "cosine")
  warmup = min(warmup_steps_for(opt, total_steps), total_steps)
  if schedule == "cosine":
    ratio = float(opt.get("final_lr_ratio", 0.1))
    if not 0 <= ratio <= 1:
      raise ValueError(f"optimizer.final_lr_ratio must be in [0, 1], got {ratio}")
    if warmup == 0:
      return optax.cosine_decay_schedule(lr, decay_steps=total_steps, alpha=ratio)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=ratio * lr)
  if schedule == "constant":
    if warmup == 0:
      return optax.constant_schedule(lr)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
  raise ValueError(f"optimizer.schedule must be one of {SCHEDULES}, got {schedule!r}")


def decay_mask(params) -> Any:
  """Weight decay on matrices and embeddings only, not on RMSNorm scales (path contains 'norm')."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "norm" not in jax.tree_util.keystr(path), params)


def make_optimizer(opt: Mapping[str, Any], total_steps: int) -> optax.GradientTransformation:
  """``clip_by_global_norm(grad_clip)`` then AdamW with the schedule above.

  Fields of ``opt``: lr, b1, b2, eps, weight_decay, grad_clip (0 = off), schedule, warmup_steps,
  warmup_frac, final_lr_ratio.
  """
  for name in ("b1", "b2"):
    if not 0 <= float(opt[name]) < 1:
      raise ValueError(f"optimizer.{name} must be in [0, 1), got {opt[name]}")
  if float(opt["eps"]) <= 0:
    raise ValueError(f"optimizer.eps must be > 0, got {opt['eps']}")
  if float(opt["weight_decay"]) < 0 or float(opt["grad_clip"]) < 0:
    raise ValueError("optimizer.weight_decay and optimizer.grad_clip must be >= 0")
  schedule = make_schedule(opt, total_steps)
  parts = []
  if float(opt["grad_clip"]) > 0:
    parts.append(optax.clip_by_global_norm(float(opt["grad_clip"])))
  parts.append(optax.adamw(schedule, b1=float(opt["b1"]), b2=float(opt["b2"]), eps=float(opt["eps"]),
                           weight_decay=float(opt["weight_decay"]), mask=decay_mask))
  return optax.chain(*parts)
