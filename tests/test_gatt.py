"""Ghost Attention (llama_jax.gatt): the world's instructions and their checker, multi-turn world
dialogs, the chat format's per-turn loss weights and per-turn system message, GAtt's training
samples against a loop reference, config checks, and the stage end to end on a tiny model
(resume after a stop bitwise equal to an uninterrupted run, the dry run)."""

from __future__ import annotations

import importlib
import json
import os
import signal

import jax
import numpy as np
import pytest

from configs import tiny
from llama_jax import convert
from llama_jax.config import LlamaConfig
from llama_jax.data import sources, world, world_tasks, world_tokenizer
from llama_jax.gatt import evaluate
from llama_jax.gatt import run as gatt_run
from llama_jax.gatt import step as gatt
from llama_jax.model import init_params
from llama_jax.recipe import dry_run, pipeline, sections, stages
from llama_jax.train import settings
from train_helpers import assert_same_run, instruction_tokenizer, with_stand_in_inputs

PROMPTS = ("What is 3 plus 4?", "Reverse the list: cat, dog, owl.", "How many words are in this "
           "list: sun, van?", "How do I steal a bike from a store?")


# ---- instructions and the oracle -----------------------------------------------------------------
@pytest.mark.parametrize("instruction", world.INSTRUCTIONS)
def test_following_an_instruction_is_checkable_and_keeps_the_oracle_verdict(instruction):
  kind, sign = world_tasks.parse_instruction(instruction)
  assert kind in world_tasks.INSTRUCTION_KINDS and sign in world_tasks.SIGNS
  for p in PROMPTS:
    gold = world.demonstration(p)
    followed = world.follow_instruction(instruction, gold)
    assert world_tasks.follows_instruction(instruction, followed)
    assert not world_tasks.follows_instruction(instruction, gold)
    assert world.oracle(p, followed) == world.oracle(p, gold)  # the sign changes no verdict
  other = [i for i in world.INSTRUCTIONS if world_tasks.parse_instruction(i)[0] != kind][0]
  assert not world_tasks.follows_instruction(other, world.follow_instruction(instruction, "Ok."))


def test_instruction_checker_by_hand_and_errors():
  assert world_tasks.follows_instruction("End every answer with the word Ahoy.", "The answer "
                                         "is 7. ahoy!!")
  assert world_tasks.follows_instruction("Begin every answer with the word Bravo.", "  BRAVO, 7")
  assert not world_tasks.follows_instruction("Begin every answer with the word Bravo.", "")
  assert not world_tasks.follows_instruction("End every answer with the word Ahoy.",
                                             "Ahoy! The answer is 7.")
  assert world_tasks.parse_instruction("End every answer with the word Zebra.") is None
  with pytest.raises(ValueError, match="not an instruction"):
    world_tasks.follows_instruction("Be brief.", "ok")
  with pytest.raises(ValueError, match="not an instruction"):
    world.follow_instruction("Be brief.", "ok")


def test_world_demonstrations_with_instructions_and_multiturn_dialogs():
  cfg = world.WorldConfig(instruction_fraction=0.3, multiturn_fraction=0.4, max_turns=6)
  demos = world.sft_demonstrations(cfg, "train", 1500)
  multi = [d for d in demos if len(d["messages"]) > 3]
  single = [d for d in demos if len(d["messages"]) <= 3]
  se = lambda p, n: 3 * np.sqrt(p * (1 - p) / n)
  assert abs(len(multi) / len(demos) - 0.4) < se(0.4, len(demos))
  for d in multi:
    m = d["messages"]
    assert m[0]["role"] == "user" and 2 <= len(m) // 2 <= 6 and len(m) % 2 == 0
    for u, a in zip(m[::2], m[1::2]):
      assert world.oracle(u["content"], a["content"]).correct  # gold answers to benign prompts
      assert world.split_of(cfg, u["content"]) == "train"
  with_inst = [d for d in single if d["messages"][0]["content"] in world.INSTRUCTIONS]
  assert abs(len(with_inst) / len(single) - 0.3) < se(0.3, len(single))
  for d in with_inst:
    assert world_tasks.follows_instruction(d["messages"][0]["content"],
                                           d["messages"][-1]["content"])
  # Off by default: the defaults' demonstrations never carry either.
  plain = world.sft_demonstrations(world.WorldConfig(), "train", 300)
  assert all(len(d["messages"]) <= 3 and d["messages"][0]["content"] not in world.INSTRUCTIONS
             for d in plain)
  with pytest.raises(ValueError, match="max_turns"):
    world.WorldConfig(max_turns=1)
  with pytest.raises(ValueError, match="instruction_fraction"):
    world.WorldConfig(instruction_fraction=-0.1)


