"""Dispatch of ``config.stage`` to the stage runners (what ``train.py`` calls)."""

from __future__ import annotations

import importlib

STAGES = ("sft", "annotate", "reward", "rejection_sampling", "ppo", "pipeline")
_MODULES = {"sft": "sft_run", "annotate": "annotation", "reward": "reward_run",
            "rejection_sampling": "rs_run", "ppo": "ppo_run", "pipeline": "pipeline"}


def run(config, workdir: str) -> dict:
  """Run the stage named by ``config.stage`` in ``workdir``.

  Raises:
    ValueError: for an unknown stage.
  """
  stage = config.stage
  if stage not in STAGES:
    raise ValueError(f"config.stage must be one of {STAGES}, got {stage!r}")
  return importlib.import_module(f"llama_jax.{_MODULES[stage]}").run(config, workdir)
