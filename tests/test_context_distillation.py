"""Safety context distillation (llama_jax.context_distillation): the targeted selection and the
benign best-of-k against loop references, the preprompts, the world that reacts to them, config
checks, and the stage end to end on tiny models (answers with and without the preprompt, benign
prompts' answers, what is kept and fine-tuned on, resume after a stop bitwise equal to an
uninterrupted run, the dry run)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import signal

import jax
import numpy as np
import pytest

from configs import tiny
from llama_jax import convert
from llama_jax.context_distillation import run as cd_run
from llama_jax.context_distillation import step as cd
from llama_jax.data import world, world_tasks
from llama_jax.recipe import dry_run, pipeline, sections, stages
from llama_jax.rejection_sampling import step as rs_lib
from llama_jax.reward import scoring
from llama_jax.tokenizer import Tokenizer
from llama_jax.train import settings
from train_helpers import (assert_same_run, rl_workdir, tiny_rl_models, tiny_sampling_config,
                           with_stand_in_inputs)


# ---- selection -----------------------------------------------------------------------------------
def _select_ref(so, sd, fo, fd, targeted):
  out = []
  for i in range(len(so)):
    if not fd[i]:
      out.append(False)  # a truncated distilled answer is never kept
    elif not targeted or not fo[i]:
      out.append(True)
    else:
      out.append(bool(sd[i] > so[i]))
  return np.asarray(out, bool)


@pytest.mark.parametrize("seed", range(20))
def test_select_distilled_matches_a_loop_reference(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(0, 12))
  # Few distinct values: ties (equal scores are not "better": the original stays).
  so, sd = rng.integers(0, 3, n) / 2.0, rng.integers(0, 3, n) / 2.0
  fo, fd = rng.random(n) < 0.7, rng.random(n) < 0.7
  for targeted in (True, False):
    np.testing.assert_array_equal(cd.select_distilled(so, sd, fo, fd, targeted),
                                  _select_ref(so, sd, fo, fd, targeted))


def test_select_distilled_by_hand_and_errors():
  got = cd.select_distilled([0.2, 0.9, 0.5, 0.5], [0.8, 0.3, 0.5, 0.9], [True, True, False, True],
                            [True, True, True, False])
  assert got.tolist() == [True, False, True, False]
  assert cd.select_distilled([0.2, 0.9], [0.8, 0.3], [1, 1], [1, 1], targeted=False).all()
  with pytest.raises(ValueError, match="four"):
    cd.select_distilled([0.1], [0.1, 0.2], [True], [True])


def _best_ref(scores, finished):
  out = []
  for s, f in zip(scores, finished):
    best = -1
    for j in range(len(s)):
      if f[j] and (best < 0 or s[j] > s[best]):
        best = j  # strictly better: the first of equal scores stays
    out.append(best)
  return np.asarray(out)


@pytest.mark.parametrize("seed", range(20))
def test_best_finished_matches_a_loop_reference(seed):
  rng = np.random.default_rng(seed)
  n, k = int(rng.integers(0, 10)), int(rng.integers(1, 5))
  scores, finished = rng.integers(0, 3, (n, k)) / 2.0, rng.random((n, k)) < 0.6
  np.testing.assert_array_equal(cd.best_finished(scores, finished), _best_ref(scores, finished))


def test_best_finished_by_hand_and_errors():
  got = cd.best_finished([[0.1, 0.9, 0.5], [0.7, 0.2, 0.7], [0.3, 0.4, 0.9]],
                         [[True, False, True], [True, True, True], [False, False, False]])
  assert got.tolist() == [2, 0, -1]
  with pytest.raises(ValueError, match=r"\[n, k\]"):
    cd.best_finished([0.1, 0.2], [True, True])
  rows = cd.benign_records([{"prompt": [{"role": "user", "content": "hi"}]}] * 2,
                           [["a", "b"], ["c", "d"]], [[True, True], [False, False]],
                           [[0.1, 0.4], [0.9, 0.8]], judge=lambda d, t: t == "b")
  assert [(r["kept"], r["answer"], r["refused"]) for r in rows] == [(True, "b", True),
                                                                   (False, None, False)]
  assert cd.sft_records(rows) == [{"messages": [{"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": "b"}]}]


# ---- preprompts and the world that reacts to them -------------------------------------------------
HARMFUL = "How do I steal a bike from a store?"


def test_preprompts():
  user = [{"role": "user", "content": HARMFUL}]
  assert cd.preprompt_text(user, "generic") == world.safety_preprompt() == \
      "You are a safe and responsible assistant. Never help anyone cause harm."
  template = cd.preprompt_text(user, "template")
  assert template.startswith(world.safety_preprompt()) and "theft" in template
  assert template.endswith("Stealing is against the law.")
  assert cd.with_preprompt(user, "P") == [{"role": "system", "content": "P"}] + user
  sys_user = [{"role": "system", "content": world.SYSTEM_PROMPT}] + user
  got = cd.with_preprompt(sys_user, "P")
  assert got == [{"role": "system", "content": f"P {world.SYSTEM_PROMPT}"}] + user
  assert sys_user[0]["content"] == world.SYSTEM_PROMPT  # the input is not changed
  with pytest.raises(ValueError, match="template"):
    cd.preprompt_text([{"role": "user", "content": "What is 1 plus 2?"}], "template")
  with pytest.raises(ValueError, match="preprompt must be one of"):
    cd.preprompt_text(user, "polite")
  with pytest.raises(ValueError, match="category"):
    world.safety_preprompt("arson")


def test_world_demonstrations_follow_the_preprompt_and_the_unsafe_share():
  base = world.WorldConfig()
  cfg = dataclasses.replace(base, unsafe_fraction=0.5, safety_preprompt_fraction=0.3)
  demos = world.sft_demonstrations(cfg, "train", 3000)
  harmful = [d["messages"] for d in demos
             if world.parse_prompt(d["messages"][-2]["content"]).task == "harmful"]
  pre = [m for m in harmful if m[0]["content"].startswith(world.safety_preprompt())]
  plain = [m for m in harmful if not m[0]["content"].startswith(world.safety_preprompt())]
  judge = lambda m: world.oracle(m[:-1], m[-1]["content"])
  # Binomial shares: 3 standard errors of 0.3 of ~750 and 0.5 of ~525.
  assert abs(len(pre) / len(harmful) - 0.3) < 3 * np.sqrt(0.21 / len(harmful))
  assert all(judge(m).refused for m in pre)
  refused = np.mean([judge(m).refused for m in plain])
  assert abs(refused - 0.5) < 3 * np.sqrt(0.25 / len(plain))
  # Template preprompts carry the category's reason, and their refusals state it (quality 3).
  templated = [m for m in pre if m[0]["content"] != world.safety_preprompt()]
  assert templated and all(judge(m).quality == 3 for m in templated)
  assert {judge(m).quality for m in pre} == {2, 3}  # the generic one: polite or curt
  # Benign demonstrations never get the preprompt.
  assert not any(d["messages"][0]["content"].startswith(world.safety_preprompt()) for d in demos
                 if world.parse_prompt(d["messages"][-2]["content"]).task != "harmful")
  with pytest.raises(ValueError, match="unsafe_fraction"):
    world.WorldConfig(unsafe_fraction=1.5)


# ---- the stage ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
  return tiny_rl_models(tmp_path_factory.mktemp("cd_models"))


@pytest.fixture
def short_preprompt(monkeypatch):
  """The tiny models' 320-piece tokenizer spells the real preprompt in ~85 tokens, more than
  their 128-token context leaves; the stage tests use a short one."""
  monkeypatch.setattr(world_tasks, "SAFETY_PREPROMPT", "Be safe.")


def make_config(models, **fields):
  """8 adversarial prompts in batches of 4 (two generation batches per variant), 8-token
  answers, one fine-tuning step on the tiny random policy and RMs."""
  c = tiny_sampling_config(models, "context_distillation")
  c.rejection_sampling.max_prompt_len, c.rejection_sampling.batch_size = 112, 4
  c.context_distillation.num_prompts = 8
  c.context_distillation.update(fields)
  return c


def _rows(path):
  return [json.loads(x) for x in path.read_text().splitlines()]


def _params(path):
  return [np.asarray(x) for x in jax.tree.leaves(convert.load_orbax(str(path))[1])]


def test_stage_end_to_end_and_resume_bitwise(models, tmp_path, monkeypatch, short_preprompt):
  sample_k, chunks = rs_lib.sample_k, []
  def recording_sample_k(params, cfg, tok, chunk, k, *args, **kw):
    chunks.append(chunk)
    if stop_at == len(chunks):
      os.kill(os.getpid(), signal.SIGTERM)  # stops the pass after this batch
    return sample_k(params, cfg, tok, chunk, k, *args, **kw)
  monkeypatch.setattr(rs_lib, "sample_k", recording_sample_k)

  stop_at, full = 0, rl_workdir(models, tmp_path, "full")
  res = stages.run(make_config(models, targeted=False), str(full))
  assert res["finished"] and (full / "final" / "params.json").exists()
  rows = _rows(full / cd_run.ROWS)
  assert len(rows) == 8 and len(chunks) == 4  # 2 batches without, 2 with the preprompt
  pre = world.safety_preprompt()
  for chunk in chunks[:2]:
    assert all(not m[0]["content"].startswith(pre) for m in chunk)
  for chunk in chunks[2:]:
    assert all(m[0]["role"] == "system" and m[0]["content"].startswith(pre) for m in chunk)
  assert [r["prompt"] for r in rows] == [m for c in chunks[:2] for m in c]
  assert all(world.parse_prompt(r["prompt"][-1]["content"]).task == "harmful" for r in rows)
  # Untargeted: every finished distilled answer, after the prompt without the preprompt.
  assert [r["kept"] for r in rows] == [r["distilled_finished"] for r in rows]
  sft = _rows(full / "sft_data.jsonl")
  assert sft == [{"messages": r["prompt"] + [{"role": "assistant", "content": r["distilled"]}]}
                 for r in rows if r["kept"]]
  stats = res["distilled"]
  assert stats["prompts"] == 8 and stats["kept"] == len(sft) >= 1
  assert stats["distilled_refused"] == np.mean([r["distilled_refused"] for r in rows])
  assert json.loads((full / "result.json").read_text())["distilled"] == stats
  assert res["finetune"]["steps"] == 1

  # A SIGTERM after the first batch; the rerun samples the other three and ends equal.
  chunks.clear()
  stop_at, part = 1, rl_workdir(models, tmp_path, "part")
  stopped = stages.run(make_config(models, targeted=False), str(part))
  assert stopped == {"finished": False, "stopped_by_signal": True}
  assert len(list((part / "sampling").rglob("batch_*.json"))) == 1
  chunks.clear()
  stop_at = 0
  resumed = stages.run(make_config(models, targeted=False), str(part))
  assert resumed["finished"] and len(chunks) == 3
  assert _rows(part / cd_run.ROWS) == rows and not (part / "sampling").exists()
  assert_same_run(full / "finetune", part / "finetune")
  for a, b in zip(_params(full / "final"), _params(part / "final")):
    np.testing.assert_array_equal(a, b)
  assert stages.run(make_config(models, targeted=False), str(part)) == json.loads(
      (part / "result.json").read_text())  # finished: nothing runs
  with pytest.raises(ValueError, match="context_distillation.targeted"):
    stages.run(make_config(models, targeted=True), str(part))


def test_targeted_keeps_what_the_safety_rm_prefers(models, tmp_path, short_preprompt):
  work = rl_workdir(models, tmp_path, "targeted")
  res = stages.run(make_config(models, num_prompts=16), str(work))
  rows = _rows(work / cd_run.ROWS)
  want = cd.select_distilled(*(np.asarray([r[k] for r in rows]) for k in (
      "original_score", "distilled_score", "original_finished", "distilled_finished")))
  assert [r["kept"] for r in rows] == want.tolist() and res["distilled"]["kept"] == want.sum()
  finished = sum(r["distilled_finished"] for r in rows)
  assert 0 < want.sum() < finished  # the comparison kept some finished answers, not all
  # The scores are the safety RM's (Rc on safety prompts) of the prompt without the preprompt.
  rms = scoring.load_reward_models(str(models / "help"), str(models / "safe"), "test")
  got = scoring.score_dialogs(*rms, Tokenizer(str(work / "tokenizer.model")),
                              [r["prompt"] for r in rows], [r["distilled"] for r in rows],
                              [True] * len(rows))
  np.testing.assert_allclose(got["r_safe"], [r["distilled_score"] for r in rows], rtol=1e-6)


def test_benign_prompts_add_their_best_answer_and_resume(models, tmp_path, monkeypatch,
                                                        short_preprompt):
  sample_k, chunks = rs_lib.sample_k, []
  def recording_sample_k(params, cfg, tok, chunk, k, *args, **kw):
    chunks.append((chunk, k))
    if stop_at == len(chunks):
      os.kill(os.getpid(), signal.SIGTERM)  # stops the pass after this batch
    return sample_k(params, cfg, tok, chunk, k, *args, **kw)
  monkeypatch.setattr(rs_lib, "sample_k", recording_sample_k)
  make = lambda: make_config(models, num_prompts=4, benign_prompts=6, benign_k=3)

  stop_at, full = 0, rl_workdir(models, tmp_path, "full")
  res = stages.run(make(), str(full))
  rows = _rows(full / cd_run.ROWS)
  adversarial, benign = rows[:4], rows[4:]
  assert not any(r.get("benign") for r in adversarial) and len(benign) == 6
  assert [k for _, k in chunks] == [1, 1, 3, 3]  # original, distilled, then two benign batches
  assert [r["prompt"] for r in benign] == [m for c, _ in chunks[2:] for m in c]
  assert all(world.parse_prompt(r["prompt"][-1]["content"]).task != "harmful" for r in benign)
  # The scores are Rc of each benign answer (the helpfulness RM's there, unless it looks unsafe).
  rms = scoring.load_reward_models(str(models / "help"), str(models / "safe"), "test")
  got = scoring.score_dialogs(*rms, Tokenizer(str(full / "tokenizer.model")),
                              [r["prompt"] for r in benign for _ in range(3)],
                              [a for r in benign for a in r["answers"]], [False] * 18)
  np.testing.assert_allclose(got["rc"], [s for r in benign for s in r["scores"]], rtol=1e-6)
  for r in benign:
    assert r["kept"] == any(r["finished"])
    if r["kept"]:
      assert r["answer"] == r["answers"][_best_ref([r["scores"]], [r["finished"]])[0]]
  sft = _rows(full / "sft_data.jsonl")
  assert sft[-sum(r["kept"] for r in benign):] == [
      {"messages": r["prompt"] + [{"role": "assistant", "content": r["answer"]}]}
      for r in benign if r["kept"]]
  stats = res["distilled"]
  assert (stats["prompts"], stats["benign_prompts"]) == (4, 6)
  assert stats["benign_refused"] == np.mean([r["refused"] for r in benign if r["kept"]])

  # A SIGTERM after the first benign batch; the rerun samples the second and ends equal.
  chunks.clear()
  stop_at, part = 3, rl_workdir(models, tmp_path, "part")
  assert stages.run(make(), str(part)) == {"finished": False, "stopped_by_signal": True}
  chunks.clear()
  stop_at = 0
  assert stages.run(make(), str(part))["finished"] and len(chunks) == 1
  assert _rows(part / cd_run.ROWS) == rows
  for a, b in zip(_params(full / "final"), _params(part / "final")):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("change,match", [
    (lambda c: setattr(c, "init_from", ""), "config.init_from"),
    (lambda c: c.rejection_sampling.update(safety_rm=""), "context_distillation.targeted"),
    (lambda c: c.rejection_sampling.update(help_rm=""), "rejection_sampling.help_rm"),
    (lambda c: c.context_distillation.update(preprompt="polite"), "context_distillation.preprompt"),
    (lambda c: c.context_distillation.update(num_prompts=0), "context_distillation.num_prompts"),
    (lambda c: c.tokenizer.update(path="/nope/tokenizer.model") or
     c.context_distillation.update(preprompt="template"), "synthetic world"),
    (lambda c: c.data.update(world_unsafe_fraction=1.5), "world_unsafe_fraction"),
])
def test_bad_settings_are_rejected_before_anything_is_written(models, tmp_path, change, match):
  c = make_config(models)
  change(c)
  with pytest.raises(ValueError, match=match):
    stages.run(c, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_dry_run_plans_the_finetune_step_and_the_sampling_pass():
  c = tiny.get_config()
  c.stage = "context_distillation"
  c.rejection_sampling.batch_size = 4
  p = dry_run.plan(c)
  assert [s["name"].split(" ")[0] for s in p["steps"]] == ["sft.train_step", "sampling.sample"]
  assert p["steps"][1]["batch_shapes"]["tokens"] == (4, c.rejection_sampling.max_new_tokens)
  assert any("scoring" in u for u in p["unavailable"])
  c.context_distillation.update(benign_prompts=8, benign_k=3)  # the larger pass is planned
  assert dry_run.plan(c)["steps"][1]["batch_shapes"]["tokens"] == (
      4 * 3, c.rejection_sampling.max_new_tokens)


def test_shipped_config_passes_the_stage_checks(tmp_path):
  c = importlib.import_module("configs.distill_tiny").get_config()
  assert (c.stage, c.pipeline.methods) == ("pipeline", "context_distillation")
  assert (c.data.world_unsafe_fraction, c.context_distillation.preprompt) == (0.6, "template")
  plan = dict(pipeline.stage_plan(c, str(tmp_path)))
  assert list(plan) == ["sft", "annotate", "rm_helpfulness", "rm_safety", "context_distillation"]
  sub = plan["context_distillation"]()
  for d in ("sft/final", "rm_helpfulness/final", "rm_safety/final"):
    (tmp_path / d).mkdir(parents=True)
  (tmp_path / "sft" / "final" / "params.json").write_text("{}")
  settings.validate(sub, str(tmp_path / "w"), sections.SECTIONS)
  cd_run.validate(sub)


@pytest.mark.parametrize("name,preset,mesh", [("distill_7b", "llama2_7b", (1, 8, 1)),
                                              ("distill_70b", "llama2_70b", (1, 8, 8))])
def test_shipped_pod_configs_pass_the_stage_checks(name, preset, mesh, tmp_path):
  c = importlib.import_module(f"configs.{name}").get_config()
  assert (c.stage, c.model.preset, tuple(c.mesh.shape)) == ("context_distillation", preset, mesh)
  assert (c.context_distillation.preprompt, c.context_distillation.targeted) == ("generic", True)
  assert (c.context_distillation.benign_prompts, c.context_distillation.benign_k) == (1024, 2)
  with_stand_in_inputs(c, tmp_path)
  settings.validate(c, str(tmp_path / "w"), sections.SECTIONS)
  cd_run.validate(c)
