"""Compare the policies of a pipeline workdir (SFT, RLHF-V1..Vk, PPO) on held-out prompts.

``python eval.py --workdir=<pipeline workdir>`` writes ``<workdir>/eval/``: ``policy_eval.json``,
``eval.md`` (one markdown table), ``policies.png`` and the rejection-sampling Figures 7/8 over all
iterations (``rs_reward_vs_n.png``, ``rs_reward_vs_temperature.png``). Per policy:

* oracle (synthetic world only): ``helpfulness`` (benign prompts answered correctly),
  ``refusal_rate`` (harmful prompts refused), ``false_refusal_rate`` (benign prompts refused),
  all of greedy completions;
* ``reward``: mean combined reward ``Rc`` (Llama 2 Sec. 3.2.3) of the greedy completions under the
  pipeline's newest helpfulness and safety RMs (sigmoid scores; ``r_help`` / ``r_safe`` their
  means);
* the same oracle metrics of temperature-1 samples (``eval.samples_per_prompt`` per prompt, the
  distribution rejection sampling distils and PPO optimizes): ``helpfulness_t1``,
  ``refusal_rate_t1``, ``false_refusal_rate_t1``;
* ``kl_to_sft``: per-token KL(pi || pi_SFT) estimated on those same temperature-1 samples: the
  mean over sampled response tokens of ``log pi(y_t) - log pi_SFT(y_t)`` (the k1 estimator; 0 for
  SFT itself);
* ``win_rate_vs_sft``: per prompt, the policy's greedy completion against SFT's: a win when the
  oracle judges the policy's completion helpful (benign: correct; harmful: refused) and SFT's not,
  a loss for the reverse, a tie (half a win) otherwise; the mean over prompts. Without an oracle
  (real data) the judge is the combined reward (higher wins, equal ties).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, List, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from llama_jax import convert, evaluation, ppo, sampling
from llama_jax import pipeline as pipeline_lib
from llama_jax.data import pipeline, world
from llama_jax.rs_run import load_prompts, load_reward_models, score_dialogs
from llama_jax.tokenizer import Tokenizer

COLUMNS = ("policy", "helpfulness", "helpfulness_t1", "refusal_rate", "refusal_rate_t1",
           "false_refusal_rate", "false_refusal_rate_t1", "reward", "r_help", "r_safe", "kl_to_sft",
           "win_rate_vs_sft", "mean_length")


def policies_of(workdir: str) -> List[tuple]:
  """``[(name, final dir)]`` of the finished policies of a pipeline workdir, in pipeline order."""
  out = []
  if os.path.isdir(os.path.join(workdir, "sft", "final")):
    out.append(("SFT", os.path.join(workdir, "sft", "final")))
  i = 1
  while os.path.isdir(os.path.join(workdir, f"rs_{i}")):
    if os.path.isdir(os.path.join(workdir, f"rs_{i}", "final")):
      out.append((f"RLHF-V{i} (RS)", os.path.join(workdir, f"rs_{i}", "final")))
    i += 1
  if os.path.isdir(os.path.join(workdir, "ppo", "final")):
    out.append(("PPO", os.path.join(workdir, "ppo", "final")))
  return out


@functools.partial(jax.jit, static_argnames=("cfg",))
def _logprobs(params, tokens, positions, segment_ids, response_tokens, *, cfg):
  return ppo.response_logprobs(params, tokens, positions, segment_ids, response_tokens, cfg=cfg,
                               temperature=1.0)[0]


def sample_with_kl(params, ref_params, cfg, tokenizer, prompts, *, max_new_tokens: int,
                   samples_per_prompt: int = 1, seed: int = 0,
                   batch_size: int = 64) -> tuple[float, List[str]]:
  """Temperature-1 samples of ``params`` and their per-token KL(pi || pi_ref).

  Args:
    params, ref_params: policy and reference weights (same ``cfg``); ``ref_params=None``
      (the policy is its own reference) skips the teacher-forced passes and gives KL 0.
    prompts: dialogs.
    max_new_tokens: per sample. samples_per_prompt: samples drawn per prompt (>= 1).
    seed: sampling seed (batch ``i`` uses ``seed + i``). batch_size: rows per generate call.
  Returns:
    (k1 KL: mean over sampled response tokens of ``log pi(y_t) - log pi_ref(y_t)``, the decoded
    samples in prompt-major order: row ``i * samples_per_prompt + j`` is sample ``j`` of prompt
    ``i``).
  Raises:
    ValueError: if ``samples_per_prompt`` < 1.
  """
  if samples_per_prompt < 1:
    raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
  prompts = [p for p in prompts for _ in range(samples_per_prompt)]
  total, count, texts = 0.0, 0.0, []
  for start in range(0, len(prompts), batch_size):
    ids = [tokenizer.encode_dialog(list(p))[0].tolist() for p in prompts[start:start + batch_size]]
    longest = -(-max(len(x) for x in ids) // 16) * 16
    tok, mask = sampling.left_pad(ids, tokenizer.pad_id, longest)
    tok, mask = jnp.asarray(tok), jnp.asarray(mask)
    gen = sampling.sample(params, tok, mask, jax.random.key(seed + start), cfg=cfg,
                          max_new_tokens=max_new_tokens, temperature=1.0,
                          eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    if ref_params is not None:
      ro = ppo.rollout_tensors(tok, mask, gen)
      args = (ro["tokens"], ro["positions"], ro["segment_ids"], ro["response_tokens"])
      lp = np.asarray(_logprobs(params, *args, cfg=cfg))
      lr = np.asarray(_logprobs(ref_params, *args, cfg=cfg))
      m = np.asarray(ro["response_mask"])
      total += float(((lp - lr) * m).sum())
      count += float(m.sum())
    texts += sampling.decode(gen, tokenizer)
  return total / max(count, 1.0), texts


def rs_figures(workdir: str, out_dir: str) -> dict:
  """Figures 7 and 8 over all rejection-sampling iterations of the pipeline (one curve each), from
  ``rs_<i>/figures/figures.json``; returns ``{"reward_vs_n": png, ...}`` of what was drawn."""
  from llama_jax import rejection_sampling as rs_lib  # pylint: disable=import-outside-toplevel
  curves = {"reward_vs_n": {}, "reward_vs_temperature": {}}
  i = 1
  while os.path.isfile(os.path.join(workdir, f"rs_{i}", "figures", "figures.json")):
    with open(os.path.join(workdir, f"rs_{i}", "figures", "figures.json")) as f:
      fig = json.load(f)
    for key in curves:
      curves[key].update(fig.get(key, {}))
    i += 1
  out = {}
  if curves["reward_vs_n"]:
    out["reward_vs_n"] = rs_lib.plot_reward_vs_n(curves["reward_vs_n"],
                                                 os.path.join(out_dir, "rs_reward_vs_n.png"))
  if curves["reward_vs_temperature"]:
    out["reward_vs_temperature"] = rs_lib.plot_reward_vs_temperature(
        curves["reward_vs_temperature"], os.path.join(out_dir, "rs_reward_vs_temperature.png"))
  return out


def _plot(rows, out_png: str) -> str:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  keys = [k for k in ("helpfulness", "refusal_rate", "false_refusal_rate", "reward",
                      "win_rate_vs_sft", "kl_to_sft") if any(k in r for r in rows)]
  fig, axes = plt.subplots(1, len(keys), figsize=(2.6 * len(keys), 3.2), squeeze=False)
  names = [r["policy"] for r in rows]
  for ax, key in zip(axes[0], keys):
    ax.bar(range(len(rows)), [r.get(key, np.nan) for r in rows], color=[f"C{i}" for i in
                                                                         range(len(rows))])
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
    ax.set_title(key, fontsize=9)
  fig.tight_layout()
  fig.savefig(out_png, dpi=110)
  plt.close(fig)
  return out_png


def run(workdir: str, num_prompts: Optional[int] = None) -> dict:
  """Evaluate every finished policy of a pipeline ``workdir``; returns ``policy_eval.json``.

  Held-out prompts longer than ``min(ppo.max_prompt_len, max_seq_len - eval.max_new_tokens)``
  tokens are skipped.

  Raises:
    FileNotFoundError: if the workdir has no finished SFT stage or reward models.
    ValueError: if no held-out prompt fits.
  """
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  policies = policies_of(workdir)
  if not policies or policies[0][0] != "SFT":
    raise FileNotFoundError(f"{workdir}: no finished SFT stage (sft/final)")
  tok_path = config.tokenizer.path
  tokenizer = Tokenizer(os.path.join(workdir, "sft", "tokenizer.model") if tok_path == "world"
                        else tok_path)
  rms = load_reward_models(*pipeline_lib.latest_reward_models(workdir), "pipeline workdir")
  is_world = tok_path == "world"
  n = num_prompts or config.eval.num_prompts
  max_new = int(config.eval.max_new_tokens)
  per_prompt_samples = int(config.eval.get("samples_per_prompt", 4))
  sft_cfg, sft_params = convert.load_orbax(policies[0][1])
  # Prompts that fit the rollout budget of the pipeline (as PPO's): prompt + max_new tokens.
  max_prompt = min(int(config.ppo.max_prompt_len), sft_cfg.max_seq_len - max_new)
  records = [r for r in load_prompts(config, os.path.join(workdir, "sft"), "held_out", n)
             if pipeline.prompt_example(r, tokenizer, max_prompt) is not None]
  if not records:
    raise ValueError(f"{workdir}: no held-out prompt fits {max_prompt} tokens")
  prompts = [r["prompt"] for r in records]
  safety = [bool(r.get("is_safety", False)) for r in records]
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  rows, per_prompt = [], {}
  for name, path in policies:
    cfg, params = (sft_cfg, sft_params) if name == "SFT" else convert.load_orbax(path)
    texts = evaluation.complete(params, cfg, tokenizer, prompts, max_new_tokens=max_new)
    scores = score_dialogs(*rms, tokenizer, prompts, texts, safety,
                           threshold=float(config.ppo.safety_threshold))
    row: dict[str, Any] = {"policy": name, "reward": float(scores["rc"].mean()),
                           "r_help": float(scores["r_help"].mean()),
                           "r_safe": float(scores["r_safe"].mean()),
                           "mean_length": float(np.mean([len(tokenizer.encode(t, bos=False))
                                                         for t in texts]))}
    if is_world:
      rep = evaluation.oracle_report(prompts, texts)
      row.update({k: rep[k] for k in ("helpfulness", "refusal_rate", "false_refusal_rate",
                                      "n_benign", "n_harmful")})
      judge = np.asarray([world.oracle(p, t).helpful for p, t in zip(prompts, texts)], float)
    else:
      judge = scores["rc"]
    row["kl_to_sft"], sampled = sample_with_kl(
        params, None if name == "SFT" else sft_params, cfg, tokenizer, prompts,
        max_new_tokens=max_new, samples_per_prompt=per_prompt_samples, seed=config.seed)
    if is_world:
      rep = evaluation.oracle_report([p for p in prompts for _ in range(per_prompt_samples)],
                                     sampled)
      row.update({f"{k}_t1": rep[k] for k in ("helpfulness", "refusal_rate",
                                              "false_refusal_rate")})
    per_prompt[name] = judge
    base = per_prompt["SFT"]
    row["win_rate_vs_sft"] = float(np.mean(np.where(judge > base, 1.0,
                                                    np.where(judge == base, 0.5, 0.0))))
    rows.append(row)
    with open(os.path.join(out_dir, f"completions_{name.split()[0]}.jsonl"), "w") as f:
      for p, t, r in zip(prompts, texts, scores["rc"]):
        f.write(json.dumps({"prompt": p, "completion": t, "reward": float(r)},
                           ensure_ascii=False) + "\n")
  result = {"workdir": os.path.abspath(workdir), "stage": "pipeline", "num_prompts": len(prompts),
            "policies": rows, "plot": _plot(rows, os.path.join(out_dir, "policies.png")),
            "rs_figures": rs_figures(workdir, out_dir)}
  with open(os.path.join(out_dir, "policy_eval.json"), "w") as f:
    json.dump(result, f, indent=2)
  cols = [c for c in COLUMNS if any(c in r for r in rows)]
  lines = [f"# Policy comparison of {result['workdir']}", "",
           f"{len(prompts)} held-out prompts; greedy completions (max {max_new} tokens); ``_t1``: "
           f"{per_prompt_samples} temperature-1 samples per prompt (also used for the KL); "
           "win rate vs SFT (greedy) judged by "
           + ("the world oracle" if is_world else "the combined reward") + ".", "",
           evaluation.markdown_table(rows, cols)]
  with open(os.path.join(out_dir, "eval.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return result