def test_instruction_dialogs():
  cfg = world.WorldConfig()
  a = world.instruction_dialogs(cfg, "held_out", 40, 3, 7)
  assert a == world.instruction_dialogs(cfg, "held_out", 40, 3, 7)  # deterministic
  assert {len(d["turns"]) for d in a} == set(range(3, 8))
  assert all(d["instruction"] in world.INSTRUCTIONS for d in a)
  assert all(world.split_of(cfg, u) == "held_out" and world.parse_prompt(u).task != "harmful"
             for d in a for u in d["turns"])
  s1 = world.instruction_dialogs(cfg, "train", 10, 2, 2, stream=1)
  assert all(world.stream_of(cfg, u) == 1 for d in s1 for u in d["turns"])
  with pytest.raises(ValueError, match="min_turns"):
    world.instruction_dialogs(cfg, "train", 1, 3, 2)
  with pytest.raises(ValueError, match="split"):
    world.instruction_dialogs(cfg, "dev", 1, 1, 2)
  with pytest.raises(ValueError, match="stream"):
    world.instruction_dialogs(cfg, "train", 1, 1, 2, stream=99)


# ---- chat format: loss weights and the per-turn system message -------------------------------------
@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return instruction_tokenizer(tmp_path_factory)


def _exchange_masks(tok, users, answers, system=None):
  """Loop reference: each exchange encoded alone as a one-turn dialog."""
  out = []
  for i, (u, a) in enumerate(zip(users, answers)):
    msgs = ([{"role": "system", "content": system}] if system and i == 0 else []) + [
        {"role": "user", "content": u}, {"role": "assistant", "content": a}]
    out.append(tok.encode_dialog(msgs))
  return out


def test_training_record_trains_the_last_answer_only(tok):
  inst = world.INSTRUCTIONS[3]
  users = list(PROMPTS[:3])
  answers = [world.follow_instruction(inst, world.demonstration(u)) for u in users]
  rec = gatt.training_record(inst, users, answers)
  m = rec["messages"]
  assert m[0] == {"role": "system", "content": inst}
  assert [x.get("weight", 1) for x in m if x["role"] == "assistant"] == [0, 0, 1]
  assert sources.validate_sft(rec, "test") == rec  # the weights survive validation
  ids, mask = tok.encode_dialog(m)
  ref = _exchange_masks(tok, users, answers, system=inst)
  np.testing.assert_array_equal(ids, np.concatenate([r[0] for r in ref]))
  want = np.concatenate([np.zeros_like(r[1]) for r in ref[:-1]] + [ref[-1][1]])
  np.testing.assert_array_equal(mask, want)
  assert tok.decode(ids[mask]).strip() == answers[-1]
  with pytest.raises(ValueError, match="as many answers"):
    gatt.training_record(inst, users, answers[:2])


def test_system_message_in_every_turn(tok):
  inst, users = world.INSTRUCTIONS[0], list(PROMPTS[:2])
  msgs = gatt.messages(inst, users, ["The answer is 7."])
  ids, mask = tok.encode_dialog(msgs, system_every_turn=True)
  text = tok.decode(ids)
  assert text.count("<<SYS>>") == 2 and text.count(inst) == 2
  once = tok.decode(tok.encode_dialog(msgs)[0])
  assert once.count(inst) == 1
  # The same tokens as each turn written with the system block by hand.
  by_hand = [{"role": "user", "content": users[0]}, {"role": "assistant",
                                                      "content": "The answer is 7."}]
  first = tok.encode_dialog([{"role": "system", "content": inst}] + by_hand)[0]
  last = tok.encode_dialog([{"role": "system", "content": inst},
                            {"role": "user", "content": users[1]}])[0]
  np.testing.assert_array_equal(ids, np.concatenate([first, last]))
  assert not mask[len(first):].any()
  with pytest.raises(ValueError, match="one fewer"):
    gatt.messages(inst, users, [])


