"""The Ghost Attention stage (stage "gatt", Llama 2 Sec. 3.3).

``python train.py --config=configs/gatt_tiny.py`` runs it inside a pipeline; alone:
``python train.py --config=... --config.stage=gatt --config.init_from=<policy>/final``.

Steps (each resumable: a finished step's file is reused):
  1. dialogs: ``gatt.num_dialogs`` train dialogs of ``gatt.prompt_stream``, each a system
     instruction and 1 .. ``gatt.max_turns`` user turns (:func:`instruction_dialogs`): on the
     synthetic world its checkable instructions (``world.INSTRUCTIONS``: begin or end every
     answer with a word) and benign prompts; on file data Llama 2's synthetic constraints
     (hobby, language, public figure; ``gatt.step.synthetic_instruction``) and the user turns
     of ``data.sft_sources``' prompts, where only ``gatt.keep="finished"`` and no evaluation
     apply (both need the world's checker);
  2. answers, turn by turn from ``init_from`` with the instruction concatenated to *every* user
     turn (``encode_dialog(..., system_every_turn=True)``) at ``rejection_sampling.temperature``
     / ``max_new_tokens`` in batches of ``rejection_sampling.batch_size``; finished turns wait in
     ``sampling/`` (SIGTERM / SIGINT stops after the current turn, exit 0; the next run resumes);
  3. training samples (``gatt.step.training_record``): the instruction in the first turn only,
     the loss on the last answer only; kept when every answer finished (a dialog the context
     cuts short ends at its last answer) and, by ``gatt.keep``, the last one follows the
     instruction (and the oracle judges it correct); ``gatt_data.jsonl`` holds every sampled
     dialog;
  4. fine-tuning with the SFT stage (given by the registry) from ``init_from`` on them with
     ``rejection_sampling``'s ``lr`` / ``num_epochs`` / ``num_steps`` in ``finetune/``;
  5. evaluation (``gatt.eval_dialogs`` > 0): held-out dialogs of ``gatt.eval_turns`` turns played
     greedily by ``init_from`` and by the result with the instruction in the first turn only;
     adherence and the oracle's correctness per turn, paired differences with 95% bootstrap
     intervals (``adherence.json``, ``adherence.png``; ``gatt.evaluate``).
Only the config that started the workdir may resume it (``train.workdir.check_resume``).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Tuple

import jax
from jax.experimental import multihost_utils
import numpy as np

from llama_jax.config import LlamaConfig
from llama_jax.data import prompts as prompts_lib
from llama_jax.data import sources, world, world_tasks
from llama_jax.gatt import evaluate
from llama_jax.gatt import step as gatt_lib
from llama_jax.rejection_sampling import step as rs_lib
from llama_jax.train import build
from llama_jax.train import stage as stage_lib
from llama_jax.train import workdir as wd

log = logging.getLogger(__name__)
ROWS = "gatt_data.jsonl"
ADHERENCE = "adherence.json"


def validate(config) -> None:
  """Checks across fields and against files, before anything is written.

  Raises:
    ValueError: naming the field: ``init_from`` empty; ``gatt.late_turn`` > ``eval_turns``;
      off the synthetic world, ``gatt.keep`` other than "finished" or ``gatt.eval_dialogs`` > 0
      (both need the world's checker).
    FileNotFoundError: for ``init_from`` without ``params.json``.
  """
  build.check_sampling_inputs(config, "gatt", "the policy to teach", scored=False)
  if config.gatt.late_turn > config.gatt.eval_turns:
    raise ValueError(f"config.gatt.late_turn={config.gatt.late_turn} exceeds "
                     f"config.gatt.eval_turns={config.gatt.eval_turns}: no turn to pool")
  if not prompts_lib.is_world(config):
    if config.gatt.keep != "finished":
      raise ValueError(f"config.gatt.keep={config.gatt.keep!r} checks the answers with the "
                       'synthetic world\'s checker and oracle; off the world use "finished"')
    if int(config.gatt.eval_dialogs) > 0:
      raise ValueError("config.gatt.eval_dialogs > 0 measures adherence with the synthetic "
                       "world's checker; off the world set it to 0")


def instruction_dialogs(config, workdir: str, split: str, n: int, min_turns: int,
                        max_turns: int) -> List[dict]:
  """``n`` dialogs ``{"instruction", "turns"}`` of ``split`` and ``gatt.prompt_stream`` with
  ``min_turns`` .. ``max_turns`` user turns: on the world ``world.instruction_dialogs`` (its
  checkable instructions, benign prompts); on file data ``gatt.step.instruction_dialogs``
  (Llama 2's synthetic constraints; the last user turns of the prompts of
  ``data.sft_sources``), seeded by ``config.seed``, split and stream.

  Raises:
    ValueError: from the prompt loaders (no prompt, a bad stream).
  """
  stream = int(config.gatt.prompt_stream)
  if prompts_lib.is_world(config):
    return world.instruction_dialogs(build.world_config(config), split, n, min_turns, max_turns,
                                     stream=None if stream < 0 else stream)
  records = prompts_lib.load_prompts(config, workdir, split, 0, stream=stream)
  texts = [[m["content"] for m in r["prompt"] if m["role"] == "user"][-1] for r in records]
  rng = np.random.default_rng([int(config.seed), ("train", "held_out").index(split), 0x6A77,
                               stream + 1])  # stream >= -1 (-1: every stream)
  return gatt_lib.instruction_dialogs(texts, n, min_turns, max_turns, rng)


def _policy(path: str, config, tokenizer) -> rs_lib.Policy:
  return rs_lib.load_policy(path, tokenizer, build.mesh_and_rules(config)[0])


def _sync(what: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"gatt: {what}")


class GAttStage(stage_lib.Stage):
  """Stage ``gatt`` (module docstring); the fine-tune runs on ``finetune`` (the SFT stage, given
  by the registry, so this package imports no other runner)."""

  name = "gatt"

  def __init__(self, finetune: stage_lib.Stage):
    self.finetune = finetune

  def run(self, config, workdir: str) -> dict:
    """Run (or resume) Ghost Attention in ``workdir``.

    Returns:
      dict with ``finished``, ``gatt_data`` (dialogs sampled, kept, adherence of the sampled
      answers, truncated share), ``finetune``, ``adherence`` (the evaluation's pooled results;
      per turn in ``adherence.json``) and ``final_dir`` when finished.
    Raises:
      ValueError / FileNotFoundError: from :func:`validate`, a workdir of another config or in
        use, before anything is written (a new workdir is removed).
    """
    existed = os.path.exists(workdir)
    with wd.Lock(workdir):
      with wd.clean_on_failure(workdir, existed):
        validate(config)
        tokenizer = build.tokenizer(config, workdir)
        tokenizer.check_vocab(LlamaConfig.from_params_json(
            os.path.join(config.init_from, "params.json")))
        wd.check_resume(workdir, config, any(os.path.exists(os.path.join(workdir, name)) for name
                                             in (ROWS, "sampling", "finetune", wd.RESULT)))
      if wd.is_done(workdir):
        return wd.read_json(os.path.join(workdir, wd.RESULT))
      wd.write_config(workdir, config)
      sampled = stage_lib.rows_or_sample(
          config, workdir, ROWS, lambda stop: self._sample(config, workdir, tokenizer, stop),
          evaluate.Stopped, "gatt")
      if sampled is None:
        return {"finished": False, "stopped_by_signal": True}
      return self._finetune(config, workdir, tokenizer, *sampled)

  def _sample(self, config, workdir: str, tokenizer, stop) -> Tuple[List[dict], Optional[int]]:
    g, rc = config.gatt, config.rejection_sampling
    dialogs = instruction_dialogs(config, workdir, "train", int(g.num_dialogs), 1,
                                  int(g.max_turns))
    on_world = prompts_lib.is_world(config)
    policy = _policy(config.init_from, config, tokenizer)
    out = evaluate.rollout(policy, tokenizer, dialogs, system_every_turn=True,
                           temperature=float(rc.temperature),
                           max_new_tokens=int(rc.max_new_tokens),
                           batch_size=int(rc.batch_size),
                           key=jax.random.fold_in(jax.random.key(config.seed), 0x6A77),
                           turn_dir=os.path.join(workdir, "sampling"), stop=stop)
    del policy
    rows = []
    for d, texts, done in zip(dialogs, out["texts"], out["finished"]):
      # A dialog cut short by the context (rollout's context_stops) ends at its last answer.
      row = {"instruction": d["instruction"], "turns": d["turns"][:len(texts)],
             "planned_turns": len(d["turns"]), "answers": texts,
             "finished": bool(texts) and all(done)}
      if on_world:  # the world's checker and oracle; file data has neither
        row["follows"] = [world_tasks.follows_instruction(d["instruction"], t) for t in texts]
        row["correct"] = [world.oracle(u, t).helpful for u, t in zip(d["turns"], texts)]
      rows.append(row)
    last = lambda key: [bool(r.get(key)) and r[key][-1] for r in rows]
    kept = gatt_lib.keep([r["finished"] for r in rows], last("follows"), last("correct"),
                         mode=g.keep)
    for r, k in zip(rows, kept):
      r["kept"] = bool(k)
    return rows, out["tokens_sampled"]

  def _finetune(self, config, workdir: str, tokenizer, rows: List[dict],
                tokens: Optional[int]) -> dict:
    stats = summary(rows)
    log.info("gatt: %s", stats)
    sft = [gatt_lib.training_record(r["instruction"], r["turns"], r["answers"])
           for r in rows if r["kept"]]
    if not sft:
      raise ValueError(f"gatt: none of the {len(rows)} sampled dialogs was kept (every answer "
                       f"finished; config.gatt.keep={config.gatt.keep!r}); nothing to fine-tune "
                       "on")
    sft_jsonl = os.path.join(workdir, "sft_data.jsonl")
    if jax.process_index() == 0:
      sources.write_jsonl(sft_jsonl, sft)
    _sync("sft_data written")
    then = lambda final_dir: self._evaluate(config, workdir, tokenizer, final_dir)
    return stage_lib.finetune_on(self.finetune, config, workdir, sft_jsonl, sft,
                                 {"gatt_data": stats, "tokens_sampled": tokens}, then=then)

  def _evaluate(self, config, workdir: str, tokenizer, final_dir: str) -> Dict[str, Any]:
    g, rc = config.gatt, config.rejection_sampling
    if int(g.eval_dialogs) <= 0:
      return {}
    dialogs = instruction_dialogs(config, workdir, "held_out", int(g.eval_dialogs),
                                  int(g.eval_turns), int(g.eval_turns))
    results = {}
    for name, path in (("before", config.init_from), ("after", final_dir)):
      policy = _policy(path, config, tokenizer)
      results[name] = evaluate.adherence(policy, tokenizer, dialogs,
                                         max_new_tokens=int(rc.max_new_tokens),
                                         batch_size=int(rc.batch_size))
      del policy
    comparison = evaluate.compare(results["before"], results["after"],
                                  late_turn=int(g.late_turn), seed=int(config.seed))
    comparison["context_stops"] = {k: v["context_stops"] for k, v in results.items()}
    if jax.process_index() == 0:
      wd.write_json(os.path.join(workdir, ADHERENCE), comparison)
      evaluate.plot(comparison, os.path.join(workdir, "adherence.png"))
      sources.write_jsonl(os.path.join(workdir, "eval_dialogs.jsonl"), [
          {**d, "before": results["before"]["texts"][i], "after": results["after"]["texts"][i]}
          for i, d in enumerate(dialogs)])
    _sync("evaluation written")
    f = comparison["follows"]
    log.info("gatt: adherence at turns >= %d: %s", g.late_turn, f["late"])
    return {"adherence": {"late": f["late"], "all": f["all"],
                          "correct_late": comparison["correct"]["late"],
                          "correct_if_following": comparison["correct_if_following"],
                          "context_stops": comparison["context_stops"]}}

  def abstract_steps(self, config, mesh) -> List[stage_lib.StepPlan]:
    """The fine-tuning step (the SFT stage's) and the longest sampling call:
    ``rejection_sampling.batch_size`` prompts of ``model.max_seq_len - max_new_tokens`` tokens on
    the generation layout."""
    rc = config.rejection_sampling
    cfg = build.planning_model_config(config)
    prompt_len = max(1, int(cfg.max_seq_len) - int(rc.max_new_tokens))
    sample = stage_lib.sampling_plan(
        f"sampling.sample (GAtt turn: {rc.batch_size} dialogs, generation layout)", cfg, mesh,
        int(rc.batch_size), prompt_len, int(rc.max_new_tokens), float(rc.temperature))
    return self.finetune.abstract_steps(config, mesh) + [sample]


def summary(rows: List[dict]) -> Dict[str, Any]:
  """Statistics of ``gatt_data.jsonl``'s rows: dialogs, kept and its share, mean turns, the share
  with a truncated answer (``unfinished``), the dialogs the context cut short, and on the world
  the share of sampled answers that follow the instruction and that the oracle judges correct
  (``follows`` / ``correct``: all turns; ``*_last``: the last turn)."""
  n = len(rows)
  mean = lambda xs: float(np.mean(xs)) if len(xs) else 0.0
  out = {"dialogs": n, "kept": int(sum(r["kept"] for r in rows)),
         "kept_share": mean([r["kept"] for r in rows]),
         "mean_turns": mean([len(r["answers"]) for r in rows]),
         "unfinished": mean([not r["finished"] for r in rows]),
         "context_stops": int(sum(len(r["answers"]) < r["planned_turns"] and r["finished"]
                                  for r in rows))}
  for key in ("follows", "correct"):  # the world's verdicts (absent on file data)
    if rows and key in rows[0]:
      out[key] = mean([f for r in rows for f in r[key]])
      out[f"{key}_last"] = mean([r[key][-1] for r in rows if r[key]])
  return out
