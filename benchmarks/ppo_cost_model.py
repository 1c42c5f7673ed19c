#!/usr/bin/env python
"""Cost model of one PPO iteration on a GPU pod, from XLA's counts of the compiled programs.

Issue 16, item 3. For each PPO config (``configs/ppo_7b.py``: mesh (1, 8, 1); ``configs/ppo_70b.py``:
mesh (1, 8, 8)) the programs of one iteration are compiled ahead of time on emulated CPU devices
(nothing runs; the script re-executes itself per config with
``XLA_FLAGS=--xla_force_host_platform_device_count=<mesh size>``), and each program's per-device
FLOPs and bytes (``compiled.cost_analysis()``) and collective traffic (parsed from the HLO right
after SPMD partitioning, ``hlo_costs.py``: XLA:CPU's final HLO gathers bf16 weights in f32) are
turned into seconds on a chip (A100 / H100 tables below, or flags).

  python benchmarks/ppo_cost_model.py                                  # 7B and 70B, A100 and H100
  python benchmarks/ppo_cost_model.py --configs configs/ppo_70b.py --chip a100 --mfu 0.5 \\
      --hbm_eff 0.8 --json /tmp/cost.json

What is counted (all per device, per iteration; ``config.ppo``/``config.train`` give the counts):

* ``reshard``: the policy copied to the generation layout (``sharding.to_generation_layout``:
  f32 FSDP shards -> compute-dtype, tensor-parallel, replicated over fsdp): one program.
* ``offload``: with ``ppo.offload_state`` the train state (policy + value: params and AdamW
  moments) goes to pinned host memory before sampling and back after: 2 x its bytes per device
  over PCIe (``--pcie_gbs``; not an XLA program: bytes from the abstract state).
* ``prefill``: ``model.decode_step`` of one prompt chunk of ``sampling.PREFILL_CHUNK`` tokens into
  the per-layer KV cache, x (prompt chunks) x (generation batches of ``ppo.generation_batch_size``).
* ``decode``: one step of the sampler's while loop (``sampling.sample_logits`` +
  ``model.decode_step`` of one token on the full-length cache), x ``ppo.max_new_tokens`` x
  generation batches. Left in the costed programs: the threefry RNG's and GAE's small
  elementwise loops (counted once; negligible). The loop stops early once every row has emitted EOS; with 512 rollouts
  some row almost always runs to the budget, so all ``max_new_tokens`` steps are counted.
* ``scoring``: ``ppo.rollout_rewards`` (helpfulness + safety reward models) and
  ``ppo.make_experience`` (reference + value model; old log-probs come from the sampler), two
  programs as ``ppo.run`` jits them, each costed on one ``ppo.forward_batch_size`` chunk of
  rollouts (the stage's ``lax.map`` over chunks is a loop) x the chunks.
* ``update``: ``ppo.ppo_train_step`` (policy + value forward/backward), split into the
  microbatches' forward/backward (x ``train.grad_accum_steps`` x minibatches x epochs) and the
  two AdamW updates (x minibatches x epochs).

XLA facts this relies on (checked in ``tests/test_ppo_cost_model.py``):

* ``cost_analysis()`` of an SPMD program is per device (a matmul split 4 ways reports 1/4 of
  the FLOPs).
* XLA's HloCostAnalysis counts a ``while`` body ONCE, not times its trip count, so the scanned
  layers (``nn.scan`` with ``scan_layers=True``), the microbatch ``lax.scan``, the chunked prefill
  scan and the decode ``while_loop`` are all undercounted in the real programs. This script
  therefore never costs a program with a loop: every program is compiled with
  ``scan_layers=False`` (layers unrolled), the microbatch step alone (``grad_accum_steps=1`` on one
  microbatch), and one prefill chunk / one decode step; each is compiled at 2 and 3 layers and
  extrapolated linearly to the model's ``n_layers`` (``cost(L) = cost(2) + (L - 2) (cost(3) -
  cost(2))``, exact for a per-layer-identical stack; the test checks it against an unrolled
  6-layer compile; a 1-layer program fuses differently and is off the line by ~10% in bytes),
  then multiplied by the known trip counts above. ``hlo_costs.hlo_multiplicity`` (the
  product of enclosing loops' trip counts) is used for the collective counts of a looped
  program when one is parsed directly.
* The microbatch forward/backward is the microbatch step minus the AdamW program (compiled
  alone, same shardings): the real step all-gathers the FSDP weights and reduce-scatters the
  gradients once per microbatch (inside the accumulation loop), which this split reproduces.

Timing (an explicit model, not a measurement):

* HBM bytes (:func:`hbm_bytes`): XLA:CPU has no bf16 dot; it computes a bf16 program in f32
  (its bytes for a bf16-compute program equal the f32-compute program's within 7%, checked in
  the test). The decode step (memory-bound) is counted analytically (:func:`decode_step_bytes`:
  weight shard in the compute dtype + K/V cache shard read + 3 x the f32 logits shard; XLA:CPU's
  count is 5-6x that). Every other bf16-compute program takes XLA:CPU's bytes x
  ``--cpu_bytes_scale`` (0.5: the f32 traffic at 2 B); this still counts CPU attention's
  materialized score blocks (flash attention keeps them on chip), so it is an upper bound. The
  AdamW program (f32 only) takes XLA:CPU's count. Both columns are printed.
* compute s = FLOPs / (peak x ``--mfu``); memory s = HBM bytes / (bandwidth x ``--hbm_eff``);
  a program takes max(compute, memory) (roofline) + its collectives (not overlapped; ``--overlap``
  takes max(compute, memory, collectives) instead). "roofline" columns use mfu = hbm_eff =
  net_eff = 1; "predicted" the derated ones.
* collectives (ring algorithms; per-device traffic from the partitioned HLO's result shapes and
  dtypes, as XLA:GPU keeps them; an all-reduce whose only use is a dynamic-slice of this
  device's 1/n counts as the reduce-scatter XLA:GPU makes of it): all-gather (n-1)/n x result;
  reduce-scatter (n-1) x result; all-reduce 2 (n-1)/n x size; all-to-all (n-1)/n x size;
  collective-permute size. A replica group inside one node (``--gpus_per_node``
  consecutive mesh positions, 'tensor' innermost as ``sharding.make_mesh`` lays it out) runs at
  the NVLink bandwidth per direction; a group spanning nodes with k members per node runs at
  min(NVLink, k x the per-GPU NIC bandwidth) (NCCL rings: one ring per NIC), derated by
  ``--net_eff``.
* host transfers: bytes / ``--pcie_gbs`` (per direction, per GPU).

Caveats: FLOPs and (but the decode step's) bytes are XLA:CPU's. XLA:GPU fuses differently
(bytes differ most: CPU attention materializes score blocks that cuDNN flash attention keeps on
chip); the FLOP counts are checked against the analytic 2 x params x tokens (+
attention) in the test and the ``analytic`` column. Attention FLOPs on CPU skip the blocks above
the causal diagonal (``kernels.cpu_causal_chunk``), as flash attention does on GPU. The value
and both reward models are taken to have the policy's shape (as the dry run does).

The paper's figure: "~330 s per iteration at 70B" (Llama 2, Sec. 3.2.3; ``../shared/RECIPE.md``,
PPO section). Issue 16's goal: <= 120 s predicted for 70B on 64 A100.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, Optional

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
# benchmarks/ is not a package: its modules are imported from this file's folder.
import hlo_costs  # noqa: E402,F401  (tests reach it as ppo_cost_model.hlo_costs)
from hlo_costs import collective_seconds, combine, extrapolate, program_cost  # noqa: E402
from ppo_programs import build_programs, decode_step_bytes, score_rows  # noqa: E402

PAPER_70B_S = 330.0
GOAL_70B_S = 120.0

# Peak numbers, dense (no sparsity), per GPU. Sources:
# - A100 80GB SXM: NVIDIA A100 Tensor Core GPU datasheet (nvidia.com/content/dam/en-zz/Solutions/
#   Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf): BF16 Tensor Core
#   312 TFLOPS (624 with sparsity), GPU memory bandwidth 2,039 GB/s, NVLink 600 GB/s
#   (bidirectional: 300 GB/s per direction), PCIe Gen4 64 GB/s (bidirectional: 32 per direction;
#   ~25 achieved). Inter-node: DGX A100 has 8 x 200 Gb/s HDR InfiniBand (one NIC per GPU,
#   25 GB/s each, 200 GB/s per node per direction).
# - H100 80GB SXM: NVIDIA H100 Tensor Core GPU datasheet (resources.nvidia.com/en-us-tensor-core/
#   nvidia-tensor-core-gpu-datasheet): BF16 Tensor Core 1,979 TFLOPS with sparsity = 989.5
#   dense, 3.35 TB/s, NVLink 900 GB/s (450 per direction), PCIe Gen5 128 GB/s (64 per
#   direction; ~50 achieved). DGX H100: 8 x 400 Gb/s NDR ConnectX-7 (50 GB/s per GPU, 400 GB/s
#   per node).
CHIPS: Dict[str, Dict[str, float]] = {
    "a100": {"name": "A100-80GB SXM", "peak_tflops": 312.0, "hbm_gbs": 2039.0,
             "nvlink_gbs": 300.0, "nic_gbs": 25.0, "pcie_gbs": 25.0},
    "h100": {"name": "H100-80GB SXM", "peak_tflops": 989.0, "hbm_gbs": 3350.0,
             "nvlink_gbs": 450.0, "nic_gbs": 50.0, "pcie_gbs": 50.0},
}

# ---- analytic counts -----------------------------------------------------------------------------
def matmul_params(cfg) -> int:
  """Parameters that take part in matmuls per token (all but the embedding table and norms)."""
  d, n, k, h, f = cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.ffn_hidden_dim
  return cfg.n_layers * (2 * d * n * h + 2 * d * k * h + 3 * d * f) + d * cfg.vocab_size


def analytic_forward_flops(cfg, batch: int, q_len: int, k_len: int, causal: bool = True,
                           logits_positions: Optional[int] = None) -> float:
  """2 x matmul params x tokens, the output projection only at ``logits_positions`` per row
  (default all), plus attention 2 x 2 x b x n x h x q x k per layer (half the q x k pairs when
  ``causal`` and q == k)."""
  d, n, h = cfg.dim, cfg.n_heads, cfg.head_dim
  trunk = matmul_params(cfg) - d * cfg.vocab_size
  lp = q_len if logits_positions is None else logits_positions
  pairs = q_len * k_len * (0.5 if causal and q_len == k_len else 1.0)
  return (2 * trunk * batch * q_len + 2 * d * cfg.vocab_size * batch * lp
          + cfg.n_layers * 4 * batch * n * h * pairs)


def load_config(path: str):
  sys.path.insert(0, str(ROOT))
  spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, ROOT / path
                                                if not os.path.isabs(path) else path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def measure_config(config_path, gpus_per_node: int = 8, layers=(2, 3),
                   log=print) -> Dict[str, Any]:
  """Per-device costs of each program of one PPO iteration of ``config_path`` at its real
  depth (extrapolated from ``layers``), with their per-iteration counts. Needs the mesh's
  devices (``XLA_FLAGS=--xla_force_host_platform_device_count``)."""
  from llama_jax import sharding
  from llama_jax.ppo import rollout
  from llama_jax.recipe import dry_run
  from llama_jax.train import build
  from llama_jax.train.stage import shard_bytes

  config = load_config(config_path) if isinstance(config_path, str) else config_path
  config_path = config_path if isinstance(config_path, str) else "<config>"
  mesh = dry_run.mesh_for(config)
  full = build.planning_model_config(config)
  rollout.check_plan(config, full, mesh)
  per_layer = {}
  for n in layers:
    cfg = full.replace(n_layers=n, scan_layers=False)
    t0 = time.perf_counter()
    lowered = build_programs(config, cfg, mesh)
    costs = {}
    for name, low in lowered.items():
      costs[name] = program_cost(low, gpus_per_node)
    per_layer[n] = costs
    log(f"  {config_path}: {len(costs)} programs at {n} layer(s) compiled in "
        f"{time.perf_counter() - t0:.1f} s")
  la, lb = layers
  progs = {name: extrapolate(per_layer[la][name], per_layer[lb][name], full.n_layers, la, lb)
           for name in per_layer[la]}
  micro = progs.pop("train_micro_step")
  progs["train_micro_fwd_bwd"] = combine(micro, progs["adamw"], 1.0, -1.0)

  pc = config.ppo
  accum = int(config.train.get("grad_accum_steps", 1))
  steps = (int(pc.batch_size) // int(pc.minibatch_size)) * int(pc.epochs)
  rows = int(pc.get("generation_batch_size", 0)) or int(pc.batch_size)
  gen_batches = int(pc.batch_size) // rows
  p = int(pc.max_prompt_len)
  from llama_jax import sampling
  prefill_chunks = -(-p // sampling.PREFILL_CHUNK) if p > sampling.PREFILL_CHUNK else 1
  setup = rollout.Setup(config, full, full, full, mesh, sharding.DEFAULT_RULES)
  state_bytes = shard_bytes(setup.abstract_state())
  score_chunks = int(pc.batch_size) // score_rows(config)
  counts = {"reshard": 1, "prefill_chunk": prefill_chunks * gen_batches,
            "decode_step": int(pc.max_new_tokens) * gen_batches,
            "score_reward_models": score_chunks, "score_ref_value": score_chunks, "train_micro_fwd_bwd": accum * steps, "adamw": steps}
  tokens = int(pc.batch_size) * (p + int(pc.max_new_tokens))
  m = int(pc.max_new_tokens)
  analytic = {  # global FLOPs of the phase (all devices), for the ratio column
      "score_reward_models": 2 * analytic_forward_flops(full, int(pc.batch_size), p + m, p + m,
                                                        logits_positions=0),
      "score_ref_value": 2 * analytic_forward_flops(full, int(pc.batch_size), p + m, p + m,
                                                    logits_positions=0)
      + 2 * full.dim * full.vocab_size * int(pc.batch_size) * m,
      "train_micro_fwd_bwd": (2 * (3 + (1 if full.remat == "full" else 0))
                              * analytic_forward_flops(full, int(pc.batch_size), p + m, p + m,
                                                       logits_positions=0)
                              + 3 * 2 * full.dim * full.vocab_size * int(pc.batch_size) * m)
      * int(pc.epochs),
      # the cached passes attend over the whole cache buffer (masked), as the kernel computes
      "prefill_chunk": analytic_forward_flops(full, int(pc.batch_size), p, p + m,
                                              causal=False, logits_positions=0),
      "decode_step": m * analytic_forward_flops(full, int(pc.batch_size), 1, p + m,
                                                causal=False),
  }
  return {"config": config_path, "model": config.model.preset, "n_layers": full.n_layers,
          "params": full.num_params(), "mesh": dict(mesh.shape), "devices": mesh.size,
          "gpus_per_node": gpus_per_node, "layers_compiled": list(layers),
          "per_layer_compiles": {str(k): v for k, v in per_layer.items()},
          "programs": progs, "counts": counts, "tokens_per_iteration": tokens,
          "offload": bool(pc.get("offload_state", False)), "state_bytes_per_device": state_bytes,
          "analytic_flops_global": analytic,
          "analytic_bytes": {"decode_step": decode_step_bytes(config, full, mesh)},
          "settings": {"batch_size": int(pc.batch_size), "minibatch_size": int(pc.minibatch_size),
                       "grad_accum_steps": accum, "epochs": int(pc.epochs),
                       "generation_batch_size": rows, "max_prompt_len": p,
                       "max_new_tokens": m, "remat": full.remat, "dtype": full.dtype,
                       "param_dtype": full.param_dtype}}


# ---- the model: seconds --------------------------------------------------------------------------
PHASES = (  # (phase, programs)
    ("reshard to generation layout", ("reshard",)),
    ("offload train state (host, both ways)", ()),
    ("generation: prefill", ("prefill_chunk",)),
    ("generation: decode", ("decode_step",)),
    ("scoring: reward models", ("score_reward_models",)),
    ("scoring: reference + value", ("score_ref_value",)),
    ("update: fwd/bwd (policy + value)", ("train_micro_fwd_bwd",)),
    ("update: AdamW (policy + value)", ("adamw",)),
)


def program_seconds(cost: Dict[str, Any], chip: Dict[str, float], mfu: float, hbm_eff: float,
                    net_eff: float, overlap: bool) -> Dict[str, float]:
  compute = cost["flops"] / (chip["peak_tflops"] * 1e12 * mfu)
  memory = cost["bytes"] / (chip["hbm_gbs"] * 1e9 * hbm_eff)
  coll = collective_seconds(cost["collectives"], chip, net_eff)
  total = max(compute, memory, coll) if overlap else max(compute, memory) + coll
  return {"compute": compute, "memory": memory, "collectives": coll, "total": total}


F32_PROGRAMS = ("adamw",)  # f32 master params and moments only: no bf16 artefact to correct


def hbm_bytes(measured: Dict[str, Any], name: str, cpu_bytes_scale: float):
  """(HBM bytes per device of one call of program ``name`` that the timing uses, its source):
  the analytic count where there is one (the decode step, :func:`decode_step_bytes`); else
  XLA:CPU's count x ``cpu_bytes_scale`` for a bf16-compute program (XLA:CPU computes bf16 in
  f32: its bytes for a bf16-compute program equal the f32-compute program's within 7%, checked
  in the test; a GPU moves those tensors at 2 B); else XLA:CPU's count."""
  terms = measured.get("analytic_bytes", {}).get(name)
  if terms:
    return float(sum(terms.values())), "analytic"
  xla = measured["programs"][name]["bytes"]
  if measured["settings"]["dtype"] == "bfloat16" and name not in F32_PROGRAMS:
    return cpu_bytes_scale * xla, f"XLA:CPU x {cpu_bytes_scale:g}"
  return xla, "XLA:CPU"