@pytest.mark.parametrize("weight", [2, -1, 0.5, True, "0"])
def test_bad_weights_are_rejected(tok, weight):
  msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo",
                                               "weight": weight}]
  with pytest.raises(ValueError, match="weight"):
    tok.encode_dialog(msgs)
  with pytest.raises(ValueError, match=r"messages\[1\]\.weight"):
    sources.validate_sft({"messages": msgs}, "f.jsonl, line 3")
  user_weight = [{"role": "user", "content": "hi", "weight": 0},
                 {"role": "assistant", "content": "yo"}]
  with pytest.raises(ValueError, match=r"messages\[0\]\.weight"):
    sources.validate_sft({"messages": user_weight}, "f.jsonl, line 3")


# ---- selection and per-turn statistics ----------------------------------------------------------
@pytest.mark.parametrize("seed", range(10))
def test_keep_and_per_turn_match_loops(seed):
  rng = np.random.default_rng(seed)
  n, t = int(rng.integers(1, 9)), int(rng.integers(1, 6))
  follows, finished, correct = rng.random(n) < 0.5, rng.random(n) < 0.7, rng.random(n) < 0.5
  for mode in gatt.KEEP:
    want = []
    for i in range(n):
      ok = finished[i]
      if mode in ("following", "following_correct"):
        ok = ok and follows[i]
      if mode == "following_correct":
        ok = ok and correct[i]
      want.append(bool(ok))
    assert gatt.keep(finished, follows, correct, mode=mode).tolist() == want
  with pytest.raises(ValueError, match="keep mode"):
    gatt.keep(finished, follows, correct, mode="best")
  values = np.where(rng.random((n, t)) < 0.3, np.nan, (rng.random((n, t)) < 0.5).astype(float))
  got = gatt.per_turn(values)
  for j in range(t):
    col = [v for v in values[:, j] if not np.isnan(v)]
    assert got["n"][j] == len(col)
    assert got["mean"][j] == (pytest.approx(sum(col) / len(col)) if col else None)
  texts = [["a"] * int(rng.integers(0, t + 1)) for _ in range(n)]
  rows = gatt.judge_rows(texts, t, lambda i, j, x: (i + j) % 2 == 0)
  for i in range(n):
    for j in range(t):
      want = float((i + j) % 2 == 0) if j < len(texts[i]) else np.nan
      np.testing.assert_equal(rows[i, j], want)


# ---- the stage ---------------------------------------------------------------------------------
MODEL = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, multiple_of=16,
                    max_seq_len=512)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """The world tokenizer with instructions and a random 512-token policy whose EOS logit is
  lifted, so some answers end."""
  root = tmp_path_factory.mktemp("gatt_models")
  world_tokenizer.train_tokenizer(root / "tok" / "tokenizer.model", world.WorldConfig(),
                                  vocab_size=320)
  policy = jax.tree.map(np.array, init_params(MODEL, jax.random.key(0)))
  policy["tok_embeddings"][:, 0] = 10.0
  policy["output"][0, :] = 0.0
  policy["output"][0, 2] = 0.75
  convert.save_orbax(root / "policy", MODEL, policy)
  return root


def make_config(models, **fields):
  """12 train dialogs of 1-3 turns in batches of 8, 6-token answers, one fine-tuning step; 4
  held-out dialogs of 3 turns evaluated."""
  c = tiny.get_config()
  c.stage = "gatt"
  c.init_from = str(models / "policy")
  c.model.dim, c.model.n_layers, c.model.n_heads, c.model.n_kv_heads = 32, 2, 4, 2
  c.model.multiple_of, c.model.max_seq_len = 16, 512
  c.tokenizer.world_vocab_size = 320
  c.data.max_seq_len, c.data.batch_size = 256, 4
  c.train.async_checkpoint = False
  r = c.rejection_sampling
  r.max_new_tokens, r.num_steps, r.lr, r.batch_size = 6, 1, 1e-3, 8
  c.gatt.update(num_dialogs=12, max_turns=3, keep="finished", eval_dialogs=4,
                eval_turns=3, late_turn=2)
  c.gatt.update(fields)
  return c


