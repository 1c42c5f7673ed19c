"""Faults a run must survive or refuse (issue 14): NaN/Inf training halts with a clear error and
never checkpoints or exports a non-finite state; a workdir resumes only with the config that
started it; a second writer is locked out; an interrupted run logs each step once; eval.py
refuses a non-finite model; a damaged checkpoint (flipped bit included) is set aside for the
newest intact one; a full disk stops before the save; 50 bad inputs are refused before step 0
(docs/reliability.md lists them all)."""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from llama_jax import convert
from llama_jax.config import LlamaConfig
from llama_jax.model import init_params
from llama_jax.data import input_pipeline
from llama_jax.recipe import eval_run, stages
from llama_jax.train import build, checkpoint
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


@pytest.fixture(scope="module")
def straight_final(tmp_path_factory):
  """Params of an uninterrupted 4-step run."""
  work = tmp_path_factory.mktemp("straight")
  assert stages.run(_config(), str(work))["finished"]
  return convert.load_orbax(str(work / "final"))[1]


def _assert_final_equal(params, work):
  _, other = convert.load_orbax(str(work / "final"))
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(other)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _largest_file(directory):
  return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["no_state_metadata", "empty_step_dir", "no_data_item",
                                    "truncated_shard", "flipped_bit"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, caplog,
                                                                    straight_final):
  work = tmp_path / "w"
  stages.run(_config(stop_after_steps=4, checkpoint_every=2, keep_checkpoints=3), str(work))
  for name in ("final", "result.json"):
    path = work / name
    shutil.rmtree(path) if path.is_dir() else path.unlink()
  latest = work / "checkpoints" / "4"
  assert (latest / "checksums.json").exists()
  if damage == "no_state_metadata":
    (latest / "state" / "_METADATA").unlink()
  elif damage == "empty_step_dir":
    shutil.rmtree(latest)
    latest.mkdir()
  elif damage == "no_data_item":
    shutil.rmtree(latest / "data")
  elif damage == "truncated_shard":
    shard = _largest_file(latest / "state")
    shard.write_bytes(shard.read_bytes()[:10])
  else:  # restores without error: only checksums.json tells
    shard = _largest_file(latest / "state")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
  again = stages.run(_config(), str(work))
  assert again["finished"] and again["steps"] == 4
  assert "damaged" in caplog.text and "trying an older one" in caplog.text
  if damage == "flipped_bit":  # orbax alone restores such a file silently (changed values)
    assert "changed since it was written (checksums.json" in caplog.text
  assert (work / "checkpoints" / "damaged-4").is_dir()  # set aside; step 4 was saved again
  assert (work / "checkpoints" / "4" / "checksums.json").exists()
  _assert_final_equal(straight_final, work)


def test_a_full_disk_stops_before_the_save_and_the_run_resumes(tmp_path, monkeypatch,
                                                               straight_final):
  """ENOSPC: the save is refused up front with one clear error (orbax would fail midway in its
  background threads); the last complete checkpoint stands and the run resumes from it."""
  free = iter([1 << 40])  # room for the step-2 checkpoint, then a full disk
  usage = shutil.disk_usage
  monkeypatch.setattr(checkpoint.shutil, "disk_usage",
                      lambda p: usage(p)._replace(free=next(free, 1 << 20)))
  work = tmp_path / "w"
  with pytest.raises(OSError, match="no space left for a checkpoint") as err:
    stages.run(_config(), str(work))
  assert err.value.errno == errno.ENOSPC
  assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["2"]
  monkeypatch.setattr(checkpoint.shutil, "disk_usage", usage)
  assert stages.run(_config(), str(work))["finished"]
  _assert_final_equal(straight_final, work)


# --- Bad inputs: each is refused before step 0, naming the field / file / line, and leaves no
# workdir behind. (Shared settings: 26 more in test_stages.py; reader-level cases in
# test_data_sources.py, test_convert.py and test_model.py.)

def _dialog(user, answer):
  return json.dumps({"messages": [{"role": "user", "content": user},
                                  {"role": "assistant", "content": answer}]})


def _sft_jsonl(lines):
  def mutate(c, tmp):
    path = tmp / "sft.jsonl"
    path.write_bytes(lines if isinstance(lines, bytes) else "\n".join(lines).encode() + b"\n")
    c.data.sft_sources, c.data.sft_jsonl_path, c.data.heldout_fraction = "jsonl", str(path), 0.3
  return mutate


def _pref_jsonl(lines, **reward):
  def mutate(c, tmp):
    path = tmp / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    c.stage, c.data.heldout_fraction = "reward", 0.3
    c.reward.sources, c.reward.weights, c.data.preference_jsonl_path = "jsonl_preferences", "", str(path)
    for k, v in reward.items():
      c.reward[k] = v
  return mutate