def predict(measured: Dict[str, Any], chip: Dict[str, float], mfu: float, hbm_eff: float,
            net_eff: float, overlap: bool = False, pcie_gbs: Optional[float] = None,
            cpu_bytes_scale: float = 0.5):
  """Rows (one per phase) of per-iteration per-device FLOPs, HBM bytes (timed: :func:`hbm_bytes`;
  and XLA:CPU's), collective bytes, roofline and derated seconds, and the totals."""
  progs, counts = measured["programs"], measured["counts"]
  pcie = (pcie_gbs or chip["pcie_gbs"]) * 1e9
  rows = []
  for phase, names in PHASES:
    r = {"phase": phase, "flops": 0.0, "bytes": 0.0, "xla_bytes": 0.0, "collective_bytes": 0.0,
         "roofline_s": 0.0, "predicted_s": 0.0, "count": 0, "bound": "", "analytic_flops": None,
         "bytes_source": ""}
    if not names:
      if not measured["offload"]:
        continue
      host = 2 * measured["state_bytes_per_device"]
      r.update(host_bytes=host, roofline_s=host / pcie, predicted_s=host / pcie, count=2,
               bound="PCIe")
      rows.append(r)
      continue
    for name in names:
      c, k = progs[name], counts[name]
      b, r["bytes_source"] = hbm_bytes(measured, name, cpu_bytes_scale)
      timed = {**c, "bytes": b}
      peak = program_seconds(timed, chip, 1.0, 1.0, 1.0, overlap)
      derated = program_seconds(timed, chip, mfu, hbm_eff, net_eff, overlap)
      r["flops"] += k * c["flops"]
      r["bytes"] += k * b
      r["xla_bytes"] += k * c["bytes"]
      r["collective_bytes"] += k * sum(c["collectives"].values())
      r["roofline_s"] += k * peak["total"]
      r["predicted_s"] += k * derated["total"]
      r["count"] += k
      parts = {"compute": derated["compute"], "HBM": derated["memory"],
               "network": derated["collectives"]}
      r["bound"] = max(parts, key=parts.get)
      r["split_s"] = {kk: k * v for kk, v in derated.items()}
      a = measured["analytic_flops_global"].get(name)
      if a is not None:
        r["analytic_flops"] = a / measured["devices"]
    rows.append(r)
  total = {"roofline_s": sum(r["roofline_s"] for r in rows),
           "predicted_s": sum(r["predicted_s"] for r in rows),
           "flops": sum(r["flops"] for r in rows), "bytes": sum(r["bytes"] for r in rows),
           "xla_bytes": sum(r["xla_bytes"] for r in rows),
           "collective_bytes": sum(r["collective_bytes"] for r in rows)}
  return rows, total


