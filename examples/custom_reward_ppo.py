"""A custom reward in PPO: the world oracle's gold reward minus a penalty per response token.

Drives the pure PPO functions (``llama_jax.ppo.step``) from your own loop, with your own reward in
place of the reward models: ``sampling.sample``, any [b] reward ``rc`` in (0, 1) computed on the
host (``make_experience`` whitens ``logit(rc)``), ``make_experience``, ``ppo_update``. A tiny
random policy on the synthetic world, 3 iterations.

Run from the repo root (after ``pip install -e .``; ~1 min on 2 CPU cores):
  python examples/custom_reward_ppo.py
"""

import functools, json, pathlib, tempfile
import jax, jax.numpy as jnp, numpy as np, optax
from llama_jax import sampling
import llama_jax as lj
from llama_jax.data import world, world_tokenizer
from llama_jax.ppo import step as ppo
from llama_jax.reward import scoring
from llama_jax.reward import step as reward

B, M, ITERATIONS, PENALTY = 16, 12, 3, 0.005  # rollouts, max new tokens, iterations, per token


def length_penalized_reward(prompts, texts, lengths):
  """(gold reward (0.1 .. 0.9) minus PENALTY per response token, clipped into (0, 1); gold)."""
  gold = scoring.oracle_scores(prompts, texts)["rc"]
  return np.clip(gold - PENALTY * np.asarray(lengths), 0.01, 0.99), gold


tok = lj.Tokenizer(world_tokenizer.train_tokenizer(  # the world's 320-piece BPE (~3 s)
    pathlib.Path(tempfile.mkdtemp()) / "tokenizer.model", world.WorldConfig(), vocab_size=320))
cfg = lj.LlamaConfig.tiny(vocab_size=tok.vocab_size, max_seq_len=128)
records = world.sample_prompts(world.WorldConfig(), "train", B * ITERATIONS)
tokens, mask = sampling.left_pad([tok.encode_dialog(r["prompt"])[0] for r in records], tok.pad_id)
policy = lj.init_params(cfg, jax.random.key(0))
# A random model never ends its answers: a constant residual direction (embedding dim 0) that
# lifts the EOS logit makes rollouts stop at various lengths, as an SFT policy's do.
policy["tok_embeddings"] = policy["tok_embeddings"].at[:, 0].set(10.0)
policy["output"] = policy["output"].at[0].set(0.0).at[0, tok.eos_id].set(0.3)
value = ppo.reset_value_head(reward.init_reward_params(lj.init_params(cfg, jax.random.key(1)),
                                                       jax.random.key(2)))
pcfg, opt = ppo.PPOConfig(beta=0.05, minibatch_size=8), optax.adam(1e-3)
state, ref = ppo.init_ppo_state(policy, value, opt, opt), policy  # reference = starting policy
experience = jax.jit(functools.partial(ppo.make_experience, cfg=cfg, ppo_cfg=pcfg))
update = jax.jit(functools.partial(ppo.ppo_update, cfg=cfg, policy_opt=opt, value_opt=opt,
                                   ppo_cfg=pcfg))
history = []
for it in range(ITERATIONS):
  rows = slice(it * B, (it + 1) * B)  # fresh prompts, same padded shape: everything compiles once
  batch = {"prompt_tokens": jnp.asarray(tokens[rows]), "prompt_mask": jnp.asarray(mask[rows]),
           "is_safety": jnp.asarray([r["is_safety"] for r in records[rows]])}
  k_gen, k_upd = jax.random.split(jax.random.key(100 + it))
  gen = sampling.sample(state.policy.params, batch["prompt_tokens"], batch["prompt_mask"], k_gen,
                        cfg=cfg, max_new_tokens=M, temperature=pcfg.temperature,
                        eos_id=tok.eos_id, pad_id=tok.pad_id)
  rc, gold = length_penalized_reward([r["prompt"] for r in records[rows]],
                                     sampling.decode(gen, tok), gen.lengths)
  exp, stats = experience(state.policy.params, ref, state.value.params, batch, gen,
                          jnp.asarray(rc, jnp.float32))
  state, upd = update(state, exp, k_upd)
  history.append({k: float(v) for k, v in dict(
      reward=rc.mean(), gold=gold.mean(), length=stats["response_length"],
      eos_rate=stats["eos_rate"], kl=stats["kl"], approxkl=upd["approxkl"]).items()})
  print(f"iter {it}: " + " ".join(f"{k} {v:.4g}" for k, v in history[-1].items()), flush=True)
moved = max(float(jnp.max(jnp.abs(a - b)))
            for a, b in zip(jax.tree.leaves(state.policy.params), jax.tree.leaves(ref)))
print("RESULT " + json.dumps({"iterations": history, "penalty": PENALTY, "policy_change": moved}))
