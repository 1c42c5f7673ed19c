"""Per-device costs of a compiled SPMD program (used by ``ppo_cost_model.py``): XLA's FLOPs and
bytes (:func:`program_cost`), its collective traffic from the HLO text, and the layer
extrapolation of loop-free programs (:func:`extrapolate`).

The HLO parsed is the module right after SPMD partitioning (:func:`compile_with_partitioned_hlo`),
not XLA:CPU's final HLO (``compiled.as_text()``): XLA:CPU has no bf16 dot, so its
float-normalization pass upcasts bf16 dots to f32 and moves the converts in front of the FSDP
all-gathers (and folds bf16 gradient all-reduces into f32 ones), doubling their bytes; XLA:GPU
keeps them in the partitioner's dtype. The partitioner writes a reduce-scatter as an all-reduce
whose only use is a ``dynamic-slice`` of this device's 1/n (offsets from ``partition-id``);
XLA:GPU's ReduceScatterCreator turns that into a reduce-scatter, and :func:`parse_collectives`
counts it as one. Its ``while`` loops carry no ``known_trip_count`` yet (a later pass adds it):
the trip count is read from the loop condition (``i < K`` with ``i`` starting at a constant).

The HLO parsing is pure Python (numpy for replica groups); :func:`compile_with_partitioned_hlo`
and :func:`program_cost` need jax.
"""

from __future__ import annotations

import glob
import math
import os
import re
import shutil
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

COLLECTIVE_OPS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all",
                  "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5, "token": 0}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_DEF = re.compile(r"\s*(?:ROOT\s+)?(%[\w.\-]+)\s*=\s*(\(.*?\)|\S+)\s+([\w\-]+)\(")


def shape_bytes(type_str: str) -> float:
  """Bytes of an HLO type: ``f32[8,128]{1,0}``, a tuple ``(f32[2], bf16[4,4])``, ``s32[]``."""
  total = 0.0
  for dt, dims in _ARRAY.findall(type_str):
    if dt in _DTYPE_BYTES:
      total += math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES[dt]
  return total


def shape_elements(type_str: str) -> int:
  return sum(math.prod(int(d) for d in dims.split(",") if d)
             for dt, dims in _ARRAY.findall(type_str) if dt in _DTYPE_BYTES)


def _iota_ids(dims_spec: str, perm: Optional[str]):
  import numpy as np
  dims = [int(x) for x in dims_spec.split(",")]
  ids = np.arange(math.prod(dims)).reshape(dims)
  return ids.transpose([int(x) for x in perm.split(",")]) if perm else ids


def parse_replica_groups(line: str) -> Optional[List[List[int]]]:
  """Replica groups (lists of device positions in the program's device assignment = the mesh's
  flat order) of one HLO collective, in any of XLA's three spellings:

  * explicit ``replica_groups={{0,1},{2,3}}``;
  * iota ``replica_groups=[2,4]<=[4,2]T(1,0)`` (iota over prod(dims), reshaped to dims,
    transposed by perm, reshaped to G groups);
  * mesh axes ``replica_groups=mesh['axis_0'=4,'axis_1'=2], device_ids=([2,4]T(1,0)) {'axis_0'}``
    (devices = the iota laid out on the named axes; one group per index of the other axes).

  Returns None when the line has no replica groups (e.g. collective-permute's pairs)."""
  m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(([^)]*\)?)\))?\s*\{([^}]*)\}",
                line)
  if m:
    import numpy as np
    axes = re.findall(r"'([^']+)'=(\d+)", m.group(1))
    names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
    if m.group(2):
      dm = re.match(r"\[([0-9,]+)\](?:T\(([0-9,]+)\))?", m.group(2))
      ids = _iota_ids(dm.group(1), dm.group(2)).reshape(-1)
    else:
      ids = np.arange(math.prod(sizes))
    ids = ids.reshape(sizes)
    group_axes = [names.index(a) for a in re.findall(r"'([^']+)'", m.group(3))]
    other = [i for i in range(len(sizes)) if i not in group_axes]
    size = math.prod(sizes[i] for i in group_axes)
    return ids.transpose(other + group_axes).reshape(-1, size).tolist()
  m = re.search(r"replica_groups=\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", line)
  if m:
    groups = int(m.group(1).split(",")[0])
    return _iota_ids(m.group(2), m.group(3)).reshape(groups, -1).tolist()
  m = re.search(r"replica_groups=\{((?:\{[0-9,]*\},?)*)\}", line)
  if m:
    groups = [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([0-9,]*)\}", m.group(1))]
    return groups or None
  return None


