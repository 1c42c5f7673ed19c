"""Helpers for tests that run train.py / eval.py in subprocesses on a tiny world config, or a
stage in process (:func:`tiny_sft_config`)."""

import json
import os
import pathlib
import subprocess
import sys

from configs import tiny

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