def _set(**fields):
  """Set dotted config fields: _set(**{"data.batch_size": 0})."""
  def mutate(c, tmp):
    del tmp
    for dotted, value in fields.items():
      section, _, name = dotted.rpartition(".")
      with c.unlocked():
        (c[section] if section else c)[name] = value
  return mutate


def _init_from(make):
  def mutate(c, tmp):
    c.init_from = make(tmp)
  return mutate


def _final_with_other_shapes(tmp):
  """A final/ holding a 96-dim model whose params.json was edited to say 64 (the config's dim)."""
  cfg = LlamaConfig(dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, multiple_of=16,
                    max_seq_len=256)
  convert.save_orbax(str(tmp / "other"), cfg, init_params(cfg, jax.random.key(0)))
  meta = json.loads((tmp / "other" / "params.json").read_text())
  (tmp / "other" / "params.json").write_text(json.dumps({**meta, "dim": 64}))
  return str(tmp / "other")


def _hh_file(data):
  def mutate(c, tmp):
    (tmp / "hh.jsonl.gz").write_bytes(data)
    c.data.sft_sources, c.data.hh_rlhf_path = "hh_rlhf", str(tmp / "hh.jsonl.gz")
  return mutate


_LONG = " ".join(["word"] * 400)
_PAIR = lambda i, chosen, rejected: json.dumps({"prompt": f"q{i}", "chosen": chosen,
                                                "rejected": rejected})

