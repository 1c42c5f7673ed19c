"""Ahead-of-time memory plans of a stage's steps (``python train.py --dry_run``).

Stages planned: ``sft`` (``sft.train_step``), ``reward`` (``reward.train_step``), ``ppo``
(``ppo.ppo_train_step`` on one minibatch, and rollout generation with ``sampling.sample`` on the
generation layout); ``rejection_sampling`` plans its SFT fine-tuning step; ``pipeline`` plans SFT,
reward and PPO.

The step is built exactly as the stage builds it (model config, mesh, rules, optimizer,
``stage_lib.StateSetup``, the stage's jitted step with explicit in/out shardings), lowered on
abstract inputs (``jax.ShapeDtypeStruct`` with shardings: nothing is allocated) and compiled; XLA's
buffer assignment (``compiled.memory_analysis()``) then gives the per-device bytes. Parameters and
optimizer state are computed from the sharded abstract state (sum over leaves of the shard size).

Without accelerators, emulate the mesh's devices on the host (compile only, nothing runs)::

  XLA_FLAGS=--xla_force_host_platform_device_count=64 \\
      python train.py --config=configs/sft_70b.py --dry_run

Caveat: on emulated CPU devices the numbers are XLA:CPU's buffer assignment. XLA:GPU fuses and
schedules differently (and uses cuDNN flash attention instead of materialized [b, n, t, t] scores
with ``attention_impl='auto'``), so temporaries on GPU differ; parameters, optimizer state and
batch arguments are exact.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any, Dict, Optional, Sequence

import jax
import jax.numpy as jnp

from llama_jax import build, optim, sharding, stage_lib, stages
from llama_jax.sft import SFT_KEYS

GIB = 2.0 ** 30
STAGES = stages.STAGES
LLAMA2_VOCAB = 32000  # SentencePiece pieces of the Llama 2 tokenizer (paper Sec. 2.2)
_PLANNING_STEPS = 1000  # schedule length for the optimizer (any value: it does not change memory)


def vocab_size_for(config) -> int:
  """Vocab size used for planning: ``config.model.vocab_size``, the world tokenizer's size
  (``tokenizer.path == "world"``), else the Llama 2 tokenizer's 32000 (no file is read)."""
  if config.model.get("vocab_size") is not None:
    return int(config.model.vocab_size)
  if config.tokenizer.path == "world":
    return int(config.tokenizer.world_vocab_size)
  return LLAMA2_VOCAB


def mesh_for(config, devices: Optional[Sequence[Any]] = None):
  """The stage's mesh over ``devices`` (default ``jax.devices()``) with a helpful error.

  Uses the first ``prod(config.mesh.shape)`` devices when more are available.

  Raises:
    ValueError: naming the mesh shape and the device count, with the ``XLA_FLAGS`` to emulate
      enough devices, if the mesh needs more devices than there are or does not divide them.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = tuple(int(s) for s in config.mesh.shape)
  n = len(devices)
  hint = ("for a compile-only plan on CPU, emulate the devices: "
          "XLA_FLAGS=--xla_force_host_platform_device_count={} python train.py ... --dry_run")
  if len(shape) == 3 and -1 not in shape and all(s > 0 for s in shape):
    need = math.prod(shape)
    if need > n:
      raise ValueError(f"config.mesh.shape {shape} needs {need} devices but only {n} are "
                       f"available; {hint.format(need)}")
    devices = devices[:need]
  try:
    return sharding.make_mesh(shape, devices)
  except ValueError as e:
    known = max(1, math.prod(s for s in shape if s > 0))
    raise ValueError(f"config.mesh.shape {shape} with {n} devices: {e}; "
                     f"{hint.format(f'<a multiple of {known}>')}") from e


def _shard_bytes(tree: Any) -> int:
  """Bytes per device of a tree of ``jax.ShapeDtypeStruct`` with shardings (shard shapes; the
  device holding the most of each leaf; replicated leaves count fully)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.shape else ()
    total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
  return total


def _global_bytes(tree: Any) -> int:
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _memory(compiled) -> Dict[str, int]:
  m = compiled.memory_analysis()
  if m is None:
    raise RuntimeError("compiled.memory_analysis() returned None on this backend")
  args, out, alias = m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes
  temp, code = m.temp_size_in_bytes, m.generated_code_size_in_bytes
  return {"arguments": args, "outputs": out, "aliased": alias, "temporaries": temp,
          "generated_code": code, "total": args + out - alias + temp + code}


