"""Faults a run must survive or refuse (issue 14): NaN/Inf training halts with a clear error and
never checkpoints or exports a non-finite state; a workdir resumes only with the config that
started it; a second writer is locked out; an interrupted run logs each step once; eval.py
refuses a non-finite model."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from llama_jax import convert
from llama_jax.data import input_pipeline
from llama_jax.recipe import eval_run, stages
from llama_jax.train import build
from llama_jax.train import workdir as wd
from train_helpers import tiny_sft_config


def _config(**train):
  return tiny_sft_config("sft", **train)


def _train_rows(work):
  rows = [json.loads(x) for x in (work / "logs" / "metrics.jsonl").read_text().splitlines()]
  return [r["step"] for r in rows if r["split"] == "train"]


def test_nan_training_halts_and_keeps_only_finite_checkpoints(tmp_path):
  c = _config(num_steps=40, max_nonfinite_steps=3)
  c.optimizer.lr, c.optimizer.warmup_steps, c.optimizer.warmup_frac = 1e6, 0, 0.0
  work = tmp_path / "nan"
  with pytest.raises(FloatingPointError, match="consecutive steps with a NaN/Inf loss or gradient"):
    stages.run(c, str(work))
  assert not (work / "final").exists() and not (work / "result.json").exists()
  rows = [json.loads(x) for x in (work / "logs" / "metrics.jsonl").read_text().splitlines()]
  assert sum(r.get("nonfinite", 0) for r in rows) >= 3
  steps = [p for p in (work / "checkpoints").iterdir() if p.name.isdigit()]
  assert steps  # the halt came after the first checkpoint (step 2)
  for step in steps:
    with ocp.StandardCheckpointer() as ckptr:
      state = ckptr.restore(step / "state")
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state["params"]))


def test_resume_rules(tmp_path):
  work = tmp_path / "w"
  first = stages.run(_config(stop_after_steps=2), str(work))
  assert first["steps"] == 2 and not first["finished"]
  config_json = (work / "config.json").read_text()

  changed = _config()
  changed.optimizer.lr = 0.5
  with pytest.raises(ValueError, match=r"optimizer.lr: 0.003 -> 0.5"):
    stages.run(changed, str(work))
  other = _config()
  other.stage = "reward"
  with pytest.raises(ValueError, match=r"stage: 'sft' -> 'reward'"):
    stages.run(other, str(work))
  assert (work / "config.json").read_text() == config_json  # nothing rewritten
  assert not (work / "rm").exists() and sorted(p.name for p in (work / "checkpoints").iterdir()) == ["2"]
  fewer = _config(num_steps=1, allow_config_change=True)
  with pytest.raises(ValueError, match="checkpoint at step 2, past this config's 1 steps"):
    stages.run(fewer, str(work))
  with wd.Lock(str(work)):
    with pytest.raises(ValueError, match="is in use by another run"):
      stages.run(_config(), str(work))

  done = stages.run(_config(log_every=2, checkpoint_every=2), str(work))  # harmless changes
  assert done["finished"] and done["steps"] == 4 and _train_rows(work) == [1, 2, 4]
  # A run killed after its last checkpoint logged steps 3-4; they are logged once on resume.
  shutil.rmtree(work / "checkpoints" / "4")
  shutil.rmtree(work / "final")
  (work / "result.json").unlink()
  again = stages.run(_config(), str(work))
  assert again["finished"] and again["steps"] == 4
  steps = _train_rows(work)
  assert len(steps) == len(set(steps)) and steps[-1] == 4, steps


def test_eval_refuses_a_nonfinite_model(tmp_path):
  work = tmp_path / "w"
  assert stages.run(_config(num_steps=2), str(work))["finished"]
  cfg, params = convert.load_orbax(str(work / "final"))
  params["norm"] = params["norm"] * np.nan
  shutil.rmtree(work / "final")
  convert.save_orbax(str(work / "final"), cfg, params)
  with pytest.raises(ValueError, match=r"final: parameter \['norm'\] holds NaN or Inf"):
    eval_run.run(str(work))
  c = _config(num_steps=2)
  c.init_from = str(work / "final")
  with pytest.raises(ValueError, match=r"init_from .*final: parameter \['norm'\] holds NaN"):
    stages.run(c, str(tmp_path / "next"))
  assert not (tmp_path / "next").exists()


def test_user_jsonl_with_the_world_tokenizer_trains_and_samples(tmp_path):
  """The world's oracle judges world prompts only: a user's dialogs are sampled, not judged."""
  path = tmp_path / "dialogs.jsonl"
  with open(path, "w") as f:
    for i in range(40):
      f.write(json.dumps({"messages": [{"role": "user", "content": f"name a colour {i}"},
                                       {"role": "assistant", "content": "blue"}]}) + "\n")
  c = _config(num_steps=2)
  c.data.sft_sources, c.data.sft_jsonl_path, c.data.heldout_fraction = "jsonl", str(path), 0.2
  c.eval.num_samples, c.eval.max_new_tokens = 2, 4
  res = stages.run(c, str(tmp_path / "w"))
  assert res["finished"]
  rows = [json.loads(x) for x in (tmp_path / "w" / "samples" / "step_000002.jsonl").read_text()
          .splitlines()]
  assert len(rows) == 2 and all("helpful" not in r for r in rows)


def test_an_edited_jsonl_with_the_same_size_and_mtime_is_read_again(tmp_path):
  path = tmp_path / "d.jsonl"
  line = lambda i, answer: json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                    {"role": "assistant", "content": answer}]})
  path.write_text("\n".join(line(i, f"a{i:02d}") for i in range(20)) + "\n")
  c = _config()
  c.data.sft_sources, c.data.sft_jsonl_path, c.data.heldout_fraction = "jsonl", str(path), 0.3
  answers = lambda b: sorted(input_pipeline.decode_record(x)["messages"][-1]["content"]
                             for x in b.as_data_source(split="train"))
  first = answers(build.source_builder("jsonl", "sft", c, str(tmp_path / "w")))
  stat = path.stat()
  path.write_text("\n".join(line(i, f"b{i:02d}") for i in range(20)) + "\n")  # same size
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
  second = answers(build.source_builder("jsonl", "sft", c, str(tmp_path / "w")))
  assert first[0].startswith("a") and second[0].startswith("b")


def test_a_flipped_bit_in_final_is_detected_on_load(tmp_path):
  work = tmp_path / "w"
  assert stages.run(_config(num_steps=2), str(work))["finished"]
  assert (work / "final" / "checksums.json").exists()
  convert.load_orbax(str(work / "final"))  # intact
  shard = max((p for p in (work / "final" / "params").rglob("*") if p.is_file()),
              key=lambda p: p.stat().st_size)
  data = bytearray(shard.read_bytes())
  data[len(data) // 2] ^= 0x10
  shard.write_bytes(bytes(data))
  with pytest.raises(ValueError, match="changed since it was written"):
    convert.load_orbax(str(work / "final"))
  c = _config(num_steps=2)
  c.init_from = str(work / "final")
  with pytest.raises(ValueError, match="changed since it was written"):
    stages.run(c, str(tmp_path / "next"))
  assert not (tmp_path / "next").exists()


@pytest.mark.parametrize("damage", ["no_state_metadata", "empty_step_dir", "no_data_item",
                                    "truncated_shard"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, caplog):
  straight = stages.run(_config(), str(tmp_path / "straight"))
  work = tmp_path / "w"
  stages.run(_config(stop_after_steps=4, checkpoint_every=2, keep_checkpoints=3), str(work))
  for name in ("final", "result.json"):
    path = work / name
    shutil.rmtree(path) if path.is_dir() else path.unlink()
  latest = work / "checkpoints" / "4"
  if damage == "no_state_metadata":
    (latest / "state" / "_METADATA").unlink()
  elif damage == "empty_step_dir":
    shutil.rmtree(latest)
    latest.mkdir()
  elif damage == "no_data_item":
    shutil.rmtree(latest / "data")
  else:
    shard = max((p for p in (latest / "state").rglob("*") if p.is_file()),
                key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:10])
  again = stages.run(_config(), str(work))
  assert again["finished"] and again["steps"] == 4
  assert "damaged" in caplog.text and "trying an older one" in caplog.text
  _, a = convert.load_orbax(str(tmp_path / "straight" / "final"))
  _, b = convert.load_orbax(str(work / "final"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert straight["finished"]
