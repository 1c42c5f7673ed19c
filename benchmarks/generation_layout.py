"""Decode throughput with FSDP-sharded weights vs the generation layout, on one emulated mesh.

The Llama 2 paper (Sec. 3.2.3, PPO training details) reports generation ~20x slower under FSDP,
fixed by consolidating the weights per node before generation and freeing them after. This script
measures the same choice with ``llama_jax``:

1. FSDP layout: the training params (``sharding.DEFAULT_RULES``: 'embed' split over 'fsdp',
   heads/mlp/vocab over 'tensor'), as built by ``sharding.init_params_sharded``.
2. Generation layout: ``sharding.to_generation_layout`` (``GENERATION_RULES``: no 'fsdp' split,
   heads/mlp/vocab over 'tensor', replicated over 'data' and 'fsdp'); its reshard time is
   measured and charged to every generate call in the "with reshard" row (one rollout batch
   per reshard, the worst case).

Both run ``llama_jax.sampling.sample`` (jitted prefill + ``lax.while_loop`` decode with a KV cache)
greedily with ``eos_id=-1`` (exactly ``new_tokens`` per row) inside ``sharding.jit_step`` with the
prompts split over ('data', 'fsdp'). Tokens/s = batch * new_tokens / wall time of one call
(prefill included, compile excluded; median and best of ``--repeats``, the layouts alternating;
the best is the better estimate when other processes load the machine). The greedy tokens of
both layouts are compared. The all-gather ops of each compiled program are counted: under FSDP
the layer body (run for every layer of every decode step) all-gathers each of its 7 weights;
in the generation layout only the vocab-parallel logits are gathered.

The devices are emulated (``--xla_force_host_platform_device_count``) on this machine's CPU cores:
collectives are memory copies, so the ratio shows the cost of re-gathering weights every step
relative to compute on one memory system, not a GPU interconnect. Usage::

  python benchmarks/generation_layout.py                    # dim 512, 8 layers, mesh 1,4,2
  python benchmarks/generation_layout.py --mesh 1,8,1 --new_tokens 32
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--devices", type=int, default=8, help="emulated CPU devices")
  p.add_argument("--mesh", default="1,4,2", help="data,fsdp,tensor sizes of the mesh")
  p.add_argument("--dim", type=int, default=512)
  p.add_argument("--n_layers", type=int, default=8)
  p.add_argument("--n_heads", type=int, default=8)
  p.add_argument("--n_kv_heads", type=int, default=None, help="None = n_heads (no GQA)")
  p.add_argument("--vocab_size", type=int, default=32000)
  p.add_argument("--multiple_of", type=int, default=256)
  p.add_argument("--batch", type=int, default=16, help="prompts per generate call")
  p.add_argument("--prompt_len", type=int, default=32)
  p.add_argument("--new_tokens", type=int, default=32)
  p.add_argument("--repeats", type=int, default=5, help="timed calls per layout")
  args = p.parse_args(argv)
  try:
    args.mesh = tuple(int(x) for x in args.mesh.split(","))
  except ValueError:
    p.error(f"--mesh must be three comma-separated ints, got {args.mesh!r}")
  for name in ("devices", "batch", "prompt_len", "new_tokens", "repeats"):
    if getattr(args, name) <= 0:
      p.error(f"--{name} must be positive")
  return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:  # the device count must be fixed before jax is imported
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={ARGS.devices}").strip()

import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from llama_jax import sampling, sharding  # noqa: E402
from llama_jax.config import LlamaConfig  # noqa: E402


def make_generate(cfg, mesh, rules, params, new_tokens):
  """sharding.jit_step of greedy ``sampling.sample`` for params laid out as ``params``."""
  batch_sh, repl = sharding.batch_sharding(mesh, rules), NamedSharding(mesh, P())

  def run(p, tokens, mask, key):
    return sampling.sample(p, tokens, mask, key, cfg=cfg, max_new_tokens=new_tokens,
                           temperature=0.0, eos_id=-1)

  return sharding.jit_step(
      run, mesh, rules, donate_argnums=(),
      in_shardings=(jax.tree.map(lambda x: x.sharding, params), batch_sh, batch_sh, repl),
      out_shardings=sampling.GenerateOutput(batch_sh, batch_sh, batch_sh, batch_sh))


def first_call(fn):
  """(seconds of the first call, compile included; its output)."""
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn())
  return time.perf_counter() - t0, out


def timed_call(fn, times):
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn())
  times.append(time.perf_counter() - t0)
  return out


def main(args):
  cfg = LlamaConfig(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
                    n_kv_heads=args.n_kv_heads, vocab_size=args.vocab_size,
                    multiple_of=args.multiple_of, max_seq_len=args.prompt_len + args.new_tokens)
  mesh = sharding.make_mesh(args.mesh)
  print(f"jax {jax.__version__} on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {jax.device_count()} emulated devices, mesh "
        f"{dict(mesh.shape)}")
  print(f"model: dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads ({cfg.kv_heads} kv), "
        f"vocab {cfg.vocab_size}, {cfg.num_params() / 1e6:.1f}M params (float32)")
  print(f"generate: batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
        f"greedy, {args.repeats} timed calls each")

  fsdp = sharding.init_params_sharded(cfg, jax.random.key(0), mesh, sharding.DEFAULT_RULES)
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, cfg.vocab_size, (args.batch, args.prompt_len), dtype=np.int32)
  batch_sh = sharding.batch_sharding(mesh)
  tokens = jax.device_put(tokens, batch_sh)
  mask = jax.device_put(np.ones((args.batch, args.prompt_len), bool), batch_sh)
  key = jax.random.key(1)
  n_tokens = args.batch * args.new_tokens

  gen_fsdp = make_generate(cfg, mesh, sharding.DEFAULT_RULES, fsdp, args.new_tokens)
  first_f, out_f = first_call(lambda: gen_fsdp(fsdp, tokens, mask, key))
  gen_shardings = sharding.param_shardings(cfg, mesh, sharding.GENERATION_RULES)
  first_r, gen = first_call(lambda: sharding.reshard(fsdp, gen_shardings))
  gen_gen = make_generate(cfg, mesh, sharding.GENERATION_RULES, gen, args.new_tokens)
  first_g, out_g = first_call(lambda: gen_gen(gen, tokens, mask, key))
  # Alternate the layouts, so that load from other processes hits both alike.
  times_f, times_r, times_g = [], [], []
  for _ in range(args.repeats):
    out_f = timed_call(lambda: gen_fsdp(fsdp, tokens, mask, key), times_f)
    del gen  # the previous copy is freed before the next reshard, as in an RL loop
    gen = timed_call(lambda: sharding.reshard(fsdp, gen_shardings), times_r)
    out_g = timed_call(lambda: gen_gen(gen, tokens, mask, key), times_g)

  same = bool(np.array_equal(np.asarray(out_f.tokens), np.asarray(out_g.tokens)))
  gathers = {}
  for name, fn, p in (("fsdp", gen_fsdp, fsdp), ("generation", gen_gen, gen)):
    hlo = fn.lower(p, tokens, mask, key).compile().as_text()
    gathers[name] = hlo.count(" all-gather(") + hlo.count(" all-gather-start(")
  t_f, t_r, t_g = (statistics.median(t) for t in (times_f, times_r, times_g))
  b_f, b_r, b_g = (min(t) for t in (times_f, times_r, times_g))
  per_device = lambda tree: sum(  # noqa: E731
      x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree)) / 2**20

  print()
  print("| layout                      | median s | tokens/s | best s | tokens/s | 1st call s "
        "| MiB/device | all-gathers |")
  print("|-----------------------------|---------:|---------:|-------:|---------:|-----------:"
        "|-----------:|------------:|")
  rows = (("FSDP (training layout)", t_f, b_f, f"{first_f:10.2f}", f"{per_device(fsdp):10.1f}",
           f"{gathers['fsdp']:11d}"),
          ("generation layout", t_g, b_g, f"{first_g:10.2f}", f"{per_device(gen):10.1f}",
           f"{gathers['generation']:11d}"),
          ("generation layout + reshard", t_g + t_r, b_g + b_r, " " * 10, " " * 10, " " * 11))
  for name, med, best, first, mib, ag in rows:
    print(f"| {name:<27} | {med:8.3f} | {n_tokens / med:8.1f} | {best:6.3f} | "
          f"{n_tokens / best:8.1f} | {first} | {mib} | {ag} |")
  print()
  print(f"reshard FSDP -> generation: median {t_r * 1e3:.1f} ms, best {b_r * 1e3:.1f} ms "
        f"(first call with compile {first_r:.2f} s)")
  print(f"decode times (s): fsdp {', '.join(f'{t:.3f}' for t in times_f)}; "
        f"generation {', '.join(f'{t:.3f}' for t in times_g)}")
  print(f"speedup of the generation layout (median / best): {t_f / t_g:.2f}x / {b_f / b_g:.2f}x "
        f"decode only, {t_f / (t_g + t_r):.2f}x / {b_f / (b_g + b_r):.2f}x reshard included")
  # Per decode step, every FSDP-split weight is all-gathered over 'fsdp' on every device.
  gathered = 0
  for x in jax.tree.leaves(fsdp):
    if any(a == "fsdp" or (isinstance(a, tuple) and "fsdp" in a) for a in x.sharding.spec):
      gathered += x.addressable_shards[0].data.nbytes * (mesh.shape["fsdp"] - 1)
  print(f"FSDP layout all-gathers {gathered / 2**20:.1f} MiB per device per decode step "
        f"({gathered * args.new_tokens / 2**30:.2f} GiB per device per generate call); "
        f"emulated devices copy it in shared memory, a GPU pod moves it over NVLink / the network")
  print(f"greedy tokens identical across layouts: {same}")
  return 0 if same else 1


if __name__ == "__main__":
  sys.exit(main(ARGS))
