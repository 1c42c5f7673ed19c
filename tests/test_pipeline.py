"""The whole pipeline on a shrunken configs/tiny.py: stop, resume at the right stage, skip what is
done, and compare the policies with eval.py's pipeline branch."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from configs import tiny
from llama_jax.recipe import eval_run, pipeline, stages
from llama_jax.train import workdir as wd

ROOT = pathlib.Path(__file__).resolve().parents[1]

STAGES = ["sft", "rm_helpfulness", "rm_safety", "rs_1", "rs_2", "ppo", "ppo_oracle"]


def small_config():
  c = tiny.get_config()
  c.stage = "pipeline"
  c.model.dim, c.model.n_layers, c.model.n_heads, c.model.n_kv_heads = 64, 2, 4, 2
  c.model.multiple_of = 16
  c.tokenizer.world_vocab_size = 320
  c.data.world_sft_examples, c.data.world_heldout_prompts = 200, 16
  c.data.max_seq_len, c.data.batch_size = 128, 8
  # 30 SFT steps: enough for the policy to end answers with EOS (a truncated sample is never
  # picked by rejection sampling).
  c.train.num_steps, c.train.log_every = 30, 1
  c.train.async_checkpoint = False
  c.optimizer.warmup_steps = 0
  c.eval.num_samples, c.eval.num_batches, c.eval.max_new_tokens, c.eval.num_prompts = 0, 1, 16, 8
  c.eval.bon_prompts, c.eval.bon_n = 4, 8
  c.reward.world_train_pairs, c.reward.world_heldout_pairs, c.reward.batch_size = 32, 8, 8
  c.reward.max_seq_len, c.reward.overlong = 160, "drop"
  c.pipeline.reward_num_steps, c.pipeline.rs_iterations = 2, 2
  c.annotate.num_prompts = 0  # a 4-step SFT policy writes garbage: no pair to annotate
  r = c.rejection_sampling
  r.num_prompts, r.k, r.max_new_tokens, r.max_prompt_len, r.batch_size = 6, 2, 16, 80, 8
  r.auto_temperature = False
  r.num_steps, r.plot_prompts, r.plot_k, r.plot_temperatures = 1, 2, 2, "0.8,1.2"
  p = c.ppo
  p.num_iterations, p.batch_size, p.minibatch_size, p.max_new_tokens = 2, 8, 4, 16
  p.max_prompt_len, p.num_prompts, p.eval_prompts, p.eval_every = 80, 16, 8, 0
  p.epochs = 1
  p.lr = 1e-3
  return c


def test_pipeline_stops_resumes_skips_and_evaluates(tmp_path):
  work = tmp_path / "pipe"
  assert [name for name, _ in pipeline.stage_plan(small_config(), str(work))] == STAGES
  # 1) Stopped inside SFT after 15 of its 30 steps (as a time-limited job would be).
  c = small_config()
  c.train.stop_after_steps = 15
  res = stages.run(c, str(work))
  assert not res["finished"] and res["stopped_at"] == "sft" and res["ran"] == ["sft"]
  assert not (work / "rm_helpfulness").exists()
  # 2) Rerun: SFT resumes at step 15 (not from scratch) and every later stage runs.
  res = stages.run(small_config(), str(work))
  assert res["finished"] and res["ran"] == STAGES and res["skipped"] == []
  # Wall time per stage, summed over both runs for the resumed SFT.
  walls = json.loads((work / pipeline.WALL).read_text())
  assert sorted(walls) == sorted(STAGES) and all(v > 0 for v in walls.values())
  assert walls["sft"] > res["wall_s"]["sft"]  # the first run's part is in it too
  sft_steps = [json.loads(x)["step"] for x in
               (work / "sft" / "logs" / "metrics.jsonl").read_text().splitlines()
               if json.loads(x)["split"] == "train"]
  assert sft_steps == list(range(1, 31))
  # Tokens trained: every step's real_tokens (logged each step), the first run's included.
  logged = lambda name: [json.loads(x) for x in
                          (work / name / "logs" / "metrics.jsonl").read_text().splitlines()
                          if json.loads(x)["split"] == "train"]
  result = lambda name: json.loads((work / name / "result.json").read_text())
  sft_rows = logged("sft")
  assert result("sft")["tokens_trained"] == round(sum(r["real_tokens"] for r in sft_rows)) > 0
  assert sft_rows[-1]["tokens_trained"] == result("sft")["tokens_trained"]
  assert result("sft")["tokens_sampled"] == 0
  ppo_rows = logged("ppo")  # 8 rollouts per iteration
  assert result("ppo")["tokens_sampled"] == round(sum(8 * r["response_length"] for r in ppo_rows))
  assert result("rs_1")["tokens_trained"] == result("rs_1/finetune")["tokens_trained"] > 0
  assert result("rs_1")["tokens_sampled"] == result("rs_1")["sampled"]["tokens_sampled"] > 0
  for name in STAGES:
    assert wd.is_done(str(work / name)), name
  # Each stage starts from the previous one's checkpoint.
  cfg = lambda name: json.loads((work / name / "config.json").read_text())
  assert cfg("rm_safety")["init_from"] == str(work / "sft" / "final")
  assert cfg("rs_1")["init_from"] == str(work / "sft" / "final")
  assert cfg("rs_2")["init_from"] == str(work / "rs_1" / "final")
  assert cfg("rs_2")["rejection_sampling"]["pool_from"] == str(work / "rs_1" / "sampled.jsonl")
  assert cfg("ppo")["init_from"] == str(work / "rs_2" / "final")
  assert cfg("ppo")["ppo"]["help_rm"] == str(work / "rm_helpfulness" / "final")
  # 3) A finished pipeline skips every stage.
  res = stages.run(small_config(), str(work))
  assert res["finished"] and res["ran"] == [] and res["skipped"] == STAGES

  # eval.py on the pipeline workdir: one row per policy, intervals around every mean.
  out = eval_run.run(str(work), 8)
  names = [r["policy"] for r in out["policies"]]
  assert names == ["SFT", "RLHF-V1 (RS)", "RLHF-V2 (RS)", "PPO", "PPO (oracle reward)"]
  sft = out["policies"][0]
  assert [r["wall_s"] for r in out["policies"]] == [walls[r["stage"]] for r in out["policies"]]
  assert [r["tokens_trained"] for r in out["policies"]] == [
      result(r["stage"])["tokens_trained"] for r in out["policies"]]
  assert sft["kl_to_sft"] == 0.0 and sft["win_rate_vs_sft"] == 0.5
  assert sft["helpfulness_vs_sft"] == 0.0 and sft["helpfulness_vs_sft_ci"] == [0.0, 0.0]
  for row in out["policies"]:
    assert 0 <= row["reward"] < 1 and 0 <= row["truncated"] <= 1
    for key in ("helpfulness", "helpfulness_t1", "false_refusal_rate_t1", "win_rate_vs_sft",
                "reward_t1"):
      lo, hi = row[f"{key}_ci"]
      assert 0 <= lo <= row[key] <= hi <= 1 or np.isnan(row[key]), (row["policy"], key)
    assert np.isfinite(row["kl_to_sft"])
  # Every later policy was trained away from SFT (KL on its own samples is not 0).
  for row in out["policies"][1:]:
    assert row["kl_to_sft"] != 0.0, row["policy"]
  assert set(out["ppo"]) == {"ppo", "ppo_oracle"}
  assert "best-of-n (SFT samples)" in out["overoptimization"]
  table = (work / "eval" / "eval.md").read_text()
  assert "| PPO |" in table and "| SFT |" in table and "Over-optimization" in table
  # --markdown prints the same report from the JSON, without evaluating again.
  proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), f"--workdir={work}",
                         "--markdown"], capture_output=True, text=True, check=True, cwd=ROOT)
  assert proc.stdout.strip() == table.strip()
  for png in ("policies.png", "rs_reward_vs_n.png", "rs_reward_vs_temperature.png",
              "overoptimization.png"):
    assert (work / "eval" / png).stat().st_size > 1000, png


def test_annotation_feeds_both_reward_models(tmp_path):
  c = small_config()
  c.annotate.num_prompts, c.annotate.rounds = 16, 1
  plan = dict(pipeline.stage_plan(c, str(tmp_path)))
  assert list(plan) == ["sft", "annotate"] + STAGES[1:]
  assert plan["annotate"]().init_from == str(tmp_path / "sft" / "final")
  pairs = str(tmp_path / "annotate" / "final" / "preferences.jsonl")
  for name, sources, weights in (("rm_helpfulness", "world_helpfulness,world_safety", "1,1"),
                                 ("rm_safety", "world_safety,world_helpfulness", "0.9,0.1")):
    sub = plan[name]()
    assert sub.reward.sources == sources + ",jsonl_preferences"
    assert sub.reward.weights == weights + (",1.0" if name == "rm_helpfulness" else ",0.1")
    assert sub.data.preference_jsonl_path == pairs
  c.pipeline.help_sources = "world_helpfulness,jsonl_preferences"
  with pytest.raises(ValueError, match="jsonl_preferences"):
    dict(pipeline.stage_plan(c, str(tmp_path)))["rm_helpfulness"]()


def test_annotation_rounds_retrain_the_rms_on_the_newest_policy(tmp_path):
  c = small_config()
  c.annotate.num_prompts, c.annotate.rounds = 16, 3
  plan = dict(pipeline.stage_plan(c, str(tmp_path)))
  assert list(plan) == ["sft", "annotate", "rm_helpfulness", "rm_safety", "rs_1", "annotate_2",
                        "rm_helpfulness_2", "rm_safety_2", "rs_2", "annotate_3",
                        "rm_helpfulness_3", "rm_safety_3", "ppo", "ppo_oracle"]
  final = lambda name: str(tmp_path / name / "final")
  prefs = lambda name: str(tmp_path / name / "final" / "preferences.jsonl")
  a2, a3 = plan["annotate_2"](), plan["annotate_3"]()
  assert (a2.init_from, a2.annotate.accumulate_from) == (final("rs_1"), prefs("annotate"))
  assert (a3.init_from, a3.annotate.accumulate_from) == (final("rs_2"), prefs("annotate_2"))
  assert plan["rm_safety_3"]().data.preference_jsonl_path == prefs("annotate_3")
  assert plan["rm_helpfulness_2"]().init_from == final("sft")
  seeds = {plan[n]().seed for n in plan if n.startswith("rm_")}
  assert len(seeds) == 6  # six distinct reward models
  assert plan["rs_1"]().rejection_sampling.help_rm == final("rm_helpfulness")
  assert plan["rs_2"]().rejection_sampling.safety_rm == final("rm_safety_2")
  assert (plan["ppo"]().ppo.help_rm, plan["ppo"]().ppo.safety_rm) == (
      final("rm_helpfulness_3"), final("rm_safety_3"))
  # The newest finished round is what eval.py scores with.
  for name in ("rm_helpfulness", "rm_safety", "rm_helpfulness_2", "rm_safety_2"):
    (tmp_path / name / "final").mkdir(parents=True)
    (tmp_path / name / "result.json").write_text("{}")
  assert pipeline.latest_reward_models(str(tmp_path)) == (final("rm_helpfulness_2"),
                                                          final("rm_safety_2"))
  c.annotate.rounds = 4
  with pytest.raises(ValueError, match="annotate.rounds"):
    pipeline.stage_plan(c, str(tmp_path))


def test_every_prompt_drawing_stage_has_its_own_stream_and_the_options_wire_through(tmp_path):
  c = small_config()
  c.annotate.num_prompts, c.annotate.rounds = 16, 3
  c.pipeline.oracle_control, c.pipeline.rs_after_ppo = True, True
  c.pipeline.rs_k, c.pipeline.rs_sample_from = "2,4,8", "/big/final"
  plan = dict(pipeline.stage_plan(c, str(tmp_path)))
  assert list(plan)[-3:] == ["ppo", "ppo_oracle", "rs_3"]
  subs = {name: make() for name, make in plan.items()}
  streams = {name: {"annotate": lambda x: x.annotate.prompt_stream,
                    "rejection_sampling": lambda x: x.rejection_sampling.prompt_stream,
                    "ppo": lambda x: x.ppo.prompt_stream}[sub.stage](sub)
             for name, sub in subs.items() if sub.stage in ("annotate", "rejection_sampling", "ppo")}
  own = {n: s for n, s in streams.items() if n != "ppo_oracle"}
  assert len(set(own.values())) == len(own) == 7 and min(own.values()) >= 0  # all disjoint
  assert streams["ppo_oracle"] == streams["ppo"]  # the control sees PPO's prompts
  assert subs["ppo_oracle"].ppo.reward == "oracle" and subs["ppo"].ppo.reward == "rm"
  assert subs["ppo_oracle"].init_from == subs["ppo"].init_from == str(tmp_path / "rs_2" / "final")
  assert subs["ppo"].ppo.sft_from == str(tmp_path / "sft" / "final")
  assert subs["rs_3"].init_from == str(tmp_path / "ppo" / "final")
  assert subs["rs_3"].rejection_sampling.pool_from.count("sampled.jsonl") == 2
  assert [subs[f"rs_{i}"].rejection_sampling.k for i in (1, 2, 3)] == [2, 4, 8]
  assert all(subs[f"rs_{i}"].rejection_sampling.sample_from == "/big/final" for i in (1, 2, 3))
  assert subs["rm_safety"].reward.safety_aux_weight == 1.0
  assert subs["rm_helpfulness"].reward.safety_aux_weight == 0.0
  c.data.prompt_streams = 6
  with pytest.raises(ValueError, match="prompt_streams"):
    pipeline.stage_plan(c, str(tmp_path))
  c.data.prompt_streams = 8
  c.pipeline.rs_k = "2,4"
  with pytest.raises(ValueError, match="rs_k"):
    pipeline.stage_plan(c, str(tmp_path))


def test_bad_iteration_count():
  c = small_config()
  c.pipeline.rs_iterations = -1
  with pytest.raises(ValueError, match="rs_iterations"):
    stages.run(c, "/nonexistent/never_created")


def test_subset_sft_methods_train_from_init_on_a_share_for_as_many_steps(tmp_path):
  c = small_config()
  c.pipeline.methods, c.pipeline.select_fraction = "sft_coreset,sft_random", 0.1
  c.train.num_steps = 0  # epochs
  plan = dict(pipeline.stage_plan(c, str(tmp_path)))
  sft, coreset, rand = plan["sft"](), plan["sft_coreset"](), plan["sft_random"]()
  assert coreset.stage == rand.stage == "sft"
  assert coreset.init_from == rand.init_from == c.init_from
  assert (coreset.data.select, coreset.data.select_fraction) == ("coreset", 0.1)
  assert (rand.data.select, rand.data.select_fraction) == ("random", 0.1)
  assert coreset.data.select_embed_from == str(tmp_path / "sft" / "final")
  # A tenth of the records for ten times the epochs: the full SFT's optimizer steps.
  for sub in (coreset, rand):
    assert sub.train.num_epochs == pytest.approx(10 * sft.train.num_epochs)
  c.train.num_steps = 7  # a step count is kept as it is (the same steps)
  assert dict(pipeline.stage_plan(c, str(tmp_path)))["sft_random"]().train.num_epochs == (
      c.train.num_epochs)


def test_methods_start_from_sft_with_the_first_round_data_and_reward_models(tmp_path):
  c = small_config()
  c.annotate.num_prompts, c.annotate.rounds = 16, 2
  c.pipeline.methods = "dpo,rrhf,raft,context_distillation"
  c.pipeline.method_lr, c.pipeline.method_epochs = 1e-4, 2.0
  plan = dict(pipeline.stage_plan(c, str(tmp_path)))
  assert list(plan)[-4:] == ["dpo", "rrhf", "raft", "context_distillation"]
  final = lambda name: str(tmp_path / name / "final")
  dpo, rrhf, raft, rm = plan["dpo"](), plan["rrhf"](), plan["raft"](), plan["rm_helpfulness"]()
  assert dpo.init_from == rrhf.init_from == raft.init_from == final("sft")
  assert (dpo.stage, rrhf.stage, raft.stage) == ("dpo", "rrhf", "raft")
  # DPO learns from the helpfulness RM's mixture, the first annotation batch included.
  assert (dpo.dpo.sources, dpo.dpo.weights) == (rm.reward.sources, rm.reward.weights)
  assert dpo.data.preference_jsonl_path == rm.data.preference_jsonl_path
  assert "jsonl_preferences" in dpo.dpo.sources
  assert rrhf.rrhf.sampled == str(tmp_path / "rs_1" / "sampled.jsonl")
  for sub in (dpo, rrhf):
    assert (sub.optimizer.lr, sub.train.num_epochs, sub.train.num_steps) == (1e-4, 2.0, 0)
  r, rs_1 = raft.rejection_sampling, plan["rs_1"]().rejection_sampling
  assert (r.help_rm, r.safety_rm) == (final("rm_helpfulness"), final("rm_safety"))
  assert (r.prompt_stream, r.k, r.auto_temperature) == (rs_1.prompt_stream, rs_1.k, False)
  assert r.num_prompts == rs_1.num_prompts // raft.raft.num_rounds
  # Context distillation: the first RM pair, rs_1's prompt stream, rejection sampling's fine-tune.
  cd = plan["context_distillation"]()
  assert (cd.stage, cd.init_from) == ("context_distillation", final("sft"))
  assert (cd.rejection_sampling.help_rm, cd.rejection_sampling.safety_rm) == (
      final("rm_helpfulness"), final("rm_safety"))
  assert cd.context_distillation.prompt_stream == rs_1.prompt_stream
  assert cd.rejection_sampling.lr == c.rejection_sampling.lr
  for bad in ("dpo,ppo", "dpo,dpo"):
    c.pipeline.methods = bad
    with pytest.raises(ValueError, match="config.pipeline.methods"):
      pipeline.stage_plan(c, str(tmp_path))
  c.pipeline.methods, c.pipeline.rs_iterations, c.annotate.rounds = "rrhf", 0, 1
  with pytest.raises(ValueError, match="rs_iterations"):
    pipeline.stage_plan(c, str(tmp_path))
