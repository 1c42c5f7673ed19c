"""train.workdir: resume fingerprint (which fields may change), the workdir lock, final/ and
result.json helpers."""

import json
import os

import ml_collections
import pytest

from llama_jax import convert
from llama_jax.train import workdir as wd


def _config(**train):
  return ml_collections.ConfigDict({"stage": "sft", "optimizer": {"lr": 1e-3},
                                    "train": {"num_steps": 4, "log_every": 1, **train},
                                    "eval": {"num_samples": 2}, "data": {"sources": ("world",)}})


def test_config_changes_ignore_only_harmless_fields():
  old = _config().to_dict()
  new = _config(log_every=5, checkpoint_every=7, stop_after_steps=2)
  new.eval.num_samples = 9
  assert wd.config_changes(old, new.to_dict()) == []
  new.optimizer.lr, new.stage, new.train.num_steps = 0.5, "reward", 8
  assert wd.config_changes(old, new.to_dict()) == [
      "optimizer.lr: 0.001 -> 0.5", "stage: 'sft' -> 'reward'", "train.num_steps: 4 -> 8"]


def test_a_field_added_later_at_its_old_behaviour_is_no_change():
  """A run made before ppo.forward_batch_size existed resumes with it at 0 (one pass, what the
  older code did), not with another value; a field absent from the new config still counts."""
  old = _config().to_dict()
  new = _config()
  new.ppo = {"forward_batch_size": 0}
  assert wd.config_changes(old, new.to_dict()) == []
  new.ppo.forward_batch_size = 128
  assert wd.config_changes(old, new.to_dict()) == ["ppo.forward_batch_size: '<absent>' -> 128"]
  assert wd.config_changes(new.to_dict(), old) == ["ppo.forward_batch_size: 128 -> '<absent>'"]
  # A RAFT run made before raft.kl_coef: resumes at 0 (ranked by r), not at another value.
  old_raft, new_raft = {**old, "raft": {"num_rounds": 4}}, {**old, "raft": {"num_rounds": 4,
                                                                            "kl_coef": 0.0}}
  assert wd.config_changes(old_raft, new_raft) == []
  new_raft["raft"]["kl_coef"] = 0.1
  assert wd.config_changes(old_raft, new_raft) == ["raft.kl_coef: '<absent>' -> 0.1"]


def test_a_section_added_later_is_no_change_for_older_runs():
  """A run made before config.dpo existed resumes with the dpo section present; once a config.json
  has the section, its fields count."""
  old = _config().to_dict()
  new = _config()
  new.dpo = {"beta": 0.1, "sources": "world_helpfulness"}
  assert wd.config_changes(old, new.to_dict()) == []
  with_dpo = new.to_dict()
  new.dpo.beta = 0.5
  assert wd.config_changes(with_dpo, new.to_dict()) == ["dpo.beta: 0.1 -> 0.5"]
  assert wd.config_changes(new.to_dict(), old) == ["dpo.beta: 0.5 -> '<absent>'",
                                                   "dpo.sources: 'world_helpfulness' -> '<absent>'"]


def test_check_resume_refuses_another_config_unless_allowed(tmp_path):
  wd.write_config(str(tmp_path), _config())
  changed = _config()
  changed.optimizer.lr = 0.5
  wd.check_resume(str(tmp_path), changed, started=False)  # nothing ran yet: a fresh start
  with pytest.raises(ValueError, match=r"optimizer.lr: 0.001 -> 0.5.*allow_config_change"):
    wd.check_resume(str(tmp_path), changed, started=True)
  wd.check_resume(str(tmp_path), _config(allow_config_change=True, num_steps=9), started=True)
  wd.check_resume(str(tmp_path / "new"), changed, started=True)  # no config.json


def test_lock_is_exclusive_and_released(tmp_path):
  work = str(tmp_path / "w")
  with wd.Lock(work):
    with pytest.raises(ValueError, match="is in use by another run"):
      with wd.Lock(work):
        pass
  with wd.Lock(work):  # released
    pass


def test_publish_replaces_and_results_mark_done(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  (src / "x.txt").write_text("new")
  work = tmp_path / "w"
  (work / "final").mkdir(parents=True)
  (work / "final" / "old.txt").write_text("old")
  assert not wd.is_done(str(work))
  assert wd.copy_final(str(src), str(work)) == str(work / "final")
  assert sorted(p.name for p in (work / "final").iterdir()) == ["checksums.json", "x.txt"]
  convert.verify_checksums(str(work / "final"))
  (work / "final" / "x.txt").write_text("NEW")
  with pytest.raises(ValueError, match="x.txt: changed since it was written"):
    convert.verify_checksums(str(work / "final"))
  wd.write_result(str(work), {"finished": True})
  assert wd.is_done(str(work)) and json.loads((work / "result.json").read_text())["finished"]
  assert wd.read_json(str(work / "missing.json"), default={}) == {}


def test_write_json_is_atomic(tmp_path, monkeypatch):
  path = str(tmp_path / "sub" / "result.json")
  wd.write_json(path, {"finished": True, "steps": 3})
  assert wd.read_json(path) == {"finished": True, "steps": 3}
  dump = json.dump
  def dies_midway(obj, f, **kw):
    f.write('{"finished": tr')  # what a kill mid-write would leave behind
    raise KeyboardInterrupt
  monkeypatch.setattr(json, "dump", dies_midway)
  with pytest.raises(KeyboardInterrupt):
    wd.write_json(path, {"finished": False})
  monkeypatch.setattr(json, "dump", dump)
  assert wd.read_json(path) == {"finished": True, "steps": 3}  # the previous file, whole
  assert sorted(os.listdir(tmp_path / "sub")) == ["result.json", "result.json.tmp"]
