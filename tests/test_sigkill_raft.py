"""A RAFT run (two rounds of the rejection-sampling stage: sampling batches, scoring, the kept
set, a fine-tune with checkpoints) SIGKILLed at random moments, again and again, ends bitwise
equal to an uninterrupted run: the same samples in every round, the same fine-tune state and
``final/``. Unlike the save-timed kills of test_sigkill_sft.py / test_sigkill_dpo.py, the kills
land anywhere (sampling, writing a batch file, fine-tuning, exporting). Slow: each kill restarts
train.py (marked ``slow``)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from llama_jax import convert
from train_helpers import (PPO_VOCAB, ROOT, assert_same_run, env, rl_workdir, run_train,
                           tiny_rl_models, train_cmd)

pytestmark = pytest.mark.slow
KILLS = 4


def _flags(models):
  return (f"--config.init_from={models / 'policy'}", "--config.model.dim=32",
          "--config.model.n_layers=2", "--config.model.n_heads=4", "--config.model.n_kv_heads=2",
          "--config.model.multiple_of=16", "--config.model.max_seq_len=128",
          f"--config.tokenizer.world_vocab_size={PPO_VOCAB}", "--config.data.max_seq_len=128",
          "--config.data.batch_size=4", f"--config.rejection_sampling.help_rm={models / 'help'}",
          f"--config.rejection_sampling.safety_rm={models / 'safe'}",
          "--config.rejection_sampling.max_new_tokens=8", "--config.rejection_sampling.num_steps=4",
          "--config.rejection_sampling.lr=1e-3", "--config.rejection_sampling.num_prompts=8",
          "--config.rejection_sampling.k=3", "--config.rejection_sampling.max_prompt_len=96",
          "--config.rejection_sampling.batch_size=2", "--config.raft.num_rounds=2",
          "--config.raft.kl_coef=0.1", "--config.train.checkpoint_every=1",
          "--config.train.log_every=1")


def _progress(work) -> tuple:
  """What a run had kept: sampled batch files, finished round files, fine-tune checkpoints.
  ``os.walk`` skips a directory that vanishes while it looks (orbax renames its temporary ones)."""
  return tuple(sorted(
      os.path.relpath(os.path.join(root, name), work) for root, dirs, files in os.walk(work)
      for name in dirs + files
      if name.startswith("batch_") or name == "result.json"
      or (os.path.basename(root) == "checkpoints" and name.isdigit())))


def test_raft_killed_at_random_moments_ends_bitwise_equal(tmp_path):
  models = tiny_rl_models(tmp_path / "models")
  flags = _flags(models)
  straight = rl_workdir(models, tmp_path, "straight")
  run_train(straight, *flags, config="configs/raft_tiny.py")
  killed = rl_workdir(models, tmp_path, "killed")
  cmd = train_cmd(killed, *flags, config="configs/raft_tiny.py")
  rng, kills, seen = random.Random(0), 0, []
  while kills < KILLS:  # each restart resumes, so a later one may finish before its kill
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    # Kill a random 0-300 ms after the run keeps something new (a batch file, a checkpoint, a
    # round's result), skipping 0-2 of those moments: mid-sampling, mid-scoring, mid-fine-tune.
    before, skip, deadline = _progress(killed), rng.randrange(3), time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
      now = _progress(killed)
      if now != before:
        if skip == 0:
          time.sleep(rng.uniform(0.0, 0.3))
          proc.kill()  # SIGKILL
          break
        skip, before = skip - 1, now
      time.sleep(0.02)
    err = proc.communicate(timeout=300)[1]
    if proc.returncode == -signal.SIGKILL:
      kills += 1
      seen.append(_progress(killed))
      continue
    assert proc.returncode == 0, err[-3000:]
    break
  assert kills >= 2, f"only {kills} kills landed before the run finished"
  assert len(set(seen)) >= 2 and any(seen), seen  # the kills landed at different stages of work
  run_train(killed, *flags, config="configs/raft_tiny.py")  # finishes (or finds it finished)
  for r in (1, 2):
    a, b = straight / f"round_{r}", killed / f"round_{r}"
    assert (a / "sampled.jsonl").read_bytes() == (b / "sampled.jsonl").read_bytes(), r
    assert (a / "pooled.jsonl").read_bytes() == (b / "pooled.jsonl").read_bytes(), r
    assert_same_run(a / "finetune", b / "finetune")
  for x, y in zip(*(jax.tree.leaves(convert.load_orbax(str(w / "final"))[1])
                    for w in (straight, killed))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  res = [json.loads((w / "result.json").read_text()) for w in (straight, killed)]
  assert [r["tokens_sampled"] for r in res[0]["rounds"]] == [
      r["tokens_sampled"] for r in res[1]["rounds"]]
