"""Tests for benchmarks/ppo_cost_model.py and benchmarks/hlo_costs.py: XLA's FLOP counts against
the analytic count, the while-loop (scan) undercount and its correction, XLA:CPU's bytes of a
bf16-compute program (= the f32 program's), and the collective-bytes parser on hand-made
sharded programs (8 emulated devices, in a subprocess: the device count is fixed before jax
starts), read from the HLO right after SPMD partitioning."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

from llama_jax import model
from llama_jax.config import LlamaConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("ppo_cost_model",
                                               ROOT / "benchmarks" / "ppo_cost_model.py")
pcm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pcm)
hc = pcm.hlo_costs  # benchmarks/hlo_costs.py, imported by the script from its folder


def _forward_cost(n_layers: int, scan: bool, t: int = 128, b: int = 2, dtype: str = "float32"):
  """(cfg, lowered forward pass) of a small Llama."""
  cfg = LlamaConfig(dim=256, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=512,
                    multiple_of=32, max_seq_len=1024, scan_layers=scan, dtype=dtype)
  params = jax.eval_shape(functools.partial(model.init_params, cfg), jax.random.key(0))
  tokens = jax.ShapeDtypeStruct((b, t), jnp.int32)
  return cfg, jax.jit(functools.partial(model.forward, cfg=cfg)).lower(params, tokens)


def _xla_cost(lowered):
  """flops / bytes / while_loops of ``program_cost`` without its partitioned-HLO dump (which
  compiles past the persistent compilation cache: slow here, checked in the collectives test)."""
  compiled = lowered.compile()
  ca = compiled.cost_analysis()
  return {"flops": ca["flops"], "bytes": ca["bytes accessed"], "transcendentals": 0.0,
          "collectives": {}, "while_loops": hc.count_while_loops(compiled.as_text())}


def test_forward_flops_match_analytic_count():
  """Unrolled layers: XLA's FLOPs = 2 x matmul params x tokens + causal attention, within 5%
  (the rest: norms, RoPE, softmax; the CPU attention skips whole blocks above the diagonal, so
  it lies between the causal and the full count)."""
  for t in (128, 512):
    cfg, lowered = _forward_cost(4, scan=False, t=t)
    flops = _xla_cost(lowered)["flops"]
    causal = pcm.analytic_forward_flops(cfg, 2, t, t, causal=True)
    full = pcm.analytic_forward_flops(cfg, 2, t, t, causal=False)
    assert causal * 0.98 < flops < full * 1.05, (t, flops, causal, full)
    assert abs(flops / causal - 1) < 0.05, (t, flops / causal)


def test_scan_is_counted_once_and_the_layer_extrapolation_corrects_it():
  """XLA's cost analysis counts a while body once: 4 scanned layers cost as 1 (the reason the
  script compiles unrolled 2- and 3-layer programs); the linear extrapolation from those equals
  the unrolled 6-layer count; the scanned program's loop has known_trip_count 4."""
  costs = {n: _xla_cost(_forward_cost(n, scan=False)[1]) for n in (1, 2, 3, 4, 6)}
  _, scanned = _forward_cost(4, scan=True)
  scanned_cost = _xla_cost(scanned)
  assert scanned_cost["while_loops"] == 1 and costs[4]["while_loops"] == 0
  assert scanned_cost["flops"] < 0.35 * costs[4]["flops"]  # ~1 layer + logits, not 4
  assert abs(scanned_cost["flops"] / costs[1]["flops"] - 1) < 0.01
  ext = pcm.extrapolate(costs[2], costs[3], 6)
  for key in ("flops", "bytes"):
    assert abs(ext[key] / costs[6][key] - 1) < 0.01, (key, ext[key], costs[6][key])
  text = scanned.compile().as_text()
  mult = hc.hlo_multiplicity(text)
  (body,) = re.findall(r"\swhile\(.*?body=%?([\w.\-]+)", text)
  (cond,) = re.findall(r"\swhile\(.*?condition=%?([\w.\-]+)", text)
  assert (mult[body], mult[cond]) == (4.0, 5.0)


