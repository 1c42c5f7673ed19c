"""Issue 14: a run killed with SIGKILL at random points during its checkpoint saves, again and
again, still ends bitwise equal to an uninterrupted run: PPO, its value model included. Slow:
each kill restarts train.py (marked ``slow``; CI runs it). The SFT twin is in test_sigkill_sft.py (a file each, so pytest-xdist
runs them side by side)."""

from __future__ import annotations

import pytest

from train_helpers import (ROOT, assert_same_run, kill_during_saves, rl_workdir, run_train,
                           tiny_rl_models, train_cmd)

pytestmark = pytest.mark.slow
KILLS = 10


def test_ppo_killed_during_saves_ends_bitwise_equal(tmp_path):
  models = tiny_rl_models(tmp_path / "models")
  config = tmp_path / "ppo_config.py"
  config.write_text(
      "import pathlib, sys\n"
      f"sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
      "from train_helpers import tiny_ppo_config\n\n\n"
      "def get_config():\n"
      f"  c = tiny_ppo_config(pathlib.Path({str(models)!r}), num_iterations=30)\n"
      "  c.ppo.checkpoint_every, c.train.keep_checkpoints = 1, 2\n"
      "  return c\n")
  straight, killed = rl_workdir(models, tmp_path, "straight"), rl_workdir(models, tmp_path, "killed")
  run_train(straight, config=str(config))
  seen = kill_during_saves(train_cmd(killed, config=str(config)), killed, KILLS, seed=1)
  assert len(seen) == KILLS and seen[-1], seen
  assert_same_run(straight, killed)
