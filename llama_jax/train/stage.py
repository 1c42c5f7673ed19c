"""The one stage skeleton: prepare -> state -> loop -> export.

Every stage is a :class:`Stage`: ``run(config, workdir) -> result`` and
``abstract_steps(config, mesh) -> [StepPlan]`` (its jitted steps lowered on abstract inputs, what
``--dry_run`` compiles and measures). A training stage (SFT, reward model, PPO) only writes
:meth:`TrainingStage.prepare`, which validates the config and data and builds a :class:`Run`
without writing anything; :func:`run_stage` does the rest the same way for all of them:

1. ``prepare`` inside ``workdir.clean_on_failure`` (a run that fails validation leaves nothing);
2. resume from the newest checkpoint (state and data iterator) or build the step-0 state
   (``init_from`` restored and checked finite), still before anything is written;
3. ``config.json`` and ``data_stats.json`` (a workdir resumes only with the config that
   started it: ``workdir.check_resume``; ``workdir.Lock`` keeps a second run out);
4. ``train.loop.run_loop``: steps, metrics, evaluations, checkpoints, SIGTERM/SIGINT,
   ``train.stop_after_steps``, a progress bar;
5. when finished: ``final/`` (``Run.export``, default the params as ``convert.save_orbax``) and
   ``result.json``, written once.

A new stage is a package with ``step.py`` (pure, jittable) and ``run.py`` (a ``TrainingStage``
subclass), plus one line in ``llama_jax.recipe.stages.REGISTRY`` (see ``docs/architecture.md``).
"""

from __future__ import annotations

import abc
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from llama_jax import sampling, sharding
from llama_jax.config import LlamaConfig
from llama_jax.data import sources
from llama_jax.train import build, settings
from llama_jax.train import workdir as wd
from llama_jax.train.checkpoint import Checkpointer, StopSignal
from llama_jax.train.loop import LoopResult, run_loop
from llama_jax.train.metrics import MetricWriter
from llama_jax.train.state import StateSetup, step_rng


def _state_rng(state, step: int) -> jax.Array:
  del step
  return step_rng(state)


@dataclasses.dataclass
class Run:
  """A prepared run of a training stage: validated and built, nothing written yet.

  Attributes:
    cfg: model config of the params ``final/`` holds.
    total_steps: steps of the whole run (earlier, resumed runs included).
    step_fn: ``(state, batch, rng) -> (state, metrics)``: a jitted step, or a host function
      around jitted ones (PPO: rollouts, scoring, update).
    batches: iterator of host batches; checkpointed with the state when it has ``get_state``
      (grain); :func:`run_stage` calls ``batches.seek(step)`` after a restore when it has one.
    abstract_state: the state as ``jax.ShapeDtypeStruct`` leaves with shardings (restore target).
    init_state: builds the step-0 state (sharded).
    put_batch: host batch -> device arrays. rng_fn: ``(state, step) -> key`` of a step (default
      ``train.state.step_rng``).
    evaluate: ``(state, step) -> metrics`` (written under ``eval``), every ``eval_every`` steps,
      at step 0 with ``eval_at_start``, and after the last step with ``final_eval``.
    should_stop: checked before the first step and after each periodic evaluation (early
      stopping; a resumed run that had stopped stays stopped).
    on_save: called after a checkpoint is complete (e.g. to write bookkeeping beside it).
    export: ``state -> final dir`` (default: ``workdir.export_params`` of ``state.params``).
    result: extra ``result.json`` keys from the :class:`~llama_jax.train.loop.LoopResult`.
    data_stats: written to ``data_stats.json``. desc: progress label. tokens_key: metric
      summed for tokens/s. progress_key: metric shown on the progress bar.
    totals: step metric -> name of its running total over the whole stage (resumes included:
      kept in each checkpoint's metadata), logged with the train metrics and written to
      ``result.json``; default ``real_tokens`` -> ``tokens_trained`` (non-padding tokens of the
      optimizer steps' batches).
    checkpoint_every, log_every, stop_after_steps: intervals (0 = off), from ``config.train``.
    max_nonfinite_steps: halt after this many consecutive non-finite steps (0 = never).
    stop_grace_s: seconds a step may take after a stop signal before the process ends unsaved.
  """

  cfg: LlamaConfig
  total_steps: int
  step_fn: Callable[[Any, Any, jax.Array], Any]
  batches: Iterator
  abstract_state: Any
  init_state: Callable[[], Any]
  put_batch: Callable[[Any], Any] = lambda b: b
  rng_fn: Callable[[Any, int], jax.Array] = _state_rng
  evaluate: Optional[Callable[[Any, int], Mapping[str, float]]] = None
  eval_every: int = 0
  eval_at_start: bool = False
  final_eval: bool = True
  should_stop: Callable[[], bool] = lambda: False
  on_save: Optional[Callable[[int], None]] = None
  export: Optional[Callable[[Any], str]] = None
  result: Optional[Callable[[LoopResult], Dict[str, Any]]] = None
  data_stats: Dict[str, Any] = dataclasses.field(default_factory=dict)
  desc: str = "train"
  tokens_key: str = "real_tokens"
  progress_key: str = "loss"
  totals: Dict[str, str] = dataclasses.field(
      default_factory=lambda: {"real_tokens": "tokens_trained"})
  checkpoint_every: int = 0
  log_every: int = 10
  stop_after_steps: int = 0
  max_nonfinite_steps: int = 10
  stop_grace_s: float = 300.0


