"""Checkpoints: exact resume (bitwise), SIGTERM, a save killed midway, bad data writes nothing."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from train_helpers import ROOT, TINY_FLAGS, env, run_train, train_cmd


def _state_arrays(workdir, step):
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(path)
  import jax
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_bitwise_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert any("opt_state" in k for k in a) and any("params" in k for k in a)


@pytest.fixture(scope="module")
def shared_flags(tmp_path_factory):
  """Reuse one TFDS dir and tokenizer across runs (prepared by a first 1-step run)."""
  base = tmp_path_factory.mktemp("shared")
  tfds_dir = base / "tfds"
  run_train(base / "prep", *TINY_FLAGS, f"--config.data.tfds_dir={tfds_dir}",
            "--config.train.num_steps=1")
  return (*TINY_FLAGS, f"--config.data.tfds_dir={tfds_dir}",
          f"--config.tokenizer.path={base / 'prep' / 'tokenizer.model'}")


def test_sigterm_saves_and_exits_zero_then_resumes_exactly(tmp_path, shared_flags):
  flags = (*shared_flags, "--config.train.num_steps=400", "--config.train.checkpoint_every=5")
  work = tmp_path / "term"
  proc = subprocess.Popen(train_cmd(work, *flags), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not (work / "checkpoints" / "5").exists():
    assert proc.poll() is None and time.time() < deadline, "no checkpoint at step 5"
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  stopped = json.loads(out[out.index("{\n"):])
  stop_step = stopped["steps"]
  assert stopped["stopped_by_signal"] and 5 <= stop_step < 400
  assert str(stop_step) in os.listdir(work / "checkpoints")
  # Resume two more steps vs an uninterrupted run to the same step.
  run_train(work, *flags, "--config.train.stop_after_steps=2")
  run_train(tmp_path / "straight", *flags, f"--config.train.stop_after_steps={stop_step + 2}")
  _assert_bitwise_equal(_state_arrays(work, stop_step + 2),
                        _state_arrays(tmp_path / "straight", stop_step + 2))


_KILLER = textwrap.dedent("""
    import os, signal, sys, time
    import jax.numpy as jnp
    from llama_jax.train.checkpoint import Checkpointer
    ckpt = Checkpointer(sys.argv[1], keep=3, async_save=True)
    ckpt.save(1, {"w": jnp.full((1000,), 1.0)})
    ckpt.wait()
    import jax
    big = {"w": jax.random.normal(jax.random.key(0), (64, 1024, 1024))}  # 256 MiB, incompressible
    big["w"].block_until_ready()
    ckpt.save(2, big)
    deadline = time.time() + 60
    while not any("tmp" in p for p in os.listdir(sys.argv[1])) and time.time() < deadline:
      time.sleep(0.001)
    os.kill(os.getpid(), signal.SIGKILL)  # mid-save: the temporary directory exists
""")


def test_save_killed_midway_keeps_last_good_checkpoint(tmp_path):
  directory = tmp_path / "ckpt"
  proc = subprocess.run([sys.executable, "-c", _KILLER, str(directory)], cwd=ROOT, env=env(),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == -signal.SIGKILL
  leftovers = [p for p in os.listdir(directory) if p != "1"]
  assert leftovers and all("tmp" in p for p in leftovers), os.listdir(directory)  # killed mid-save
  import jax
  from llama_jax.train.checkpoint import Checkpointer
  ckpt = Checkpointer(str(directory))
  assert ckpt.latest_step() == 1
  restored = ckpt.restore({"w": jax.ShapeDtypeStruct((1000,), np.float32)})
  np.testing.assert_array_equal(restored["w"], np.ones(1000, np.float32))


def test_bad_record_fails_before_step0_and_writes_nothing(tmp_path):
  bad = tmp_path / "sft.jsonl"
  good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
  bad.write_text(json.dumps(good) + "\n" + json.dumps({"messages": [{"role": "user"}]}) + "\n")
  work = tmp_path / "work"
  proc = run_train(work, *TINY_FLAGS, "--config.data.sft_sources=jsonl",
                   f"--config.data.sft_jsonl_path={bad}", check=False)
  assert proc.returncode != 0
  assert str(bad) in proc.stderr and "line 2" in proc.stderr and "content" in proc.stderr
  assert not work.exists()
