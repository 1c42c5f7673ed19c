"""train.settings / recipe.sections: typed config sections (defaults in one place, bounds named)."""

import dataclasses
import glob
import importlib
import inspect
import os

import pytest

import configs
from configs import base, tiny
from llama_jax.ppo import step
from llama_jax.recipe import sections
from llama_jax.train import settings

ALL = {**settings.SECTIONS, **sections.SECTIONS}


def test_base_config_sections_are_the_dataclass_defaults():
  c = base.get_config()
  for name, cls in ALL.items():
    assert settings.read(c, name, cls) == cls()
    assert set(c[name].keys()) == {f.name for f in dataclasses.fields(cls)}


def test_read_gives_a_frozen_typed_section_with_overrides():
  c = tiny.get_config()
  c.train.num_steps = 7
  t = settings.read(c, "train", settings.Train)
  assert isinstance(t, settings.Train) and t.num_steps == 7 and isinstance(t.num_epochs, float)
  with pytest.raises(dataclasses.FrozenInstanceError):
    t.num_steps = 8


@pytest.mark.parametrize("section,field,value,match", [
    ("train", "async_checkpoint", 1, "config.train.async_checkpoint must be True or False"),
    ("optimizer", "schedule", 3, "config.optimizer.schedule must be a string"),
    ("optimizer", "eps", 0.0, r"config.optimizer.eps must be a finite number > 0.0"),
    ("optimizer", "b2", 1.0, r"config.optimizer.b2 must be a finite number in \[0.0, 1.0\)"),
    ("train", "log_every", 0, "config.train.log_every must be an int >= 1"),
    ("eval", "temperature", float("nan"), "config.eval.temperature must be a finite number"),
])
def test_bad_values_name_the_field(section, field, value, match):
  cls = ALL[section]
  with pytest.raises(ValueError, match=match):
    settings.read({section: {field: value}}, section, cls)


def test_describe_lists_every_field_with_its_meaning():
  text = settings.describe(settings.Optimizer)
  assert "lr = 2e-05: Peak learning rate" in text
  assert len(text.splitlines()) == len(dataclasses.fields(settings.Optimizer))


def _shipped_configs():
  """(name, config) of every configs/*.py (reward configs once per reward model)."""
  out = []
  for path in sorted(glob.glob(os.path.join(os.path.dirname(configs.__file__), "*.py"))):
    name = os.path.basename(path)[:-3]
    if name == "__init__":
      continue
    module = importlib.import_module(f"configs.{name}")
    if "model" in inspect.signature(module.get_config).parameters:
      out += [(f"{name}:{m}", module.get_config(m)) for m in ("helpfulness", "safety")]
    else:
      out.append((name, module.get_config()))
  return out


def test_every_section_is_typed_and_every_shipped_config_passes():
  assert set(ALL) == {"train", "optimizer", "eval", "tokenizer", "data", "mesh", "annotate",
                      "reward", "dpo", "rrhf", "raft", "context_distillation", "gatt",
                      "rejection_sampling", "ppo", "pipeline"}
  shipped = _shipped_configs()
  assert len(shipped) >= 16
  for name, c in shipped:
    settings.validate(c, "/tmp/w", sections.SECTIONS)
    assert settings.read(c, "mesh", sections.Mesh).shape == tuple(c.mesh.shape), name


def test_ppo_math_defaults_are_ppo_config_s():
  ppo, defaults = sections.PPO(), step.PPOConfig()
  for name in ("beta", "kl_estimator", "clip_eps", "value_clip", "gamma", "lam", "temperature",
               "eos_penalty", "safety_threshold", "minibatch_size", "epochs"):
    assert getattr(ppo, name) == getattr(defaults, name), name


def test_optional_and_tuple_fields():
  c = base.get_config()
  c.ppo.eos_penalty = None
  assert settings.read(c, "ppo", sections.PPO).eos_penalty is None
  c.mesh.shape = [2, -1, 1]
  assert settings.read(c, "mesh", sections.Mesh).shape == (2, -1, 1)


@pytest.mark.parametrize("section,field,value,match", [
    ("ppo", "batch_size", -1, "config.ppo.batch_size must be an int >= 1, got -1"),
    ("ppo", "kl_estimator", "k9", r"config.ppo.kl_estimator must be one of \('k1', 'k2', 'k3'\)"),
    ("ppo", "clip_eps", 1.0, r"config.ppo.clip_eps must be a finite number in \(0.0, 1.0\)"),
    ("ppo", "eos_penalty", "off", "config.ppo.eos_penalty must be None or a finite number"),
    ("mesh", "shape", (1, 0, 1), r"config.mesh.shape must be a tuple of 3 ints >= -1, none 0"),
    ("mesh", "shape", (-1, -1), "config.mesh.shape must be a tuple of 3 ints"),
    ("tokenizer", "world_vocab_size", 100, "config.tokenizer.world_vocab_size must be an int >= 300"),
    ("data", "heldout_fraction", 1.0, "config.data.heldout_fraction must be a finite number in"),
    ("data", "prompt_streams", 0, "config.data.prompt_streams must be an int >= 1"),
    ("annotate", "k", 1, "config.annotate.k must be an int >= 2"),
    ("reward", "margin", "huge", "config.reward.margin must be one of"),
    ("reward", "overlong", "cut", "config.reward.overlong must be one of"),
    ("dpo", "beta", 0.0, r"config.dpo.beta must be a finite number > 0.0"),
    ("dpo", "batch_size", 0, "config.dpo.batch_size must be an int >= 1"),
    ("rejection_sampling", "top_p", 0.0, "config.rejection_sampling.top_p must be a finite number"),
    ("rejection_sampling", "reward", "gold", "config.rejection_sampling.reward must be one of"),
    ("pipeline", "rs_iterations", -1, "config.pipeline.rs_iterations must be an int >= 0"),
    ("pipeline", "ppo", "yes", "config.pipeline.ppo must be True or False"),
])
def test_bad_stage_section_values_name_the_field(section, field, value, match):
  with pytest.raises(ValueError, match=match):
    settings.read({section: {field: value}}, section, ALL[section])
  c = tiny.get_config()
  try:
    c[section][field] = value
  except TypeError:  # ml_collections already refuses a value of another type
    return
  with pytest.raises(ValueError, match=match):
    settings.validate(c, "/tmp/w", sections.SECTIONS)