@dataclasses.dataclass
class StepPlan:
  """One jitted step lowered on abstract inputs, for ``--dry_run`` (``recipe.dry_run``).

  Attributes:
    name: e.g. ``"sft.train_step"``. lowered: ``jax.stages.Lowered`` (compiled by the dry run).
    accum_steps: gradient-accumulation microbatches. batch_shapes: input name -> shape.
    params / opt_state: the abstract sharded params and optimizer state (counted per device;
      ``opt_state`` None for a step without one). detail: bytes of parts of the arguments shown
      separately. extra: bytes live during the step but not its arguments (added to the total).
    lower_s: seconds spent lowering.
  """

  name: str
  lowered: Any
  accum_steps: int
  batch_shapes: Dict[str, tuple]
  params: Any
  opt_state: Any = None
  detail: Dict[str, int] = dataclasses.field(default_factory=dict)
  extra: Dict[str, int] = dataclasses.field(default_factory=dict)
  lower_s: float = 0.0


def generation_params(cfg: LlamaConfig, mesh) -> Any:
  """Abstract params (``jax.ShapeDtypeStruct`` with shardings) on the generation layout:
  ``sharding.GENERATION_RULES``, the compute dtype, as ``sharding.to_generation_layout`` copies
  them for sampling and forward-only passes."""
  return jax.tree.map(
      lambda x, sh: jax.ShapeDtypeStruct(x.shape, cfg.compute_dtype, sharding=sh),
      sharding.param_shapes(cfg), sharding.param_shardings(cfg, mesh, sharding.GENERATION_RULES))


def sampling_plan(name: str, cfg: LlamaConfig, mesh, rows: int, prompt_len: int,
                  max_new_tokens: int, temperature: float,
                  extra: Optional[Dict[str, int]] = None, num_samples: int = 1) -> "StepPlan":
  """:class:`StepPlan` of ``sampling.sample`` of ``rows`` prompts of ``prompt_len`` tokens
  (``num_samples`` completions each) on the generation layout (``sharding.GENERATION_RULES``:
  weights tensor-parallel in the compute dtype, as ``sharding.to_generation_layout`` copies
  them; rows split over data x fsdp). ``extra``: bytes live meanwhile (e.g. a resident train
  state), added to the total."""
  gen_rules = sharding.GENERATION_RULES
  gen_params = generation_params(cfg, mesh)
  batch_sh = sharding.batch_sharding(mesh, gen_rules)
  prompts = jax.ShapeDtypeStruct((rows, prompt_len), jnp.int32, sharding=batch_sh)
  pmask = jax.ShapeDtypeStruct((rows, prompt_len), jnp.bool_, sharding=batch_sh)
  replicated = NamedSharding(mesh, P())
  sample = sharding.jit_step(
      lambda params, tok, msk, key: sampling.sample(params, tok, msk, key, cfg=cfg,
                                                    max_new_tokens=max_new_tokens,
                                                    temperature=temperature,
                                                    num_samples=num_samples),
      mesh, gen_rules, in_shardings=(jax.tree.map(lambda x: x.sharding, gen_params), batch_sh,
                                     batch_sh, replicated),
      out_shardings=jax.tree.map(lambda _: batch_sh, sampling.GenerateOutput(0, 0, 0, 0)),
      donate_argnums=())
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
  t0 = time.perf_counter()
  lowered = sample.lower(gen_params, prompts, pmask, rng)
  return StepPlan(name, lowered, 1, {"prompt_tokens": (rows, prompt_len),
                                     "prompt_mask": (rows, prompt_len),
                                     "tokens": (rows * num_samples, max_new_tokens)},
                  gen_params, None, extra=dict(extra or {}), lower_s=time.perf_counter() - t0)


