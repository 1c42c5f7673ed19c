"""recipe.stages.run and train.settings.validate: shared settings rejected before anything is written."""

import os

import pytest

from configs import tiny
from llama_jax.recipe import stages
from llama_jax.train import settings


@pytest.mark.parametrize("field,value,match", [
    ("seed", -1, "config.seed"),
    ("train.num_steps", -3, "config.train.num_steps"),
    ("train.stop_after_steps", -1, "config.train.stop_after_steps"),
    ("train.grad_accum_steps", 0, "config.train.grad_accum_steps"),
    ("train.log_every", 0, "config.train.log_every"),
    ("train.eval_every", -5, "config.train.eval_every"),
    ("train.checkpoint_every", -1, "config.train.checkpoint_every"),
    ("train.keep_checkpoints", 0, "config.train.keep_checkpoints"),
    ("train.num_epochs", -1.0, "config.train.num_epochs"),
    ("train.num_epochs", float("nan"), "config.train.num_epochs"),
    ("optimizer.lr", -1e-3, "config.optimizer.lr"),
    ("optimizer.lr", float("inf"), "config.optimizer.lr"),
    ("optimizer.warmup_steps", -2, "config.optimizer.warmup_steps"),
    ("optimizer.warmup_frac", -0.1, "config.optimizer.warmup_frac"),
    ("optimizer.warmup_frac", 1.5, "config.optimizer.warmup_frac"),
    ("optimizer.final_lr_ratio", 2.0, "config.optimizer.final_lr_ratio"),
    ("optimizer.grad_clip", -1.0, "config.optimizer.grad_clip"),
    ("optimizer.weight_decay", -0.1, "config.optimizer.weight_decay"),
    ("optimizer.b1", 1.0, "config.optimizer.b1"),
    ("optimizer.b2", -0.5, "config.optimizer.b2"),
    ("optimizer.eps", 0.0, "config.optimizer.eps"),
    ("eval.temperature", -1.0, "config.eval.temperature"),
    ("eval.max_new_tokens", 0, "config.eval.max_new_tokens"),
    ("eval.num_prompts", -1, "config.eval.num_prompts"),
    ("eval.samples_per_prompt", 0, "config.eval.samples_per_prompt"),
])
def test_bad_shared_setting_is_rejected_before_anything_is_written(tmp_path, field, value, match):
  config = tiny.get_config()
  config.stage = "sft"
  section, _, name = field.rpartition(".")
  with config.unlocked():
    (config[section] if section else config)[name] = value
  workdir = tmp_path / "w"
  with pytest.raises(ValueError, match=match):
    stages.run(config, str(workdir))
  assert not workdir.exists()


def test_empty_workdir_is_rejected(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match="--workdir"):
    stages.run(tiny.get_config(), "")
  assert not os.listdir(tmp_path)


def test_edge_values_are_accepted():
  config = tiny.get_config()
  config.seed = 0
  config.train.num_steps, config.train.checkpoint_every, config.train.eval_every = 0, 0, 0
  config.optimizer.warmup_frac, config.optimizer.final_lr_ratio = 1.0, 0.0
  config.optimizer.lr, config.optimizer.grad_clip = 0, 0.0
  settings.validate(config, "w")


def test_unknown_stage():
  config = tiny.get_config()
  config.stage = "no_such_stage"
  with pytest.raises(ValueError, match="config.stage"):
    stages.run(config, "w")
