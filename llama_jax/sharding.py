"""Device meshes, logical axis rules and shardings for params, train state, batches and caches.

The approach of flax's lm1b example and MaxText: every parameter and activation dimension carries a
*logical* axis name (``llama_jax.model``: 'layers', 'embed', 'heads', 'kv_heads', 'head_dim', 'mlp',
'vocab', 'norm' for params; 'batch', 'length', 'act_embed' for activations), and a *rule table*
(living in the training config) maps each logical name to mesh axes. The mesh has three axes:

  data    pure data parallelism: params replicated, batch split (across nodes / slices).
  fsdp    fully sharded data parallelism (ZeRO-3): batch split *and* params split on 'embed'.
  tensor  Megatron tensor parallelism: heads / kv heads / ffn hidden / vocab split; keep it
          within a node (fast interconnect). ``make_mesh`` puts it innermost for that reason.

Rules are strict, as in EasyLM: a logical name without a rule, or a dimension that its mesh axes
do not divide, raises ``ValueError`` naming the parameter path (never silent replication). In
particular GQA key/value heads must be divisible by the tensor axis: Llama 2 70B (8 kv heads) works
up to tensor=8; tensor=16 raises (replicating kv heads, as some frameworks do silently, would
change memory and communication by a factor the user did not ask for).

State is built shape-first (``init_params_sharded``): ``jax.eval_shape`` -> shardings ->
``jax.jit(init, out_shardings=...)``, so no host ever holds the full model.

Generation layout (Llama 2 Sec. 3.2.3): sampling with FSDP-sharded weights all-gathers every
weight at every decode step (~20x slower at 70B); ``to_generation_layout`` copies the weights once
to tensor-parallel-within-node (``GENERATION_RULES``). ``initialize_distributed`` (multi-process
startup, ``llama_jax.distributed``) is re-exported here.

Meshes use AxisType.Auto (GSPMD/Shardy propagation), not jax.make_mesh's Explicit.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from llama_jax import distributed, model
from llama_jax.config import LlamaConfig

initialize_distributed = distributed.initialize_distributed  # re-exported

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = Union[None, str, Tuple[str, ...]]
Rules = Tuple[Tuple[str, MeshAxes], ...]

# Training layout (FSDP x tensor parallel x data parallel). One rule per logical name.
DEFAULT_RULES: Rules = (
    # ---- parameters (model.param_logical_axes) ----
    ("layers", None),  # stacked layer axis: scanned over, one layer at a time; never split
    ("embed", "fsdp"),  # model dim of every weight matrix: the FSDP (ZeRO-3) split
    ("heads", "tensor"),  # query heads of wq/wo: Megatron column/row parallel attention
    ("kv_heads", "tensor"),  # GQA key/value heads of wk/wv: must be divisible by tensor size
    ("head_dim", None),  # per-head features: RoPE pairs and attention stay local
    ("mlp", "tensor"),  # SwiGLU hidden of w1/w3 (columns) and w2 (rows)
    ("vocab", "tensor"),  # tok_embeddings rows and output columns (vocab-parallel logits)
    ("norm", None),  # RMSNorm scales [d]: tiny, replicated
    # ---- activations (model.ACT_*) and the KV cache ----
    ("batch", ("data", "fsdp")),  # examples split over both data-parallel axes
    ("length", None),  # sequence kept whole (no sequence/context parallelism)
    ("act_embed", None),  # residual stream replicated over 'tensor' (Megatron, no seq-parallel)
    ("cache_length", None),  # KV cache slots, kept whole
)


def generation_rules(merge_fsdp_into_tensor: bool = False) -> Rules:
  """Rules for sampling: weights tensor-parallel, never FSDP-sharded.

  With ``merge_fsdp_into_tensor=False`` (default) weights are split over 'tensor' only (one node)
  and replicated over 'data' and 'fsdp'; the batch is split over ('data', 'fsdp'). Each device
  then holds params / tensor_size bytes: choose tensor so that this fits (70B in bf16 on a node of
  8 x 80 GB: 17.5 GB per GPU besides its FSDP shard).

  With ``merge_fsdp_into_tensor=True`` the tensor-parallel group is ('fsdp', 'tensor') (for models
  that do not fit on 'tensor' alone, at the price of cross-node collectives if 'fsdp' spans nodes)
  and the batch is split over 'data' only. heads, kv_heads, mlp and vocab must then be divisible by
  fsdp_size * tensor_size.
  """
  tp: MeshAxes = ("fsdp", "tensor") if merge_fsdp_into_tensor else "tensor"
  batch: MeshAxes = "data" if merge_fsdp_into_tensor else ("data", "fsdp")
  return (
      ("layers", None), ("embed", None), ("heads", tp), ("kv_heads", tp), ("head_dim", None),
      ("mlp", tp), ("vocab", tp), ("norm", None),
      ("batch", batch), ("length", None), ("act_embed", None), ("cache_length", None),
  )


GENERATION_RULES: Rules = generation_rules()

# Logical axes of model.KVCache leaves (k, v: [L, b, k, s, h]; mask: [b, s]; index: []).
CACHE_LOGICAL_AXES = model.KVCache(
    k=P("layers", "batch", "kv_heads", "cache_length", "head_dim"),
    v=P("layers", "batch", "kv_heads", "cache_length", "head_dim"),
    mask=P("batch", "cache_length"),
    index=P(),
)


# ---- meshes and rules ---------------------------------------------------------------------------
def make_mesh(mesh_shape: Sequence[int], devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh with ``AxisType.Auto`` axes.

  Args:
    mesh_shape: three sizes (data, fsdp, tensor); one may be -1 = all remaining devices.
    devices: devices to use (default ``jax.devices()``, all processes). Laid out by
      ``jax.make_mesh`` (``mesh_utils``), so 'tensor' (innermost) stays within a node.
  Returns:
    A ``jax.sharding.Mesh``.
  Raises:
    ValueError: if mesh_shape is not three positive ints (one -1 allowed), or if it does not
      divide / use exactly the device count (the message names both).
  """
  shape = tuple(mesh_shape)
  if (len(shape) != 3 or any(not isinstance(s, int) or isinstance(s, bool) or (s <= 0 and s != -1)
                             for s in shape) or shape.count(-1) > 1):
    raise ValueError(f"mesh_shape must be 3 positive ints (data, fsdp, tensor), one of which "
                     f"may be -1; got {mesh_shape!r}")
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if n % known:
      raise ValueError(f"mesh shape {shape} does not divide the device count {n}")
    shape = tuple(n // known if s == -1 else s for s in shape)
  elif known != n:
    raise ValueError(f"mesh shape {shape} needs {known} devices but the device count is {n}; "
                     f"use -1 for one axis or pass devices=")
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def validate_rules(rules: Sequence[Sequence[Any]], mesh: Optional[Mesh] = None) -> Rules:
  """Checks a rule table and returns it as a tuple of (name, None | str | tuple of str).

  Lists (e.g. from an ml_collections config) become tuples.

  Raises:
    ValueError: if an entry is not a (logical name, mesh axes) pair, a logical name repeats, or a
      mesh axis is unknown (not in ``mesh.axis_names``, or ``MESH_AXES`` without a mesh) or
      repeats within one rule.
  """
  axis_names = tuple(mesh.axis_names) if mesh is not None else MESH_AXES
  out, seen = [], set()
  for entry in rules:
    if not isinstance(entry, (tuple, list)) or len(entry) != 2 or not isinstance(entry[0], str):
      raise ValueError(f"logical axis rule must be a (logical_name, mesh_axes) pair, got {entry!r}")
    name, axes = entry
    if name in seen:
      raise ValueError(f"logical axis rules: {name!r} has more than one rule")
    seen.add(name)
    if isinstance(axes, (tuple, list)):
      axes = tuple(axes)
      names = axes
    elif axes is None or isinstance(axes, str):
      names = () if axes is None else (axes,)
    else:
      raise ValueError(f"logical axis rule {name!r}: mesh axes must be None, a str or a tuple of "
                       f"str, got {axes!r}")
    for a in names:
      if a not in axis_names:
        raise ValueError(f"logical axis rule {name!r}: unknown mesh axis {a!r} (mesh axes "
                         f"{axis_names})")
    if len(set(names)) != len(names):
      raise ValueError(f"logical axis rule {name!r}: mesh axis repeated in {axes!r}")
    out.append((name, axes))
  return tuple(out)


def _path_str(path) -> str:
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      parts.append(str(k.key))
    else:
      parts.append(str(k))
  return "/".join(parts)


def _axes_tuple(axes: MeshAxes) -> Tuple[str, ...]:
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_mesh_spec(logical: P, shape: Sequence[int], mesh: Mesh, rules: Rules,
                         path: str = "<array>") -> P:
  """The mesh PartitionSpec of one array from its logical PartitionSpec (strict).

  Args:
    logical: one logical name (or None = not split) per dimension.
    shape: the array shape (same length as ``logical``).
    mesh: the device mesh (axis sizes are read from it).
    rules: logical axis rules (see ``validate_rules``).
    path: the array's name, used in error messages (e.g. 'layers/attention/wk').
  Raises:
    ValueError: naming ``path``, if ``logical`` does not have one entry per dimension, a logical
      name has no rule, two dimensions map to the same mesh axis, or a dimension is not divisible
      by the size of its mesh axes (the message names the dimension, its size, the mesh axes and
      their size).
  """
  return _mesh_spec(logical, shape, mesh, dict(validate_rules(rules, mesh)), path)


def _mesh_spec(logical: P, shape: Sequence[int], mesh: Mesh, table: dict, path: str) -> P:
  shape = tuple(shape)
  names = tuple(logical) if logical is not None else ()
  if len(names) != len(shape):
    raise ValueError(f"{path}: logical axes {names} do not match shape {shape} (one logical name "
                     f"or None per dimension; every parameter needs logical axes)")
  out, used = [], {}
  for i, (name, size) in enumerate(zip(names, shape)):
    if name is None:
      out.append(None)
      continue
    if not isinstance(name, str):
      raise ValueError(f"{path}: logical axis {name!r} of dimension {i} must be a str or None")
    if name not in table:
      raise ValueError(f"{path}: logical axis {name!r} (dimension {i} of shape {shape}) has no "
                       f"logical axis rule; rules cover {sorted(table)}")
    axes = table[name]
    mesh_axes = _axes_tuple(axes)
    for a in mesh_axes:
      if a in used:
        raise ValueError(f"{path}: logical axes {used[a]!r} and {name!r} both map to mesh axis "
                         f"{a!r}")
      used[a] = name
    n = math.prod(mesh.shape[a] for a in mesh_axes)
    if size % n:
      raise ValueError(f"{path}: dimension {i} ({name!r}) of size {size} is not divisible by mesh "
                       f"axis {axes!r} of size {n} (shape {shape}); change the mesh or the rule")
    out.append(axes)
  return P(*out)


def logical_to_sharding(logical_specs: Any, shapes: Any, mesh: Mesh, rules: Rules) -> Any:
  """Tree of ``NamedSharding`` from a tree of logical PartitionSpecs and a matching tree of shapes.

  Args:
    logical_specs: pytree with ``PartitionSpec`` leaves of logical names (e.g.
      ``model.param_logical_axes(cfg)``).
    shapes: pytree of the same structure whose leaves have ``.shape`` (arrays,
      ``jax.ShapeDtypeStruct``) or are shape tuples.
    mesh, rules: see ``logical_to_mesh_spec``.
  Raises:
    ValueError: as ``logical_to_mesh_spec``, naming the leaf path ('layers/attention/wq').
  """
  table = dict(validate_rules(rules, mesh))

  def one(path, spec, leaf):
    shape = leaf.shape if hasattr(leaf, "shape") else tuple(leaf)
    return NamedSharding(mesh, _mesh_spec(spec, shape, mesh, table, _path_str(path)))

  return jax.tree_util.tree_map_with_path(one, logical_specs, shapes,
                                          is_leaf=lambda x: isinstance(x, P))


# ---- parameters and train state ----------------------------------------------------------------
def param_shapes(cfg: LlamaConfig) -> Any:
  """Tree of ``jax.ShapeDtypeStruct`` of ``model.init_params(cfg, key)`` (no memory allocated)."""
  return jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))