def shard_bytes(tree: Any) -> int:
  """Bytes per device of a tree of ``jax.ShapeDtypeStruct`` with shardings (shard shapes; the
  device holding the most of each leaf; replicated leaves count fully)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.shape else ()
    total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
  return total


def plan_train_step(name: str, setup: StateSetup, step_fn: Callable, abstract_batch: Mapping,
                    accum_steps: int) -> StepPlan:
  """:class:`StepPlan` of ``step_fn`` jitted by ``setup`` (donated state, explicit shardings) on
  ``abstract_batch`` (name -> ``jax.ShapeDtypeStruct``)."""
  t0 = time.perf_counter()
  lowered = setup.lower_step(step_fn, abstract_batch)
  state = setup.abstract_sharded_state()
  return StepPlan(name, lowered, accum_steps, {k: tuple(v.shape) for k, v in abstract_batch.items()},
                  state.params, state.opt_state, lower_s=time.perf_counter() - t0)


def intervals(config) -> Dict[str, int]:
  """``Run`` keyword arguments from ``config.train``: ``eval_every``, ``checkpoint_every``,
  ``log_every``, ``stop_after_steps``, ``max_nonfinite_steps``, ``stop_grace_s``."""
  t = settings.read(config, "train", settings.Train)
  return {"eval_every": t.eval_every, "checkpoint_every": t.checkpoint_every,
          "log_every": t.log_every, "stop_after_steps": t.stop_after_steps,
          "max_nonfinite_steps": t.max_nonfinite_steps, "stop_grace_s": t.stop_grace_s}


def check_batch(config, section: str, cfg: LlamaConfig, mesh) -> None:
  """The step's batch ``config.<section>.batch_size`` x ``max_seq_len`` fits the model and splits
  into ``train.grad_accum_steps`` microbatches that divide over the mesh's data x fsdp axes.

  Raises:
    ValueError: naming the field.
  """
  sec = config[section]
  b, t, accum = int(sec.batch_size), int(sec.max_seq_len), int(config.train.grad_accum_steps)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if t > cfg.max_seq_len:
    raise ValueError(f"config.{section}.max_seq_len={t} exceeds the model's "
                     f"max_seq_len={cfg.max_seq_len}")
  if accum < 1 or b % accum:
    raise ValueError(f"config.{section}.batch_size={b} is not divisible by "
                     f"config.train.grad_accum_steps={accum}")
  if (b // accum) % shards:
    raise ValueError(f"microbatch config.{section}.batch_size / grad_accum_steps = {b // accum} "
                     f"is not divisible by the batch mesh axes data x fsdp = {shards}")


class Stage(abc.ABC):
  """A stage of the recipe: what ``config.stage`` names (registry: ``recipe.stages``).
  Subclasses set ``name`` and write :meth:`run` (or derive from :class:`TrainingStage`)."""

  name = ""

  @abc.abstractmethod
  def run(self, config, workdir: str) -> dict:
    """Run (or resume) the stage in ``workdir``; returns what ``result.json`` holds."""

  def abstract_steps(self, config, mesh) -> List[StepPlan]:
    """The stage's jitted steps lowered for ``mesh`` on abstract inputs (nothing allocated).

    Raises:
      ValueError: naming the field, for sizes the mesh cannot split.
    """
    del config, mesh
    return []

  def unavailable(self, config) -> List[str]:
    """Passes of this stage with no memory plan yet (reported, never guessed)."""
    del config
    return []


class TrainingStage(Stage):
  """A stage that is one training loop: subclasses write :meth:`prepare` only."""

  @abc.abstractmethod
  def prepare(self, config, workdir: str) -> Run:
    """Validate ``config`` and the data and build the :class:`Run`; write nothing.

    Raises:
      ValueError / FileNotFoundError: naming the field, file or source.
    """

  def run(self, config, workdir: str) -> dict:
    return run_stage(self, config, workdir)


def _start(run: Run, checkpointer: Checkpointer):
  """(state, step): the newest intact checkpoint (data iterator restored in place; a damaged
  newer one is skipped with a warning) or step 0."""
  if checkpointer.latest_step() is None:
    return run.init_state(), 0
  data = run.batches if hasattr(run.batches, "get_state") else None
  state, step = checkpointer.restore_intact(run.abstract_state, data)
  if hasattr(run.batches, "seek"):
    run.batches.seek(step)
  return state, step


def _open(stage: TrainingStage, config, workdir: str):
  """(run, checkpointer) of a new or resumable workdir (``prepare``, then the resume checks)."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  started = os.path.exists(os.path.join(workdir, wd.RESULT)) or (
      os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir)))
  wd.check_resume(workdir, config, started)  # before prepare writes anything into the workdir
  run = stage.prepare(config, workdir)
  t = settings.read(config, "train", settings.Train)
  checkpointer = Checkpointer(ckpt_dir, run.checkpoint_every, t.keep_checkpoints,
                              t.async_checkpoint, t.checkpoint_checksums)
  try:
    latest = checkpointer.latest_step()
    if latest is not None and latest > run.total_steps:
      raise ValueError(f"{workdir} has a checkpoint at step {latest}, past this config's "
                       f"{run.total_steps} steps (train.num_steps / num_epochs, or "
                       "ppo.num_iterations); raise it or use another --workdir")
  except BaseException:
    checkpointer.close()
    raise
  return run, checkpointer


