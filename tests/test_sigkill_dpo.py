"""A DPO run killed with SIGKILL at random points during its checkpoint saves, again and again,
still ends bitwise equal to an uninterrupted run (the reference log-probs read back from
``<workdir>/reference_logps.npz`` on every restart). Slow: each kill restarts train.py (marked
``slow``; the SFT and PPO twins are test_sigkill_sft.py / test_sigkill_ppo.py)."""

from __future__ import annotations

import jax
import pytest

import llama_jax as lj
from configs import dpo_tiny
from llama_jax import convert
from llama_jax.train import build
from train_helpers import assert_same_run, kill_during_saves, run_train, train_cmd

pytestmark = pytest.mark.slow
KILLS = 4
MODEL = {"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "multiple_of": 16}


def test_dpo_killed_during_saves_ends_bitwise_equal(tmp_path):
  c = dpo_tiny.get_config()
  for k, v in MODEL.items():
    c.model[k] = v
  cfg = build.model_config(c, c.tokenizer.world_vocab_size)
  sft = str(tmp_path / "sft_final")
  convert.save_orbax(sft, cfg, lj.init_params(cfg, jax.random.key(3)))
  flags = (f"--config.init_from={sft}", *(f"--config.model.{k}={v}" for k, v in MODEL.items()),
           "--config.dpo.batch_size=4", "--config.dpo.world_train_pairs=48",
           "--config.dpo.world_heldout_pairs=8", "--config.optimizer.lr=1e-3",
           "--config.train.num_steps=30", "--config.train.checkpoint_every=1",
           "--config.train.keep_checkpoints=2", "--config.train.eval_every=0",
           "--config.train.log_every=1")
  run_train(tmp_path / "straight", *flags, config="configs/dpo_tiny.py")
  killed = tmp_path / "killed"
  seen = kill_during_saves(train_cmd(killed, *flags, config="configs/dpo_tiny.py"), killed, KILLS,
                           seed=0)
  assert len(seen) == KILLS and seen[-1], seen
  assert_same_run(tmp_path / "straight", killed)