def _eng(x: float, unit: str = "") -> str:
  for div, suf in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(x) >= div:
      return f"{x / div:.2f} {suf}{unit}"
  return f"{x:.0f} {unit}"


def format_table(measured: Dict[str, Any], chip_key: str, chip: Dict[str, float], rows, total,
                 args) -> str:
  s = measured["settings"]
  lines = [f"### {measured['model']} ({measured['params'] / 1e9:.1f}B, {measured['config']}) on "
           f"{measured['devices']} x {chip['name']}",
           "",
           f"mesh {measured['mesh']}, {s['batch_size']} rollouts of {s['max_prompt_len']} + "
           f"{s['max_new_tokens']} tokens, generation batch {s['generation_batch_size']}, "
           f"minibatch {s['minibatch_size']} in {s['grad_accum_steps']} microbatches, "
           f"{s['epochs']} epoch(s), remat {s['remat']}; mfu {args.mfu}, hbm_eff {args.hbm_eff}, "
           f"net_eff {args.net_eff}, collectives {'overlapped' if args.overlap else 'not overlapped'}",
           "",
           "| phase | programs | FLOPs/device | analytic FLOPs/device | HBM bytes/device (timed) | "
           "XLA:CPU bytes/device | collective bytes/device | roofline s | predicted s | bound |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
  for r in rows:
    if "host_bytes" in r:
      lines.append(f"| {r['phase']} | {r['count']} | - | - | - | - | {_eng(r['host_bytes'], 'B')} "
                   f"(PCIe) | {r['roofline_s']:.1f} | {r['predicted_s']:.1f} | {r['bound']} |")
      continue
    an = _eng(r["analytic_flops"], "") if r["analytic_flops"] else "-"
    lines.append(f"| {r['phase']} | {r['count']} | {_eng(r['flops'])} | {an} | "
                 f"{_eng(r['bytes'], 'B')} ({r['bytes_source']}) | {_eng(r['xla_bytes'], 'B')} | "
                 f"{_eng(r['collective_bytes'], 'B')} | "
                 f"{r['roofline_s']:.1f} | {r['predicted_s']:.1f} | {r['bound']} |")
  lines.append(f"| **total per iteration** | | {_eng(total['flops'])} | | "
               f"{_eng(total['bytes'], 'B')} | {_eng(total['xla_bytes'], 'B')} | "
               f"{_eng(total['collective_bytes'], 'B')} | "
               f"**{total['roofline_s']:.1f}** | **{total['predicted_s']:.1f}** | |")
  if "70b" in measured["model"]:
    verdict = "meets" if total["predicted_s"] <= GOAL_70B_S else "misses"
    lines.append("")
    lines.append(f"Paper (Llama 2 Sec. 3.2.3): ~{PAPER_70B_S:.0f} s per 70B iteration; goal "
                 f"<= {GOAL_70B_S:.0f} s on 64 A100: predicted {total['predicted_s']:.1f} s "
                 f"({verdict} the goal; {total['predicted_s'] / PAPER_70B_S:.2f}x the paper's "
                 f"{PAPER_70B_S:.0f} s).")
  return "\n".join(lines)


def _worker(args) -> None:
  result = measure_config(args.worker, args.gpus_per_node,
                          log=lambda s: print(s, file=sys.stderr, flush=True))
  with open(args.worker_out, "w") as f:
    json.dump(result, f)


def _mesh_devices(config_path: str) -> int:
  return math.prod(int(x) for x in load_config(config_path).mesh.shape)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--configs", default="configs/ppo_7b.py,configs/ppo_70b.py")
  ap.add_argument("--chip", default="a100,h100", help=f"comma list of {sorted(CHIPS)}")
  ap.add_argument("--mfu", type=float, default=0.5, help="achieved fraction of peak FLOP/s")
  ap.add_argument("--hbm_eff", type=float, default=0.8, help="achieved fraction of HBM bandwidth")
  ap.add_argument("--net_eff", type=float, default=0.8,
                  help="achieved fraction of NVLink / NIC bandwidth")
  ap.add_argument("--cpu_bytes_scale", type=float, default=0.5,
                  help="HBM bytes of a bf16-compute program (but the decode step's, analytic) = "
                       "XLA:CPU's bytes x this (XLA:CPU computes bf16 in f32)")
  ap.add_argument("--overlap", action="store_true",
                  help="collectives overlap compute (max instead of sum)")
  ap.add_argument("--gpus_per_node", type=int, default=8)
  for field in ("peak_tflops", "hbm_gbs", "nvlink_gbs", "nic_gbs", "pcie_gbs"):
    ap.add_argument(f"--{field}", type=float, default=None,
                    help=f"override the chip table's {field}")
  ap.add_argument("--json", default="", help="write the measurements and predictions here")
  ap.add_argument("--measured", default="", help="reuse a previous --json's measurements")
  ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
  ap.add_argument("--worker_out", default="", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.worker:
    _worker(args)
    return

  measured = {}
  if args.measured:
    with open(args.measured) as f:
      measured = {m["config"]: m for m in json.load(f)["measured"]}
  for path in [c for c in args.configs.split(",") if c]:
    if path in measured:
      continue
    n = _mesh_devices(path)
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, "m.json")
      env = dict(os.environ, JAX_PLATFORMS="cpu",
                 XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={n}").strip())
      t0 = time.perf_counter()
      print(f"compiling the programs of {path} on {n} emulated devices ...", file=sys.stderr,
            flush=True)
      subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", path,
                      "--worker_out", out, "--gpus_per_node", str(args.gpus_per_node)],
                     env=env, check=True, cwd=str(ROOT))
      with open(out) as f:
        measured[path] = json.load(f)
      print(f"  done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

  report = {"measured": list(measured.values()), "predictions": []}
  print(f"PPO iteration cost model (per device; XLA:CPU cost analysis of the compiled programs, "
        f"layers extrapolated from 2 and 3; {args.gpus_per_node} GPUs per node)\n")
  for chip_key in [c for c in args.chip.split(",") if c]:
    chip = dict(CHIPS[chip_key])
    for field in ("peak_tflops", "hbm_gbs", "nvlink_gbs", "nic_gbs", "pcie_gbs"):
      if getattr(args, field) is not None:
        chip[field] = getattr(args, field)
    for path in [c for c in args.configs.split(",") if c]:
      m = measured[path]
      rows, total = predict(m, chip, args.mfu, args.hbm_eff, args.net_eff, args.overlap,
                            cpu_bytes_scale=args.cpu_bytes_scale)
      print(format_table(m, chip_key, chip, rows, total, args))
      print()
      report["predictions"].append({"config": path, "chip": chip, "mfu": args.mfu,
                                    "hbm_eff": args.hbm_eff, "net_eff": args.net_eff,
                                    "overlap": args.overlap,
                                    "cpu_bytes_scale": args.cpu_bytes_scale, "phases": rows, "total": total})
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  main()
