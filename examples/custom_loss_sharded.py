"""A custom loss (cross-entropy plus a z-loss on the logits) trained with AdamW on a device mesh.

The loss is written over the public ``llama_jax.forward`` and ``llama_jax.losses``; ``jax.grad``
of it runs sharded via ``llama_jax.sharding``: a (data, fsdp, tensor) mesh sized from
``jax.device_count()``, params and AdamW state created sharded, the batch split over (data,
fsdp), the step jitted by ``jit_step`` (explicit shardings, donation, activation constraints).

Run from the repo root (after ``pip install -e .``; ~20 s on 2 CPU cores), on 8 emulated devices
or on whatever devices there are (one CPU device: a 1x1x1 mesh):
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/custom_loss_sharded.py
  python examples/custom_loss_sharded.py
"""

import json

import jax, jax.numpy as jnp, optax
from llama_jax import losses, sharding
import llama_jax as lj

Z_LOSS = 1e-4  # weight of mean(logsumexp(logits)^2): PaLM's z-loss, keeps the normalizer near 1
STEPS = 12


def loss_fn(params, tokens, cfg):
  """(next-token cross-entropy + Z_LOSS * z^2, (cross-entropy, z-loss)) of a [b, t] batch."""
  logits = lj.forward(params, tokens[:, :-1], cfg)
  nll_sum, count = losses.cross_entropy(logits, tokens[:, 1:], jnp.ones(tokens[:, 1:].shape))
  z_loss = Z_LOSS * jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)
  return nll_sum / count + z_loss, (nll_sum / count, z_loss)


def train_step(params, opt_state, tokens, *, cfg, opt):
  (loss, (ce, z)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens, cfg)
  updates, opt_state = opt.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, {"loss": loss, "ce": ce, "z_loss": z}


n = jax.device_count()
tensor = 2 if n % 2 == 0 else 1  # <= n_kv_heads (2) of the tiny config
data = 2 if (n // tensor) % 2 == 0 and n // tensor > 2 else 1
mesh, rules = sharding.make_mesh((data, -1, tensor)), sharding.DEFAULT_RULES  # fsdp: the rest
cfg, opt = lj.LlamaConfig.tiny(), optax.adamw(3e-3, weight_decay=0.1)
params = sharding.init_params_sharded(cfg, jax.random.key(0), mesh, rules)
param_sh = sharding.param_shardings(cfg, mesh, rules)
opt_sh = sharding.state_shardings(jax.eval_shape(opt.init, params), param_sh, mesh)
opt_state = jax.jit(opt.init, out_shardings=opt_sh)(params)
batch_sh, replicated = sharding.batch_sharding(mesh, rules), jax.NamedSharding(mesh, jax.P())
step = sharding.jit_step(lambda p, o, t: train_step(p, o, t, cfg=cfg, opt=opt), mesh, rules,
                         in_shardings=(param_sh, opt_sh, batch_sh),
                         out_shardings=(param_sh, opt_sh, replicated), donate_argnums=(0, 1))
tokens = jax.device_put(jax.random.randint(jax.random.key(1), (8, 65), 0, cfg.vocab_size),
                        batch_sh)  # one random batch: the loss falls as the model memorizes it
wq = lambda p: p["layers"]["attention"]["wq"]  # [L, d, n, h]: d over fsdp, heads over tensor
print(f"mesh {dict(mesh.shape)}: wq {wq(params).shape} {wq(params).sharding.spec}, shard "
      f"{wq(params).addressable_shards[0].data.shape} per device; tokens {tokens.sharding.spec}")
history = []
for i in range(STEPS):
  params, opt_state, m = step(params, opt_state, tokens)  # donated: old params are freed
  history.append({k: float(m[k]) for k in ("loss", "ce", "z_loss")})
  print(f"step {i}: " + " ".join(f"{k} {v:.4f}" for k, v in history[-1].items()), flush=True)
print("RESULT " + json.dumps({
    "mesh": dict(mesh.shape), "first_loss": history[0]["loss"], "last_loss": history[-1]["loss"],
    "z_loss": history[-1]["z_loss"], "wq_spec": str(wq(params).sharding.spec),
    "wq_shard_shape": wq(params).addressable_shards[0].data.shape,
    "adam_mu_wq_spec": str(wq(opt_state[0].mu).sharding.spec)}))  # AdamW's mu: sharded as wq