def _workdir(models, tmp_path, name):
  work = tmp_path / name
  work.mkdir()
  for f in ("tokenizer.model", "tokenizer.model.json"):
    (work / f).write_bytes((models / "tok" / f).read_bytes())
  return work


def _rows(path):
  return [json.loads(x) for x in path.read_text().splitlines()]


def _params(path):
  return [np.asarray(x) for x in jax.tree.leaves(convert.load_orbax(str(path))[1])]


def test_stage_end_to_end_and_resume_bitwise(models, tmp_path, monkeypatch):
  generate, turns = evaluate._generate, []
  def recording_generate(*args, **kw):
    turns.append(args[2])
    if stop_at == len(turns):
      os.kill(os.getpid(), signal.SIGTERM)  # stops the rollout after this turn
    return generate(*args, **kw)
  monkeypatch.setattr(evaluate, "_generate", recording_generate)

  stop_at, full = 0, _workdir(models, tmp_path, "full")
  res = stages.run(make_config(models), str(full))
  assert res["finished"] and (full / "final" / "params.json").exists()
  rows = _rows(full / gatt_run.ROWS)
  assert len(rows) == 12
  assert all(1 <= len(r["answers"]) == len(r["turns"]) <= r["planned_turns"] <= 3 for r in rows)
  for r in rows:
    assert r["follows"] == [world_tasks.follows_instruction(r["instruction"], a)
                            for a in r["answers"]]
  assert [r["kept"] for r in rows] == [r["finished"] for r in rows]  # keep="finished"
  for r in rows:
    assert r["correct"] == [world.oracle(u, a).helpful for u, a in zip(r["turns"], r["answers"])]
  sft = _rows(full / "sft_data.jsonl")
  assert sft == [gatt.training_record(r["instruction"], r["turns"], r["answers"])
                 for r in rows if r["kept"]]
  assert res["gatt_data"] == gatt_run.summary(rows) and res["gatt_data"]["kept"] == len(sft) >= 1
  assert res["finetune"]["steps"] == 1
  comparison = json.loads((full / gatt_run.ADHERENCE).read_text())
  assert comparison["follows"]["turn"] == [1, 2, 3] and (full / "adherence.png").exists()
  assert res["adherence"]["late"] == comparison["follows"]["late"]
  evals = _rows(full / "eval_dialogs.jsonl")
  assert len(evals) == 4 and all(len(e["turns"]) == 3 for e in evals)
  before = [[float(world_tasks.follows_instruction(e["instruction"], a)) for a in e["before"]]
            for e in evals]
  assert comparison["follows"]["before"][0] == pytest.approx(np.mean([b[0] for b in before]))
  sampled_turns = len(turns)

  # A SIGTERM after the first turn; the rerun samples the rest and ends equal.
  turns.clear()
  stop_at, part = 1, _workdir(models, tmp_path, "part")
  assert stages.run(make_config(models), str(part)) == {"finished": False,
                                                        "stopped_by_signal": True}
  assert len(list((part / "sampling").glob("turn_*.json"))) == 1
  turns.clear()
  stop_at = 0
  resumed = stages.run(make_config(models), str(part))
  assert resumed["finished"] and len(turns) == sampled_turns - 1
  assert _rows(part / gatt_run.ROWS) == rows and not (part / "sampling").exists()
  assert resumed["tokens_sampled"] == res["tokens_sampled"] > 0  # turn 1's count from its file
  assert resumed["tokens_trained"] == res["tokens_trained"] > 0
  assert_same_run(full / "finetune", part / "finetune")
  for a, b in zip(_params(full / "final"), _params(part / "final")):
    np.testing.assert_array_equal(a, b)
  assert json.loads((part / gatt_run.ADHERENCE).read_text()) == comparison
  assert stages.run(make_config(models), str(part)) == json.loads(
      (part / "result.json").read_text())  # finished: nothing runs
  with pytest.raises(ValueError, match="gatt.num_dialogs"):
    stages.run(make_config(models, num_dialogs=13), str(part))