def test_cpu_bytes_of_a_bf16_program_equal_the_f32_programs():
  """XLA:CPU computes bf16 dots in f32 (converts around them): its bytes accessed for a
  bf16-compute forward pass and gradient are within 7% of the f32-compute program's (the reason
  the script halves them for a GPU, ``--cpu_bytes_scale``), while the FLOPs agree."""
  def costs(dtype):
    cfg, fwd = _forward_cost(2, scan=False, t=128, dtype=dtype)
    params = jax.eval_shape(functools.partial(model.init_params, cfg), jax.random.key(0))
    loss = lambda p, tok: jnp.mean(model.forward(p, tok, cfg).astype(jnp.float32) ** 2)
    grad = jax.jit(jax.grad(loss)).lower(params, jax.ShapeDtypeStruct((2, 128), jnp.int32))
    return [pcm.program_cost(fwd), _xla_cost(grad)]
  bf16, f32 = costs("bfloat16"), costs("float32")
  for b, f in zip(bf16, f32):
    assert 0.9 < b["bytes"] / f["bytes"] < 1.07, (b["bytes"], f["bytes"])
    assert b["flops"] == pytest.approx(f["flops"], rel=0.02)
  measured = {"analytic_bytes": {}, "settings": {"dtype": "bfloat16"},
              "programs": {"p": {"bytes": 10.0}, "adamw": {"bytes": 10.0}}}
  assert pcm.hbm_bytes(measured, "p", 0.5) == (5.0, "XLA:CPU x 0.5")
  assert pcm.hbm_bytes(measured, "adamw", 0.5) == (10.0, "XLA:CPU")
  measured["analytic_bytes"]["p"] = {"weights": 3.0, "kv_cache_read": 4.0}
  assert pcm.hbm_bytes(measured, "p", 0.5) == (7.0, "analytic")


def test_replica_group_spellings():
  assert hc.parse_replica_groups("x, replica_groups={{0,1},{2,3}}, y") == [[0, 1], [2, 3]]
  assert hc.parse_replica_groups("replica_groups=[2,4]<=[8], u") == [[0, 1, 2, 3], [4, 5, 6, 7]]
  assert hc.parse_replica_groups("replica_groups=[4,2]<=[2,4]T(1,0), u") == [
      [0, 4], [1, 5], [2, 6], [3, 7]]
  line = ("replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], device_ids=([2,4]T(1,0)) "
          "{'axis_0'}, dimensions={0}")
  assert hc.parse_replica_groups(line) == [[0, 1, 2, 3], [4, 5, 6, 7]]
  line = "replica_groups=mesh['axis_0'=2,'axis_1'=1,'axis_2'=4] {'axis_0'}, dimensions={0}"
  assert hc.parse_replica_groups(line) == [[0, 4], [1, 5], [2, 6], [3, 7]]
  assert hc.shape_bytes("(f32[2,3]{1,0}, bf16[4])") == 32
  chip = pcm.CHIPS["a100"]
  assert hc.link_gbs("all-gather|n=8|nodes=1|per_node=8", chip) == chip["nvlink_gbs"]
  assert hc.link_gbs("all-gather|n=8|nodes=8|per_node=1", chip) == chip["nic_gbs"]
  assert hc.link_gbs("all-gather|n=64|nodes=8|per_node=8", chip) == 8 * chip["nic_gbs"]


