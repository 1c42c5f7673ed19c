"""Sharding checks on 8 emulated CPU devices, run by tests/test_sharding.py in a subprocess.

The device count must be fixed before jax is imported, and the pytest process has already
imported jax (tests/conftest.py), hence a separate process. Usage::

  python tests/sharding_checks.py [CHECK ...]     # default: all checks

Prints one line per check: ``CHECK {"name": ..., "ok": ..., "error": ...}``. References are the
single-device results of the same computation (``model.forward`` with no mesh) and shard shapes
written out by hand from the mesh sizes, never the sharding code's own output.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from llama_jax import model, sharding  # noqa: E402
from llama_jax.config import LlamaConfig  # noqa: E402
from llama_jax.sft import step as sft  # noqa: E402
from llama_jax.train.state import init_train_state

ROOT = pathlib.Path(__file__).resolve().parents[1]
jax.config.update("jax_compilation_cache_dir", str(ROOT / ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# GQA, every split dimension divisible by 8: d 64, n 8, k 4, h 8, ffn 176, vocab 256.
CFG = LlamaConfig.tiny(dim=64, n_heads=8, n_kv_heads=4, vocab_size=256, multiple_of=16)
B, T = 8, 16
KEY = jax.random.key(0)
CHECKS = {}


def check(fn):
  CHECKS[fn.__name__] = fn
  return fn


def _tokens(seed=1, shape=(B, T)):
  return jax.random.randint(jax.random.key(seed), shape, 0, CFG.vocab_size, jnp.int32)


def _leaves(tree):
  return {sharding._path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _expected_shard_shapes(cfg, data, fsdp, tensor, *, embed_split=True):
  """Per-device shapes written out from the layout: embed/fsdp, heads/kv/mlp/vocab/tensor."""
  del data
  L, d, n, k, h, f, v = (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.head_dim,
                         cfg.ffn_hidden_dim, cfg.vocab_size)
  e = d // fsdp if embed_split else d
  t = tensor
  return {
      "tok_embeddings": (v // t, e), "output": (e, v // t), "norm": (d,),
      "layers/attention_norm": (L, d), "layers/ffn_norm": (L, d),
      "layers/attention/wq": (L, e, n // t, h), "layers/attention/wk": (L, e, k // t, h),
      "layers/attention/wv": (L, e, k // t, h), "layers/attention/wo": (L, n // t, h, e),
      "layers/feed_forward/w1": (L, e, f // t), "layers/feed_forward/w3": (L, e, f // t),
      "layers/feed_forward/w2": (L, f // t, e),
  }


def _assert_shard_shapes(params, expected):
  leaves = _leaves(params)
  assert set(leaves) == set(expected), sorted(leaves)
  for name, x in leaves.items():
    shapes = {s.data.shape for s in x.addressable_shards}
    assert shapes == {expected[name]}, (name, shapes, expected[name])
    assert len(x.addressable_shards) == 8, name


def _forward_fn(cfg):
  return lambda p, t: model.forward(p, t, cfg)


def _sharded_forward(params, tokens, mesh, rules, cfg=CFG):
  p_sh = jax.tree.map(lambda x: x.sharding, params)
  b_sh = sharding.batch_sharding(mesh, rules)
  fwd = sharding.jit_step(_forward_fn(cfg), mesh, rules, in_shardings=(p_sh, b_sh),
                          out_shardings=b_sh, donate_argnums=())
  return fwd(params, jax.device_put(tokens, b_sh))


def _reference_forward(params, tokens, cfg=CFG):
  return jax.jit(_forward_fn(cfg))(params, tokens)


def _forward_parity(mesh_shape):
  mesh = sharding.make_mesh(mesh_shape)
  ref_params = model.init_params(CFG, KEY)  # single device, no mesh
  params = sharding.init_params_sharded(CFG, KEY, mesh)
  _assert_shard_shapes(params, _expected_shard_shapes(CFG, *mesh_shape))
  for (name, a), b in zip(_leaves(params).items(), _leaves(ref_params).values()):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-7, err_msg=name)
  tokens = _tokens()
  for scale in (1.0, 3.0):  # x3: wider logits
    ref = np.asarray(_reference_forward(jax.tree.map(lambda x: x * scale, ref_params), tokens))
    out = _sharded_forward(jax.tree.map(lambda x: x * scale, params), tokens, mesh,
                           sharding.DEFAULT_RULES)
    assert out.sharding.spec == P(("data", "fsdp")), out.sharding
    err = float(np.max(np.abs(np.asarray(out) - ref)))
    assert err <= 1e-5 * max(1.0, float(np.max(np.abs(ref)))), (scale, err)
    print(f"  forward {mesh_shape} scale {scale}: max|logit| {np.max(np.abs(ref)):.3f} "
          f"max err {err:.2e}", file=sys.stderr)


@check
def forward_data_8():
  _forward_parity((8, 1, 1))


@check
def forward_fsdp_8():
  _forward_parity((1, 8, 1))


@check
def forward_fsdp2_tensor4():
  _forward_parity((1, 2, 4))


@check
def forward_2x2x2():
  _forward_parity((2, 2, 2))


@check
def constraints_in_hlo():
  mesh = sharding.make_mesh((2, 2, 2))
  params = sharding.init_params_sharded(CFG, KEY, mesh)
  tokens = _tokens()
  pattern = re.compile(r'sdy\.sharding_constraint .*\[\{"data", "fsdp"\}, \{\}, \{\}\]')
  plain = jax.jit(_forward_fn(CFG)).lower(params, tokens).as_text()
  assert "sharding_constraint" not in plain  # no rules active: flax drops the constraints
  with sharding.activate(mesh, sharding.DEFAULT_RULES):
    active = jax.jit(_forward_fn(CFG)).lower(params, tokens).as_text()
  # Embedding output and the scanned block output (inside the scan body).
  assert len(pattern.findall(active)) == 2, [l for l in active.splitlines() if "constraint" in l]
  b_sh = sharding.batch_sharding(mesh)
  stepped = sharding.jit_step(_forward_fn(CFG), mesh, sharding.DEFAULT_RULES,
                              in_shardings=(jax.tree.map(lambda x: x.sharding, params), b_sh),
                              out_shardings=b_sh, donate_argnums=()).lower(params, tokens).as_text()
  assert len(pattern.findall(stepped)) == 2
  # A rule table that splits the residual stream over 'tensor' shows up as such.
  rules = tuple((n, "tensor" if n == "act_embed" else a) for n, a in sharding.DEFAULT_RULES)
  with sharding.activate(mesh, rules):
    tp = jax.jit(_forward_fn(CFG)).lower(params, tokens).as_text()
  assert '[{"data", "fsdp"}, {}, {"tensor"}]' in tp


# ---- optimizer steps ---------------------------------------------------------------------------
def _optimizer():
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.1))


def _create_state(params, optimizer):
  return init_train_state(params, optimizer, seed=0)


def _sft_batches():
  """Two packed SFT batches [B, T]: two segments per row, padding at the end of odd rows."""
  out = []
  for seed in (3, 4):
    tokens = np.asarray(_tokens(seed, (B, T + 1)))
    col = np.arange(T)[None, :].repeat(B, 0)
    segment_ids = np.where(col < 9, 1, 2).astype(np.int32)
    segment_ids[1::2, -3:] = 0
    positions = np.where(col < 9, col, col - 9).astype(np.int32)
    loss_mask = ((positions >= 3) & (segment_ids > 0)).astype(np.float32)
    out.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": loss_mask,
                "segment_ids": segment_ids, "positions": positions})
  return out


@check
def sft_train_step_2x2x2():
  """llama_jax.sft.train_step (2 accumulated microbatches), donated, vs one device."""
  mesh_shape = (2, 2, 2)
  mesh, opt, rules = sharding.make_mesh(mesh_shape), _optimizer(), sharding.DEFAULT_RULES
  step = functools.partial(sft.train_step, cfg=CFG, optimizer=opt, accum_steps=2)
  create = functools.partial(_create_state, optimizer=opt)
  batches, rng = _sft_batches(), jax.random.key(5)

  ref_state = create(model.init_params(CFG, KEY))
  ref_step = jax.jit(step)
  ref_losses = []
  for batch in batches:
    ref_state, m = ref_step(ref_state, batch, rng)
    ref_losses.append(float(m["loss"]))

  abstract_params = sharding.abstract_params(CFG, mesh, rules)
  st_sh = sharding.state_shardings(jax.eval_shape(create, abstract_params), abstract_params, mesh)
  state = jax.jit(create, out_shardings=st_sh)(sharding.init_params_sharded(CFG, KEY, mesh, rules))
  b_sh, repl = sharding.batch_sharding(mesh, rules), NamedSharding(mesh, P())
  jitted = sharding.jit_step(step, mesh, rules, in_shardings=(st_sh, b_sh, repl),
                             out_shardings=(st_sh, repl))
  losses = []
  for batch in batches:
    old = state
    state, m = jitted(state, jax.device_put(batch, b_sh), rng)
    losses.append(float(m["loss"]))
    assert all(x.is_deleted() for x in jax.tree.leaves(old.params)), "state was not donated"
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert int(state.step) == 2
  # Adam divides by sqrt(v) + eps: an element whose gradient is ~1e-7 (an unused vocab column)
  # can move by up to 2 lr on float32 rounding alone, so bound the fraction of elements off by
  # more than 1e-6 (a missing gradient reduction would move most elements by ~lr) and the mean.
  for (name, a), b in zip(_leaves(state.params).items(), jax.tree.leaves(ref_state.params)):
    diff = np.abs(np.asarray(a) - np.asarray(b))
    assert np.mean(diff > 1e-6) < 1e-3 and diff.mean() < 1e-7, (name, diff.max(), diff.mean())
    assert diff.max() < 2 * 1e-3 * len(batches), (name, diff.max())
  print(f"  sft train step: losses {losses} vs {ref_losses}", file=sys.stderr)
  expected = _expected_shard_shapes(CFG, *mesh_shape)
  _assert_shard_shapes(state.params, expected)
  _assert_shard_shapes(state.opt_state[1][0].mu, expected)
  _assert_shard_shapes(state.opt_state[1][0].nu, expected)
  assert state.rng.sharding.spec == P() and state.step.sharding.spec == P()


@check
def state_shardings_multisteps():
  mesh = sharding.make_mesh((1, 2, 4))
  abstract = sharding.abstract_params(CFG, mesh)
  p_sh = sharding.param_shardings(CFG, mesh)
  opt = optax.MultiSteps(_optimizer(), every_k_schedule=4)
  state = jax.eval_shape(functools.partial(_create_state, optimizer=opt), abstract)
  for params_arg in (abstract, p_sh):  # ShapeDtypeStruct leaves or NamedSharding leaves
    st_sh = sharding.state_shardings(state, params_arg, mesh)
    ms = st_sh.opt_state
    for tree in (st_sh.params, ms.acc_grads, ms.inner_opt_state[1][0].mu,
                 ms.inner_opt_state[1][0].nu):
      for name, s in _leaves(tree).items():
        assert s == _leaves(p_sh)[name], (name, s)
    wq = ms.inner_opt_state[1][0].mu["layers"]["attention"]["wq"]
    assert wq.spec == P(None, "fsdp", "tensor", None), wq.spec
    for s in (st_sh.step, ms.mini_step, ms.gradient_step, ms.inner_opt_state[1][0].count):
      assert s.spec == P(), s.spec
  split = lambda s: any(a is not None for a in s.spec)  # noqa: E731
  n_sharded = sum(1 for s in jax.tree.leaves(st_sh) if split(s))
  n_split_params = sum(1 for s in jax.tree.leaves(p_sh) if split(s))
  assert n_sharded == 4 * n_split_params, (n_sharded, n_split_params)  # params, acc, mu, nu


@check
def indivisible_kv_heads():
  mesh = sharding.make_mesh((1, 1, 8))
  try:
    sharding.param_shardings(CFG, mesh)
  except ValueError as e:
    msg = str(e)
    assert "layers/attention/w" in msg and "kv_heads" in msg, msg
    assert "size 4" in msg and "'tensor'" in msg and "size 8" in msg, msg
  else:
    raise AssertionError("n_kv_heads 4 on tensor=8 did not raise")
  try:
    sharding.make_mesh((3, 1, -1))
  except ValueError as e:
    assert "(3, 1, -1)" in str(e) and "8" in str(e), str(e)
  else:
    raise AssertionError("mesh (3, 1, -1) on 8 devices did not raise")
  assert sharding.make_mesh((2, -1, 2)).shape == {"data": 2, "fsdp": 2, "tensor": 2}


@check
def generation_layout():
  mesh_shape = (2, 2, 2)
  mesh = sharding.make_mesh(mesh_shape)
  params = sharding.init_params_sharded(CFG, KEY, mesh)
  for merge, tensor in ((False, 2), (True, 4)):
    rules = sharding.generation_rules(merge)
    gen = jax.block_until_ready(sharding.to_generation_layout(params, CFG, mesh, rules))
    # No weight goes through the host: jax.device_put would gather it there and upload it again
    # (jax 0.10). The CPU backend does not enforce the device-to-host guard; the upload trips
    # the host-to-device one.
    shardings = sharding.param_shardings(CFG, mesh, rules)
    with jax.transfer_guard("disallow_explicit"):
      again = jax.block_until_ready(sharding.reshard(params, shardings))
    assert jax.tree.map(lambda x: x.sharding, again) == shardings
    expected = _expected_shard_shapes(CFG, 1, 1, tensor, embed_split=False)
    _assert_shard_shapes(gen, expected)
    wq = gen["layers"]["attention"]["wq"].sharding.spec
    assert wq == P(None, None, ("fsdp", "tensor") if merge else "tensor", None), wq
    for (name, a), b in zip(_leaves(gen).items(), _leaves(params).values()):
      assert not b.is_deleted(), name
      assert np.array_equal(np.asarray(a), np.asarray(b)), name
    ref = np.asarray(_reference_forward(model.init_params(CFG, KEY), _tokens()))
    out = _sharded_forward(gen, _tokens(), mesh, rules)
    err = float(np.max(np.abs(np.asarray(out) - ref)))
    assert err <= 1e-5, err
  # Cached prefill with the generation layout and a sharded KV cache.
  rules = sharding.GENERATION_RULES
  gen = sharding.to_generation_layout(params, CFG, mesh)
  c_sh = sharding.cache_shardings(CFG, mesh, rules, B, 32)
  assert c_sh.k.spec == P(None, ("data", "fsdp"), "tensor", None, None), c_sh.k.spec
  assert c_sh.mask.spec == P(("data", "fsdp"), None) and c_sh.index.spec == P()

  def prefill(p, tokens, cfg=CFG):
    return model.forward_cached(p, tokens, cfg, model.init_cache(cfg, B, 32))

  jitted = sharding.jit_step(prefill, mesh, rules,
                             in_shardings=(jax.tree.map(lambda x: x.sharding, gen),
                                           sharding.batch_sharding(mesh, rules)),
                             out_shardings=(sharding.batch_sharding(mesh, rules), c_sh),
                             donate_argnums=())
  logits, cache = jitted(gen, _tokens())
  assert {s.data.shape for s in cache.k.addressable_shards} == {(CFG.n_layers, 2, 2, 32, 8)}
  ref_logits, ref_cache = jax.jit(prefill)(model.init_params(CFG, KEY), _tokens())
  assert float(np.max(np.abs(np.asarray(logits) - np.asarray(ref_logits)))) <= 1e-5
  assert float(np.max(np.abs(np.asarray(cache.k) - np.asarray(ref_cache.k)))) <= 1e-5


@check
def process_local_batch():
  """Single process: the local batch is the global batch, split over ('data', 'fsdp')."""
  mesh = sharding.make_mesh((2, 2, 2))
  local = {"tokens": np.arange(B * T, dtype=np.int32).reshape(B, T), "mask": np.ones((B, T), bool)}
  batch = sharding.global_batch_from_process_local(local, mesh)
  for name in local:
    assert batch[name].shape == (B, T) and batch[name].sharding == sharding.batch_sharding(mesh)
    assert {s.data.shape for s in batch[name].addressable_shards} == {(B // 4, T)}
    assert np.array_equal(np.asarray(batch[name]), local[name])


@check
def presets_abstract():
  """70B shapes: FSDP over 8 puts 1/8 of every weight matrix on each device (no allocation)."""
  cfg = LlamaConfig.llama2_70b()
  total = cfg.num_params() * 4
  for shape in ((1, 8, 1), (1, 1, 8)):
    mesh = sharding.make_mesh(shape)
    abstract = sharding.abstract_params(cfg, mesh)
    per_device = sum(math.prod(x.sharding.shard_shape(x.shape)) * 4
                     for x in jax.tree.leaves(abstract))
    norms = (2 * cfg.n_layers + 1) * cfg.dim * 4  # replicated RMSNorm scales
    assert per_device == (total - norms) // 8 + norms, (shape, per_device, total)
  wk = sharding.param_shardings(cfg, sharding.make_mesh((1, 1, 8)))["layers"]["attention"]["wk"]
  assert wk.shard_shape((80, 8192, 8, 128)) == (80, 8192, 1, 128)


def main(names):
  assert jax.device_count() == 8, jax.devices()
  failed = 0
  for name in names or list(CHECKS):
    try:
      CHECKS[name]()
      result = {"name": name, "ok": True, "error": ""}
    except Exception:  # reported to the parent test, which fails with the traceback
      result = {"name": name, "ok": False, "error": traceback.format_exc()}
      failed += 1
    print("CHECK " + json.dumps(result), flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
