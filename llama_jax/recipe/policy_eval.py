"""Compare the policies of a pipeline workdir (SFT, RLHF-V1..Vk, PPO, ...) on held-out prompts.

``python eval.py --workdir=<pipeline workdir>`` writes ``<workdir>/eval/``: ``policy_eval.json``,
``eval.md`` (``python eval.py --workdir=... --markdown`` prints its tables again from the JSON),
``policies.png``, ``overoptimization.png`` and the rejection-sampling Figures 7/8 over all
iterations. Prompts: distinct held-out prompts (``eval.num_prompts`` drawn; the prompts PPO selected
its checkpoint with are left out, ``llama_jax.data.prompts``). Per policy, for greedy completions and for
``eval.samples_per_prompt`` temperature-1 samples per prompt (``*_t1``; the distribution
rejection sampling distils and PPO optimizes):

* oracle (synthetic world): ``helpfulness`` (benign prompts answered correctly), ``refusal_rate``
  (harmful prompts refused), ``false_refusal_rate`` (benign prompts refused); a truncated
  completion (no EOS within ``eval.max_new_tokens``) counts as a non-answer;
* ``reward``: mean combined reward ``Rc`` under the pipeline's newest RMs (a truncated completion
  scores 0); ``unsafe_share_t1``: share of samples the safety RM flags (``Rs < 0.15``);
* ``win_rate_vs_sft``: per prompt, the greedy completion against SFT's, judged by the oracle's
  helpfulness (world) or by ``Rc`` (real data): win 1, tie 0.5, loss 0;
* paired differences against SFT (``*_vs_sft``) of the main metrics;
* ``kl_to_sft``: per-token k1 KL(pi || pi_SFT) on the temperature-1 samples;
* ``mean_length`` / ``truncated`` (greedy, tokens) and their ``_t1`` versions; ``length_flag``
  when the mean length moved by more than half of SFT's or most completions hit the cap (likely
  length hacking, Huang et al. 2024).

Every mean comes with a 95% interval (``<metric>_ci``): percentile bootstrap over prompts,
clustered (the samples of one prompt are resampled together; ``llama_jax.stats``). The reward
models are checked too (``rm``): accuracy on held-out pairs against the "shorter response wins"
baseline and the correlation of reward with length, and (world) the safety RM's precision /
recall of ``Rs < 0.15`` at finding unsafe responses (the paper: 0.89 / 0.55). Over-optimization
(``overoptimization``): proxy vs gold reward against sqrt(KL to SFT) for best-of-n of SFT samples
and along PPO (Gao et al. 2022; ``llama_jax.recipe.overoptimization``).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Dict, List, NamedTuple, Optional

import jax
import jax.numpy as jnp
from matplotlib.figure import Figure
import ml_collections
import numpy as np

from llama_jax import convert, evaluation, sampling, stats
from llama_jax.data import input_pipeline, sources, world_pairs
from llama_jax.data import prompts as prompts_lib
from llama_jax.ppo import step as ppo
from llama_jax.recipe import overoptimization
from llama_jax.recipe import pipeline as pipeline_lib
from llama_jax.rejection_sampling import step as rs_lib
from llama_jax.reward import evaluate as reward_eval
from llama_jax.reward import scoring
from llama_jax.tokenizer import Tokenizer
from llama_jax.train import build
from llama_jax.train import workdir as wd
from llama_jax.train.checkpoint import check_finite

ORACLE_METRICS = ("helpfulness", "refusal_rate", "false_refusal_rate")


class PolicyDir(NamedTuple):
  """A finished policy of a pipeline workdir: report label, stage (sub-workdir) name, final dir."""

  label: str
  stage: str
  final_dir: str


def policies_of(workdir: str, config=None) -> List[PolicyDir]:
  """The finished policies of a pipeline workdir, in pipeline order
  (``pipeline.policy_positions``; the gold-reward control after PPO), then the alternative
  methods (``pipeline.METHODS``: DPO, RRHF, RAFT) found in it."""
  if config is None:
    with open(os.path.join(workdir, "config.json")) as f:
      config = ml_collections.ConfigDict(json.load(f))
  names = ["sft"]
  for name in pipeline_lib.policy_positions(config):
    names += [name, "ppo_oracle"] if name == "ppo" else [name]
  names += list(pipeline_lib.METHODS)
  label = lambda n: ("SFT" if n == "sft" else "PPO" if n == "ppo" else
                     "PPO (oracle reward)" if n == "ppo_oracle" else
                     pipeline_lib.METHODS[n] if n in pipeline_lib.METHODS else
                     f"RLHF-V{n.split('_')[1]} (RS)")
  return [PolicyDir(label(n), n, os.path.join(workdir, n, "final")) for n in names
          if os.path.isdir(os.path.join(workdir, n, "final"))]


@functools.partial(jax.jit, static_argnames=("cfg",))
def _logprobs(params, tokens, positions, segment_ids, response_tokens, *, cfg):
  return ppo.response_logprobs(params, tokens, positions, segment_ids, response_tokens, cfg=cfg,
                               temperature=1.0)[0]


def sample_rows(params, ref_params, cfg, tokenizer, prompts, *, max_new_tokens: int,
                temperature: float = 1.0, samples_per_prompt: int = 1, seed: int = 0,
                batch_size: int = 64) -> Dict[str, Any]:
  """Completions of ``params`` for every prompt, with their KL to ``ref_params``.

  Args:
    params, ref_params: policy and reference weights (same ``cfg``); ``ref_params=None`` skips
      the teacher-forced passes (KL 0).
    prompts: dialogs. max_new_tokens: per completion. temperature: 0 = greedy.
    samples_per_prompt: completions per prompt (>= 1). seed: batch ``i`` uses key ``seed + i``.
    batch_size: rows per generate call.
  Returns:
    dict, rows in prompt-major order (row ``i * samples_per_prompt + j`` is completion ``j`` of
    prompt ``i``): ``texts`` [n] str, ``finished`` [n] bool, ``lengths`` [n] int (tokens, EOS
    included), ``kl`` [n] float64 (sum over the row's ``lengths`` tokens of ``log pi -
    log pi_ref`` at temperature 1, the k1 estimator).
  Raises:
    ValueError: if ``samples_per_prompt`` < 1.
  """
  if samples_per_prompt < 1:
    raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
  prompts = [p for p in prompts for _ in range(samples_per_prompt)]
  out: Dict[str, list] = {"texts": [], "finished": [], "lengths": [], "kl": []}
  for start in range(0, len(prompts), batch_size):
    ids = [tokenizer.encode_dialog(list(p))[0].tolist() for p in prompts[start:start + batch_size]]
    longest = -(-max(len(x) for x in ids) // 16) * 16
    tok, mask = sampling.left_pad(ids, tokenizer.pad_id, longest)
    tok, mask = jnp.asarray(tok), jnp.asarray(mask)
    gen = sampling.sample(params, tok, mask, jax.random.key(seed + start), cfg=cfg,
                          max_new_tokens=max_new_tokens, temperature=float(temperature),
                          eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    lengths = np.asarray(gen.lengths)
    if ref_params is not None:
      ro = ppo.rollout_tensors(tok, mask, gen)
      args = (ro["tokens"], ro["positions"], ro["segment_ids"], ro["response_tokens"])
      m = np.asarray(ro["response_mask"])
      diff = np.asarray(_logprobs(params, *args, cfg=cfg)) - np.asarray(
          _logprobs(ref_params, *args, cfg=cfg))
      out["kl"] += np.sum(np.where(m, diff, 0.0), axis=1).tolist()
    else:
      out["kl"] += [0.0] * len(ids)
    out["texts"] += sampling.decode(gen, tokenizer)
    out["finished"] += np.asarray(gen.finished).tolist()
    out["lengths"] += lengths.tolist()
  return {k: (v if k == "texts" else np.asarray(v)) for k, v in out.items()}


def _ci(values, clusters=None) -> dict:
  values = np.asarray(values, np.float64)
  if values.size == 0:
    return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
  return stats.bootstrap_mean(values, clusters)


def _per_prompt(values, k: int) -> np.ndarray:
  return np.asarray(values, np.float64).reshape(-1, k).mean(axis=1)


def _judged(prompts, rows, k: int, is_world: bool, rc) -> Dict[str, np.ndarray]:
  """Per-row judgements: ``benign`` mask, ``correct``, ``refused``, ``false_refusal``,
  ``helpful`` (oracle; world) and ``rc`` (truncated rows 0)."""
  flat = [p for p in prompts for _ in range(k)]
  out = {"rc": np.where(rows["finished"], rc, 0.0)}
  if is_world:
    judged = evaluation.judge(flat, rows["texts"], rows["finished"])
    out.update({"benign": np.asarray([not j.harmful for j in judged]),
                "correct": np.asarray([j.correct for j in judged], np.float64),
                "refused": np.asarray([j.refused for j in judged], np.float64),
                "false_refusal": np.asarray([j.false_refusal for j in judged], np.float64),
                "helpful": np.asarray([j.helpful for j in judged], np.float64)})
  return out


def _metrics(j: Dict[str, np.ndarray], rows, k: int, suffix: str, is_world: bool,
             threshold: float, r_safe) -> dict:
  """Means with clustered-bootstrap intervals of one policy's greedy (k = 1) or sampled rows."""
  clusters = np.repeat(np.arange(len(rows["texts"]) // k), k)
  out: Dict[str, Any] = {}

  def put(name, values, mask=None):
    mask = np.ones(len(values), bool) if mask is None else mask
    d = _ci(np.asarray(values)[mask], clusters[mask])
    out[f"{name}{suffix}"] = d["mean"]
    out[f"{name}{suffix}_ci"] = [d["lo"], d["hi"]]

  if is_world:
    put("helpfulness", j["correct"], j["benign"])
    put("refusal_rate", j["refused"], ~j["benign"])
    put("false_refusal_rate", j["false_refusal"], j["benign"])
  put("reward", j["rc"])
  put("unsafe_share", (np.asarray(r_safe) < threshold) & rows["finished"])
  out[f"mean_length{suffix}"] = float(np.mean(rows["lengths"]))
  out[f"truncated{suffix}"] = float(1.0 - np.mean(rows["finished"]))
  return out


def _paired(policy: dict, base: dict, is_world: bool, k: int) -> dict:
  """Paired differences (policy - SFT) over prompts, and the greedy win rate vs SFT."""
  out = {}
  pairs = [("reward", "rc", None)]
  if is_world:
    pairs += [("helpfulness", "correct", "benign"), ("refusal_rate", "refused", "harmful"),
              ("false_refusal_rate", "false_refusal", "benign")]
  for suffix, kk in (("", 1), ("_t1", k)):
    a, b = policy[suffix], base[suffix]
    for name, key, subset in pairs:
      x, y = _per_prompt(a[key], kk), _per_prompt(b[key], kk)
      if subset is not None:
        benign = _per_prompt(a["benign"], kk) > 0.5
        keep = benign if subset == "benign" else ~benign
        x, y = x[keep], y[keep]
      d = stats.bootstrap_paired_difference(x, y) if len(x) else {"mean": float("nan"),
                                                                   "lo": float("nan"),
                                                                   "hi": float("nan")}
      out[f"{name}{suffix}_vs_sft"] = d["mean"]
      out[f"{name}{suffix}_vs_sft_ci"] = [d["lo"], d["hi"]]
  judge_key = "helpful" if is_world else "rc"
  w = stats.win_rate(policy[""][judge_key], base[""][judge_key])
  out.update(win_rate_vs_sft=w["mean"], win_rate_vs_sft_ci=[w["lo"], w["hi"]],
             wins=w["wins"], ties=w["ties"], losses=w["losses"])
  return out


def _length_flag(row: dict, sft_row: dict, max_new: int) -> str:
  """Why a policy's lengths look like length hacking (empty if they do not)."""
  flags = []
  for suffix in ("", "_t1"):
    base, got = sft_row[f"mean_length{suffix}"], row[f"mean_length{suffix}"]
    if base > 0 and abs(got - base) > 0.5 * base:
      flags.append(f"mean length{suffix} {base:.1f} -> {got:.1f} tokens")
    if row[f"truncated{suffix}"] > 0.5:
      flags.append(f"{row[f'truncated{suffix}']:.0%} of completions{suffix} hit the "
                   f"{max_new}-token cap")
  return "; ".join(flags)


def heldout_prompts(config, workdir: str, tokenizer, max_prompt: int, n: int) -> List[dict]:
  """Distinct held-out prompt records that fit ``max_prompt`` tokens, without the prompts PPO
  selected its checkpoint with (``ppo.rollout.HeldOut``: ``ppo.eval_prompts`` of stream
  ``prompts.SELECTION_STREAM``).

  Raises:
    ValueError: if none is left.
  """
  data_dir = os.path.join(workdir, "sft")
  records = prompts_lib.load_prompts(config, data_dir, "held_out", n, distinct=True)
  selection = {sources.prompt_key(r["prompt"]) for r in prompts_lib.load_prompts(
      config, data_dir, "held_out", int(config.ppo.eval_prompts),
      stream=prompts_lib.SELECTION_STREAM, distinct=True)}
  records = [r for r in records if sources.prompt_key(r["prompt"]) not in selection
             and input_pipeline.prompt_example(r, tokenizer, max_prompt) is not None]
  if not records:
    raise ValueError(f"{workdir}: no held-out prompt fits {max_prompt} tokens")
  return records


def _rm_checks(config, workdir: str, tokenizer, rms, is_world: bool) -> dict:
  """Reward-model diagnostics on held-out preference pairs (see the module docstring)."""
  rcfg, help_params, safe_params = rms
  max_len = int(config.reward.max_seq_len)
  help_pairs, safety_pairs = [], []
  if is_world:
    wcfg = build.world_config(config)
    help_pairs = world_pairs.helpfulness_pairs(wcfg, "held_out", 400)
    safety_pairs = world_pairs.safety_pairs(wcfg, "held_out", 400)
  elif "hh_rlhf" in build.parse_list(config.pipeline.help_sources, "config.pipeline.help_sources"):
    builder = build.source_builder("hh_rlhf", "preference", config, os.path.join(workdir, "sft"),
                                   is_safety=True)
    help_pairs = [input_pipeline.decode_record(x) for x in builder.as_data_source(split="held_out")]
  out: Dict[str, Any] = {}
  rc, rr, kept = reward_eval.score_pairs(help_params, rcfg, tokenizer, help_pairs, max_len)
  if len(kept):
    n_len = lambda t: len(tokenizer.encode(t, bos=False))
    lc = np.asarray([n_len(r["chosen"]) for r in kept])
    lr = np.asarray([n_len(r["rejected"]) for r in kept])
    out["help_rm_pairs"] = len(kept)
    out["help_rm_accuracy"] = float(np.mean(rc > rr))
    out["shorter_wins_accuracy"] = float(np.mean(np.where(lc == lr, 0.5, (lc < lr).astype(float))))
    out["reward_length_corr"] = scoring.reward_length_correlation(
        np.concatenate([rc, rr]), np.concatenate([lc, lr]))
  if safety_pairs and safe_params is not None:
    sc, sr, kept = reward_eval.score_pairs(safe_params, rcfg, tokenizer, safety_pairs, max_len)
    labels = np.asarray([sources.SAFETY_LABELS.index(r["safety_label"])
                         if r.get("safety_label") else -1 for r in kept])
    threshold = float(config.ppo.safety_threshold)
    out["unsafe_detection"] = reward_eval.unsafe_detection(sc, sr, labels, threshold)
    out["unsafe_detection_at_0.5"] = reward_eval.unsafe_detection(sc, sr, labels, 0.5)
  return out


def run(workdir: str, num_prompts: Optional[int] = None) -> dict:
  """Evaluate every finished policy of a pipeline ``workdir``; returns ``policy_eval.json``.

  Held-out prompts longer than ``min(ppo.max_prompt_len, max_seq_len - eval.max_new_tokens)``
  tokens are skipped. Deterministic: every sampling key derives from ``config.seed``.

  Raises:
    FileNotFoundError: if the workdir has no finished SFT stage or reward models.
    ValueError: if no held-out prompt fits.
  """
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  policies = policies_of(workdir, config)
  if not policies or policies[0].stage != "sft":
    raise FileNotFoundError(f"{workdir}: no finished SFT stage (sft/final)")
  tok_path = config.tokenizer.path
  is_world = tok_path == "world"
  tokenizer = Tokenizer(os.path.join(workdir, "sft", "tokenizer.model") if is_world else tok_path)
  rms = scoring.load_reward_models(*pipeline_lib.latest_reward_models(workdir), "pipeline workdir")
  threshold = float(config.ppo.safety_threshold)
  scorer = scoring.Scorer("rm", tokenizer, rms.on_device(),
                          threshold=threshold)
  max_new = int(config.eval.max_new_tokens)
  k = int(config.eval.get("samples_per_prompt", 4))
  sft_cfg, sft_params = convert.load_orbax(policies[0].final_dir)
  check_finite(sft_params, policies[0].final_dir)
  max_prompt = min(int(config.ppo.max_prompt_len), sft_cfg.max_seq_len - max_new)
  records = heldout_prompts(config, workdir, tokenizer, max_prompt,
                            num_prompts or int(config.eval.num_prompts))
  prompts = [r["prompt"] for r in records]
  safety = [bool(r.get("is_safety", False)) for r in records]
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  rows, judged = [], {}
  walls = wd.read_json(os.path.join(workdir, pipeline_lib.WALL), {})
  for name, key, path in policies:
    cfg, params = (sft_cfg, sft_params) if key == "sft" else convert.load_orbax(path)
    check_finite(params, path)
    metrics, judged[key], greedy = _evaluate_policy(
        params, None if key == "sft" else sft_params, cfg, tokenizer, prompts, safety, scorer,
        max_new=max_new, k=k, seed=config.seed, is_world=is_world, threshold=threshold)
    stage = wd.read_json(os.path.join(workdir, key, wd.RESULT), {})
    row: Dict[str, Any] = {"policy": name, "stage": key, **metrics,
                           "wall_s": walls.get(key),  # None: ran before wall_s.json existed
                           **{k: stage.get(k) for k in wd.TOKEN_COUNTS}}
    row.update(_paired(judged[key], judged["sft"], is_world, k))
    row["length_flag"] = _length_flag(row, rows[0] if rows else row, max_new)
    rows.append(row)
    _write_completions(os.path.join(out_dir, f"completions_{key}.jsonl"), prompts, greedy,
                       judged[key][""]["rc"])
  result = {"workdir": os.path.abspath(workdir), "stage": "pipeline",
            "num_prompts": len(prompts), "samples_per_prompt": k, "max_new_tokens": max_new,
            "judge": "oracle" if is_world else "combined reward",
            "n_benign": int(np.sum(judged["sft"][""]["benign"])) if is_world else None,
            "policies": rows, "rm": _rm_checks(config, workdir, tokenizer, rms, is_world),
            "overoptimization": _overoptimization(config, workdir, tokenizer, scorer, sft_cfg,
                                                  sft_params, records, is_world),
            "ppo": _ppo_summary(workdir)}
  _write_report(result, workdir, out_dir)
  return result


def _evaluate_policy(params, ref_params, cfg, tokenizer, prompts, safety, scorer, *,
                     max_new: int, k: int, seed: int, is_world: bool,
                     threshold: float) -> tuple[dict, dict, dict]:
  """Greedy and ``k`` temperature-1 samples of one policy, scored and judged.

  Returns:
    (the policy's metrics: greedy ones, ``_t1`` ones, ``kl_to_sft`` and, in the world,
    ``per_task``; ``_judged`` arrays by suffix ``""`` / ``"_t1"``; the greedy ``sample_rows``).
  """
  greedy = sample_rows(params, None, cfg, tokenizer, prompts, max_new_tokens=max_new,
                       temperature=0.0, seed=seed)
  sampled = sample_rows(params, ref_params, cfg, tokenizer, prompts, max_new_tokens=max_new,
                        samples_per_prompt=k, seed=seed)
  row: Dict[str, Any] = {}
  judged = {}
  for suffix, rws, kk in (("", greedy, 1), ("_t1", sampled, k)):
    flat_safety = [s for s in safety for _ in range(kk)]
    sc = scorer([p for p in prompts for _ in range(kk)], rws["texts"], flat_safety)
    judged[suffix] = _judged(prompts, rws, kk, is_world, sc["rc"])
    row.update(_metrics(judged[suffix], rws, kk, suffix, is_world, threshold, sc["r_safe"]))
  row["kl_to_sft"] = float(np.sum(sampled["kl"]) / max(np.sum(sampled["lengths"]), 1))
  if is_world:
    row["per_task"] = evaluation.oracle_report(prompts, greedy["texts"],
                                               greedy["finished"])["per_task"]
  return row, judged, greedy


def _write_completions(path: str, prompts, greedy: dict, rewards) -> None:
  """``completions_<stage>.jsonl``: prompt, greedy completion, finished and reward per line."""
  sources.write_jsonl(path, [{"prompt": p, "completion": t, "finished": bool(done),
                               "reward": float(r)}
                              for p, t, done, r in zip(prompts, greedy["texts"],
                                                       greedy["finished"], rewards)])


def _write_report(result: dict, workdir: str, out_dir: str) -> None:
  """Figures, ``policy_eval.json`` and ``eval.md`` in ``out_dir``; sets ``result["figures"]``."""
  # Files by name in <workdir>/eval (the JSON has no other path: two runs compare equal).
  figures = {"plot": _plot(result["policies"], os.path.join(out_dir, "policies.png")),
             **rs_figures(workdir, out_dir)}
  if result["overoptimization"]:
    figures["overoptimization"] = overoptimization.plot(
        result["overoptimization"], os.path.join(out_dir, "overoptimization.png"))
  result["figures"] = {k: os.path.basename(v) for k, v in figures.items()}
  with open(os.path.join(out_dir, "policy_eval.json"), "w") as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(out_dir, "eval.md"), "w") as f:
    f.write(evaluation.policy_markdown(result) + "\n")


def _overoptimization(config, workdir, tokenizer, scorer, cfg, params, records,
                      is_world: bool) -> dict:
  """Best-of-n curve of SFT samples (world: with the oracle's gold reward) and PPO's curves."""
  out = {}
  n_prompts, n_max = int(config.eval.get("bon_prompts", 64)), int(config.eval.get("bon_n", 64))
  if is_world and n_prompts > 0 and n_max > 1:
    sub = records[:n_prompts]
    prompts = [r["prompt"] for r in sub]
    rows = sample_rows(params, None, cfg, tokenizer, prompts,
                       max_new_tokens=int(config.eval.max_new_tokens), samples_per_prompt=n_max,
                       seed=config.seed + 104729)
    flat = [p for p in prompts for _ in range(n_max)]
    flat_safety = [bool(r.get("is_safety", False)) for r in sub for _ in range(n_max)]
    done = rows["finished"]
    proxy = np.where(done, scorer(flat, rows["texts"], flat_safety)["rc"], 0.0)
    gold = np.where(done, scoring.oracle_scores(flat, rows["texts"])["gold"], 0.0)
    out["best-of-n (SFT samples)"] = overoptimization.best_of_n_curve(
        proxy.reshape(len(sub), n_max), gold.reshape(len(sub), n_max))
  for stage, label in (("ppo", "PPO (reward models)"), ("ppo_oracle", "PPO (oracle reward)")):
    path = os.path.join(workdir, stage, "ppo_progress.json")
    if os.path.isfile(path):
      with open(path) as f:
        curve = overoptimization.ppo_curve(json.load(f).get("evals", []))
      if curve["iteration"]:
        out[label] = curve
  return out


def _ppo_summary(workdir: str) -> dict:
  """What each PPO stage learned: ``result.json``'s selection, the medians of its train metrics
  (``approxkl``, ``clipfrac``), the value loss of the first 5 iterations, and its held-out
  reward and KL to SFT at iteration 0 and at the selected iteration."""
  out = {}
  for stage in ("ppo", "ppo_oracle"):
    res_path = os.path.join(workdir, stage, "result.json")
    log_path = os.path.join(workdir, stage, "logs", "metrics.jsonl")
    if not (os.path.isfile(res_path) and os.path.isfile(log_path)):
      continue
    with open(res_path) as f:
      res = json.load(f)
    with open(log_path) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    train = [r for r in rows if r.get("split") == "train"]
    evals = {r["step"]: r for r in rows if r.get("split") == "eval"}
    med = lambda key: float(np.median([r[key] for r in train])) if train else float("nan")
    out[stage] = {"best_iteration": res.get("best_iteration"), "improved": res.get("improved"),
                  "iterations": res.get("steps"), "median_approxkl": med("approxkl"),
                  "median_clipfrac": med("clipfrac"),
                  "value_loss_first_5": [r["value_loss"] for r in train[:5]]}
    start, best = evals.get(0), evals.get(res.get("best_iteration"))
    if start and best:
      out[stage].update(reward_start=start["reward"], reward_best=best["reward"])
      if "kl_sft" in start:
        out[stage].update(kl_sft_start=start["kl_sft"], kl_sft_best=best["kl_sft"])
  return out


def rs_figures(workdir: str, out_dir: str) -> dict:
  """Figures 7 and 8 over all rejection-sampling iterations of the pipeline (one curve each), from
  ``rs_<i>/figures/figures.json``; returns ``{"reward_vs_n": png, ...}`` of what was drawn."""
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
  """Bar charts with 95% intervals of the main metrics, one bar per policy."""
  keys = [k for k in ("helpfulness", "helpfulness_t1", "false_refusal_rate_t1", "reward",
                      "win_rate_vs_sft") if any(k in r for r in rows)]
  fig = Figure(figsize=(2.8 * len(keys), 3.4))
  axes = fig.subplots(1, len(keys), squeeze=False)
  names = [r["policy"] for r in rows]
  for ax, key in zip(axes[0], keys):
    means = np.asarray([r.get(key, np.nan) for r in rows], float)
    cis = np.asarray([r.get(f"{key}_ci", [np.nan, np.nan]) for r in rows], float)
    err = np.abs(np.stack([means - cis[:, 0], cis[:, 1] - means]))
    ax.bar(range(len(rows)), means, yerr=err, capsize=3,
           color=[f"C{i}" for i in range(len(rows))])
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
    ax.set_title(key, fontsize=9)
  fig.tight_layout()
  fig.savefig(out_png, dpi=110)
  return out_png