_COLLECTIVES_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    sys.path.insert(0, sys.argv[1])
    import hlo_costs as hc
    mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    sd = lambda shape, spec, dt=jnp.float32: jax.ShapeDtypeStruct(
        shape, dt, sharding=NamedSharding(mesh, spec))
    rep = NamedSharding(mesh, P())
    out = {}
    def cost(f, *args, out_sh=rep, trip=None):
      c, partitioned = hc.compile_with_partitioned_hlo(
          jax.jit(f, out_shardings=out_sh).lower(*args))
      return {"flops": c.cost_analysis()["flops"],
              "colls": hc.parse_collectives(partitioned, gpus_per_node=4, unknown_trip_count=trip),
              "cpu_colls": hc.parse_collectives(c.as_text(), gpus_per_node=4)}
    # all-gather of a [64, 256] f32 array split 4 ways over 'b' (one node of 4)
    out["gather_b"] = cost(lambda x: x * 2.0, sd((64, 256), P("b", None)))
    # ... and split 2 ways over 'a' (two nodes)
    out["gather_a"] = cost(lambda x: x * 2.0, sd((64, 256), P("a", None)))
    # a matmul split 4 ways: per-device FLOPs are a quarter
    out["matmul"] = cost(lambda x, w: x @ w, sd((64, 256), P("b", None)),
                         sd((256, 512), P(None, None)), out_sh=NamedSharding(mesh, P("b", None)))
    # a contraction split over 'b' with the result split over 'b': reduce-scatter traffic
    out["rs"] = cost(lambda x, w: x @ w, sd((64, 256), P(None, "b")),
                     sd((256, 512), P("b", None)), out_sh=NamedSharding(mesh, P(None, "b")))
    # FSDP in bf16: an f32 weight sharded over 'b' cast to bf16 and gathered for the matmul of a
    # batch split over 'b'; its gradient reduced back to the shards
    fsdp = lambda x, w: x @ w.astype(jnp.bfloat16)
    x, w = sd((32, 256), P("b", None), jnp.bfloat16), sd((256, 512), P("b", None))
    out["fsdp"] = cost(fsdp, x, w, out_sh=NamedSharding(mesh, P("b", None)))
    grad = jax.grad(lambda w, x: jnp.sum(fsdp(x, w).astype(jnp.float32) ** 2))
    out["fsdp_grad"] = cost(grad, w, x, out_sh=NamedSharding(mesh, P("b", None)))
    # an all-gather inside a 5-step scan counts 5 times
    def looped(x, ws):
      def body(c, w):
        return c + jnp.sum(jax.lax.with_sharding_constraint(w, rep)), None
      return jax.lax.scan(body, x, ws)[0]
    out["scan"] = cost(looped, sd((), P()), sd((5, 64, 256), P(None, "b", None)))
    print(json.dumps(out))
