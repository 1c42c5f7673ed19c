"""The scripts in examples/ run as a user runs them (a subprocess from the repo root) and print a
final ``RESULT {json}`` line whose numbers make sense."""

import json
import math
import subprocess
import sys

import pytest

from train_helpers import ROOT, env


def run_example(name, *args, devices=None):
  """Runs ``examples/<name>.py`` on CPU; returns the parsed ``RESULT`` line and the stdout.

  ``devices``: emulate that many host devices (``XLA_FLAGS``); None: the plain environment, with
  any inherited XLA_FLAGS removed (one CPU device).
  """
  e = env()
  e.pop("XLA_FLAGS", None)
  if devices is not None:
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  e["PYTHONPATH"] = str(ROOT)  # the checkout's llama_jax, whatever is installed
  proc = subprocess.run([sys.executable, str(ROOT / "examples" / f"{name}.py"), *args], cwd=ROOT,
                        env=e, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
  assert len(lines) == 1, proc.stdout[-2000:]
  assert proc.stdout.rstrip().endswith(lines[0])
  return json.loads(lines[0][len("RESULT "):]), proc.stdout


def finite(*xs):
  return all(math.isfinite(x) for x in xs)


def test_custom_reward_ppo():
  res, out = run_example("custom_reward_ppo")
  its = res["iterations"]
  assert len(its) == 3 and [x.startswith("iter ") for x in out.splitlines()].count(True) == 3
  for it in its:
    assert finite(*it.values()), it
    assert 0.1 <= it["gold"] <= 0.9 and 0 < it["reward"] < it["gold"]
    assert 1 <= it["length"] <= 12 and 0 <= it["eos_rate"] <= 1 and it["approxkl"] >= 0
    # The custom reward is what was used: gold minus the penalty per token (no clipping here).
    assert it["reward"] == pytest.approx(it["gold"] - res["penalty"] * it["length"], abs=1e-6)
  assert its[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at iteration 0
  assert res["policy_change"] > 1e-4 and any(abs(it["kl"]) > 1e-4 for it in its[1:])


def test_custom_loss_sharded_on_8_devices():
  res, _ = run_example("custom_loss_sharded", devices=8)
  assert res["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  assert finite(res["first_loss"], res["last_loss"], res["z_loss"]) and res["z_loss"] > 0
  assert res["first_loss"] == pytest.approx(math.log(256), abs=0.1)  # a fresh model: ~uniform
  assert res["last_loss"] < res["first_loss"] - 0.5
  # wq [L, d, n, h] = [2, 64, 4, 16]: d split over fsdp, heads over tensor; AdamW's mu follows.
  assert res["wq_spec"] == res["adam_mu_wq_spec"] == "P(None, 'fsdp', 'tensor', None)"
  assert res["wq_shard_shape"] == [2, 32, 2, 16]


def test_custom_loss_sharded_on_one_device():
  res, _ = run_example("custom_loss_sharded")
  assert res["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
  assert finite(res["first_loss"], res["last_loss"])
  assert res["last_loss"] < res["first_loss"] - 0.5 and res["wq_shard_shape"] == [2, 64, 4, 16]


def test_score_hf_checkpoint(llama2_tokenizer_path):
  res, _ = run_example("score_hf_checkpoint", f"--tokenizer={llama2_tokenizer_path}")
  assert res["max_logit_diff"] < 1e-4  # the conversion reproduces HF's logits
  n = len(res["completions"])
  assert n == 3 and all(isinstance(t, str) for t in res["completions"])
  for key in ("r_help", "r_safe", "rc"):
    assert len(res[key]) == n and all(0 < x < 1 for x in res[key]), key
  for h, s, rc, safety in zip(res["r_help"], res["r_safe"], res["rc"], res["is_safety"]):
    assert rc == (s if safety or s < 0.15 else h)  # Llama 2's combined reward