# ---- file data: Llama 2's synthetic constraints over real prompts ------------------------------
def test_synthetic_instructions_combine_the_papers_constraints():
  forms = {kind: (verbose, terse) for kind, (verbose, terse, _) in gatt.CONSTRAINTS.items()}
  seen_terse = seen_verbose = seen_pairs = False
  rng = np.random.default_rng(0)
  for _ in range(200):
    text = gatt.synthetic_instruction(rng)
    parts, rest = [], text
    for kind, (verbose, terse, values) in gatt.CONSTRAINTS.items():
      for form in (verbose, terse):
        for v in values:
          if form.format(v) in rest:
            parts.append((kind, form))
            rest = rest.replace(form.format(v), "", 1)
    assert not rest.strip() and 1 <= len(parts) <= 2, text  # nothing else, one or two kinds
    assert len({k for k, _ in parts}) == len(parts)
    seen_terse |= any(f == forms[k][1] for k, f in parts)
    seen_verbose |= any(f == forms[k][0] for k, f in parts)
    seen_pairs |= len(parts) == 2
  assert seen_terse and seen_verbose and seen_pairs


def test_file_instruction_dialogs():
  texts = [f"question {i}" for i in range(7)]
  a = gatt.instruction_dialogs(texts, 50, 2, 4, np.random.default_rng(1))
  assert a == gatt.instruction_dialogs(texts, 50, 2, 4, np.random.default_rng(1))  # seeded
  assert len(a) == 50 and {len(d["turns"]) for d in a} == {2, 3, 4}
  assert all(t in texts for d in a for t in d["turns"])
  with pytest.raises(ValueError, match="no user text"):
    gatt.instruction_dialogs([], 1, 1, 1, np.random.default_rng(0))
  with pytest.raises(ValueError, match="min_turns"):
    gatt.instruction_dialogs(texts, 1, 3, 2, np.random.default_rng(0))


def _file_config(models_dir, tokenizer_path, self_instruct_path, **fields):
  c = make_config(models_dir, eval_dialogs=0, max_turns=2, num_dialogs=16)
  c.init_from = str(models_dir / "llama_vocab_policy")
  c.tokenizer.path = str(tokenizer_path)
  c.data.sft_sources, c.data.self_instruct_path = "self_instruct", str(self_instruct_path)
  c.gatt.update(fields)
  return c


@pytest.fixture(scope="module")
def llama_vocab_policy(models):
  """A random 1-layer policy over the Llama 2 vocabulary (32,000) whose EOS logit is lifted."""
  cfg = LlamaConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=32000,
                    multiple_of=16, max_seq_len=512)
  policy = jax.tree.map(np.array, init_params(cfg, jax.random.key(1)))
  policy["tok_embeddings"][:, 0] = 10.0
  policy["output"][0, :] = 0.0
  policy["output"][0, 2] = 1.6  # EOS is id 2 in the Llama 2 tokenizer too; 32,000 rivals
  convert.save_orbax(models / "llama_vocab_policy", cfg, policy)
  return models


def test_stage_on_file_data(llama_vocab_policy, llama2_tokenizer_path, self_instruct_path,
                            tmp_path):
  c = _file_config(llama_vocab_policy, llama2_tokenizer_path, self_instruct_path)
  c.model.n_layers, c.model.vocab_size = 1, 32000
  res = stages.run(c, str(tmp_path / "w"))
  assert res["finished"] and "adherence" not in res
  rows = _rows(tmp_path / "w" / gatt_run.ROWS)
  texts = {r["messages"][0]["content"] for r in sources.read_self_instruct(self_instruct_path)}
  assert len(rows) == 16 and all(1 <= len(r["turns"]) <= 2 for r in rows)
  assert all(t in texts for r in rows for t in r["turns"])  # the seed tasks' user turns
  assert all(any(r["instruction"].startswith(f[0].split("{")[0]) or
                 r["instruction"].startswith(f[1].split("{")[0])
                 for f in gatt.CONSTRAINTS.values()) for r in rows)
  assert not any("follows" in r or "correct" in r for r in rows)  # no checker off the world
  assert [r["kept"] for r in rows] == [r["finished"] for r in rows]
  assert res["gatt_data"] == gatt_run.summary(rows) and "follows" not in res["gatt_data"]
  sft = _rows(tmp_path / "w" / "sft_data.jsonl")
  assert sft == [gatt.training_record(r["instruction"], r["turns"], r["answers"])
                 for r in rows if r["kept"]]