def hlo_computations(text: str) -> Tuple[Dict[str, List[str]], Optional[str]]:
  """({computation name: [instruction lines]}, entry name) of an HLO module's text."""
  comps: Dict[str, List[str]] = {}
  entry, current = None, None
  for line in text.splitlines():
    head = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$", line)
    if head and not line.startswith(" "):
      current = head.group(2)
      comps[current] = []
      if head.group(1):
        entry = current
      continue
    if line.startswith("}"):
      current = None
      continue
    if current is not None and line.strip():
      comps[current].append(line)
  return comps, entry


def _defs(lines: Sequence[str]) -> Dict[str, str]:
  out = {}
  for ln in lines:
    d = _DEF.match(ln)
    if d:
      out[d.group(1)] = ln
  return out


def while_trip_count(comps: Dict[str, List[str]], caller: str, line: str) -> Optional[int]:
  """Trip count of the ``while`` instruction ``line`` of computation ``caller``: its
  ``known_trip_count`` (final HLO), else from the condition ``ROOT compare(gte(param, i),
  constant K), direction=LT`` and the loop tuple's element i initialized to a constant c
  (K - c: the counter loops of ``lax.scan`` / ``fori_loop``, step 1), else None."""
  trip = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
  if trip:
    return int(trip.group(1))
  cond = re.search(r"condition=%?([\w.\-]+)", line).group(1)
  cdefs = _defs(comps.get(cond, []))
  root = next((ln for ln in comps.get(cond, []) if ln.lstrip().startswith("ROOT")), "")
  m = re.search(r"compare\((%[\w.\-]+), (%[\w.\-]+)\), direction=(LT|GT)", root)
  if not m:
    return None
  a, b = (m.group(1), m.group(2)) if m.group(3) == "LT" else (m.group(2), m.group(1))
  k = re.search(r"constant\((-?\d+)\)", cdefs.get(b, ""))
  idx = re.search(r"get-tuple-element\(%[\w.\-]+\), index=(\d+)", cdefs.get(a, ""))
  if not (k and idx):
    return None
  operand = re.search(r"\swhile\((%[\w.\-]+)\)", line).group(1)
  callers = _defs(comps.get(caller, []))
  tup = re.search(r"\stuple\(([^)]*)\)", callers.get(operand, ""))
  if not tup:
    return None
  elems = [e.strip() for e in tup.group(1).split(",")]
  c = re.search(r"constant\((-?\d+)\)", callers.get(elems[int(idx.group(1))], ""))
  return max(0, int(k.group(1)) - int(c.group(1))) if c else None


def hlo_multiplicity(text: str, unknown_trip_count: Optional[int] = None) -> Dict[str, float]:
  """How many times each computation runs per call of the entry: the product of the trip
  counts (:func:`while_trip_count`) of the ``while`` loops around it (a loop without one, e.g.
  the sampler's data-dependent decode loop, counts ``unknown_trip_count``; None raises)."""
  comps, entry = hlo_computations(text)
  mult: Dict[str, float] = {}

  def visit(name: str, k: float):
    mult[name] = mult.get(name, 0.0) + k
    for line in comps.get(name, ()):
      if re.search(r"\swhile\(", line):
        n = while_trip_count(comps, name, line)
        if n is None:
          if unknown_trip_count is None:
            raise ValueError(f"while loop without a known trip count: {line.strip()[:200]}")
          n = unknown_trip_count
        visit(re.search(r"body=%?([\w.\-]+)", line).group(1), k * n)
        visit(re.search(r"condition=%?([\w.\-]+)", line).group(1), k * (n + 1))
        continue
      for attr in ("calls", "to_apply", "true_computation", "false_computation"):
        for callee in re.findall(attr + r"=%?([\w.\-]+)", line):
          visit(callee, k)
      branches = re.search(r"branch_computations=\{([^}]*)\}", line)
      if branches:
        for callee in re.findall(r"%?([\w.\-]+)", branches.group(1)):
          visit(callee, k)

  visit(entry, 1.0)
  return mult


