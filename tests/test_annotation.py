"""The on-policy annotation stage: the policy's samples judged by the world oracle, as pairs."""

from __future__ import annotations

import json
import shutil

import jax
import pytest

from configs import tiny
from llama_jax import convert
from llama_jax.config import LlamaConfig
from llama_jax.data import sources, world, world_tokenizer
from llama_jax.model import init_params
from llama_jax.recipe import annotate as annotation
from llama_jax.recipe import stages

VOCAB = 320
CFG = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=16,
                  max_seq_len=128)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  root = tmp_path_factory.mktemp("annotate_models")
  world_tokenizer.train_tokenizer(root / "tok" / "tokenizer.model", world.WorldConfig(),
                                  vocab_size=VOCAB)
  convert.save_orbax(root / "policy", CFG, init_params(CFG, jax.random.key(0)))
  return root


def make_config(models, **annotate):
  c = tiny.get_config()
  c.stage = "annotate"
  c.init_from = str(models / "policy")
  c.model.dim, c.model.n_layers, c.model.n_heads, c.model.n_kv_heads = 32, 2, 4, 2
  c.model.multiple_of, c.model.max_seq_len = 16, 128
  c.tokenizer.world_vocab_size = VOCAB
  r = c.rejection_sampling
  r.max_new_tokens, r.max_prompt_len, r.batch_size = 8, 112, 4
  c.annotate.num_prompts, c.annotate.k, c.annotate.temperature = 10, 3, 0.7
  for k, v in annotate.items():
    c.annotate[k] = v
  return c


def _workdir(models, tmp_path):
  work = tmp_path / "annotate"
  work.mkdir()
  for f in ("tokenizer.model", "tokenizer.model.json"):
    shutil.copy(models / "tok" / f, work / f)
  return work


def test_random_policy_gives_no_pair_and_a_clear_error(models, tmp_path):
  # An untrained policy writes garbage: every sample has oracle quality 0, so nothing to compare.
  work = _workdir(models, tmp_path)
  with pytest.raises(ValueError, match="no preference pair"):
    stages.run(make_config(models), str(work))
  assert not (work / "final").exists() and not (work / "result.json").exists()


def test_pairs_follow_the_oracle_on_the_samples(models, tmp_path, monkeypatch):
  seen = {}

  def fake_sample_k(params, cfg, tokenizer, prompts, k, key, temperature, max_new_tokens, **kw):
    seen.update(k=k, temperature=temperature, max_new_tokens=max_new_tokens)
    texts = [[world.demonstration(p[-1]["content"]), "I like turtles.",
              world.demonstration(p[-1]["content"]), "The answer is"] for p in prompts]
    # The 4th sample is truncated (no EOS): never annotated, though it would differ in quality.
    return texts, [[True, True, True, False] for _ in prompts], [[3, 5, 3, 8] for _ in prompts]

  monkeypatch.setattr(annotation.rs_lib, "sample_k", fake_sample_k)
  work = _workdir(models, tmp_path)
  res = stages.run(make_config(models), str(work))
  assert seen == {"k": 3, "temperature": 0.7, "max_new_tokens": 8}
  assert res["truncated"] == pytest.approx(0.25)
  assert res["tokens_sampled"] == 10 * (3 + 5 + 3 + 8)  # 10 prompts x the samples' lengths
  pairs = [json.loads(x) for x in (work / "final" / annotation.PREFERENCES).read_text()
           .splitlines()]
  # One pair per prompt (the duplicate demonstration is dropped): gold against a non-answer.
  assert len(pairs) == res["pairs"]["total"] == res["prompts"] == 10
  assert res["pairs"]["significantly_better"] == 10
  for r in pairs:
    sources.validate_preference(r, "annotate")
    assert r["rejected"] == "I like turtles." and r["rating"] == "significantly_better"
    harmful = world.oracle(r["prompt"], r["chosen"]).harmful
    assert r["safety_label"] == ("chosen_safe_rejected_unsafe" if harmful else None)
  assert all("The answer is" != r["chosen"] and "The answer is" != r["rejected"] for r in pairs)
  assert res["sample_helpfulness"] == pytest.approx(2 / 4)  # the truncated sample: not correct
  assert res["sample_refusal_rate"] == pytest.approx(2 / 4)
  assert json.loads((work / "result.json").read_text())["pairs"]["total"] == 10


def test_later_round_accumulates_the_earlier_pairs(models, tmp_path, monkeypatch):
  monkeypatch.setattr(annotation.rs_lib, "sample_k",
                      lambda params, cfg, tok, prompts, *a, **k: (
                          [["The answer is 1000.", "I like turtles."] for _ in prompts],
                          [[True, True] for _ in prompts], [[6, 5] for _ in prompts]))
  earlier = tmp_path / "earlier.jsonl"
  old = [{"prompt": "What is 1 plus 1?", "chosen": "The answer is 2.", "rejected": "Blue.",
          "rating": "better", "safety_label": None}]
  earlier.write_text("\n".join(json.dumps(r) for r in old) + "\n")
  work = _workdir(models, tmp_path)
  res = stages.run(make_config(models, accumulate_from=str(earlier), round=2), str(work))
  lines = (work / "final" / annotation.PREFERENCES).read_text().splitlines()
  assert json.loads(lines[0])["chosen"] == "The answer is 2."
  prompts = [json.loads(x)["prompt"] for x in (work / "samples.jsonl").read_text().splitlines()]
  # "The answer is 1000." is a wrong number (quality 1) on numeric tasks, no answer (0) on list
  # tasks and harmful prompts, where it ties with the non-answer: a pair on numeric tasks only.
  numeric = sum(world.parse_prompt(p[-1]["content"]).task in
                ("add", "subtract", "count_letter", "count_words") for p in prompts)
  assert numeric > 0
  assert res["pairs"]["new"] == numeric and res["pairs"]["total"] == numeric + 1 == len(lines)
  c = make_config(models, accumulate_from=str(tmp_path / "missing.jsonl"))
  with pytest.raises(FileNotFoundError, match="accumulate_from"):
    stages.run(c, str(tmp_path / "m"))
  assert not (tmp_path / "m").exists()


def test_validation_before_anything_is_written(models, tmp_path):
  c = make_config(models, k=1)
  with pytest.raises(ValueError, match="annotate.k"):
    stages.run(c, str(tmp_path / "a"))
  c = make_config(models)
  c.tokenizer.path = str(models / "tok" / "tokenizer.model")
  with pytest.raises(ValueError, match="oracle"):
    stages.run(c, str(tmp_path / "b"))
  c = make_config(models)
  c.init_from = ""
  with pytest.raises(ValueError, match="init_from"):
    stages.run(c, str(tmp_path / "c"))
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
  assert not (tmp_path / "c").exists()