BAD_INPUTS = {
    # stage sections (recipe/sections.py) and the model
    "data.batch_size=0": (_set(**{"data.batch_size": 0}), "config.data.batch_size"),
    "data.max_seq_len=1": (_set(**{"data.max_seq_len": 1}), "config.data.max_seq_len"),
    "data.heldout_fraction=1.5": (_set(**{"data.heldout_fraction": 1.5}), "config.data.heldout_fraction"),
    "data.sft_sources unknown": (_set(**{"data.sft_sources": "wikipedia"}),
                                 "config.data.sft_sources: unknown source 'wikipedia'"),
    "data.sft_weights count": (_set(**{"data.sft_weights": "1,2"}), "sft_weights"),
    "data.prompt_streams=0": (_set(**{"data.prompt_streams": 0}), "config.data.prompt_streams"),
    "tokenizer.world_vocab_size=-1": (_set(**{"tokenizer.world_vocab_size": -1}),
                                      "config.tokenizer.world_vocab_size"),
    "tokenizer.path missing": (_set(**{"tokenizer.path": "/nonexistent/tokenizer.model"}),
                               "/nonexistent/tokenizer.model"),
    "mesh.shape too large": (_set(**{"mesh.shape": (3, -1, 1)}), "does not divide the device count"),
    "model.dim not divisible": (_set(**{"model.dim": 66}), r"config.model: LlamaConfig.dim \(66\)"),
    "model.n_kv_heads": (_set(**{"model.n_kv_heads": 3}), r"divisible by n_kv_heads \(3\)"),
    "reward.margin unknown": (_set(stage="reward", **{"reward.margin": "huge"}), "config.reward.margin"),
    "reward.overlong unknown": (_set(stage="reward", **{"reward.overlong": "clip"}), "config.reward.overlong"),
    "reward.batch_size=0": (_set(stage="reward", **{"reward.batch_size": 0}), "config.reward.batch_size"),
    "reward.sources unknown": (_set(stage="reward", **{"reward.sources": "world_helpfulness,bogus"}),
                               "bogus"),
    "reward.model unknown": (_set(stage="reward", **{"reward.model": "honesty"}), "config.reward.model"),
    "rs.k=0": (_set(stage="rejection_sampling", **{"rejection_sampling.k": 0}),
               "config.rejection_sampling.k"),
    "rs.top_p=0": (_set(stage="rejection_sampling", **{"rejection_sampling.top_p": 0.0}),
                   "config.rejection_sampling.top_p"),
    "rs.reward unknown": (_set(stage="rejection_sampling", **{"rejection_sampling.reward": "gold"}),
                          "config.rejection_sampling.reward"),
    "rs.temperature=0": (_set(stage="rejection_sampling", **{"rejection_sampling.temperature": 0.0}),
                         "config.rejection_sampling.temperature"),
    "ppo.kl_estimator unknown": (_set(stage="ppo", **{"ppo.kl_estimator": "k9"}), "config.ppo.kl_estimator"),
    "ppo.clip_eps=0": (_set(stage="ppo", **{"ppo.clip_eps": 0.0}), "config.ppo.clip_eps"),
    "ppo.minibatch > batch": (_set(stage="ppo", **{"ppo.batch_size": 4, "ppo.minibatch_size": 8}),
                              "minibatch_size"),
    "ppo without init_from": (_set(stage="ppo", init_from=""), "config.init_from"),
    "ppo.value_head_init unknown": (_set(stage="ppo", **{"ppo.value_head_init": "random"}),
                                    "config.ppo.value_head_init"),
    "annotate.k=1": (_set(stage="annotate", **{"annotate.k": 1}), "config.annotate.k"),
    "pipeline stage unknown": (_set(stage="no_such_stage"), "config.stage"),
    # init_from
    "init_from missing": (_set(init_from="/nonexistent/final"), "config.init_from: /nonexistent/final"),
    "init_from without params.json": (_init_from(lambda tmp: str(tmp)), "config.init_from: .* params.json"),
    "init_from tensors disagree with params.json": (_init_from(_final_with_other_shapes),
                                                    r"parameter .* is \(2, 96, 2, 24\) there"),
    # SFT JSONL records
    "sft jsonl missing file": (_set(**{"data.sft_sources": "jsonl",
                                       "data.sft_jsonl_path": "/nonexistent/sft.jsonl"}),
                               "/nonexistent/sft.jsonl"),
    "sft jsonl empty": (_sft_jsonl([]), "sft.jsonl: the 'train' split is empty"),
    "sft jsonl invalid JSON": (_sft_jsonl([_dialog("a", "b"), "{oops"]), "line 2"),
    "sft jsonl not an object": (_sft_jsonl([_dialog("a", "b"), "[1, 2]"]), "line 2"),
    "sft jsonl no messages": (_sft_jsonl([json.dumps({"text": "hi"})]), "line 1"),
    "sft jsonl missing content": (_sft_jsonl([json.dumps({"messages": [{"role": "user"}]})]), "line 1"),
    "sft jsonl unknown role": (_sft_jsonl([json.dumps({"messages": [
        {"role": "wizard", "content": "a"}, {"role": "assistant", "content": "b"}]})]), "line 1"),
    "sft jsonl content not text": (_sft_jsonl([json.dumps({"messages": [
        {"role": "user", "content": 5}, {"role": "assistant", "content": "b"}]})]), "line 1"),
    "sft jsonl not UTF-8": (_sft_jsonl(_dialog("a", "b").encode() + b"\n\xff\xfe\n"), "line 2"),
    "sft jsonl nested too deep": (_sft_jsonl([_dialog("a", "b"), "[" * 100000]), "line 2"),
    "sft jsonl lone surrogate": (_sft_jsonl([_dialog("a", "b"), _dialog("\ud800", "b")]), "line 2"),
    "sft jsonl every prompt too long": (_sft_jsonl(
        [_dialog(f"{i} {_LONG}", "b") for i in range(40)]), "max_seq_len"),
    # preference JSONL records (reward stage)
    "pairs jsonl missing rejected": (_pref_jsonl([json.dumps({"prompt": "q", "chosen": "a"})]), "line 1"),
    "pairs jsonl chosen == rejected": (_pref_jsonl([_PAIR(0, "a", "a")]), "line 1"),
    "pairs jsonl bad rating": (_pref_jsonl([json.dumps({"prompt": "q", "chosen": "a", "rejected": "b",
                                                         "rating": "best"})]), "line 1"),
    "pairs jsonl every pair overlong (error)": (_pref_jsonl(
        [_PAIR(i, _LONG, "b") for i in range(40)], max_seq_len=64), "max_seq_len"),
    "pairs jsonl every pair overlong (drop)": (_pref_jsonl(
        [_PAIR(i, _LONG, "b") for i in range(40)], max_seq_len=64, overlong="drop"), "max_seq_len"),
    "hh file not gzip": (_hh_file(b"not gzip at all"), "hh.jsonl.gz: not a complete gzip file"),
    "hh file truncated": (_hh_file(gzip.compress(_PAIR(0, "a", "b").encode() * 50)[:40]), "hh.jsonl.gz: not a complete gzip file"),
    "hh file missing": (_set(**{"data.sft_sources": "hh_rlhf", "data.hh_rlhf_path": "/nonexistent/hh.gz"}),
                        "/nonexistent/hh.gz"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_a_bad_input_is_refused_before_step0_and_leaves_no_workdir(tmp_path, name):
  mutate, match = BAD_INPUTS[name]
  c = _config()
  inputs = tmp_path / "inputs"
  inputs.mkdir()
  mutate(c, inputs)
  work = tmp_path / "w"
  with pytest.raises((ValueError, FileNotFoundError), match=match):
    stages.run(c, str(work))
  assert not work.exists()