def param_shardings(cfg: LlamaConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """Tree of ``NamedSharding`` for the Llama params (``model.param_logical_axes`` + rules).

  Raises:
    ValueError: see ``logical_to_mesh_spec`` (e.g. n_kv_heads 4 on tensor=8 names
      'layers/attention/wk', 'kv_heads', 4, 'tensor' and 8).
  """
  return logical_to_sharding(model.param_logical_axes(cfg), param_shapes(cfg), mesh, rules)


def abstract_params(cfg: LlamaConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """Tree of ``jax.ShapeDtypeStruct(shape, param_dtype, sharding=...)``: for ahead-of-time
  lowering (``jax.jit(f).lower(abstract_params(...), ...)``) and for ``state_shardings``."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      param_shapes(cfg), param_shardings(cfg, mesh, rules))


def init_params_sharded(cfg: LlamaConfig, key: jax.Array, mesh: Mesh,
                        rules: Rules = DEFAULT_RULES) -> Any:
  """``model.init_params(cfg, key)`` created directly in its sharded layout (shape-first).

  Each device computes only its shards (``jax.jit(init, out_shardings=...)``); the values equal
  the single-device ``init_params`` for the same key (threefry is sharding-invariant).
  """
  shardings = param_shardings(cfg, mesh, rules)
  return jax.jit(functools.partial(model.init_params, cfg), out_shardings=shardings)(key)


def state_shardings(abstract_state: Any, params_shardings: Any, mesh: Mesh) -> Any:
  """Shardings for a train state (params, optimizer state, accumulators, step...).

  A state leaf gets a parameter's sharding when its tree path ends with that parameter's path
  (longest match wins; e.g. ``opt_state[1][0].mu['layers']['attention']['wq']`` or
  ``opt_state.acc_grads[...]`` of ``optax.MultiSteps``) and it has the parameter's shape. Every
  other leaf (step counters, scalars, factored statistics of another shape) is replicated.

  Args:
    abstract_state: pytree of arrays or ``jax.ShapeDtypeStruct`` (e.g. ``jax.eval_shape`` of the
      state constructor).
    params_shardings: the params tree with ``jax.ShapeDtypeStruct`` leaves carrying a sharding
      (``abstract_params``; shapes are then compared exactly) or ``NamedSharding`` leaves
      (``param_shardings``; then "same shape" means same rank and divisible by the sharding).
    mesh: the mesh, for the replicated sharding.
  Returns:
    A pytree of ``NamedSharding`` with the structure of ``abstract_state``.
  """
  index = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params_shardings)[0]:
    names = tuple(_path_str((k,)) for k in path)
    if isinstance(leaf, jax.ShapeDtypeStruct):
      index[names] = (leaf.sharding, tuple(leaf.shape))
    else:
      index[names] = (leaf, None)
  replicated = NamedSharding(mesh, P())

  def fits(sharding, shape):
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    if len(spec) != len(shape):
      return False
    return all(size % math.prod(sharding.mesh.shape[a] for a in _axes_tuple(axes)) == 0
               for size, axes in zip(shape, spec))

  def one(path, leaf):
    shape = tuple(getattr(leaf, "shape", ()))
    if not shape:
      return replicated
    names = tuple(_path_str((k,)) for k in path)
    for start in range(len(names)):
      match = index.get(names[start:])
      if match is None:
        continue
      sharding, param_shape = match
      ok = shape == param_shape if param_shape is not None else fits(sharding, shape)
      return sharding if ok else replicated
    return replicated

  return jax.tree_util.tree_map_with_path(one, abstract_state)


# ---- batches, caches, steps ---------------------------------------------------------------------
def _rule(rules: Rules, name: str, mesh: Mesh) -> MeshAxes:
  table = dict(validate_rules(rules, mesh))
  if name not in table:
    raise ValueError(f"logical axis rules have no rule for {name!r}")
  return table[name]


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
  """Sharding of a batch array [b, ...]: b split over the 'batch' rule (('data', 'fsdp') by
  default), other dimensions replicated. b must be divisible by that size."""
  return NamedSharding(mesh, P(_rule(rules, "batch", mesh)))


def cache_shardings(cfg: LlamaConfig, mesh: Mesh, rules: Rules, batch: int,
                    max_len: int) -> model.KVCache:
  """``model.KVCache`` of shardings for ``model.init_cache(cfg, batch, max_len)``.

  k, v [L, b, k, s, h]: b over the 'batch' rule, k over 'kv_heads' (tensor); mask [b, s]: b split;
  index []: replicated.

  Raises:
    ValueError: if batch or kv heads are not divisible by their mesh axes (see
      ``logical_to_mesh_spec``).
  """
  shapes = jax.eval_shape(functools.partial(model.init_cache, cfg, batch, max_len))
  return logical_to_sharding(CACHE_LOGICAL_AXES, shapes, mesh, rules)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Makes the model's ``nn.with_logical_constraint`` calls apply: ``jax.set_mesh(mesh)`` plus
  ``nn.logical_axis_rules(rules)`` (flax reads the abstract mesh; ``with mesh:`` alone does not
  set it in jax 0.10, and the constraints are then silently dropped).

  Caveat: flax's rules are not part of jax.jit's cache key. A function jitted and traced under one
  rule table reuses that trace under another; ``jit_step`` avoids this by fixing the rules inside
  the traced function.
  """
  rules = validate_rules(rules, mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def jit_step(step: Callable[..., Any], mesh: Mesh, rules: Rules, *, in_shardings: Any,
             out_shardings: Any, donate_argnums: Union[int, Sequence[int]] = (0,),
             static_argnums: Union[int, Sequence[int]] = ()) -> Any:
  """``jax.jit`` of a pure step with explicit shardings, donation and activation constraints.

  The rules and the abstract mesh are entered inside the traced function, so the model's
  activation constraints ('batch', 'length', 'act_embed') apply without an outer context and
  the trace is tied to these rules. Bind keyword arguments first, e.g.
  ``jit_step(functools.partial(train_step, cfg=cfg, optimizer=opt), mesh, rules,
  in_shardings=(state_sh, batch_sh, replicated), out_shardings=(state_sh, replicated))``.

  Returns:
    The ``jax.jit`` object (call it, or ``.lower(...)`` for AOT plans and HLO inspection).
  """
  rules = validate_rules(rules, mesh)

  @functools.wraps(step)
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
      return step(*args, **kwargs)

  return jax.jit(traced, in_shardings=in_shardings, out_shardings=out_shardings,
                 donate_argnums=donate_argnums, static_argnums=static_argnums)


# ---- generation layout ---------------------------------------------------------------------------
def _cast(tree, dtype):
  if dtype is None:
    return tree
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


@functools.lru_cache(maxsize=64)
def _resharder(out_shardings_flat: Tuple[NamedSharding, ...], treedef, dtype) -> Callable[[Any], Any]:
  return jax.jit(functools.partial(_cast, dtype=dtype),
                 out_shardings=jax.tree_util.tree_unflatten(treedef, out_shardings_flat))


def reshard(tree: Any, shardings: Any, dtype: Any = None) -> Any:
  """Copies ``tree`` into ``shardings`` device-to-device (XLA collectives, no host round trip).

  A jitted identity with ``out_shardings``; works for arrays spanning several processes. (In
  jax 0.10 ``jax.device_put`` of a sharded array to a different sharding gathers it on the host
  and fails for non-fully-addressable arrays.) The input is not donated. ``dtype``, if given,
  casts floating leaves in the same pass (e.g. bfloat16 copies for generation).
  """
  flat, treedef = jax.tree_util.tree_flatten(shardings)
  dtype = None if dtype is None else jnp.dtype(dtype)
  return _resharder(tuple(flat), treedef, dtype)(tree)


def to_generation_layout(params: Any, cfg: LlamaConfig, mesh: Mesh,
                         rules: Rules = GENERATION_RULES, dtype: Any = "compute") -> Any:
  """A copy of ``params`` laid out for sampling (tensor-parallel weights, no FSDP split).

  The training params are left untouched. Free the copy by dropping every reference to the
  returned tree (its buffers are released when garbage-collected; ``jax.block_until_ready`` it
  before timing). Memory per device: params_bytes / tensor_size for the copy, on top of the
  training shard.

  Source: Llama 2 paper, Sec. 3.2.3 (generation under FSDP ~20x slower; consolidating the
  weights per node before generation, freeing them after, fixed it).

  ``dtype``: the copy's; ``"compute"`` (default) = ``cfg.dtype``, None = the params'. The model
  casts every weight to ``cfg.dtype`` before use, so such a copy samples exactly as the params
  do, in half the memory for f32 params with bf16 compute (70B, tensor 8: 16 vs 32 GiB).

  Raises:
    ValueError: see ``param_shardings`` (e.g. kv heads not divisible by the tensor size).
  """
  if isinstance(dtype, str) and dtype == "compute":
    dtype = cfg.compute_dtype
  return reshard(params, param_shardings(cfg, mesh, rules), dtype)


def move_to_memory(tree: Any, kind: str) -> Any:
  """``tree`` in memory ``kind`` ("pinned_host", "device"), same shardings; the source buffers
  are freed (jax cannot donate across memory kinds), so other references become invalid."""
  out = jax.block_until_ready(jax.tree.map(
      lambda x: jax.device_put(x, x.sharding.with_memory_kind(kind)), tree))
  jax.tree.map(lambda x: x.delete(), tree)
  return out


# ---- multi-host batches -------------------------------------------------------------------------
def global_batch_from_process_local(local_batch: Any, mesh: Mesh,
                                    sharding: Optional[NamedSharding] = None) -> Any:
  """Global arrays from each process's rows of the batch (``make_array_from_process_local_data``).

  Args:
    local_batch: pytree of [b_local, ...] arrays: this process's rows (processes hold disjoint
      rows, in process order).
    mesh: the mesh.
    sharding: sharding of the global arrays (default ``batch_sharding(mesh)``).
  Returns:
    The same pytree of [b_local * n_data_processes, ...] ``jax.Array``s.
  Raises:
    ValueError: if a leaf is a scalar.
  """
  sharding = batch_sharding(mesh) if sharding is None else sharding

  def one(path, x):
    if not getattr(x, "shape", ()):
      raise ValueError(f"global_batch_from_process_local: {_path_str(path) or 'batch'} must have "
                       f"a leading batch dimension, got a scalar")
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree_util.tree_map_with_path(one, local_batch)