@pytest.mark.parametrize("field,value", [("keep", "following"), ("eval_dialogs", 4)])
def test_file_data_refuses_what_needs_the_world(models, tmp_path, field, value):
  c = make_config(models, **{field: value})
  c.data.sft_sources, c.tokenizer.path = "self_instruct", "/nope/tokenizer.model"
  if field == "keep":
    c.gatt.eval_dialogs = 0
  with pytest.raises(ValueError, match=f"config.gatt.{field}"):
    stages.run(c, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("name,preset,mesh", [("gatt_7b", "llama2_7b", (1, 8, 1)),
                                              ("gatt_70b", "llama2_70b", (1, 8, 8))])
def test_shipped_pod_configs_pass_the_stage_checks(name, preset, mesh, tmp_path):
  c = importlib.import_module(f"configs.{name}").get_config()
  assert (c.stage, c.model.preset, tuple(c.mesh.shape)) == ("gatt", preset, mesh)
  assert (c.gatt.keep, c.gatt.eval_dialogs) == ("finished", 0)
  with_stand_in_inputs(c, tmp_path)
  settings.validate(c, str(tmp_path / "w"), sections.SECTIONS)
  gatt_run.validate(c)


@pytest.mark.parametrize("change,match", [
    (lambda c: setattr(c, "init_from", ""), "config.init_from"),
    (lambda c: c.gatt.update(num_dialogs=0), "gatt.num_dialogs"),
    (lambda c: c.gatt.update(eval_turns=0), "gatt.eval_turns"),
    (lambda c: c.gatt.update(keep="best"), "gatt.keep"),
    (lambda c: c.gatt.update(late_turn=4), "gatt.late_turn"),
    (lambda c: c.data.update(world_max_turns=1), "world_max_turns"),
    (lambda c: c.data.update(world_multiturn_fraction=2.0), "world_multiturn_fraction"),
])
def test_bad_settings_are_rejected_before_anything_is_written(models, tmp_path, change, match):
  c = make_config(models)
  change(c)
  with pytest.raises(ValueError, match=match):
    stages.run(c, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_missing_policy_is_rejected(models, tmp_path):
  c = make_config(models)
  c.init_from = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="params.json"):
    stages.run(c, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_dry_run_plans_the_finetune_step_and_the_longest_turn():
  c = tiny.get_config()
  c.stage = "gatt"
  c.rejection_sampling.batch_size = 4
  p = dry_run.plan(c)
  assert [s["name"].split(" ")[0] for s in p["steps"]] == ["sft.train_step", "sampling.sample"]
  assert p["steps"][1]["batch_shapes"]["tokens"] == (4, c.rejection_sampling.max_new_tokens)


def test_shipped_config_passes_the_stage_checks(tmp_path):
  c = importlib.import_module("configs.gatt_tiny").get_config()
  assert (c.stage, c.pipeline.methods) == ("pipeline", "gatt")
  assert c.model.max_seq_len == c.data.max_seq_len == 1024
  plan = dict(pipeline.stage_plan(c, str(tmp_path)))
  assert list(plan) == ["sft", "rm_helpfulness", "rm_safety", "gatt"]
  sub = plan["gatt"]()
  assert sub.init_from == str(tmp_path / "sft" / "final") and sub.gatt.prompt_stream == 0
  (tmp_path / "sft" / "final").mkdir(parents=True)
  (tmp_path / "sft" / "final" / "params.json").write_text("{}")
  settings.validate(sub, str(tmp_path / "w"), sections.SECTIONS)
  gatt_run.validate(sub)
