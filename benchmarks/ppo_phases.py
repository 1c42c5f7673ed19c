"""CPU benchmark: PPO's scoring and update phases, the current path vs the previous one, A/B.

One process, the same weights and rollouts; the two paths alternate call by call (medians of the
timed calls after warm-up; compile excluded):

* ``previous``: old log-probs recomputed by a teacher-forced policy pass, and every log-prob from
  the full ``[b, s, v]`` logits sliced to the response (the code before issue 16).
* ``current``: the sampler's log-probs as the old ones (``PPOConfig.old_logprobs="sampler"``) and
  logits for the response positions only (``model.lm_head`` on the sliced hidden states).

Scoring = ``ppo.make_experience`` (policy pass (previous only), reference pass, value pass, GAE);
update = one epoch of ``ppo.ppo_train_step`` over the minibatches. Generation is the same code in
both and is timed once for scale. The default shapes are issue 16's: a 58M Llama (dim 512,
8 layers, vocab 32000), 16 prompts x 64 tokens, 64 sampled tokens, minibatch 16, one epoch.

Usage::

  python benchmarks/ppo_phases.py
  python benchmarks/ppo_phases.py --dim 256 --n_layers 4 --repeats 3
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import llama_jax as lj
from llama_jax.losses import token_entropy, token_logprobs
from llama_jax.ppo import step as ppo
from llama_jax.reward import step as reward
from llama_jax.sampling import sample


def previous_response_logprobs(params, tokens, positions, segment_ids, response_tokens, *, cfg,
                               temperature):
  """The pre-issue-16 ``ppo.response_logprobs``: full logits, then the response slice."""
  logits = lj.forward(params, tokens, cfg, positions=positions, segment_ids=segment_ids)
  m = response_tokens.shape[1]
  logits = logits[:, logits.shape[1] - m - 1:logits.shape[1] - 1] / temperature
  return token_logprobs(logits, response_tokens), token_entropy(logits)


def _timed(fn, *args):
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--dim", type=int, default=512)
  ap.add_argument("--n_layers", type=int, default=8)
  ap.add_argument("--vocab", type=int, default=32000)
  ap.add_argument("--prompts", type=int, default=16)
  ap.add_argument("--prompt_len", type=int, default=64)
  ap.add_argument("--new_tokens", type=int, default=64)
  ap.add_argument("--minibatch", type=int, default=16)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--repeats", type=int, default=5)
  args = ap.parse_args()

  cfg = lj.LlamaConfig(dim=args.dim, n_layers=args.n_layers, n_heads=8, n_kv_heads=8,
                       vocab_size=args.vocab, multiple_of=256,
                       max_seq_len=args.prompt_len + args.new_tokens)
  policy = lj.init_params(cfg, jax.random.key(0))
  ref = jax.tree.map(jnp.copy, policy)
  value = reward.init_reward_params(lj.init_params(cfg, jax.random.key(1)), jax.random.key(2))
  print(f"llama_jax PPO phases A/B | {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, jax {jax.__version__} | {cfg.num_params() / 1e6:.0f}M params, "
        f"{args.prompts} prompts x {args.prompt_len} + {args.new_tokens} tokens, minibatch "
        f"{args.minibatch}, 1 epoch, medians of {args.repeats} after {args.warmup} warm-up")

  rng = np.random.RandomState(0)
  prompts = jnp.asarray(rng.randint(3, args.vocab, (args.prompts, args.prompt_len)), jnp.int32)
  batch = {"prompt_tokens": prompts, "prompt_mask": jnp.ones(prompts.shape, bool)}
  gen_fn = jax.jit(functools.partial(sample, cfg=cfg, max_new_tokens=args.new_tokens,
                                     temperature=1.0, eos_id=-1, pad_id=0))
  gen = gen_fn(policy, prompts, batch["prompt_mask"], jax.random.key(3))
  t_gen = min(_timed(gen_fn, policy, prompts, batch["prompt_mask"], jax.random.key(3))
              for _ in range(2))
  rc = jnp.asarray(rng.uniform(0.05, 0.95, args.prompts), jnp.float32)

  base = ppo.PPOConfig(minibatch_size=args.minibatch)
  paths = {"previous": dataclasses.replace(base, old_logprobs="recompute"), "current": base}
  opt = optax.adamw(1e-6)
  fns = {}
  for name, pcfg in paths.items():
    patch = previous_response_logprobs if name == "previous" else ppo.response_logprobs

    def experience(policy, ref, value, batch, gen, rc, pcfg=pcfg, patch=patch):
      with _patched(patch):
        return ppo.make_experience(policy, ref, value, batch, gen, rc, cfg=cfg, ppo_cfg=pcfg)

    def update(state, exp, key, pcfg=pcfg, patch=patch):
      with _patched(patch):
        return ppo.ppo_update(state, exp, key, cfg=cfg, policy_opt=opt, value_opt=opt,
                              ppo_cfg=pcfg)
    fns[name] = (jax.jit(experience), jax.jit(update))

  state = ppo.init_ppo_state(policy, value, opt, opt)
  times = {name: {"scoring": [], "update": []} for name in paths}
  outs = {}
  for i in range(args.warmup + args.repeats):
    for name, (experience, update) in fns.items():
      t0 = time.perf_counter()
      exp, _ = jax.block_until_ready(experience(policy, ref, value, batch, gen, rc))
      t1 = time.perf_counter()
      new_state, metrics = jax.block_until_ready(update(state, exp, jax.random.key(4)))
      t2 = time.perf_counter()
      outs[name] = (exp, metrics)
      if i >= args.warmup:
        times[name]["scoring"].append(t1 - t0)
        times[name]["update"].append(t2 - t1)
      del new_state

  print(f"\ngeneration (same code in both): {t_gen:.2f} s\n")
  print("| path | scoring s | update s | scoring + update s |")
  print("|---|---|---|---|")
  med = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}
  for name in paths:
    s, u = med[name]["scoring"], med[name]["update"]
    print(f"| {name} | {s:.2f} | {u:.2f} | {s + u:.2f} |")
  prev, cur = med["previous"], med["current"]
  total = lambda m: m["scoring"] + m["update"]
  print(f"\ncurrent vs previous: scoring {prev['scoring'] / cur['scoring']:.2f}x, update "
        f"{prev['update'] / cur['update']:.2f}x, scoring + update {total(prev) / total(cur):.2f}x, "
        f"iteration incl. generation {(total(prev) + t_gen) / (total(cur) + t_gen):.2f}x")
  diff = float(jnp.max(jnp.abs(outs["previous"][0]["old_logprobs"] -
                               outs["current"][0]["old_logprobs"])))
  loss = abs(float(outs["previous"][1]["policy_loss"]) - float(outs["current"][1]["policy_loss"]))
  print(f"max |old log-prob difference| {diff:.2e}; |policy loss difference| {loss:.2e}")


class _patched:
  """Swap ``ppo.response_logprobs`` while a function is traced (jit traces once per path)."""

  def __init__(self, fn):
    self.fn = fn

  def __enter__(self):
    self.saved = ppo.response_logprobs
    ppo.response_logprobs = self.fn

  def __exit__(self, *exc):
    ppo.response_logprobs = self.saved


if __name__ == "__main__":
  main()
