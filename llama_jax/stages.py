"""Dispatch of ``config.stage`` to the stage runners (what ``train.py`` calls), after one check
of the settings every stage shares (:func:`validate`)."""

from __future__ import annotations

import importlib
import math

import numpy as np

STAGES = ("sft", "annotate", "reward", "rejection_sampling", "ppo", "pipeline")
_MODULES = {"sft": "sft_run", "annotate": "annotation", "reward": "reward_run",
            "rejection_sampling": "rs_run", "ppo": "ppo_run", "pipeline": "pipeline"}


# Training fields every stage shares, skipped when absent from the config.
# (section, field, lowest): ints.
_INT_FIELDS = (
    ("train", "num_steps", 0), ("train", "stop_after_steps", 0), ("train", "grad_accum_steps", 1),
    ("train", "log_every", 1), ("train", "eval_every", 0), ("train", "checkpoint_every", 0),
    ("train", "keep_checkpoints", 1), ("optimizer", "warmup_steps", 0),
    ("eval", "num_batches", 0), ("eval", "num_samples", 0), ("eval", "max_new_tokens", 1),
    ("eval", "num_prompts", 0), ("eval", "samples_per_prompt", 1), ("eval", "bon_prompts", 0),
    ("eval", "bon_n", 1))
# (section, field, lowest, highest or None, highest included): finite numbers.
_FLOAT_FIELDS = (
    ("train", "num_epochs", 0.0, None, True), ("optimizer", "lr", 0.0, None, True),
    ("optimizer", "warmup_frac", 0.0, 1.0, True), ("optimizer", "final_lr_ratio", 0.0, 1.0, True),
    ("optimizer", "grad_clip", 0.0, None, True), ("optimizer", "weight_decay", 0.0, None, True),
    ("optimizer", "b1", 0.0, 1.0, False), ("optimizer", "b2", 0.0, 1.0, False),
    ("eval", "temperature", 0.0, None, True))


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def validate(config, workdir: str) -> None:
  """Checks the settings every stage shares, before anything runs or is written.

  ``config.seed`` an int >= 0; ``config.train`` step counts and intervals ints (``num_steps``,
  ``stop_after_steps``, ``eval_every``, ``checkpoint_every`` >= 0; ``grad_accum_steps``,
  ``log_every``, ``keep_checkpoints`` >= 1); ``num_epochs`` >= 0; ``config.optimizer``: ``lr``,
  ``grad_clip``, ``weight_decay`` >= 0, ``warmup_steps`` an int >= 0, ``warmup_frac`` and
  ``final_lr_ratio`` in [0, 1], ``b1``/``b2`` in [0, 1), ``eps`` > 0, all finite;
  ``config.eval``: counts >= 0 (``max_new_tokens``, ``samples_per_prompt``, ``bon_n`` >= 1) and
  ``temperature`` >= 0 (checked here, before training, because the final evaluation uses them).
  Stage-specific fields are checked by each stage.

  Raises:
    ValueError: naming the first bad field (or an empty ``workdir``).
  """
  if not str(workdir).strip():
    raise ValueError("the workdir is empty: pass --workdir=<directory>")
  seed = config.get("seed", 0)
  if not _is_int(seed) or seed < 0:
    raise ValueError(f"config.seed must be an int >= 0, got {seed!r}")
  for section, name, lo in _INT_FIELDS:
    value = config.get(section, {}).get(name)
    if value is not None and (not _is_int(value) or value < lo):
      raise ValueError(f"config.{section}.{name} must be an int >= {lo}, got {value!r}")
  for section, name, lo, hi, hi_ok in _FLOAT_FIELDS:
    value = config.get(section, {}).get(name)
    if value is None:
      continue
    ok = (isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
          and math.isfinite(value) and value >= lo
          and (hi is None or value < hi or (hi_ok and value == hi)))
    if not ok:
      span = f">= {lo}" if hi is None else f"in [{lo}, {hi}{']' if hi_ok else ')'}"
      raise ValueError(f"config.{section}.{name} must be a finite number {span}, got {value!r}")
  eps = config.get("optimizer", {}).get("eps")
  if eps is not None and not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
    raise ValueError(f"config.optimizer.eps must be a finite number > 0, got {eps!r}")


def run(config, workdir: str) -> dict:
  """Run the stage named by ``config.stage`` in ``workdir`` (after :func:`validate`).

  Raises:
    ValueError: for an unknown stage or a bad shared setting (:func:`validate`), before anything
      is written.
  """
  stage = config.stage
  if stage not in STAGES:
    raise ValueError(f"config.stage must be one of {STAGES}, got {stage!r}")
  validate(config, workdir)
  return importlib.import_module(f"llama_jax.{_MODULES[stage]}").run(config, workdir)
