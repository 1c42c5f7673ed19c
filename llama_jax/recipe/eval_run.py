"""What ``eval.py`` does for a finished stage workdir (see ``eval.py``)."""

from __future__ import annotations

import json
import os
from typing import Optional

import jax
import ml_collections

from llama_jax import convert, evaluation
from llama_jax.data import world
from llama_jax.model import init_params
from llama_jax.recipe import policy_eval
from llama_jax.reward import evaluate as reward_eval
from llama_jax.tokenizer import Tokenizer
from llama_jax.train import build
from llama_jax.train.checkpoint import check_finite


def _stage_of(workdir: str) -> Optional[str]:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f).get("stage")


def load_stage(workdir: str):
  """(config, tokenizer, cfg, params) of a finished stage workdir.

  Raises:
    FileNotFoundError: if ``config.json`` or ``final/`` is missing (the stage did not finish).
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a train.py workdir?")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  tok_path = config.tokenizer.path
  tokenizer = Tokenizer(os.path.join(workdir, "tokenizer.model") if tok_path == "world" else tok_path)
  cfg, params = convert.load_orbax(os.path.join(workdir, "final"))
  check_finite(params, os.path.join(workdir, "final"))
  return config, tokenizer, cfg, params


def run(workdir: str, num_prompts: Optional[int] = None) -> dict:
  """Evaluate ``workdir``; returns the dict written to ``<workdir>/eval/eval.json`` (a reward
  workdir: ``llama_jax.reward.evaluate.run``, written to ``<workdir>/eval/reward_eval.json``; a
  pipeline workdir: ``llama_jax.recipe.policy_eval.run``, the SFT / RS / PPO comparison)."""
  if _stage_of(workdir) == "reward":
    return reward_eval.run(workdir)
  if _stage_of(workdir) == "pipeline":
    return policy_eval.run(workdir, num_prompts)
  config, tokenizer, cfg, params = load_stage(workdir)
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  result = {"workdir": os.path.abspath(workdir), "stage": config.stage}
  metrics = os.path.join(workdir, "logs", "metrics.jsonl")
  if os.path.exists(metrics):
    result["loss_plot"] = evaluation.plot_curves(metrics, os.path.join(out_dir, "loss.png"))
  result_path = os.path.join(workdir, "result.json")
  if os.path.exists(result_path):
    with open(result_path) as f:
      result["held_out"] = json.load(f).get("eval", {})
  rows = []
  if config.tokenizer.path == "world":
    n = num_prompts or config.eval.num_prompts
    prompts = [r["prompt"] for r in world.sample_prompts(build.world_config(config), "held_out", n)]
    if config.get("init_from", ""):
      _, before = convert.load_orbax(config.init_from)
    else:
      before = init_params(cfg, jax.random.key(config.seed))
    for name, p in (("initial", before), ("trained", params)):
      texts = evaluation.complete(p, cfg, tokenizer, prompts, max_new_tokens=config.eval.max_new_tokens)
      report = evaluation.oracle_report(prompts, texts)
      result[name] = report
      rows.append({"policy": name, **{k: v for k, v in report.items() if k != "per_task"}})
      with open(os.path.join(out_dir, f"completions_{name}.jsonl"), "w") as f:
        for prompt, text in zip(prompts, texts):
          f.write(json.dumps({"prompt": prompt, "completion": text}, ensure_ascii=False) + "\n")
  with open(os.path.join(out_dir, "eval.json"), "w") as f:
    json.dump(result, f, indent=2)
  lines = [f"# Evaluation of {result['workdir']} (stage {config.stage})", ""]
  if "held_out" in result:
    held = result["held_out"]
    line = f"Held-out loss {held.get('loss', float('nan')):.4f}"
    if "rewards/accuracies" in held:  # DPO: the implicit reward's accuracy on held-out pairs
      line += f", reward accuracy {held['rewards/accuracies']:.3f}"
    else:
      line += f", perplexity {held.get('perplexity', float('nan')):.3f}"
    lines += [line, ""]
  if rows:
    lines.append(evaluation.markdown_table(
        rows, ["policy", "helpfulness", "refusal_rate", "false_refusal_rate", "n_benign", "n_harmful"]))
  with open(os.path.join(out_dir, "eval.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return result
