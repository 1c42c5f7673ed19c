"""Helpers for tests that run train.py / eval.py in subprocesses on a tiny world config, or a
stage in process (:func:`tiny_sft_config`)."""

import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import tiny
from llama_jax import convert
from llama_jax.config import LlamaConfig
from llama_jax.data import world, world_tokenizer
from llama_jax.model import init_params
from llama_jax.tokenizer import Tokenizer
from llama_jax.reward import step as reward

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A small, fast SFT run on the synthetic world (seconds per step budget: tiny).
TINY_FLAGS = (
    "--config.stage=sft", "--config.model.dim=64", "--config.model.n_layers=2", "--config.model.n_heads=4",
    "--config.model.n_kv_heads=2", "--config.model.multiple_of=16",
    "--config.data.world_sft_examples=300", "--config.data.world_heldout_prompts=20",
    "--config.data.max_seq_len=128", "--config.data.batch_size=8",
    "--config.tokenizer.world_vocab_size=320", "--config.eval.num_samples=0",
    "--config.eval.max_new_tokens=8", "--config.eval.num_batches=1", "--config.train.log_every=1",
    "--config.eval.num_prompts=12",
)


def env():
  e = dict(os.environ)
  e["JAX_COMPILATION_CACHE_DIR"] = str(ROOT / ".jax_cache")
  e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
  e["JAX_PLATFORMS"] = "cpu"
  e.setdefault("PYTHONUNBUFFERED", "1")
  return e


def train_cmd(workdir, *flags, config="configs/tiny.py"):
  return [sys.executable, str(ROOT / "train.py"), f"--config={ROOT / config}", f"--workdir={workdir}",
          *flags]


def run_train(workdir, *flags, config="configs/tiny.py", check=True, timeout=600):
  proc = subprocess.run(train_cmd(workdir, *flags, config=config), cwd=ROOT, env=env(),
                        capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return proc


def result_of(proc):
  """The JSON train.py prints last."""
  out = proc.stdout
  return json.loads(out[out.index("{\n"):])


def tiny_sft_config(stage="sft", **train):
  """In-process twin of TINY_FLAGS (smaller data): a seconds-per-run SFT config on the world,
  4 steps with checkpoints every 2; ``train`` overrides ``config.train`` fields."""
  c = tiny.get_config()
  c.stage = stage
  c.model.dim, c.model.n_layers, c.model.n_heads, c.model.n_kv_heads = 64, 2, 4, 2
  c.model.multiple_of = 16
  c.tokenizer.world_vocab_size = 320
  c.data.world_sft_examples, c.data.world_heldout_prompts = 200, 20
  c.data.max_seq_len, c.data.batch_size = 64, 4
  c.eval.num_samples, c.eval.num_batches = 0, 1
  c.train.num_steps, c.train.checkpoint_every, c.train.log_every = 4, 2, 1
  for k, v in train.items():
    c.train[k] = v
  return c


PPO_VOCAB = 320
PPO_MODEL = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=PPO_VOCAB,
                        multiple_of=16, max_seq_len=128)


def tiny_rl_models(root):
  """A world tokenizer, a random policy that ends some of its 8-token samples with EOS, and two
  random reward models on disk (rejection sampling and PPO tests)."""
  world_tokenizer.train_tokenizer(root / "tok" / "tokenizer.model", world.WorldConfig(),
                                  vocab_size=PPO_VOCAB)
  policy = jax.tree.map(np.array, init_params(PPO_MODEL, jax.random.key(0)))  # writable copies
  policy["tok_embeddings"][:, 0] = 10.0  # a large, positive residual dim 0 ...
  policy["output"][0, :] = 0.0
  policy["output"][0, 2] = 0.75  # ... that lifts the EOS logit: some rollouts end, some do not
  convert.save_orbax(root / "policy", PPO_MODEL, policy)
  for i, name in enumerate(("help", "safe")):
    rm = reward.init_reward_params(init_params(PPO_MODEL, jax.random.key(10 + i)), jax.random.key(20 + i))
    reward.save_reward_model(str(root / name), PPO_MODEL, rm)
  return root


def tiny_ppo_config(models, **ppo):
  """A seconds-per-iteration PPO config over ``tiny_rl_models(models)``: 2 iterations of 8
  rollouts x 8 tokens; ``ppo`` overrides ``config.ppo`` fields."""
  c = tiny.get_config()
  c.stage = "ppo"
  c.init_from = str(models / "policy")
  c.model.dim, c.model.n_layers, c.model.n_heads, c.model.n_kv_heads = 32, 2, 4, 2
  c.model.multiple_of, c.model.max_seq_len = 16, 128
  c.tokenizer.world_vocab_size = PPO_VOCAB
  c.train.async_checkpoint = False
  p = c.ppo
  p.help_rm, p.safety_rm = str(models / "help"), str(models / "safe")
  p.num_iterations, p.batch_size, p.minibatch_size = 2, 8, 4
  p.max_new_tokens, p.max_prompt_len = 8, 48
  p.num_prompts, p.eval_prompts, p.eval_every, p.patience = 32, 8, 0, 0
  p.lr, p.value_lr = 1e-3, 1e-3
  for k, v in ppo.items():
    p[k] = v
  return c


