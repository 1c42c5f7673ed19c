"""Typed sections of the settings: ``config.train``, ``config.optimizer``, ``config.eval`` (shared
by every stage) as frozen dataclasses here, each field with its default, meaning and bounds, and
the stage sections (``tokenizer``, ``data``, ``mesh``, ``annotate``, ``reward``, ``dpo``,
``rejection_sampling``, ``ppo``, ``pipeline``) in ``recipe.sections`` (above the stages whose
defaults they use): the one place they live (``configs/base.py`` builds its sections from them
with :func:`config_section`).

:func:`validate` (run by ``recipe.stages.run`` before any stage starts, with the stage sections)
reads every section into its dataclass once (:func:`read`), so a bad value fails before anything
runs, with the field named. The ml_collections config and ``--config.x=y`` overrides stay the
user interface. ``config.model`` is not one of them: its None-able overrides are checked by
``LlamaConfig`` (``train.build.model_config``).
"""

from __future__ import annotations

import dataclasses

from typing import Mapping, Optional, Type

from llama_jax.train import fields

_f, _is_int = fields._f, fields._is_int  # pylint: disable=protected-access
read, config_section, describe = fields.read, fields.config_section, fields.describe


@dataclasses.dataclass(frozen=True)
class Train:
  """``config.train``: the training loop (``train.loop``)."""

  num_epochs: float = _f(2.0, "Epochs over the training set (Llama 2 SFT: 2); used when "
                         "num_steps is 0.", lo=0.0)
  num_steps: int = _f(0, "Total optimizer steps; 0 = derived from num_epochs.", lo=0)
  stop_after_steps: int = _f(0, "Stop after this many steps in one invocation (0 = run to the "
                             "end); the next invocation resumes bitwise identically.", lo=0)
  grad_accum_steps: int = _f(1, "Microbatches per step (the batch size must be divisible by "
                             "it); PPO: per minibatch (ppo.minibatch_size / it rows at a time).",
                             lo=1)
  log_every: int = _f(10, "Log train metrics (averaged) every N steps.", lo=1)
  eval_every: int = _f(0, "Held-out evaluation every N steps (0 = only at the end).", lo=0)
  checkpoint_every: int = _f(100, "Save a checkpoint every N steps (0 = only at the end and on "
                             "SIGTERM/SIGINT).", lo=0)
  keep_checkpoints: int = _f(2, "Checkpoints kept.", lo=1)
  async_checkpoint: bool = _f(True, "Save checkpoints asynchronously.")
  checkpoint_checksums: bool = _f(True, "Write a BLAKE2b of every file into each finished "
                                  "checkpoint (process 0, ~1 GB/s) and verify it on restore: a "
                                  "damaged checkpoint is skipped for the newest intact one.")
  max_nonfinite_steps: int = _f(10, "Halt (nonzero exit) after this many consecutive steps whose "
                                "loss or gradient was NaN/Inf (each is skipped and counted as "
                                "the metric nonfinite); 0 = never halt.", lo=0)
  stop_grace_s: float = _f(300.0, "After SIGTERM/SIGINT, seconds to wait for the current step to "
                           "finish (then the run saves and exits 0); a step stuck longer ends "
                           "the process without saving (0 = wait forever).", lo=0.0)
  allow_config_change: bool = _f(False, "Resume a workdir whose config.json differs in fields "
                                 "that change the math (refused otherwise, the fields named).")


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """``config.optimizer``: AdamW with a schedule (``train.optim``; Llama 2 Sec. 2.2, 3.1)."""

  lr: float = _f(2e-5, "Peak learning rate (Llama 2 SFT: 2e-5).", lo=0.0)
  b1: float = _f(0.9, "AdamW beta1 (Llama 2: 0.9).", lo=0.0, hi=1.0, hi_ok=False)
  b2: float = _f(0.95, "AdamW beta2 (Llama 2: 0.95).", lo=0.0, hi=1.0, hi_ok=False)
  eps: float = _f(1e-5, "AdamW epsilon (Llama 2: 1e-5).", lo=0.0, lo_ok=False)
  weight_decay: float = _f(0.1, "Decoupled weight decay on matrices (not RMSNorm scales).",
                           lo=0.0)
  grad_clip: float = _f(1.0, "Gradient clipping by global norm (0 = off).", lo=0.0)
  schedule: str = _f("cosine", "cosine (decay to final_lr_ratio * lr) | constant.")
  final_lr_ratio: float = _f(0.1, "Final LR of the cosine schedule, as a share of lr.",
                             lo=0.0, hi=1.0)
  warmup_steps: int = _f(0, "Warmup: max(warmup_steps, warmup_frac * total steps).", lo=0)
  warmup_frac: float = _f(0.0, "Warmup as a share of the total steps.", lo=0.0, hi=1.0)


@dataclasses.dataclass(frozen=True)
class Eval:
  """``config.eval``: held-out evaluation during training and ``eval.py``."""

  num_batches: int = _f(0, "Held-out batches for loss/perplexity (0 = all).", lo=0)
  num_samples: int = _f(8, "Sampled completions written to <workdir>/samples/ per evaluation.",
                        lo=0)
  max_new_tokens: int = _f(48, "Token budget of evaluation samples.", lo=1)
  temperature: float = _f(0.0, "Temperature of evaluation samples (0 = greedy).", lo=0.0)
  num_prompts: int = _f(200, "Held-out prompts drawn for eval.py (distinct; on a pipeline the "
                        "prompts PPO selected its checkpoint with are left out).", lo=0)
  samples_per_prompt: int = _f(4, "eval.py on a pipeline: temperature-1 samples per prompt "
                               "(oracle _t1 metrics and the KL).", lo=1)
  bon_prompts: int = _f(64, "eval.py on a pipeline (world): prompts of the best-of-n "
                        "over-optimization curve (Gao et al. 2022; 0 = skip).", lo=0)
  bon_n: int = _f(64, "Samples per prompt of that curve.", lo=1)


SECTIONS = {"train": Train, "optimizer": Optimizer, "eval": Eval}


def validate(config, workdir: str, stage_sections: Optional[Mapping[str, Type]] = None) -> None:
  """Checks the settings, before anything runs or is written: ``workdir`` not empty,
  ``config.seed`` an int >= 0, and every section of :data:`SECTIONS` and ``stage_sections``
  (``recipe.sections.SECTIONS``) read into its dataclass
  (types and bounds of each field: see the dataclasses). Checks across fields or against files
  (divisibility, paths, the model's length) stay with each stage.

  Raises:
    ValueError: naming the first bad field (or an empty ``workdir``).
  """
  if not str(workdir).strip():
    raise ValueError("the workdir is empty: pass --workdir=<directory>")
  seed = config.get("seed", 0)
  if not _is_int(seed) or seed < 0:
    raise ValueError(f"config.seed must be an int >= 0, got {seed!r}")
  for section, cls in {**SECTIONS, **(stage_sections or {})}.items():
    read(config, section, cls)
