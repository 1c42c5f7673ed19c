"""The stage registry: ``config.stage`` -> :class:`~llama_jax.train.stage.Stage`, and
:func:`run`, what ``train.py`` calls.

Adding a stage is one line in :data:`REGISTRY` (or :func:`register` from user code): the
stage's package holds its step and runner; ``--dry_run`` asks the stage for its
``abstract_steps``. Stages that run others get them from here (the rejection-sampling stage its
SFT fine-tune, the pipeline every sub-stage), so no stage package imports another one's runner.
"""

from __future__ import annotations

from typing import Dict

import ml_collections

from llama_jax.context_distillation import run as cd_run
from llama_jax.dpo import run as dpo_run
from llama_jax.gatt import run as gatt_run
from llama_jax.ppo import run as ppo_run
from llama_jax.raft import run as raft_run
from llama_jax.recipe import annotate, pipeline, sections
from llama_jax.rejection_sampling import run as rs_run
from llama_jax.reward import run as reward_run
from llama_jax.rrhf import run as rrhf_run
from llama_jax.sft import run as sft_run
from llama_jax.train import settings
from llama_jax.train.stage import Stage

REGISTRY: Dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
  """Add ``stage`` under ``stage.name`` (replacing a stage of that name); returns it.

  Raises:
    ValueError: if ``stage.name`` is empty.
  """
  if not stage.name:
    raise ValueError(f"{type(stage).__name__}.name is empty: a stage needs a name")
  REGISTRY[stage.name] = stage
  return stage


def get(name: str) -> Stage:
  """The stage called ``name``.

  Raises:
    ValueError: for an unknown name, listing the known ones.
  """
  if name not in REGISTRY:
    raise ValueError(f"config.stage must be one of {tuple(REGISTRY)}, got {name!r}")
  return REGISTRY[name]


def run(config, workdir: str) -> dict:
  """Run the stage named by ``config.stage`` in ``workdir``, after every section of the config
  is read into its typed dataclass (``train.settings.validate`` with ``recipe.sections``).

  Raises:
    ValueError: for a config that is not an ``ml_collections.ConfigDict`` (e.g. a config file's
      ``get_config()`` returning a dict), an unknown stage or a bad setting, before anything is
      written.
  """
  if not isinstance(config, ml_collections.ConfigDict):
    raise ValueError(f"the config must be an ml_collections.ConfigDict (get_config() of a config "
                     f"file returns one, e.g. configs/base.py), got {type(config).__name__}")
  stage = get(config.stage)
  settings.validate(config, workdir, sections.SECTIONS)
  return stage.run(config, workdir)


register(sft_run.STAGE)
register(annotate.STAGE)
register(reward_run.STAGE)
register(rs_run.RejectionSamplingStage(finetune=sft_run.STAGE))
register(ppo_run.STAGE)
register(dpo_run.STAGE)
register(raft_run.RAFTStage(rejection_sampling=REGISTRY["rejection_sampling"]))
register(rrhf_run.STAGE)
register(cd_run.ContextDistillationStage(finetune=sft_run.STAGE))
register(gatt_run.GAttStage(finetune=sft_run.STAGE))
register(pipeline.PipelineStage(run, REGISTRY))
STAGES = tuple(REGISTRY)