def tiny_sampling_config(models, stage: str):
  """A config of ``stage`` that samples the policy of ``tiny_rl_models(models)``, scores with its
  RMs (``config.rejection_sampling``: 8-token samples) and fine-tunes one step at LR 1e-3 on
  128-token rows (RAFT and context-distillation tests)."""
  c = tiny.get_config()
  c.stage = stage
  c.init_from = str(models / "policy")
  c.model.dim, c.model.n_layers, c.model.n_heads, c.model.n_kv_heads = 32, 2, 4, 2
  c.model.multiple_of, c.model.max_seq_len = 16, 128
  c.tokenizer.world_vocab_size = PPO_VOCAB
  c.data.max_seq_len, c.data.batch_size = 128, 4
  c.train.async_checkpoint = False
  r = c.rejection_sampling
  r.help_rm, r.safety_rm = str(models / "help"), str(models / "safe")
  r.max_new_tokens, r.num_steps, r.lr = 8, 1, 1e-3
  return c


def with_stand_in_inputs(c, root):
  """``c`` pointed at empty stand-ins under ``root`` for ``init_from`` (a ``params.json``) and the
  two reward models: enough for a shipped config's checks (``settings.validate`` and the stage's
  ``validate``), which look at paths, not weights."""
  for d in ("policy", "help", "safe"):
    (root / d).mkdir()
  (root / "policy" / "params.json").write_text("{}")
  c.init_from = str(root / "policy")
  c.rejection_sampling.help_rm = str(root / "help")
  c.rejection_sampling.safety_rm = str(root / "safe")
  return c


def rl_workdir(models, tmp_path, name):
  """``tmp_path/name`` holding the models' world tokenizer (so a PPO run does not retrain it)."""
  work = tmp_path / name
  work.mkdir()
  for f in ("tokenizer.model", "tokenizer.model.json"):  # reuse, do not retrain
    shutil.copy(models / "tok" / f, work / f)
  return work


# ---- repeated SIGKILL during saves (test_sigkill_*.py) ----

def saving_now(checkpoints, since: float) -> bool:
  """True while orbax writes a step: its temporary directory exists and changed after ``since``
  (a killed run's leftover one does not count)."""
  try:
    with os.scandir(checkpoints) as entries:
      return any("tmp" in e.name and e.stat().st_mtime >= since for e in entries)
  except FileNotFoundError:  # also: the directory was renamed while we looked
    return False


def kill_during_saves(cmd, work, kills: int, seed: int) -> list:
  """Start ``cmd`` again and again, each time SIGKILLing it a random 0-20 ms into its first
  or second checkpoint save, until it has been killed ``kills`` times; then let it finish.
  Returns the steps of the newest checkpoint seen after each kill."""
  rng = random.Random(seed)
  checkpoints, seen = work / "checkpoints", []
  while len(seen) < kills:
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    skip, deadline, was_saving = rng.randrange(2), time.monotonic() + 300, False
    while proc.poll() is None and time.monotonic() < deadline:
      saving = saving_now(checkpoints, started)
      if saving and not was_saving:
        if skip == 0:
          time.sleep(rng.uniform(0.0, 0.02))
          proc.send_signal(signal.SIGKILL)
          break
        skip -= 1
      was_saving = saving
      time.sleep(0.001)
    _, err = proc.communicate(timeout=300)
    if proc.returncode != -signal.SIGKILL:
      assert proc.returncode == 0, err[-3000:]
      pytest.fail(f"the run finished after {len(seen)} kills; give it more steps")
    seen.append(sorted(int(d) for d in os.listdir(checkpoints) if d.isdigit()))
  proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return seen


def assert_same_run(a, b):
  """``final/`` params and the last checkpoint's whole state (params, optimizer state, step, RNG;
  PPO: the value model too) of two workdirs are bitwise equal."""
  _, pa = convert.load_orbax(str(a / "final"))
  _, pb = convert.load_orbax(str(b / "final"))
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  last = max(int(d) for d in os.listdir(a / "checkpoints") if d.isdigit())
  states = []
  for work in (a, b):
    with ocp.StandardCheckpointer() as ckptr:
      states.append(ckptr.restore(work / "checkpoints" / str(last) / "state"))
  leaves = [jax.tree_util.tree_leaves_with_path(s) for s in states]
  assert [p for p, _ in leaves[0]] == [p for p, _ in leaves[1]]
  assert any("opt_state" in jax.tree_util.keystr(p) for p, _ in leaves[0])
  for (path, x), (_, y) in zip(*leaves):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def instruction_tokenizer(tmp_path_factory) -> Tokenizer:
  """A 384-piece world tokenizer trained with 20% instruction dialogs (GAtt tests)."""
  path = tmp_path_factory.mktemp("gatt_tok") / "tokenizer.model"
  return Tokenizer(world_tokenizer.train_tokenizer(
      path, world.WorldConfig(instruction_fraction=0.2), vocab_size=384))
