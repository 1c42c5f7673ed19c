"""Issue 14: a run killed with SIGKILL at random points during its checkpoint saves, again and
again, still ends bitwise equal to an uninterrupted run: SFT. Slow: each kill restarts train.py
(marked ``slow``; CI runs it). The PPO twin is in test_sigkill_ppo.py (a file each, so pytest-xdist
runs them side by side)."""

from __future__ import annotations

import pytest

from train_helpers import TINY_FLAGS, assert_same_run, kill_during_saves, run_train, train_cmd

pytestmark = pytest.mark.slow
KILLS = 10


def test_sft_killed_during_saves_ends_bitwise_equal(tmp_path):
  flags = (*TINY_FLAGS, "--config.train.num_steps=30", "--config.train.checkpoint_every=1",
           "--config.train.keep_checkpoints=2")
  run_train(tmp_path / "straight", *flags)
  killed = tmp_path / "killed"
  seen = kill_during_saves(train_cmd(killed, *flags), killed, KILLS, seed=0)
  assert len(seen) == KILLS and seen[-1], seen
  assert_same_run(tmp_path / "straight", killed)