""")


def test_collective_parser_on_hand_made_sharded_programs():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  res = subprocess.run([sys.executable, "-c", _COLLECTIVES_SCRIPT, str(ROOT / "benchmarks")],
                       env=env, capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads(res.stdout.strip().splitlines()[-1])
  full = 64 * 256 * 4

  (g,) = [c for c in out["gather_b"]["colls"] if c["op"] == "all-gather"]
  assert (g["group_size"], g["nodes"], g["result_bytes"]) == (4, 1, full)
  assert g["traffic"] == pytest.approx(3 / 4 * full)
  (g,) = [c for c in out["gather_a"]["colls"] if c["op"] == "all-gather"]
  assert (g["group_size"], g["nodes"], g["per_node"]) == (2, 2, 1)
  assert g["traffic"] == pytest.approx(full / 2)

  assert out["matmul"]["flops"] == pytest.approx(2 * 64 * 256 * 512 / 4, rel=0.01)

  # [64, 512] f32 partial sums over 4 devices, each keeps a quarter: (n-1)/n x 128 KiB, as the
  # reduce-scatter XLA:GPU makes of the partitioner's all-reduce + dynamic-slice.
  agg = hc.aggregate_collectives(out["rs"]["colls"])
  assert agg == {"reduce-scatter|n=4|nodes=1|per_node=4": pytest.approx(3 / 4 * 64 * 512 * 4)}

  # FSDP in bf16: the partitioned HLO gathers the bf16 weight (2 B per element), while XLA:CPU's
  # final HLO gathers it in f32 (no bf16 dot on CPU: the convert moves after the gather).
  (g,) = out["fsdp"]["colls"]
  assert (g["op"], g["dtype"], g["group_size"]) == ("all-gather", "bf16", 4)
  assert g["result_bytes"] == 256 * 512 * 2 and g["traffic"] == pytest.approx(3 / 4 * 256 * 512 * 2)
  (g,) = out["fsdp"]["cpu_colls"]
  assert (g["op"], g["dtype"], g["result_bytes"]) == ("all-gather", "f32", 256 * 512 * 4)
  # ... and the gradient goes back as a bf16 reduce-scatter (the backward gathers the weight
  # again): (n-1)/n x the full bf16 gradient.
  by_op = {}
  for c in out["fsdp_grad"]["colls"]:
    by_op.setdefault((c["op"], c["dtype"]), []).append(c)
  (rs,) = by_op[("reduce-scatter", "bf16")]
  assert rs["group_size"] == 4 and rs["traffic"] == pytest.approx(3 / 4 * 256 * 512 * 2)
  assert all(c["dtype"] == "bf16" for c in by_op[("all-gather", "bf16")])
  assert set(by_op) <= {("reduce-scatter", "bf16"), ("all-gather", "bf16")}, by_op.keys()

  # the partitioned HLO's scan has no known_trip_count yet: read from its condition (i < 5)
  (g,) = [c for c in out["scan"]["colls"] if c["op"] == "all-gather"]
  assert g["count"] == 5 and g["group_size"] == 4
  assert g["traffic"] == pytest.approx(3 / 4 * full)


def test_predict_arithmetic():
  """Seconds = roofline of each program x its count, + collectives and host transfers."""
  prog = {"flops": 312e12, "bytes": 2039e9 / 2, "transcendentals": 0.0, "while_loops": 0,
          "collectives": {"all-gather|n=8|nodes=8|per_node=1": 25e9}}
  names = [n for _, ns in pcm.PHASES for n in ns]
  measured = {"programs": {n: prog for n in names}, "counts": {n: 2 for n in names},
              "offload": True, "state_bytes_per_device": 25e9, "devices": 64,
              "analytic_flops_global": {}, "settings": {"dtype": "float32"}}
  rows, total = pcm.predict(measured, pcm.CHIPS["a100"], mfu=0.5, hbm_eff=1.0, net_eff=1.0)
  by = {r["phase"]: r for r in rows}
  assert by["generation: decode"]["roofline_s"] == pytest.approx(2 * (1.0 + 1.0))
  assert by["generation: decode"]["predicted_s"] == pytest.approx(2 * (2.0 + 1.0))
  assert by["offload train state (host, both ways)"]["predicted_s"] == pytest.approx(2.0)
  assert total["predicted_s"] == pytest.approx(len(names) * 6.0 + 2.0)
  # bf16 compute: HBM bytes = XLA:CPU's / 2 (memory 0.5 s -> compute-bound), the decode step's
  # analytic (4 x the HBM bandwidth: 4 s at hbm_eff 1 > 2 s of compute at mfu 0.5)
  measured["settings"]["dtype"] = "bfloat16"
  measured["analytic_bytes"] = {"decode_step": {"weights": 2039e9, "kv_cache_read": 3 * 2039e9}}
  by = {r["phase"]: r for r in pcm.predict(measured, pcm.CHIPS["a100"], 0.5, 1.0, 1.0)[0]}
  assert by["generation: prefill"]["bytes"] == pytest.approx(2 * 2039e9 / 4)
  assert by["generation: prefill"]["xla_bytes"] == pytest.approx(2 * 2039e9 / 2)
  assert by["generation: decode"]["predicted_s"] == pytest.approx(2 * (4.0 + 1.0))
  assert by["generation: decode"]["bound"] == "HBM"