def _measure(config, lowered, name: str, accum: int, batch_shapes: Dict[str, Any], *, params: Any,
             opt: Any, extra: Optional[Dict[str, int]] = None,
             detail: Optional[Dict[str, int]] = None, lower_s: float = 0.0) -> Dict[str, Any]:
  """Compile ``lowered`` and split its per-device memory; ``extra`` bytes (other live state the
  step does not take, e.g. frozen models during rollouts) are added to the total; ``detail``
  bytes are parts of the arguments shown separately."""
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  mem = _memory(compiled)
  params_b = _shard_bytes(params)
  opt_b = _shard_bytes(opt) if opt is not None else 0
  mem.update(params=params_b, optimizer_state=opt_b,
             other_arguments=mem["arguments"] - params_b - opt_b)
  extra = dict(extra or {})
  mem["total"] += sum(extra.values())
  limit = float(config.mesh.device_memory_gib) * GIB
  return {"name": name, "accum_steps": accum,
          "batch_shapes": {k: tuple(v) for k, v in batch_shapes.items()},
          "param_count": sum(math.prod(x.shape) for x in jax.tree.leaves(params)),
          "params_global_bytes": _global_bytes(params), "extra": extra,
          "detail": dict(detail or {}),
          "per_device": mem, "device_memory_bytes": limit, "fits": mem["total"] <= limit,
          "lower_s": lower_s, "compile_s": compile_s}


def _plan_train_step(config, setup: stage_lib.StateSetup, step_fn, abstract_batch, name: str,
                     accum: int) -> Dict[str, Any]:
  t0 = time.perf_counter()
  lowered = setup.lower_step(step_fn, abstract_batch)
  lower_s = time.perf_counter() - t0
  state = setup.abstract_sharded_state()
  return _measure(config, lowered, name, accum, {k: v.shape for k, v in abstract_batch.items()},
                  params=state.params, opt=state.opt_state, lower_s=lower_s)


def _batch_fields(config):
  """(section, name) of the global batch size and sequence length of the stage's step."""
  return "reward" if config.stage == "reward" else "data"


def _batch_shape(config):
  section = config[_batch_fields(config)]
  return int(section.batch_size), int(section.max_seq_len)


def _sft_step(config, cfg, mesh, rules, optimizer):
  from llama_jax import sft  # pylint: disable=import-outside-toplevel
  accum = int(config.train.grad_accum_steps)
  b, t = _batch_shape(config)
  batch = {k: jax.ShapeDtypeStruct((b, t), jnp.float32 if k == "loss_mask" else jnp.int32)
           for k in SFT_KEYS}
  setup = stage_lib.StateSetup(cfg, mesh, rules, optimizer, int(config.seed))
  step = functools.partial(sft.train_step, cfg=cfg, optimizer=optimizer, accum_steps=accum)
  return _plan_train_step(config, setup, step, batch, "sft.train_step", accum)


def _reward_step(config, cfg, mesh, rules, optimizer):
  from llama_jax import reward  # pylint: disable=import-outside-toplevel
  accum = int(config.train.grad_accum_steps)
  b, t = _batch_shape(config)
  batch = {"chosen_tokens": jax.ShapeDtypeStruct((b, t), jnp.int32),
           "chosen_mask": jax.ShapeDtypeStruct((b, t), jnp.bool_),
           "rejected_tokens": jax.ShapeDtypeStruct((b, t), jnp.int32),
           "rejected_mask": jax.ShapeDtypeStruct((b, t), jnp.bool_),
           "rating": jax.ShapeDtypeStruct((b,), jnp.int32)}
  abstract = reward.abstract_reward_params(cfg, mesh, rules)
  setup = stage_lib.StateSetup(cfg, mesh, rules, optimizer, int(config.seed),
                               abstract_params=abstract)
  step = functools.partial(reward.train_step, cfg=cfg, optimizer=optimizer,
                           margin=config.reward.margin,
                           accum_steps=accum)
  return _plan_train_step(config, setup, step, batch, "reward.train_step", accum)


