"""CPU benchmark: one PPO iteration of llama_jax vs Tunix and TRL on identical work, by phase.

Work (the same in every system; the script asserts the counts): a Llama policy, a frozen
reference (a copy of the policy), a value model and a reward model (Llama trunk + scalar head) of
one shape (default issue 16's 58M: dim 512, 8 layers, 8 heads, 8 KV heads, vocab 32000, SwiGLU
hidden 1536 = ``LlamaConfig(multiple_of=256)``), float32; the same 16 prompts x 64 random token
ids (no padding); 64 sampled tokens per row at temperature 1.0 with no early stop (EOS disabled
or an id never sampled); one PPO epoch, minibatch 16 (one policy and one value gradient step per
minibatch), AdamW (lr 1e-6), KL coefficient 0.01. Weights are random and differ across systems
(each system's own initializer; only the reference equals its policy).

Phases, for every system: generation = sampling the responses (prefill + decode); scoring =
everything between generation and the first gradient step (reward-model score, reference
log-probs, values, old log-probs where the system recomputes them, KL-penalized rewards,
GAE/advantages); update = the optimizer steps of policy and value (forward, backward, AdamW).
Forward passes in scoring: llama_jax 3 (reference, value, reward; old log-probs from the
sampler), TRL 0.11.4 3 (the same; old log-probs from ``generate``'s scores), Tunix 0.1.7 4
(``PPOLearner`` also recomputes the old log-probs with a teacher-forced policy pass).

* llama_jax: ``sampling.sample``, ``ppo.rollout_rewards`` (helpfulness RM only),
  ``ppo.make_experience`` and ``ppo.ppo_update`` (state donated), each jitted once as the PPO
  stage does; compiled ahead of the timed calls (compile time printed separately).
* Tunix (``ppo_peer_tunix.py``): in this process, alternating with llama_jax iteration by
  iteration (A, B, A, B ...).
* TRL (``ppo_peer_trl.py``): ``PPOv2Trainer.train()`` in its own virtualenv, process-level A/B:
  a block of llama_jax iterations here, then a TRL process, ``--trl_rounds`` times; each TRL
  process runs ``--warmup`` + ``--repeats`` iterations and times the last ``--repeats``.

Medians of the timed iterations after the warm-up ones; the first iteration (compilation for the
JAX systems) is printed apart. Ratios are peer seconds / llama_jax seconds from the llama_jax
iterations paired with that peer (> 1: llama_jax is faster).

Setup (outside the repository; the project's own environment stays unchanged)::

  python -m venv --system-site-packages /work/venvs/tunix   # sees jax, flax, llama_jax
  /work/venvs/tunix/bin/pip install google-tunix==0.1.7 jax==0.10.2 jaxlib==0.10.2 \
      flax==0.12.8 optax==0.2.8
  python -m venv /work/venvs/trl
  # torch first: the CPU wheel (here a local one; elsewhere add
  # --index-url https://download.pytorch.org/whl/cpu), or pip pulls GBs of CUDA packages
  /work/venvs/trl/bin/pip install torch==2.13.0
  /work/venvs/trl/bin/pip install trl==0.11.4 transformers==4.45.2 "accelerate<1.2" \
      "datasets<3.2" "numpy<2.1" rich

Usage::

  /work/venvs/tunix/bin/python benchmarks/ppo_vs_peers.py
  /work/venvs/tunix/bin/python benchmarks/ppo_vs_peers.py --dim 128 --n_layers 2 --vocab 1000 \
      --repeats 2
  python benchmarks/ppo_vs_peers.py --peers trl        # without the Tunix virtualenv
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

import llama_jax as lj
from llama_jax.ppo import step as ppo
from llama_jax.reward import step as reward
from llama_jax.sampling import sample

HERE = os.path.dirname(os.path.abspath(__file__))
PHASES = ("generation", "scoring", "update")
SCORING_FORWARDS = {"llama_jax": 3, "tunix": 4, "trl": 3}


def n_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


class LlamaJaxPPO:
  """One llama_jax PPO iteration per call: ({phase: seconds}, counts)."""

  def __init__(self, cfg, prompts, args):
    policy = lj.init_params(cfg, jax.random.key(0))
    ref = jax.tree.map(jnp.copy, policy)
    value = reward.init_reward_params(lj.init_params(cfg, jax.random.key(1)), jax.random.key(2))
    self.rm = reward.init_reward_params(lj.init_params(cfg, jax.random.key(3)),
                                        jax.random.key(4))
    self.params = {"policy": n_params(policy), "value": n_params(value),
                   "reward": n_params(self.rm)}
    pcfg = ppo.PPOConfig(minibatch_size=args.minibatch)
    opt = optax.adamw(1e-6)
    self.ref, self.state = ref, ppo.init_ppo_state(policy, value, opt, opt)
    self.prompts = jnp.asarray(prompts, jnp.int32)
    self.batch = {"prompt_tokens": self.prompts, "prompt_mask": jnp.ones(prompts.shape, bool)}
    self.fns = {
        "generation": jax.jit(functools.partial(sample, cfg=cfg, max_new_tokens=args.new_tokens,
                                                temperature=1.0, eos_id=-1, pad_id=0)),
        "rewards": jax.jit(lambda rm, batch, gen: ppo.rollout_rewards(
            rm, None, batch, gen, reward_cfg=cfg, ppo_cfg=pcfg)),
        "experience": jax.jit(functools.partial(ppo.make_experience, cfg=cfg, ppo_cfg=pcfg)),
        "update": jax.jit(functools.partial(ppo.ppo_update, cfg=cfg, policy_opt=opt,
                                            value_opt=opt, ppo_cfg=pcfg), donate_argnums=0)}
    self.compile_s, self.i = {}, 0

  def _call(self, name, *args):
    """Run ``fns[name]``; compile it ahead on the first call (timed apart)."""
    fn = self.fns[name]
    if name not in self.compile_s:
      t0 = time.perf_counter()
      fn = self.fns[name] = fn.lower(*args).compile()
      self.compile_s[name] = time.perf_counter() - t0
    return jax.block_until_ready(fn(*args))

  def __call__(self):
    key = jax.random.fold_in(jax.random.key(5), self.i)
    self.i += 1
    policy = self.state.policy.params
    clock = lambda: time.perf_counter() - sum(self.compile_s.values())  # compile excluded
    t0 = clock()
    gen = self._call("generation", policy, self.prompts, self.batch["prompt_mask"], key)
    t1 = clock()
    rc, _ = self._call("rewards", self.rm, self.batch, gen)
    exp, _ = self._call("experience", policy, self.ref, self.state.value.params, self.batch,
                        gen, rc)
    t2 = clock()
    self.state, metrics = self._call("update", self.state, exp, jax.random.fold_in(key, 1))
    steps = int(jax.device_get(metrics["steps"]))
    t3 = clock()
    lengths = np.asarray(gen.lengths)
    counts = {"tokens": int(lengths.sum()), "min_row_tokens": int(lengths.min()),
              "policy_steps": steps, "value_steps": steps}
    return {"generation": t1 - t0, "scoring": t2 - t1, "update": t3 - t2}, counts


def check(name, counts, args):
  """Identical work: every row sampled new_tokens tokens; one step per minibatch, each model."""
  tokens, steps = args.prompts * args.new_tokens, args.prompts // args.minibatch
  assert counts["tokens"] == tokens and counts["min_row_tokens"] == args.new_tokens, (
      f"{name} generated {counts} tokens, expected {args.prompts} x {args.new_tokens}")
  assert counts["policy_steps"] == steps and counts["value_steps"] == steps, (
      f"{name} took {counts} gradient steps, expected {steps} each")


def run_trl(args, ffn_dim):
  """One TRL process; returns its JSON report (timed iterations after its warm-up)."""
  cmd = [args.trl_python, os.path.join(HERE, "ppo_peer_trl.py")] + [
      f"--{k}={v}" for k, v in [("dim", args.dim), ("n_layers", args.n_layers),
                                ("n_heads", args.n_heads), ("ffn_dim", ffn_dim),
                                ("vocab", args.vocab), ("prompts", args.prompts),
                                ("prompt_len", args.prompt_len), ("new_tokens", args.new_tokens),
                                ("minibatch", args.minibatch), ("warmup", args.warmup),
                                ("repeats", args.repeats)]]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode or not lines:
    raise RuntimeError(f"TRL process failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  return json.loads(lines[-1])


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  for name, default in [("dim", 512), ("n_layers", 8), ("n_heads", 8), ("vocab", 32000),
                        ("prompts", 16), ("prompt_len", 64), ("new_tokens", 64),
                        ("minibatch", 16), ("warmup", 2), ("repeats", 5), ("trl_rounds", 2)]:
    ap.add_argument(f"--{name}", type=int, default=default)
  ap.add_argument("--peers", default="tunix,trl", help="comma-separated subset of tunix,trl")
  ap.add_argument("--trl_python", default="/work/venvs/trl/bin/python",
                  help="python of the TRL virtualenv (see the docstring)")
  args = ap.parse_args()
  peers = [p for p in args.peers.split(",") if p]
  if args.prompts % args.minibatch:
    ap.error("--prompts must be a multiple of --minibatch")

  cfg = lj.LlamaConfig(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
                       n_kv_heads=args.n_heads, vocab_size=args.vocab, multiple_of=256,
                       max_seq_len=args.prompt_len + args.new_tokens)
  prompts = np.random.RandomState(0).randint(3, args.vocab, (args.prompts, args.prompt_len))
  versions = f"jax {jax.__version__}"
  if "tunix" in peers:
    try:
      from importlib.metadata import version
      sys.path.insert(0, HERE)
      import ppo_peer_tunix
      versions += f", google-tunix {version('google-tunix')}"
    except ImportError as e:
      print(f"Tunix not importable ({e}); run under /work/venvs/tunix/bin/python (see the "
            f"docstring). Skipping Tunix.")
      peers.remove("tunix")
  if "trl" in peers and not os.path.exists(args.trl_python):
    print(f"--trl_python {args.trl_python} does not exist (see the docstring). Skipping TRL.")
    peers.remove("trl")

  print(f"PPO iteration, llama_jax vs {', '.join(peers) or 'no peer'} | "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {versions} | "
        f"{cfg.num_params() / 1e6:.1f}M-param Llama (dim {args.dim}, {args.n_layers} layers, "
        f"{args.n_heads} heads, SwiGLU {cfg.ffn_hidden_dim}, vocab {args.vocab}), float32, "
        f"{args.prompts} prompts x {args.prompt_len} + {args.new_tokens} tokens, minibatch "
        f"{args.minibatch}, 1 epoch, medians of {args.repeats} after {args.warmup} warm-up")
  ours = LlamaJaxPPO(cfg, prompts, args)
  times = {}   # row name -> list of ({phase: s}) timed iterations
  first, params = {}, {"llama_jax": ours.params}

  def run(name, fn, i):
    t, counts = fn()
    check(name, counts, args)
    print(f"  {name} {'timed' if i >= args.warmup else 'warm-up'}: " + ", ".join(
        f"{p} {t[p]:.2f} s" for p in PHASES), file=sys.stderr, flush=True)
    if i == 0:
      first.setdefault(name.split(" ")[0], t)
    if i >= args.warmup:
      times.setdefault(name, []).append(t)
    return t

  warm = 0
  if "tunix" in peers:
    tx = ppo_peer_tunix.TunixPPO(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
                                 ffn_dim=cfg.ffn_hidden_dim, vocab=args.vocab, prompts=prompts,
                                 new_tokens=args.new_tokens, minibatch=args.minibatch)
    params["tunix"] = dict(tx.params, reward=tx.params["value"])
    for i in range(args.warmup + args.repeats):     # A, B, A, B ...
      run("llama_jax (A/B with Tunix)", ours, i)
      run("tunix", tx, i)
    warm = args.warmup + args.repeats
  if "trl" in peers:
    for i in range(warm, args.warmup):
      run("llama_jax", ours, i)
    for _ in range(args.trl_rounds):                 # process-level A/B
      for _ in range(args.repeats):
        run("llama_jax (A/B with TRL)", ours, args.warmup)
      try:
        rep = run_trl(args, cfg.ffn_hidden_dim)
      except RuntimeError as e:
        print(f"TRL failed, skipping it: {e}")
        break
      params["trl"] = rep["params"]
      for i, it in enumerate(rep["iterations"]):
        counts = dict(it, policy_steps=it["steps"], value_steps=it["steps"])
        check("trl", counts, args)
        if i == 0:
          first.setdefault("trl", it)
        if i >= rep["warmup"]:
          times.setdefault("trl", []).append({p: it[p] for p in PHASES})
      v = rep["versions"]
      print(f"TRL process (pid {rep['pid']}): trl {v['trl']}, torch {v['torch']}, transformers "
            f"{v['transformers']}, {rep['threads']} torch threads, {rep['wall_s']:.0f} s")

  # ---- identical work --------------------------------------------------------------------------
  for name, p in params.items():
    if name == "llama_jax":
      continue
    # llama_jax's scalar head has a bias (+1 parameter); Tunix's and HF's have none.
    assert p["policy"] == ours.params["policy"], (name, p, ours.params)
    assert p["value"] == p["reward"] == ours.params["value"] - 1, (name, p, ours.params)
  print(f"\nidentical work (asserted each iteration): {args.prompts} x {args.new_tokens} = "
        f"{args.prompts * args.new_tokens} generated tokens, {args.prompts // args.minibatch} "
        f"policy + {args.prompts // args.minibatch} value gradient step(s) per iteration; params "
        + "; ".join(f"{n} policy {p['policy']:,} / value {p['value']:,} / reward {p['reward']:,}"
                    for n, p in params.items())
        + " (llama_jax's scalar head has a bias)")
  print("weights: random, per system (llama_jax init_params, Tunix nnx initializers, HF "
        "_init_weights); each reference is a copy of its policy")
  print("llama_jax compile (excluded): " + ", ".join(
      f"{k} {v:.1f} s" for k, v in ours.compile_s.items()))

  # ---- tables ----------------------------------------------------------------------------------
  med = {n: {p: statistics.median(t[p] for t in ts) for p in PHASES} for n, ts in times.items()}
  print("\n| system | generation s | scoring s | update s | iteration s | scoring forwards "
        "| timed iterations |\n|---|---|---|---|---|---|---|")
  for n, m in med.items():
    print(f"| {n} | {m['generation']:.2f} | {m['scoring']:.2f} | {m['update']:.2f} | "
          f"{sum(m.values()):.2f} | {SCORING_FORWARDS[n.split(' ')[0]]} | {len(times[n])} |")
  pairs = [("tunix", "llama_jax (A/B with Tunix)"), ("trl", "llama_jax (A/B with TRL)")]
  print("\n| peer s / llama_jax s | generation | scoring | update | iteration |\n"
        "|---|---|---|---|---|")
  for peer, base in pairs:
    if peer in med:
      a, b = med[base], med[peer]
      print(f"| {peer} | " + " | ".join(f"{b[p] / a[p]:.2f}x" for p in PHASES)
            + f" | {sum(b.values()) / sum(a.values()):.2f}x |")
  print("\nfirst iteration, not in the medians (Tunix: includes its tracing and compilation; "
        "llama_jax: compiled ahead, excluded; TRL: eager, first-call overheads):")
  for n, t in first.items():
    print(f"  {n}: " + ", ".join(f"{p} {t[p]:.2f} s" for p in PHASES))


if __name__ == "__main__":
  warnings.filterwarnings("ignore", message="scatter inputs have incompatible types")
  main()
