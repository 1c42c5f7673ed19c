"""Dispatch of ``config.stage`` to the stage runners (what ``train.py`` calls)."""

from __future__ import annotations

STAGES = ("sft", "reward", "rejection_sampling", "ppo", "pipeline")
_NOT_YET = {
    "reward": "the reward-model stage (issue: Reward models)",
    "rejection_sampling": "the rejection-sampling stage (issue: Rejection sampling and PPO)",
    "ppo": "the PPO stage (issue: Rejection sampling and PPO)",
    "pipeline": "the full pipeline (issue: Rejection sampling and PPO)",
}


def run(config, workdir: str) -> dict:
  """Run the stage named by ``config.stage`` in ``workdir``.

  Raises:
    ValueError: for an unknown stage. NotImplementedError: for a stage not built yet.
  """
  stage = config.stage
  if stage not in STAGES:
    raise ValueError(f"config.stage must be one of {STAGES}, got {stage!r}")
  if stage == "sft":
    from llama_jax import sft_run  # pylint: disable=import-outside-toplevel
    return sft_run.run(config, workdir)
  raise NotImplementedError(f"config.stage={stage!r}: {_NOT_YET[stage]} is not implemented yet")