def run_stage(stage: TrainingStage, config, workdir: str) -> dict:
  """Run ``stage`` in ``workdir`` through the skeleton (module docstring), resuming if it has a
  checkpoint; the workdir is locked against a second run (``workdir.Lock``) meanwhile.

  Returns:
    ``result.json``'s dict: ``steps``, ``total_steps``, ``finished``, ``stopped_by_signal``,
    ``stopped_early``, ``train`` (last logged metrics), ``eval`` (last evaluation), the stage's
    own keys and, when finished, ``final_dir``.
  Raises:
    ValueError / FileNotFoundError: from ``stage.prepare``, a workdir in use, or a resume with
      another config (``workdir.check_resume``), before anything is written (a new workdir is
      removed again). FloatingPointError: a NaN/Inf run halted (``train.loop.run_loop``).
  """
  existed = os.path.exists(workdir)
  with wd.Lock(workdir):
    with wd.clean_on_failure(workdir, existed):
      run, checkpointer = _open(stage, config, workdir)
      try:  # the step-0 state (init_from checked) or the checkpoint, before anything is written
        state, start = _start(run, checkpointer)
      except BaseException:
        checkpointer.close()
        raise
    wd.write_config(workdir, config)
    wd.write_json(os.path.join(workdir, "data_stats.json"), run.data_stats)
    writer = None
    try:
      writer = MetricWriter(os.path.join(workdir, "logs"), resume_step=start)
      res = run_loop(run, state, start, checkpointer, writer)
    finally:
      checkpointer.close()
      if writer is not None:
        writer.close()
    finished = res.last_step >= run.total_steps or res.stopped_early
    out: Dict[str, Any] = {"steps": res.last_step, "total_steps": run.total_steps,
                           "finished": finished, "stopped_by_signal": res.stopped_by_signal,
                           "stopped_early": res.stopped_early, "train": res.last_metrics,
                           "eval": res.last_eval,
                           "tokens_sampled": 0,  # unless the stage counts them (PPO)
                           **{k: None if v is None else int(round(v))
                              for k, v in res.totals.items()}}
    if run.result is not None:
      out.update(run.result(res))
    if finished:
      out["final_dir"] = (run.export(res.state) if run.export is not None
                          else wd.export_params(workdir, run.cfg, res.state.params))
      wd.write_result(workdir, out)
  return out