def _ppo_plans(config, cfg, mesh, rules, optimizer):
  """PPO train step (policy + value, one minibatch) and rollout generation on the generation
  layout. The value model and both reward models are assumed to share the policy's shapes."""
  from llama_jax import ppo, reward, sampling, sft  # pylint: disable=import-outside-toplevel
  pc = config.ppo
  c, p, m = int(pc.minibatch_size), int(pc.max_prompt_len), int(pc.max_new_tokens)
  s = p + m
  ppo_cfg = ppo.PPOConfig(minibatch_size=c, temperature=float(pc.temperature))
  policy_abs = sharding.abstract_params(cfg, mesh, rules)
  value_abs = reward.abstract_reward_params(cfg, mesh, rules)

  def abstract_state():
    return jax.eval_shape(lambda a, b: ppo.init_ppo_state(a, b, optimizer, optimizer,
                                                          int(config.seed)), policy_abs, value_abs)
  shapes = abstract_state()
  state_sh = ppo.PPOState(sharding.state_shardings(shapes.policy, policy_abs, mesh),
                          sharding.state_shardings(shapes.value, value_abs, mesh))
  state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                       shapes, state_sh)
  batch_sh = sharding.batch_sharding(mesh, rules)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  i32, f32 = jnp.int32, jnp.float32
  mb = {k: (c, s, i32) for k in ("tokens", "positions", "segment_ids")}
  mb.update(response_tokens=(c, m, i32), response_mask=(c, m, jnp.bool_),
            **{k: (c, m, f32) for k in ("old_logprobs", "ref_logprobs", "old_values",
                                        "advantages", "returns")})
  mb = {k: jax.ShapeDtypeStruct(v[:2], v[2], sharding=batch_sh) for k, v in mb.items()}
  step = sharding.jit_step(
      functools.partial(ppo.ppo_train_step, cfg=cfg, policy_opt=optimizer, value_opt=optimizer,
                        ppo_cfg=ppo_cfg), mesh, rules,
      in_shardings=(state_sh, batch_sh, replicated), out_shardings=(state_sh, replicated))
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
  t0 = time.perf_counter()
  lowered = step.lower(state, mb, rng)
  out = [_measure(config, lowered, "ppo.ppo_train_step (one minibatch)", 1,
                  {k: v.shape for k, v in mb.items()}, lower_s=time.perf_counter() - t0,
                  params=state.policy.params, opt=state.policy.opt_state,
                  detail={"value model state": _shard_bytes(state.value)})]

  # Rollout generation: policy weights resharded to the generation layout (tensor parallel,
  # replicated over data/fsdp), prompts split over the batch axes.
  gen_rules = sharding.GENERATION_RULES
  gen_params = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                            sharding.param_shapes(cfg),
                            sharding.param_shardings(cfg, mesh, gen_rules))
  b = int(pc.batch_size)
  gen_batch_sh = sharding.batch_sharding(mesh, gen_rules)
  prompts = jax.ShapeDtypeStruct((b, p), i32, sharding=gen_batch_sh)
  pmask = jax.ShapeDtypeStruct((b, p), jnp.bool_, sharding=gen_batch_sh)
  # Every GenerateOutput leaf ([b, m] tokens / logprobs, [b] lengths / done) is split like the batch.
  gen_sh = jax.tree.map(lambda _: gen_batch_sh, sampling.GenerateOutput(0, 0, 0, 0))
  sample = sharding.jit_step(
      lambda params, tok, msk, key: sampling.sample(params, tok, msk, key, cfg=cfg,
                                                    max_new_tokens=m,
                                                    temperature=float(pc.temperature)),
      mesh, gen_rules, in_shardings=(jax.tree.map(lambda x: x.sharding, gen_params), gen_batch_sh,
                                     gen_batch_sh, replicated),
      out_shardings=gen_sh, donate_argnums=())
  frozen = 3 * _shard_bytes(policy_abs)  # reference policy + helpfulness and safety RMs (f32)
  t0 = time.perf_counter()
  lowered = sample.lower(gen_params, prompts, pmask, rng)
  out.append(_measure(config, lowered, "sampling.sample (rollouts, generation layout)", 1,
                      {"prompt_tokens": (b, p), "prompt_mask": (b, p)},
                      params=gen_params, opt=None, lower_s=time.perf_counter() - t0,
                      extra={"resident_train_state": _shard_bytes(state),
                             "resident_frozen_models": frozen}))
  return out


