"""train.stage: a new stage registered in the test ("SFT twice": two SFT updates per batch) runs
through the skeleton with checkpoints, resume and --dry_run, touching no other stage's code."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import convert, sharding
from llama_jax.data import input_pipeline
from llama_jax.recipe import dry_run, stages
from llama_jax.sft import step as sft
from llama_jax.train import build, optim
from llama_jax.train import stage as stage_lib
from llama_jax.train.state import StateSetup, init_params_fn
from train_helpers import tiny_sft_config


def twice_step(state, batch, rng, *, cfg, optimizer):
  """Two SFT updates on one batch (pure, jittable)."""
  state, _ = sft.train_step(state, batch, rng, cfg=cfg, optimizer=optimizer)
  return sft.train_step(state, batch, jax.random.fold_in(rng, 1), cfg=cfg, optimizer=optimizer)


class SFTTwice(stage_lib.TrainingStage):
  name = "sft_twice"

  def prepare(self, config, workdir):
    builders = build.sft_sources(config, workdir)
    tokenizer = build.tokenizer(config, workdir)
    cfg = build.model_config(config, tokenizer.vocab_size)
    steps = int(config.train.num_steps)
    optimizer = optim.make_optimizer(config.optimizer, 2 * steps)
    mesh, rules = build.mesh_and_rules(config)
    setup = StateSetup(cfg, mesh, rules, optimizer, config.seed)
    records = build.mixed_records(builders, "", "weights", config.seed)
    batches = iter(input_pipeline.sft_batches(records, tokenizer, batch_size=config.data.batch_size,
                                              max_seq_len=config.data.max_seq_len, seed=config.seed))
    init = init_params_fn(config, cfg, setup)
    return stage_lib.Run(
        cfg=cfg, total_steps=steps, batches=batches, abstract_state=setup.abstract_sharded_state(),
        step_fn=setup.jit_step(functools.partial(twice_step, cfg=cfg, optimizer=optimizer)),
        init_state=lambda: setup.fresh_state(init), put_batch=build.put_batch_fn(mesh, rules),
        desc="sft_twice", **stage_lib.intervals(config))

  def abstract_steps(self, config, mesh):
    cfg = build.planning_model_config(config)
    b, t = config.data.batch_size, config.data.max_seq_len
    batch = {k: jax.ShapeDtypeStruct((b, t), jnp.float32 if k == "loss_mask" else jnp.int32)
             for k in sft.SFT_KEYS}
    optimizer = optim.make_optimizer(config.optimizer, optim.PLANNING_STEPS)
    setup = StateSetup(cfg, mesh, sharding.DEFAULT_RULES, optimizer, config.seed)
    step = functools.partial(twice_step, cfg=cfg, optimizer=optimizer)
    return [stage_lib.plan_train_step("sft_twice", setup, step, batch, 1)]


@pytest.fixture
def registered():
  stage = stages.register(SFTTwice())
  yield stage
  del stages.REGISTRY[stage.name]


def _config(**train):
  return tiny_sft_config("sft_twice", **train)


def test_a_new_stage_runs_resumes_and_plans_through_the_skeleton(registered, tmp_path):
  straight = stages.run(_config(), str(tmp_path / "straight"))
  assert straight["finished"] and straight["steps"] == 4
  assert (tmp_path / "straight" / "result.json").exists()
  rows = [json.loads(x) for x in (tmp_path / "straight" / "logs" / "metrics.jsonl").read_text()
          .splitlines()]
  assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]

  first = stages.run(_config(stop_after_steps=2), str(tmp_path / "split"))
  assert not first["finished"] and first["steps"] == 2
  assert not (tmp_path / "split" / "final").exists()
  second = stages.run(_config(), str(tmp_path / "split"))
  assert second["finished"] and second["steps"] == 4
  _, a = convert.load_orbax(str(tmp_path / "straight" / "final"))
  _, b = convert.load_orbax(str(tmp_path / "split" / "final"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)

  plan = dry_run.plan(_config())
  assert plan["stage"] == "sft_twice" and [s["name"] for s in plan["steps"]] == ["sft_twice"]
  assert plan["steps"][0]["per_device"]["params"] > 0


def test_register_needs_a_name_and_get_names_the_known_stages():
  with pytest.raises(ValueError, match="name is empty"):
    stages.register(type("Nameless", (stage_lib.Stage,), {"run": lambda self, c, w: {}})())
  with pytest.raises(ValueError, match="config.stage must be one of"):
    stages.get("nope")