def count_while_loops(text: str) -> int:
  return sum(1 for line in text.splitlines() if re.search(r"\swhile\(", line))


def _ring_traffic(op: str, n: int, rbytes: float) -> float:
  """Per-device bytes each way of a ring collective with result ``rbytes`` per device."""
  if n <= 1:
    return 0.0
  return {"all-gather": (n - 1) / n * rbytes, "reduce-scatter": (n - 1) * rbytes,
          "all-reduce": 2 * (n - 1) / n * rbytes, "all-to-all": (n - 1) / n * rbytes
          }.get(op, rbytes)  # collective-permute: every device sends its buffer once


def parse_collectives(text: str, gpus_per_node: int = 8,
                      unknown_trip_count: Optional[int] = None,
                      reduce_scatter_rewrite: bool = True) -> List[Dict[str, Any]]:
  """The collectives of an SPMD module: one dict per HLO collective with ``op``,
  ``result_bytes`` (per device), ``dtype``, ``group_size`` n, ``nodes`` (nodes a group spans,
  device position // ``gpus_per_node``), ``per_node`` (members of a group per node),
  ``traffic`` (per-device bytes each way of a ring: all-gather (n-1)/n x result, reduce-scatter
  (n-1) x result, all-reduce 2 (n-1)/n x size, all-to-all (n-1)/n x size, collective-permute
  size) and ``count`` (its computation's multiplicity, :func:`hlo_multiplicity`).

  ``reduce_scatter_rewrite``: an all-reduce whose every use (through get-tuple-element /
  bitcast / copy / reshape / convert) is a dynamic-slice of 1/n of it, or (XLA:CPU's fused
  form) an instruction taking ``partition-id``, is counted as the reduce-scatter XLA:GPU makes
  of it (:func:`_sliced_allreduce_bytes`)."""
  comps, _ = hlo_computations(text)
  mult = hlo_multiplicity(text, unknown_trip_count)
  out = []
  op_re = re.compile(r"=\s*(\(.*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+(" +
                     "|".join(COLLECTIVE_OPS) + r")(-start)?\(")
  for name, lines in comps.items():
    users = None
    for line in lines:
      m = op_re.search(line)
      if not m:
        continue
      op, rbytes = m.group(2), shape_bytes(m.group(1))
      dtypes = sorted({dt for dt, _ in _ARRAY.findall(m.group(1))})
      if m.group(3) and op in ("all-gather", "collective-permute"):
        # async start: the result is a tuple (operand(s), result(s)); count the second half.
        parts = re.findall(r"[a-z0-9]+\[[0-9,]*\]", m.group(1))
        rbytes = sum(shape_bytes(p) for p in parts[len(parts) // 2:])
      if op == "collective-permute":
        pairs = re.findall(r"\{(\d+),(\d+)\}", line.split("source_target_pairs=")[-1])
        cross = any(int(a) // gpus_per_node != int(b) // gpus_per_node for a, b in pairs)
        n, nodes, per_node = 2, 2 if cross else 1, 1
      else:
        groups = parse_replica_groups(line)
        if not groups:
          raise ValueError(f"collective without replica groups: {line.strip()[:200]}")
        n = len(groups[0])
        nodes = max(len({d // gpus_per_node for d in g}) for g in groups)
        per_node = max(max(sum(1 for d in g if d // gpus_per_node == node) for node in
                           {d // gpus_per_node for d in g}) for g in groups)
      base = {"group_size": n, "nodes": nodes, "per_node": per_node, "dtype": ",".join(dtypes),
              "count": mult.get(name, 1.0), "computation": name}
      if op == "all-reduce" and n > 1 and reduce_scatter_rewrite:
        if users is None:
          users = _users(lines)
        sliced = _sliced_allreduce_bytes(users, line, n)
        if sliced > 0:  # the part every device slices its shard of: a reduce-scatter on GPU
          out.append({**base, "op": "reduce-scatter", "result_bytes": sliced / n,
                      "traffic": _ring_traffic("reduce-scatter", n, sliced / n),
                      "rewritten_from": "all-reduce"})
          rbytes -= sliced
          if rbytes <= 0:
            continue
      out.append({**base, "op": op, "result_bytes": rbytes,
                  "traffic": _ring_traffic(op, n, rbytes)})
  return out


_PASS_THROUGH = ("get-tuple-element", "bitcast", "copy", "convert", "reshape")


def _users(lines: Sequence[str]) -> Dict[str, List[Tuple[str, str, str, str]]]:
  """{value: [(user name, user type, user opcode, user line)]} of one computation."""
  users: Dict[str, List[Tuple[str, str, str, str]]] = {}
  for ln in lines:
    d = _DEF.match(ln)
    if not d:
      continue
    operands = ln[d.end():].split(", metadata=")[0]
    for v in set(re.findall(r"(%[\w.\-]+)", operands)):
      users.setdefault(v, []).append((d.group(1), d.group(2), d.group(3), ln))
  return users


def _sliced_allreduce_bytes(users, line: str, n: int) -> float:
  """Bytes of an all-reduce's result (of its tuple elements) whose every transitive use,
  through get-tuple-element / bitcast / copy / reshape / convert, is a dynamic-slice keeping
  1/n of the elements, or takes ``partition-id`` (XLA:CPU's fusion of that slice)."""
  d = _DEF.match(line)
  name, type_str = d.group(1), d.group(2)

  def sliced(value: str, elements: int, depth: int = 0) -> bool:
    us = users.get(value, [])
    if not us or depth > 8:
      return False
    for uname, utype, uop, uline in us:
      if uop == "dynamic-slice" and shape_elements(utype) * n == elements:
        continue
      if "partition-id" in uline and uop != "dynamic-slice":
        continue
      if uop in _PASS_THROUGH and uop != "get-tuple-element" and sliced(
          uname, shape_elements(utype), depth + 1):
        continue
      return False
    return True

  if not type_str.startswith("("):
    return shape_bytes(type_str) if sliced(name, shape_elements(type_str)) else 0.0
  elems = re.findall(r"[a-z0-9]+\[[0-9,]*\]", type_str)
  total = 0.0
  for uname, utype, uop, uline in users.get(name, []):
    g = re.search(r"get-tuple-element\(" + re.escape(name) + r"\), index=(\d+)", uline)
    if g and int(g.group(1)) < len(elems) and sliced(uname, shape_elements(utype)):
      total += shape_bytes(elems[int(g.group(1))])
  return total


def collective_key(c: Dict[str, Any]) -> str:
  """Aggregation key: op, group size, nodes spanned, members per node (what the timing needs)."""
  return f"{c['op']}|n={c['group_size']}|nodes={c['nodes']}|per_node={c['per_node']}"


def aggregate_collectives(colls: Sequence[Dict[str, Any]]) -> Dict[str, float]:
  """{collective_key: per-device traffic bytes summed over ops x multiplicity}."""
  agg: Dict[str, float] = {}
  for c in colls:
    k = collective_key(c)
    agg[k] = agg.get(k, 0.0) + c["traffic"] * c["count"]
  return agg


def link_gbs(key: str, chip: Dict[str, float]) -> float:
  """Per-device ring bandwidth (GB/s, per direction) of a collective key: NVLink inside a node;
  a group spanning nodes with k members per node: min(NVLink, k x the per-GPU NIC bandwidth)."""
  nodes = int(re.search(r"nodes=(\d+)", key).group(1))
  per_node = int(re.search(r"per_node=(\d+)", key).group(1))
  if nodes <= 1:
    return chip["nvlink_gbs"]
  return min(chip["nvlink_gbs"], per_node * chip["nic_gbs"])


def collective_seconds(agg: Dict[str, float], chip: Dict[str, float], net_eff: float = 1.0) -> float:
  return sum(b / (link_gbs(k, chip) * 1e9 * net_eff) for k, b in agg.items())


def compile_with_partitioned_hlo(lowered) -> Tuple[Any, str]:
  """(``lowered.compile()``, the HLO text right after SPMD partitioning): the compile dumps
  that pass into a fresh directory of its own (``compiler_options``), so the file is this
  program's whatever else compiles in the process. The persistent compilation cache is off for
  this compile (its key ignores the dump options: a cache hit would compile, and dump, nothing)."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache

  d = tempfile.mkdtemp(prefix="hlo_costs_")
  cache_on = jax.config.jax_enable_compilation_cache
  try:
    if cache_on:
      jax.config.update("jax_enable_compilation_cache", False)
      compilation_cache.reset_cache()
    compiled = lowered.compile(compiler_options={
        "xla_dump_to": d, "xla_dump_hlo_pass_re": "spmd-partitioning",
        "xla_dump_hlo_as_text": True, "xla_dump_disable_metadata": True})
    files = glob.glob(os.path.join(d, "*after_spmd-partitioning*.txt"))
    if not files:  # one device: no partitioning pass (and no collectives); the input module
      files = glob.glob(os.path.join(d, "*before_optimizations.txt"))
    if len(files) != 1:
      raise RuntimeError(f"expected one after_spmd-partitioning dump in {d}, found {files}")
    with open(files[0]) as f:
      return compiled, f.read()
  finally:
    if cache_on:
      jax.config.update("jax_enable_compilation_cache", True)
      compilation_cache.reset_cache()
    shutil.rmtree(d, ignore_errors=True)


# ---- costs of compiled programs ---------------------------------------------------------------
def program_cost(lowered, gpus_per_node: int = 8) -> Dict[str, Any]:
  """Per-device ``flops``, ``bytes`` (XLA:CPU's HBM bytes accessed), ``transcendentals`` and
  ``collectives`` ({key: traffic bytes}, from the HLO right after SPMD partitioning: see
  ``hlo_costs``) of a ``jax.stages.Lowered`` loop-free program; ``while_loops`` (of the
  compiled program, whose cost analysis counts a loop body once)."""
  compiled, partitioned = compile_with_partitioned_hlo(lowered)
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0]
  colls = parse_collectives(partitioned, gpus_per_node, unknown_trip_count=1)
  return {"flops": float(ca.get("flops", 0.0)), "bytes": float(ca.get("bytes accessed", 0.0)),
          "transcendentals": float(ca.get("transcendentals", 0.0)),
          "collectives": aggregate_collectives(colls),
          "while_loops": count_while_loops(compiled.as_text())}


def combine(a: Dict[str, Any], b: Dict[str, Any], wa: float, wb: float) -> Dict[str, Any]:
  """wa x a + wb x b over flops, bytes, transcendentals and collectives (negatives clipped)."""
  out = {k: max(0.0, wa * a[k] + wb * b[k]) for k in ("flops", "bytes", "transcendentals")}
  keys = set(a["collectives"]) | set(b["collectives"])
  coll = {k: wa * a["collectives"].get(k, 0.0) + wb * b["collectives"].get(k, 0.0) for k in keys}
  out["collectives"] = {k: v for k, v in coll.items() if v > 1e-6}
  out["while_loops"] = max(a.get("while_loops", 0), b.get("while_loops", 0))
  return out


def extrapolate(ca: Dict[str, Any], cb: Dict[str, Any], n_layers: int, la: int = 2,
                lb: int = 3) -> Dict[str, Any]:
  """cost(L) = cost(la) + (L - la) / (lb - la) (cost(lb) - cost(la)), from la- and lb-layer
  compiles (2 and 3: a 1-layer program fuses differently, its bytes are off the line)."""
  w = (n_layers - la) / (lb - la)
  return combine(ca, cb, 1.0 - w, w)