def _check_batch(config, cfg, batch_shards: int) -> None:
  section = _batch_fields(config)
  b, t = _batch_shape(config)
  if t > cfg.max_seq_len:
    raise ValueError(f"config.{section}.max_seq_len={t} exceeds the model's "
                     f"max_seq_len={cfg.max_seq_len}")
  accum = int(config.train.grad_accum_steps)
  if accum < 1 or b % accum:
    raise ValueError(f"config.{section}.batch_size={b} is not divisible by "
                     f"config.train.grad_accum_steps={accum}")
  if (b // accum) % batch_shards:
    raise ValueError(f"microbatch config.{section}.batch_size / grad_accum_steps = {b // accum} "
                     f"is not divisible by the batch mesh axes data x fsdp = {batch_shards}")


def _check_ppo(config, cfg, batch_shards: int) -> None:
  pc = config.ppo
  if pc.max_prompt_len + pc.max_new_tokens > cfg.max_seq_len:
    raise ValueError(f"config.ppo.max_prompt_len + max_new_tokens = "
                     f"{pc.max_prompt_len + pc.max_new_tokens} exceeds the model's "
                     f"max_seq_len={cfg.max_seq_len}")
  for name in ("batch_size", "minibatch_size"):
    if pc[name] % batch_shards:
      raise ValueError(f"config.ppo.{name}={pc[name]} is not divisible by the batch mesh axes "
                       f"data x fsdp = {batch_shards}")


def plan(config, devices: Optional[Sequence[Any]] = None) -> Dict[str, Any]:
  """Compile the stage's step on abstract inputs and measure per-device memory.

  Args:
    config: a stage config (``configs/base.py`` fields; ``stage``, ``model``, ``data``,
      ``optimizer``, ``train.grad_accum_steps``, ``mesh.shape``, ``mesh.device_memory_gib``).
    devices: devices for the mesh (default ``jax.devices()``).
  Returns:
    dict: ``stage``, ``mesh_shape`` (resolved), ``model`` (LlamaConfig fields), ``steps``: a list
    of step plans, each with ``name``, ``per_device`` bytes (``params``, ``optimizer_state``,
    ``other_arguments`` (batch, rng, step counter, other models' state), ``arguments``,
    ``temporaries``, ``outputs``, ``aliased``, ``generated_code``, ``total`` = arguments +
    outputs - aliased + temporaries + code + ``extra``), ``extra`` (state live during the step
    but not an argument, e.g. the train state and frozen models during PPO rollouts), ``detail``,
    ``fits``, ``device_memory_bytes``, timings; and ``unavailable``: stages the dry run has no
    plan for yet (reported as "not yet available", never guessed).

    Stages: ``sft`` plans ``sft.train_step``; ``reward`` plans ``reward.train_step`` (batch
    ``config.reward.batch_size`` x ``max_seq_len``); ``ppo`` plans ``ppo.ppo_train_step`` on one
    minibatch and ``sampling.sample`` of a rollout batch on the generation layout (value and
    reward models assumed the policy's shape; the optimizer is ``config.optimizer``, whose LR
    does not change memory); ``rejection_sampling`` plans its fine-tuning (the SFT step) and
    reports its sampling pass as not yet available (as ``annotate`` its whole pass);
    ``pipeline`` plans SFT, reward and PPO.
  Raises:
    ValueError: on a bad mesh (see ``mesh_for``), an unknown stage, or a batch size not
      divisible by ``grad_accum_steps`` / the batch mesh axes.
  """
  stage = config.stage
  if stage not in STAGES:
    raise ValueError(f"config.stage={stage!r} is not a known stage {STAGES}")
  cfg = build.model_config(config, vocab_size=vocab_size_for(config))
  mesh = mesh_for(config, devices)
  rules = sharding.DEFAULT_RULES
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if stage in ("ppo", "pipeline"):
    _check_ppo(config, cfg, batch_shards)
  if stage != "ppo":
    _check_batch(config, cfg, batch_shards)
  optimizer = optim.make_optimizer(config.optimizer, _PLANNING_STEPS)
  out = {"stage": stage, "mesh_shape": dict(mesh.shape), "num_devices": mesh.size,
         "platform": mesh.devices.flat[0].platform, "model": {
             "preset": config.model.preset, "param_count": cfg.num_params(), "dtype": cfg.dtype,
             "param_dtype": cfg.param_dtype, "remat": cfg.remat, "scan_layers": cfg.scan_layers},
         "steps": [], "unavailable": []}
  if stage in ("sft", "rejection_sampling", "pipeline"):
    out["steps"].append(_sft_step(config, cfg, mesh, rules, optimizer))
  if stage in ("reward", "pipeline"):
    out["steps"].append(_reward_step(config, cfg, mesh, rules, optimizer))
  if stage in ("ppo", "pipeline"):
    out["steps"].extend(_ppo_plans(config, cfg, mesh, rules, optimizer))
  if stage == "annotate":
    out["unavailable"].append("the annotation pass (K samples per prompt, judged by the world's "
                              "oracle) has no plan of its own; it runs on the synthetic world only")
  if stage in ("rejection_sampling", "pipeline"):
    out["unavailable"].append("the rejection-sampling pass (K samples per prompt, scoring) has no "
                              "plan of its own yet; its fine-tuning is the SFT step planned above")
  return out


def _gib(x: float) -> str:
  return f"{x / GIB:8.2f} GiB"


def format_plan(p: Dict[str, Any]) -> str:
  """Human-readable text of ``plan(config)``."""
  shape = p["mesh_shape"]
  m = p["model"]
  lines = [f"Memory plan: stage {p['stage']}, model {m['preset']} ({m['param_count'] / 1e9:.2f}B "
           f"params, param_dtype {m['param_dtype']}, compute {m['dtype']}, remat {m['remat']}, "
           f"scan_layers {m['scan_layers']})",
           f"mesh data={shape['data']} fsdp={shape['fsdp']} tensor={shape['tensor']} "
           f"({p['num_devices']} {p['platform']} devices)"]
  for s in p["steps"]:
    d = s["per_device"]
    lines += [f"step {s['name']} (grad_accum_steps {s['accum_steps']}, batch "
              f"{', '.join(f'{k} {list(v)}' for k, v in s['batch_shapes'].items())}); "
              f"lowered in {s['lower_s']:.1f} s, compiled in {s['compile_s']:.1f} s",
              "  per device:",
              f"    parameters       {_gib(d['params'])}  ({d['params']} bytes)",
              f"    optimizer state  {_gib(d['optimizer_state'])}  ({d['optimizer_state']} bytes)",
              f"    other arguments  {_gib(d['other_arguments'])}  (batch, rng, step, other state)",
              *[f"      of which {k}: {_gib(v).strip()}" for k, v in s["detail"].items()],
              f"    temporaries      {_gib(d['temporaries'])}",
              f"    outputs          {_gib(d['outputs'])}  (aliased with arguments: "
              f"{_gib(d['aliased']).strip()})",
              f"    generated code   {_gib(d['generated_code'])}"]
    for k, v in s["extra"].items():
      lines.append(f"    + {k.replace('_', ' ')}: {_gib(v).strip()} (live during this step, "
                   f"added to the total)")
    lines.append(f"    total            {_gib(d['total'])}")
    limit = s["device_memory_bytes"]
    if s["fits"]:
      lines.append(f"  verdict: fits in {limit / GIB:.1f} GiB per device "
                   f"({(limit - d['total']) / GIB:.2f} GiB to spare)")
    else:
      lines.append(f"  verdict: does not fit in {limit / GIB:.1f} GiB per device: over by "
                   f"{(d['total'] - limit) / GIB:.2f} GiB")
  for u in p["unavailable"]:
    lines.append(f"not yet available: {u}")
  if p["platform"] == "cpu":
    lines.append("note: measured with XLA:CPU buffer assignment on emulated devices; XLA:GPU "
                 "temporaries differ (parameters and optimizer state are exact)")
  return "\n".join(lines)


def report(config, devices: Optional[Sequence[Any]] = None) -> str:
  """``format_plan(plan(config, devices))``: the text ``train.py --dry_run`` prints."""
  return format_plan(plan(config, devices))
