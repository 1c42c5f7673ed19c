"""train.settings: typed train / optimizer / eval sections (defaults in one place, bounds named)."""

import dataclasses

import pytest

from configs import base, tiny
from llama_jax.train import settings


def test_base_config_sections_are_the_dataclass_defaults():
  c = base.get_config()
  for name, cls in settings.SECTIONS.items():
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
  cls = settings.SECTIONS[section]
  with pytest.raises(ValueError, match=match):
    settings.read({section: {field: value}}, section, cls)


def test_describe_lists_every_field_with_its_meaning():
  text = settings.describe(settings.Optimizer)
  assert "lr = 2e-05: Peak learning rate" in text
  assert len(text.splitlines()) == len(dataclasses.fields(settings.Optimizer))
