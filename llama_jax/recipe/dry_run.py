"""Ahead-of-time memory plans of a stage's steps (``python train.py --dry_run``).

Each stage plans its own steps (``Stage.abstract_steps(config, mesh)`` in its ``run.py``; this
module holds no stage's shapes): ``sft`` (``sft.train_step``), ``reward``
(``reward.train_step``), ``dpo`` (``dpo.train_step`` and the one-off reference pass
``dpo.reference_logps``), ``ppo`` (``ppo.ppo_train_step`` on one minibatch, rollout generation
with ``sampling.sample`` on the generation layout, and the scoring pass: ``ppo.rollout_rewards``
and ``ppo.make_experience``); ``rejection_sampling`` plans its SFT fine-tuning step and its
sampling pass; ``pipeline`` plans SFT, reward and PPO. ``benchmarks/memory_plans.py`` runs it
for every shipped config and regenerates ``docs/memory_plans.md``'s table.

The step is built exactly as the stage builds it (model config, mesh, rules, optimizer,
``train.state.StateSetup``, the stage's jitted step with explicit in/out shardings), lowered on
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

import math
import time
from typing import Any, Dict, Optional, Sequence

import jax
import jax.numpy as jnp

from llama_jax import sharding
from llama_jax.recipe import stages
from llama_jax.train import build
from llama_jax.train.stage import StepPlan, shard_bytes

GIB = 2.0 ** 30


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


def _measure(config, step: StepPlan) -> Dict[str, Any]:
  """Compile ``step.lowered`` and split its per-device memory; ``step.extra`` bytes (other live
  state the step does not take, e.g. frozen models during rollouts) are added to the total;
  ``step.detail`` bytes are parts of the arguments shown separately."""
  t0 = time.perf_counter()
  compiled = step.lowered.compile()
  compile_s = time.perf_counter() - t0
  mem = _memory(compiled)
  params_b = shard_bytes(step.params)
  opt_b = shard_bytes(step.opt_state) if step.opt_state is not None else 0
  mem.update(params=params_b, optimizer_state=opt_b,
             other_arguments=mem["arguments"] - params_b - opt_b)
  mem["total"] += sum(step.extra.values())
  limit = float(config.mesh.device_memory_gib) * GIB
  return {"name": step.name, "accum_steps": step.accum_steps,
          "batch_shapes": {k: tuple(v) for k, v in step.batch_shapes.items()},
          "param_count": sum(math.prod(x.shape) for x in jax.tree.leaves(step.params)),
          "params_global_bytes": _global_bytes(step.params), "extra": dict(step.extra),
          "detail": dict(step.detail),
          "per_device": mem, "device_memory_bytes": limit, "fits": mem["total"] <= limit,
          "lower_s": step.lower_s, "compile_s": compile_s}


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

    Stages (``Stage.abstract_steps``): ``sft`` plans ``sft.train_step``; ``reward`` plans
    ``reward.train_step`` (batch ``config.reward.batch_size`` x ``max_seq_len``); ``dpo`` plans
    ``dpo.train_step`` and the reference pass (``dpo.reference_logps``); ``ppo`` plans
    ``ppo.ppo_train_step`` on one minibatch, ``sampling.sample`` of a rollout batch on the
    generation layout and the scoring pass (value and reward models assumed the policy's shape;
    PPO's AdamW, whose LR does not change memory); ``rejection_sampling`` plans its fine-tuning
    (the SFT step) and its sampling pass, and reports the reward models' scoring of the samples
    as not yet available (as ``annotate`` its whole pass); ``pipeline`` plans SFT, reward and
    PPO.
  Raises:
    ValueError: on a bad mesh (see ``mesh_for``), an unknown stage, or a batch size not
      divisible by ``grad_accum_steps`` / the batch mesh axes (the stage names the field).
  """
  stage = stages.get(config.stage)
  cfg = build.planning_model_config(config)
  mesh = mesh_for(config, devices)
  out = {"stage": stage.name, "mesh_shape": dict(mesh.shape), "num_devices": mesh.size,
         "platform": mesh.devices.flat[0].platform, "model": {
             "preset": config.model.preset, "param_count": cfg.num_params(), "dtype": cfg.dtype,
             "param_dtype": cfg.param_dtype, "remat": cfg.remat, "scan_layers": cfg.scan_layers},
         "steps": [_measure(config, s) for s in stage.abstract_steps(config, mesh)],
         "unavailable": stage.unavailable(config)}
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
