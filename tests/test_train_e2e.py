"""End-to-end smoke tests of train.py + eval.py on the embedded default and on real data."""

import json
import os
import subprocess
import sys

import pytest

from train_helpers import ROOT, TINY_FLAGS, env, result_of, run_train


def test_tiny_sft_then_eval(tmp_path):
  work = tmp_path / "tiny"
  res = result_of(run_train(work, *TINY_FLAGS, "--config.train.num_steps=8",
                            "--config.eval.num_samples=2"))
  assert res["finished"] and res["steps"] == 8
  assert 0 < res["eval"]["loss"] < 20 and res["eval"]["perplexity"] > 1
  assert 0 < res["train"]["real_tokens"] <= 8 * 128
  for name in ("config.json", "final/params.json", "logs/metrics.jsonl", "samples/step_000008.jsonl"):
    assert (work / name).exists(), name
  assert any(f.startswith("events.") for f in os.listdir(work / "logs"))
  lines = [json.loads(x) for x in (work / "logs" / "metrics.jsonl").read_text().splitlines()]
  assert [x["step"] for x in lines if x["split"] == "train"] == list(range(1, 9))
  proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), f"--workdir={work}"], cwd=ROOT,
                        env=env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((work / "eval" / "eval.json").read_text())
  for policy in ("initial", "trained"):
    assert report[policy]["n_benign"] + report[policy]["n_harmful"] == 12
    assert 0 <= report[policy]["helpfulness"] <= 1
  assert (work / "eval" / "loss.png").stat().st_size > 1000
  assert "| trained |" in (work / "eval" / "eval.md").read_text()


def test_sft_hh_tiny_runs_a_few_steps(tmp_path, llama2_tokenizer_path, hh_rlhf_path, self_instruct_path):
  work = tmp_path / "hh"
  res = result_of(run_train(
      work, "--config.train.num_steps=3", "--config.data.max_seq_len=128", "--config.data.batch_size=4",
      "--config.eval.num_batches=2", "--config.eval.num_samples=1", "--config.eval.max_new_tokens=4",
      f"--config.tokenizer.path={llama2_tokenizer_path}", f"--config.data.hh_rlhf_path={hh_rlhf_path}",
      f"--config.data.self_instruct_path={self_instruct_path}", config="configs/sft_hh_tiny.py"))
  assert res["finished"] and res["steps"] == 3
  # A random 32k-vocab model starts near ln(32000) = 10.4 nats per token.
  assert 5 < res["eval"]["loss"] < 12
  stats = json.loads((work / "data_stats.json").read_text())["train"]
  # ~95% of 2,299 HH chosen dialogs + 175 Self-Instruct seeds are in the training split.
  assert stats["records"] > 2000
  assert stats["kept"] + stats["truncated"] + stats["dropped_no_target"] == stats["records"]


def test_unknown_and_unimplemented_stages_fail_clearly(tmp_path):
  proc = run_train(tmp_path / "x", *TINY_FLAGS, "--config.stage=no_such_stage", check=False)
  assert proc.returncode != 0 and "config.stage must be one of" in proc.stderr
  proc = run_train(tmp_path / "y", *TINY_FLAGS, "--config.traine.lr=1", check=False)
  assert proc.returncode != 0 and "traine" in proc.stderr


@pytest.mark.parametrize("body,message", [
    ("def get_config():\n  return {'stage': 'sft'}\n",
     "get_config() returned a dict, not an ml_collections.ConfigDict"),
    ("def get_config(:\n", "cannot load it (SyntaxError: invalid syntax"),
    ("x = 1\n", "cannot load it (AttributeError: module 'config_config' has no attribute 'get_config'"),
    (None, "no such config file"),
])
def test_a_bad_config_file_is_one_line_and_exit_2(tmp_path, body, message):
  path = tmp_path / "config.py"
  if body is not None:
    path.write_text(body)
  proc = run_train(tmp_path / "w", config=str(path), check=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error:")]
  assert len(errors) == 1 and f"--config={path}" in errors[0] and message in errors[0], proc.stderr
  assert "Traceback" not in proc.stderr and not (tmp_path / "w").exists()


def _jsonl(path, prompt, n):
  with open(path, "w") as f:
    for i in range(n):
      f.write(json.dumps({"messages": [{"role": "user", "content": f"{prompt} {i}"},
                                       {"role": "assistant", "content": f"The answer is {i}."}]})
              + "\n")
  return str(path)


def test_sft_source_without_a_usable_record_fails_before_step_0(tmp_path):
  # Used to hang: the packed-batch iterator waited forever on a stream that yields nothing.
  from configs import tiny  # pylint: disable=import-outside-toplevel
  from llama_jax.sft import run as sft_run  # pylint: disable=import-outside-toplevel
  c = tiny.get_config()
  c.stage, c.data.sft_sources, c.data.tfds_dir, c.data.heldout_fraction = "sft", "jsonl", "", 0.2
  # Every prompt is longer than max_seq_len (256): truncation leaves no answer token.
  c.data.sft_jsonl_path = _jsonl(tmp_path / "sft.jsonl", " ".join(["apple"] * 400), 20)
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=r"'jsonl' \(train split\): none of its \d+ SFT records"
                                       r" .* raise config.data.max_seq_len"):
    sft_run.run(c, str(workdir))
  assert not workdir.exists()


def test_check_kept_names_the_split_and_the_counts():
  from llama_jax.sft import run as sft_run  # pylint: disable=import-outside-toplevel
  stats = {"records": 5, "kept": 0, "truncated": 0, "dropped_overlong": 2, "dropped_no_target": 3}
  with pytest.raises(ValueError, match=r"held-out: none of its 5 SFT records .*\(2 dropped .* 3 "
                                       r"without an answer token"):
    sft_run.check_kept(stats, "held-out", 64)
  sft_run.check_kept(dict(stats, kept=1), "held-out", 64)
