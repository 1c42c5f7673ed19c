"""The rejection-sampling stage: reproducible sampled set, best-of-K, pooling, figures, fine-tune."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from configs import tiny
from llama_jax.data import world
from llama_jax.recipe import stages
from llama_jax.rejection_sampling import step as rs_lib
from llama_jax.reward import step as reward
from llama_jax.tokenizer import Tokenizer
from train_helpers import rl_workdir, tiny_rl_models

VOCAB = 320


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  return tiny_rl_models(tmp_path_factory.mktemp("rs_models"))


def make_config(models, **rs):
  c = tiny.get_config()
  c.stage = "rejection_sampling"
  c.init_from = str(models / "policy")
  c.model.dim, c.model.n_layers, c.model.n_heads, c.model.n_kv_heads = 32, 2, 4, 2
  c.model.multiple_of, c.model.max_seq_len = 16, 128
  c.tokenizer.world_vocab_size = VOCAB
  c.data.max_seq_len, c.data.batch_size = 128, 4
  c.train.async_checkpoint = False
  r = c.rejection_sampling
  r.help_rm, r.safety_rm = str(models / "help"), str(models / "safe")
  r.num_prompts, r.k, r.max_new_tokens, r.max_prompt_len, r.batch_size = 6, 3, 8, 48, 4
  r.num_steps, r.lr = 1, 1e-3
  r.plot_prompts, r.plot_k, r.plot_temperatures = 2, 2, "0.7,1.3"
  r.auto_temperature = False
  for k, v in rs.items():
    r[k] = v
  return c


_workdir = rl_workdir


def _records(path):
  return [json.loads(x) for x in path.read_text().splitlines()]


def test_sampled_set_is_reproducible_and_best_of_k(models, tmp_path, monkeypatch, capfd):
  a, b = _workdir(models, tmp_path, "a"), _workdir(models, tmp_path, "b")
  config = lambda: make_config(models, auto_temperature=True, batch_size=1)
  res = stages.get("rejection_sampling").run(config(), str(a))
  # A progress bar per sampling pass, counting prompts (tqdm on stderr).
  err = capfd.readouterr().err
  assert "rejection sampling V1 (K=3, T=" in err and "Fig. 8 sweep, T=" in err
  assert f"{res['sampled']['prompts']}/{res['sampled']['prompts']} [" in err
  # b: a SIGTERM during the first batch of the main pass stops it after that batch (batches of
  # 1 prompt); the next run resumes from the saved batch with the same samples.
  sample_k, calls = rs_lib.sample_k, []
  def sample_k_then_sigterm(params, cfg, tok, chunk, k, *args, **kw):
    calls.append(k)
    if k == 3 and calls.count(3) == 1:  # the main pass (Fig. 8's curve uses plot_k=2)
      os.kill(os.getpid(), signal.SIGTERM)
    return sample_k(params, cfg, tok, chunk, k, *args, **kw)
  monkeypatch.setattr(rs_lib, "sample_k", sample_k_then_sigterm)
  stopped = stages.get("rejection_sampling").run(config(), str(b))
  assert stopped["stopped_by_signal"] and not stopped["finished"]
  assert not (b / "sampled.jsonl").exists()
  assert [p.name for p in (b / "sampling").rglob("batch_*.json")] == ["batch_0000000.json"]
  resumed = stages.get("rejection_sampling").run(config(), str(b))
  assert not (b / "sampling").exists()
  # Tokens sampled by the resumed pass: the same count (the first batch's from its file).
  assert resumed["tokens_sampled"] == res["tokens_sampled"] > 0
  assert resumed["tokens_trained"] == res["tokens_trained"] > 0
  assert calls.count(3) == res["sampled"]["prompts"] >= 2  # each batch sampled once
  assert (a / "sampled.jsonl").read_bytes() == (b / "sampled.jsonl").read_bytes()
  records = _records(a / "sampled.jsonl")
  st = res["sampled"]
  assert len(records) == st["prompts"] - st["prompts_without_finished_sample"] >= 2
  # Truncated samples (no EOS in 8 tokens) exist and are never chosen.
  finished = [f for r in records for f in r["finished"]]
  assert 0 < st["truncated"] < 1 and not all(finished)
  for r in records:
    assert len(r["samples"]) == len(r["scores"]) == 3 and r["iteration"] == 1
    done = np.asarray(r["finished"])
    assert done[r["chosen"]] and r["chosen"] == int(np.argmax(np.where(done, r["scores"], -1)))
    assert r["samples"][r["chosen"]].strip()  # an empty sample (EOS first) is never chosen
    assert all(d <= bool(t.strip()) for t, d in zip(r["samples"], done))
    assert all(0 < s < 1 for s in r["scores"])  # combined reward: a sigmoid probability
    assert r["temperature"] == st["temperature"]
  # Scores are the combined reward recomputed independently from the two RMs' sigmoid scores.
  rcfg, help_p = reward.load_reward_model(str(models / "help"))
  _, safe_p = reward.load_reward_model(str(models / "safe"))
  tok = Tokenizer(str(a / "tokenizer.model"))
  r = records[0]
  ids = tok.encode_dialog(r["prompt"] + [{"role": "assistant", "content": r["samples"][0]}])[0]
  mask = np.ones((1, len(ids)), bool)
  h = float(reward.score(help_p, rcfg, ids[None], mask, probability=True)[0])
  s = float(reward.score(safe_p, rcfg, ids[None], mask, probability=True)[0])
  harmful = world.parse_prompt(r["prompt"][-1]["content"]).task == "harmful"
  want = s if (harmful or s < 0.15) else h
  assert r["scores"][0] == pytest.approx(want, abs=2e-5)
  # Figures 7 and 8 as JSON + PNG.
  fig = json.loads((a / "figures" / "figures.json").read_text())
  curve = fig["reward_vs_n"]["RLHF-V1"]
  assert curve["n"] == [1, 2, 3]
  # Truncated samples count as reward 0 in the curves; prompts without a record had only those.
  best = np.asarray([np.where(x["finished"], x["scores"], 0.0).max() for x in records])
  assert curve["max"][-1] == pytest.approx(best.sum() / st["prompts"])
  # auto_temperature: the sampling T is the best point of this iteration's Fig. 8 curve.
  by_t = fig["reward_vs_temperature"]["RLHF-V1"]
  assert by_t["temperature"] == [0.7, 1.3]
  assert st["temperature"] == by_t["temperature"][int(np.argmax(by_t["max"]))]
  for png in ("reward_vs_n.png", "reward_vs_temperature.png"):
    assert (a / "figures" / png).stat().st_size > 1000
  # Fine-tuned on the pooled best samples, exported as final/.
  assert res["finished"] and (a / "final" / "params.json").exists()
  sft = _records(a / "sft_data.jsonl")
  assert sorted(x["messages"][-1]["content"] for x in sft) == sorted(
      x["samples"][x["chosen"]] for x in records)


def test_pooling_keeps_the_best_sample_of_every_iteration(models, tmp_path):
  first = _workdir(models, tmp_path, "v1")
  stages.get("rejection_sampling").run(make_config(models, num_steps=1), str(first))
  second = _workdir(models, tmp_path, "v2")
  res = stages.get("rejection_sampling").run(make_config(models, iteration=2, temperature=1.3,
                               pool_from=str(first / "sampled.jsonl"), plot_prompts=0),
                   str(second))
  best = {}
  # The same RMs in both iterations: re-scored picks of V1 keep their scores (up to batching).
  for path in (first / "sampled.jsonl", second / "sampled.jsonl"):
    for r in _records(path):
      key = json.dumps(r["prompt"], sort_keys=True)
      s = r["scores"][r["chosen"]]
      if key not in best or s > best[key][0]:
        best[key] = (s, r["samples"][r["chosen"]], r["iteration"])
  pooled = _records(second / "pooled.jsonl")
  assert len(pooled) == len(best) == res["sampled"]["pooled"]
  for r in pooled:
    s, text, it = best[json.dumps(r["prompt"], sort_keys=True)]
    assert r["samples"][r["chosen"]] == text and r["iteration"] == it
  assert res["sampled"]["from_earlier_iterations"] == sum(v[2] == 1 for v in best.values())
  assert res["sampled"]["rescored_from_earlier"] == len(_records(first / "sampled.jsonl"))
  assert not (second / "figures" / "reward_vs_temperature.png").exists()


def test_validation(models, tmp_path):
  c = make_config(models)
  c.init_from = ""
  with pytest.raises(ValueError, match="config.init_from"):
    stages.get("rejection_sampling").run(c, str(tmp_path / "x"))
  with pytest.raises(ValueError, match="temperature must be > 0"):
    stages.get("rejection_sampling").run(make_config(models, temperature=0.0), str(tmp_path / "y"))
  with pytest.raises(FileNotFoundError, match="pool_from"):
    stages.get("rejection_sampling").run(make_config(models, pool_from=str(tmp_path / "nope.jsonl")), str(tmp_path / "z"))
  with pytest.raises(ValueError, match="config.rejection_sampling.reward"):
    stages.get("rejection_sampling").run(make_config(models, reward="gold"), str(tmp_path / "w"))
  assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()