SAMPLED_STATS = "sampled_stats.json"  # a sampling stage's counts, written before its rows file


def rows_or_sample(config, workdir: str, rows_file: str,
                   sample: Callable[[Callable[[], bool]], Any],
                   stopped: type, what: str) -> Optional[tuple]:
  """``(rows, tokens_sampled)``: the rows of ``<workdir>/<rows_file>`` (JSONL, this stage's own
  file) when a run wrote them, else ``sample(stop) -> (rows, tokens_sampled)``, which this writes
  (process 0: ``sampled_stats.json``, then the rows atomically; ``<workdir>/sampling``, the
  partial samples, removed; every process waits). ``stop()`` turns True after a SIGTERM /
  SIGINT (``train.stop_grace_s``), and ``sample`` then raises ``stopped`` after its current
  batch, which returns None (the next run resumes from what it kept under
  ``<workdir>/sampling``). ``tokens_sampled`` is None when unknown (rows of an older version).
  The sampling step of context distillation and Ghost Attention."""
  path = os.path.join(workdir, rows_file)
  stats_path = os.path.join(workdir, SAMPLED_STATS)
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      rows = [json.loads(line) for line in f if line.strip()]
    return rows, wd.read_json(stats_path, {}).get("tokens_sampled")
  stop = StopSignal(grace_s=float(config.train.stop_grace_s))
  try:
    rows, tokens = sample(lambda: stop.requested)
  except stopped as err:
    logging.getLogger(__name__).info("%s: %s by a signal; the next run resumes from %s", what,
                                     err, os.path.join(workdir, "sampling"))
    return None
  finally:
    stop.restore()
  if jax.process_index() == 0:
    wd.write_json(stats_path, {"tokens_sampled": tokens})
    sources.write_jsonl(path, rows)
    shutil.rmtree(os.path.join(workdir, "sampling"), ignore_errors=True)
  if jax.process_count() > 1:  # the fine-tune reads the rows on every process
    multihost_utils.sync_global_devices(f"{what}: rows written")
  return rows, tokens


def finetune_on(finetune: Stage, config, workdir: str, sft_jsonl: str, sft_records: list,
                out: Dict[str, Any],
                then: Optional[Callable[[str], Dict[str, Any]]] = None) -> Dict[str, Any]:
  """Fine-tune ``config.init_from`` on the dialogs of ``sft_jsonl`` with ``finetune`` (the SFT
  stage) in ``<workdir>/finetune`` (``build.finetune_config``: ``rejection_sampling``'s LR and
  epochs); ``out`` gains ``finetune`` (steps, held-out eval, finished) and ``finished``, and when
  finished ``final_dir`` (a copy of the fine-tune's ``final/``) and ``then(final_dir)``'s fields
  (e.g. an evaluation of the result), and ``tokens_trained`` (the fine-tune's), and is written
  as ``result.json``. The last step of
  rejection sampling, context distillation and Ghost Attention."""
  tok_path = (os.path.join(workdir, "tokenizer.model") if config.tokenizer.path == "world"
              else config.tokenizer.path)
  ft = finetune.run(build.finetune_config(config, sft_jsonl, tok_path, sft_records),
                    os.path.join(workdir, "finetune"))
  out = {**out, "finetune": {k: ft.get(k) for k in ("steps", "total_steps", "eval", "finished")},
         "finished": bool(ft.get("finished")), "tokens_trained": ft.get("tokens_trained")}
  if ft.get("finished"):
    out["final_dir"] = wd.copy_final(ft["final_dir"], workdir)
    if then is not None:
      out.update(then(out["final_dir"]))
    wd.write_result(workdir, out)
  return out
