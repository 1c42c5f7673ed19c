"""The loop-free programs of one PPO iteration that ``ppo_cost_model.py`` costs (lowered, not
run), and the analytic HBM bytes of a decode step. See ``ppo_cost_model.py``'s docstring."""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any, Dict


def _unstack_abstract(tree, mesh):
  """Abstract stacked [L, ...] leaves with shardings -> tuple of L per-layer leaves."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P

  def one(x):
    spec = tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=NamedSharding(mesh, P(*spec[1:])))

  n = jax.tree.leaves(tree)[0].shape[0]
  return tuple(jax.tree.map(one, tree) for _ in range(n))


def build_programs(config, cfg, mesh) -> Dict[str, Any]:
  """Lowered loop-free programs of one PPO iteration for the model ``cfg`` (``scan_layers``
  False): name -> ``jax.stages.Lowered``. Built from the planners' pieces (``rollout.Setup``,
  ``rollout.abstract_experience``, ``sharding.*``) with the shardings the stage uses."""
  import jax
  import jax.numpy as jnp

  from llama_jax import model, sampling, sharding
  from llama_jax.ppo import rollout
  from llama_jax.ppo import step as ppo
  from llama_jax.train.state import apply_gradients

  pc = config.ppo
  rules, gen_rules = sharding.DEFAULT_RULES, sharding.GENERATION_RULES
  accum = int(config.train.get("grad_accum_steps", 1))
  micro_rows = int(pc.minibatch_size) // accum
  micro_config = copy.deepcopy(config)
  with micro_config.unlocked():
    micro_config.train.grad_accum_steps = 1
    micro_config.ppo.minibatch_size = micro_rows
  setup = rollout.Setup(micro_config, cfg, cfg, cfg, mesh, rules)
  state = setup.abstract_state()
  replicated = setup.replicated
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
  out = {}

  # update: one microbatch's ppo_train_step (forward/backward + both AdamW updates) ...
  mb = rollout.abstract_experience(micro_config, setup.batch_sharding, rows=micro_rows,
                                   keys=rollout.MINIBATCH_KEYS)
  out["train_micro_step"] = setup.minibatch_step.lower(state, mb, rng)
  # ... and the two AdamW updates alone (subtracted from it).
  policy_opt, value_opt = rollout.optimizers(config)

  def adamw(st, gp, gv):
    p, _ = apply_gradients(st.policy, gp, jnp.float32(1.0), policy_opt)
    v, _ = apply_gradients(st.value, gv, jnp.float32(1.0), value_opt)
    return ppo.PPOState(p, v)

  gp, gv = setup.policy.abstract_params, setup.value.abstract_params
  shard_of = lambda t: jax.tree.map(lambda x: x.sharding, t)
  out["adamw"] = sharding.jit_step(
      adamw, mesh, rules, in_shardings=(setup.state_shardings, shard_of(gp), shard_of(gv)),
      out_shardings=setup.state_shardings, donate_argnums=(0,)).lower(state, gp, gv)

  # reshard: training params -> generation layout in the compute dtype.
  gen_sh = sharding.param_shardings(cfg, mesh, gen_rules)
  cast = lambda t: jax.tree.map(lambda x: x.astype(cfg.compute_dtype)
                                if jnp.issubdtype(x.dtype, jnp.floating) else x, t)
  out["reshard"] = jax.jit(cast, in_shardings=(shard_of(gp),), out_shardings=gen_sh).lower(gp)

  # generation: one prefill chunk and one decode step on the generation layout.
  rows = int(pc.get("generation_batch_size", 0)) or int(pc.batch_size)
  p, m = int(pc.max_prompt_len), int(pc.max_new_tokens)
  chunk = sampling.PREFILL_CHUNK if p > sampling.PREFILL_CHUNK else p
  s = p + (-p % chunk) + m
  gen_params = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, cfg.compute_dtype,
                                                               sharding=sh),
                            sharding.param_shapes(cfg), gen_sh)
  gen_params = {**gen_params, "layers": _unstack_abstract(gen_params["layers"], mesh)}
  cache_sh = sharding.cache_shardings(cfg, mesh, gen_rules, rows, s)
  cache = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                       jax.eval_shape(functools.partial(model.init_cache, cfg, rows, s)), cache_sh)
  cache = model.KVCache(_unstack_abstract(cache.k, mesh), _unstack_abstract(cache.v, mesh),
                        cache.mask, cache.index)
  bsh = sharding.batch_sharding(mesh, gen_rules)
  sd = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=bsh)
  cache_shardings = shard_of(cache)
  temperature = float(pc.temperature)

  def prefill(params, kv, tokens, mask):
    return model.decode_step(params, tokens, cfg, kv, mask)

  out["prefill_chunk"] = sharding.jit_step(
      prefill, mesh, gen_rules,
      in_shardings=(shard_of(gen_params), cache_shardings, bsh, bsh),
      out_shardings=(bsh, cache_shardings), donate_argnums=(1,)).lower(
          gen_params, cache, sd((rows, chunk), jnp.int32), sd((rows, chunk), jnp.bool_))

  def decode(params, kv, logits, done, key, step):
    tok, lp = sampling.sample_logits(logits, jax.random.fold_in(key, step), temperature)
    tok = jnp.where(done, 0, tok)
    logits, kv = model.decode_step(params, tok[:, None], cfg, kv, (~done)[:, None])
    return logits, kv, tok, jnp.where(done, 0.0, lp)

  out["decode_step"] = sharding.jit_step(
      decode, mesh, gen_rules,
      in_shardings=(shard_of(gen_params), cache_shardings, bsh, bsh, replicated, replicated),
      out_shardings=(bsh, cache_shardings, bsh, bsh), donate_argnums=(1,)).lower(
          gen_params, cache, sd((rows, cfg.vocab_size), jnp.float32), sd((rows,), jnp.bool_), rng,
          jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated))

  # scoring: the reward models and make_experience over one forward chunk of rollouts
  # (``ppo.forward_batch_size``, 0 = the whole batch; the stage maps the chunks with lax.map, a
  # loop cost analysis would count once: costed per chunk, x chunks).
  b = score_rows(config)
  score_cfg = setup.ppo_cfg
  if hasattr(score_cfg, "forward_batch_size"):
    score_cfg = dataclasses.replace(score_cfg, forward_batch_size=0)
  batch_sh = setup.batch_sharding
  sb = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=batch_sh)
  batch = {"prompt_tokens": sb((b, p), jnp.int32), "prompt_mask": sb((b, p), jnp.bool_),
           "is_safety": sb((b,), jnp.bool_)}
  gen = sampling.GenerateOutput(sb((b, m), jnp.int32), sb((b, m), jnp.float32),
                                sb((b,), jnp.int32), sb((b,), jnp.bool_))
  rm = setup.value.abstract_params  # reward-model params (the value model's layout)
  with sharding.activate(mesh, rules):
    out["score_reward_models"] = jax.jit(functools.partial(
        ppo.rollout_rewards, reward_cfg=cfg, ppo_cfg=score_cfg)).lower(rm, rm, batch, gen)
    out["score_ref_value"] = jax.jit(functools.partial(
        ppo.make_experience, cfg=cfg, ppo_cfg=score_cfg, value_cfg=cfg)).lower(
            gp, gp, rm, batch, gen, sb((b,), jnp.float32))
  return out


def decode_step_bytes(config, cfg, mesh) -> Dict[str, float]:
  """Analytic HBM bytes per device of one decode step on a GPU (XLA:CPU's count is 5-6x this:
  with no bf16 dot it converts every bf16 weight to f32 each step, reading 2 B, writing 4 B and
  reading 4 B again). Terms: ``weights``, the generation-layout weight shard in the compute
  dtype, read once (every row's one token shares it); ``kv_cache_read``, the whole K/V buffer
  shard [L, rows, kv, s, h] (attention over the fixed-length masked cache, as the FLOPs count);
  ``kv_write``, one position of it; ``logits``, the f32 [rows, vocab] shard read twice by the
  sampler (softmax, draw) and written once. Per-layer activations (rows/device x (4 dim + 3
  ffn/tensor) x 2 B) are < 1% and left out."""
  import jax
  import jax.numpy as jnp

  from llama_jax import model, sampling, sharding
  from llama_jax.train.stage import shard_bytes

  rules = sharding.GENERATION_RULES
  pc = config.ppo
  rows = int(pc.get("generation_batch_size", 0)) or int(pc.batch_size)
  p, m = int(pc.max_prompt_len), int(pc.max_new_tokens)
  chunk = sampling.PREFILL_CHUNK if p > sampling.PREFILL_CHUNK else p
  s = p + (-p % chunk) + m
  params = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, cfg.compute_dtype, sharding=sh),
                        sharding.param_shapes(cfg), sharding.param_shardings(cfg, mesh, rules))
  cache = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                       jax.eval_shape(functools.partial(model.init_cache, cfg, rows, s)),
                       sharding.cache_shardings(cfg, mesh, rules, rows, s))
  logits = jax.ShapeDtypeStruct((rows, cfg.vocab_size), jnp.float32,
                                sharding=sharding.batch_sharding(mesh, rules))
  kv = float(shard_bytes((cache.k, cache.v)))
  return {"weights": float(shard_bytes(params)), "kv_cache_read": kv, "kv_write": kv / s,
          "logits": 3.0 * shard_bytes(logits)}


def score_rows(config) -> int:
  """Rows per scoring pass: ``ppo.forward_batch_size`` (0 or absent = the whole batch)."""
  b = int(config.ppo.batch_size)
  chunk = int(config.ppo.get("forward_batch_size", 0) or 0)
  return chunk if 0 < chunk < b else b
