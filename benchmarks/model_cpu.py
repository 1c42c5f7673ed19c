"""CPU benchmark: llama_jax vs Hugging Face transformers (PyTorch eager) on one small Llama 2.

Both systems run in ONE process on the same weights: an HF ``LlamaForCausalLM`` is built in
float32, saved with ``save_pretrained`` to a temporary directory and loaded into our params with
``llama_jax.convert.load_hf``. Two measurements:

1. Training throughput (tokens/s = batch * seq_len / step time): one AdamW step on the mean
   next-token cross-entropy. llama_jax: ``jax.value_and_grad`` of ``llama_jax.forward`` + an
   ``optax.adamw`` update, the whole step one ``jax.jit`` with params and optimizer state donated.
   HF: ``loss.backward()`` + ``torch.optim.AdamW.step()`` in eager mode. Warmup steps (the jit
   compile included) are excluded; the median of the timed steps is reported.
2. Greedy decoding (tokens/s = batch * new_tokens / wall time of one generate call, prefill
   included): ``llama_jax.generate(..., temperature=0.0)`` (jitted prefill + ``lax.while_loop``
   decode with a KV cache; the first call's compile is excluded and reported apart) vs
   ``model.generate(..., do_sample=False, use_cache=True)`` under ``torch.no_grad``. No EOS can
   stop either (llama_jax ``eos_id=-1``; HF ``eos_token_id=None``), so both generate exactly
   ``new_tokens`` per row; the counts and the agreement of the greedy tokens are printed.
3. Rejection sampling's generation (``--rs_k K``, default 8; 0 skips it): K temperature-1
   samples for each of ``--rs_prompts`` prompts of ``--rs_prompt_len`` tokens (tokens/s =
   prompts * K * rs_new_tokens / wall time). llama_jax ``generate(..., num_samples=K)`` prefills
   each prompt once and copies its cache K times; HF ``generate(do_sample=True,
   num_return_sequences=K)`` expands the prompts K times before its prefill. The llama_jax run
   with the prompts repeated K times (K prefills, as HF) is timed too, to show what the single
   prefill is worth. Samples differ between systems (different RNGs); the counts are checked.

Usage::

  python benchmarks/model_cpu.py                 # dim 512, 8 layers, 60M params, all cores
  taskset -c 0 python benchmarks/model_cpu.py    # one core, one thread per system
  python benchmarks/model_cpu.py --unrolled      # LlamaConfig(scan_layers=False)
  python benchmarks/model_cpu.py --dim 256 --n_layers 4 --n_kv_heads 2 --train_steps 3

The default run took 65-90 s on this project's 2-core machine when it was otherwise idle, ~2.5 min
pinned to one core, and up to 8 min while other jobs loaded the cores.

PyTorch runs with ``torch.set_num_threads(n)``, n = the CPUs this process may use
(``os.cpu_count()`` unless pinned); XLA's CPU client uses them all by default. On a machine shared
with other jobs, PyTorch's OpenMP threads wait on each other at every op (a 1 MB elementwise
multiply measured 5.4 ms with 2 threads vs 0.12 ms with 1 under load average ~5 on 2 cores), so
wall times of both systems swing by 2-10x; ``taskset -c 0 python benchmarks/model_cpu.py`` (one
core, one thread each) gives steadier ratios. The CPU-second columns are printed for the same
reason.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers
from transformers.utils import logging as hf_logging

from llama_jax import convert
import llama_jax as lj


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dim", type=int, default=512)
  p.add_argument("--n_layers", type=int, default=8)
  p.add_argument("--n_heads", type=int, default=8)
  p.add_argument("--n_kv_heads", type=int, default=None, help="None = n_heads (no GQA)")
  p.add_argument("--vocab_size", type=int, default=32000)
  p.add_argument("--multiple_of", type=int, default=256, help="FFN hidden size rounding (Meta)")
  p.add_argument("--unrolled", action="store_true",
                 help="LlamaConfig(scan_layers=False): layers unrolled instead of nn.scan")
  p.add_argument("--init_std", type=float, default=0.05,
                 help="std of the random matrices (HF initializer_range); at HF's default 0.02 "
                      "greedy decoding of random weights degenerates into repeating a token")
  p.add_argument("--seed", type=int, default=0)
  # Training.
  p.add_argument("--train_batch", type=int, default=8)
  p.add_argument("--seq_len", type=int, default=256)
  p.add_argument("--warmup_steps", type=int, default=2)
  p.add_argument("--train_steps", type=int, default=5, help="timed steps (median reported)")
  p.add_argument("--lr", type=float, default=1e-4)
  p.add_argument("--weight_decay", type=float, default=0.1)
  # Decoding.
  p.add_argument("--gen_batch", type=int, default=8)
  p.add_argument("--prompt_len", type=int, default=64)
  p.add_argument("--new_tokens", type=int, default=128)
  p.add_argument("--gen_repeats", type=int, default=3, help="timed generate calls (median)")
  # Rejection sampling's generation (K samples per prompt).
  p.add_argument("--rs_k", type=int, default=8, help="samples per prompt (0 = skip)")
  p.add_argument("--rs_prompts", type=int, default=4)
  p.add_argument("--rs_prompt_len", type=int, default=256)
  p.add_argument("--rs_new_tokens", type=int, default=32)
  p.add_argument("--skip_train", action="store_true")
  p.add_argument("--skip_decode", action="store_true")
  args = p.parse_args(argv)
  for name in ("train_batch", "seq_len", "train_steps", "gen_batch", "prompt_len", "new_tokens",
               "gen_repeats", "rs_prompts", "rs_prompt_len", "rs_new_tokens"):
    if getattr(args, name) <= 0:
      p.error(f"--{name} must be positive")
  if args.warmup_steps < 1:
    p.error("--warmup_steps must be >= 1 (the first step compiles)")
  return args


def _cpu_seconds() -> float:
  """User + system CPU time of this process (all threads)."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _timed(fn):
  """(fn(), wall seconds, process CPU seconds)."""
  c0, t0 = _cpu_seconds(), time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0, _cpu_seconds() - c0


# ---- shared weights ------------------------------------------------------------------------------
def build_models(args):
  """(HF model, our config, our params on device) with identical float32 weights."""
  cfg = lj.LlamaConfig(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
                       n_kv_heads=args.n_kv_heads, vocab_size=args.vocab_size,
                       multiple_of=args.multiple_of,
                       max_seq_len=max(args.seq_len, args.prompt_len + args.new_tokens,
                                       args.rs_prompt_len + args.rs_new_tokens),
                       scan_layers=not args.unrolled)
  hf_dict = {k: v for k, v in cfg.to_hf_config().items()
             if k not in ("architectures", "torch_dtype")}
  hf_cfg = transformers.LlamaConfig(**hf_dict, initializer_range=args.init_std)
  torch.manual_seed(args.seed)
  model = transformers.LlamaForCausalLM(hf_cfg).to(torch.float32)
  with tempfile.TemporaryDirectory() as tmp:
    model.save_pretrained(tmp)
    cfg_loaded, np_params = convert.load_hf(tmp, dtype="float32")
  cfg_loaded = cfg_loaded.replace(max_seq_len=cfg.max_seq_len, scan_layers=cfg.scan_layers)
  if cfg_loaded != cfg:
    raise RuntimeError(f"config round trip changed: {cfg_loaded} vs {cfg}")
  params = jax.device_put(np_params)
  return model, cfg, params


# ---- training ------------------------------------------------------------------------------------
def jax_loss(params, tokens, cfg):
  """Mean next-token cross-entropy over [b, t-1] predictions (float32)."""
  logits = lj.forward(params, tokens[:, :-1], cfg)
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def make_jax_train_step(cfg, args):
  """(jitted step(params, opt_state, tokens) -> (params, opt_state, loss), optimizer)."""
  opt = optax.adamw(args.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=args.weight_decay)

  def step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(jax_loss)(params, tokens, cfg)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1)), opt


def bench_train(model, params, cfg, batches, args):
  """Alternates one llama_jax step and one HF step per batch, so load from other processes hits
  both alike. Returns (jax runs, hf runs), each a list of (loss, wall s, CPU s) per batch."""
  step, opt = make_jax_train_step(cfg, args)
  params = jax.tree.map(jnp.copy, params)  # the step donates its inputs
  opt_state = opt.init(params)
  model.train()
  torch_opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=args.weight_decay)
  state = [params, opt_state]

  def jax_step(tokens):
    state[0], state[1], loss = step(state[0], state[1], tokens)
    return float(loss)  # blocks

  def hf_step(ids):
    torch_opt.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)  # HF shifts labels: mean over [b, t-1] predictions
    out.loss.backward()
    torch_opt.step()
    return out.loss.item()

  jax_runs, hf_runs = [], []
  for tokens in batches:
    jtokens, ids = jnp.asarray(tokens), torch.from_numpy(tokens).long()
    jax_runs.append(_timed(lambda: jax_step(jtokens)))
    hf_runs.append(_timed(lambda: hf_step(ids)))
  return jax_runs, hf_runs


# ---- decoding ------------------------------------------------------------------------------------
def bench_decode(model, params, cfg, prompts, args):
  """Alternating timed greedy generate calls. Returns (jax first-call wall s, jax runs, hf runs
  (lists of (None, wall s, CPU s)), jax tokens [b, m], jax lengths [b], hf tokens [b, m])."""
  key = jax.random.key(0)
  prompt_list = prompts.tolist()
  ids = torch.from_numpy(prompts).long()
  hf_kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
               do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0,
               temperature=None, top_p=None, top_k=None)

  def run_jax():
    out = lj.generate(params, cfg, prompt_list, key, max_new_tokens=args.new_tokens,
                      temperature=0.0, eos_id=-1)  # no token id is -1: exactly m tokens per row
    return jax.block_until_ready(out)

  def run_hf():
    with torch.no_grad():
      return model.generate(ids, **hf_kw)

  model.eval()
  jout, first, _ = _timed(run_jax)
  hout = run_hf()  # warmup
  jax_runs, hf_runs = [], []
  for _ in range(args.gen_repeats):
    jout, wall, cpu = _timed(run_jax)
    jax_runs.append((None, wall, cpu))
    hout, wall, cpu = _timed(run_hf)
    hf_runs.append((None, wall, cpu))
  return (first, jax_runs, hf_runs, np.asarray(jout.tokens), np.asarray(jout.lengths),
          hout[:, ids.shape[1]:].numpy())


def bench_rs(model, params, cfg, prompts, args):
  """Alternating timed calls of K samples per prompt: llama_jax with one prefill per prompt
  (``num_samples=K``), llama_jax with the prompts repeated K times, HF ``num_return_sequences``.
  Returns {name: runs} (lists of (generated tokens, wall s, CPU s))."""
  k, m = args.rs_k, args.rs_new_tokens
  prompt_list = prompts.tolist()
  repeated = [p for p in prompt_list for _ in range(k)]
  ids = torch.from_numpy(prompts).long()
  hf_kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=m, min_new_tokens=m,
               do_sample=True, temperature=1.0, top_p=1.0, top_k=0, num_return_sequences=k,
               use_cache=True, eos_token_id=None, pad_token_id=0)

  def run_jax(prompts_, n):
    out = jax.block_until_ready(lj.generate(params, cfg, prompts_, jax.random.key(1),
                                            max_new_tokens=m, temperature=1.0, eos_id=-1,
                                            num_samples=n))
    return int(np.asarray(out.lengths).sum())

  def run_hf():
    with torch.no_grad():
      return int(model.generate(ids, **hf_kw)[:, ids.shape[1]:].numel())

  systems = {"llama_jax, one prefill per prompt": lambda: run_jax(prompt_list, k),
             "llama_jax, prompts repeated K times": lambda: run_jax(repeated, 1),
             "HF num_return_sequences": run_hf}
  model.eval()
  for fn in systems.values():  # compile / warm up
    fn()
  runs = {name: [] for name in systems}
  for _ in range(args.gen_repeats):
    for name, fn in systems.items():
      runs[name].append(_timed(fn))
  return runs


# ---- report --------------------------------------------------------------------------------------
def _fmt(values, digits=3):
  return ", ".join(f"{v:.{digits}f}" for v in values)


def _medians(runs):
  """(median wall s, median CPU s) of [(result, wall, cpu), ...]."""
  return statistics.median(r[1] for r in runs), statistics.median(r[2] for r in runs)


_HEADER = ("| benchmark           | jax tok/s | HF tok/s  | jax/HF | jax tok/CPU-s | HF tok/CPU-s "
           "| jax/HF |\n|---------------------|-----------|-----------|--------|---------------|"
           "--------------|--------|")


def _row(name, tokens, jax_runs, hf_runs):
  """Table row: tokens/s (median wall) and tokens per CPU-second (median) of both systems."""
  (jw, jc), (hw, hc) = _medians(jax_runs), _medians(hf_runs)
  return (f"| {name:<19} | {tokens / jw:>9,.1f} | {tokens / hw:>9,.1f} | {hw / jw:>5.2f}x | "
          f"{tokens / jc:>13,.1f} | {tokens / hc:>12,.1f} | {hc / jc:>5.2f}x |")


def _describe(cfg, args, model) -> str:
  """Two lines: the model and the machine."""
  n_cpu = len(os.sched_getaffinity(0))
  return (f"model: dim={cfg.dim} n_layers={cfg.n_layers} n_heads={cfg.n_heads} "
          f"kv_heads={cfg.kv_heads} vocab={cfg.vocab_size} ffn_hidden={cfg.ffn_hidden_dim} "
          f"params={cfg.num_params() / 1e6:.1f}M float32 scan_layers={cfg.scan_layers} "
          f"init_std={args.init_std}\n"
          f"machine: {platform.machine()}, {os.cpu_count()} CPUs ({n_cpu} usable by this process), "
          f"load average {os.getloadavg()[0]:.1f} | python {platform.python_version()} | "
          f"jax {jax.__version__} ({jax.devices()[0].platform}, {jax.device_count()} device; "
          f"llama_jax from {os.path.dirname(lj.__file__)}) | torch {torch.__version__} "
          f"(torch.set_num_threads({n_cpu}) -> {torch.get_num_threads()} threads) | "
          f"transformers {transformers.__version__} "
          f"(attn_implementation={model.config._attn_implementation})")


def main(argv=None):
  args = parse_args(argv)
  torch.set_num_threads(len(os.sched_getaffinity(0)))  # = os.cpu_count() unless pinned
  hf_logging.disable_progress_bar()
  t_start = time.perf_counter()
  model, cfg, params = build_models(args)
  print(_describe(cfg, args, model))
  rng = np.random.default_rng(args.seed)
  rows = []

  if not args.skip_decode:  # first, while both hold the same (untrained) weights
    prompts = rng.integers(3, cfg.vocab_size, (args.gen_batch, args.prompt_len), dtype=np.int32)
    first, jr, hr, jtok, jlen, htok = bench_decode(model, params, cfg, prompts, args)
    print(f"\n[decode] greedy, batch {args.gen_batch}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, {args.gen_repeats} timed calls each, alternating "
          "(prefill included)")
    compile_s = first - min(r[1] for r in jr)
    print(f"  llama_jax wall s: first call {first:.2f} (compile ~{compile_s:.2f}), "
          f"timed {_fmt(r[1] for r in jr)}; CPU s {_fmt(r[2] for r in jr)}")
    print(f"  HF        wall s: timed {_fmt(r[1] for r in hr)}; CPU s {_fmt(r[2] for r in hr)}")
    print(f"  generated tokens: llama_jax {int(jlen.sum())} (shape {jtok.shape}), "
          f"HF {htok.size} (shape {htok.shape}); equal: {int(jlen.sum()) == htok.size}")
    if jtok.shape == htok.shape:
      agree = jtok == htok
      first_diff = [int(np.argmin(r)) if not r.all() else r.size for r in agree]
      print(f"  greedy agreement: {agree.mean():.1%} of tokens; first mismatch per row "
            f"({args.new_tokens} = none): {first_diff}")
    print(f"  row 0 first 8: llama_jax {jtok[0, :8].tolist()} | HF {htok[0, :8].tolist()}")
    rows.append(_row("greedy decode", args.gen_batch * args.new_tokens, jr, hr))

  if args.rs_k > 0:
    prompts = rng.integers(3, cfg.vocab_size, (args.rs_prompts, args.rs_prompt_len),
                           dtype=np.int32)
    runs = bench_rs(model, params, cfg, prompts, args)
    tokens = args.rs_prompts * args.rs_k * args.rs_new_tokens
    print(f"\n[rejection sampling] {args.rs_prompts} prompts x {args.rs_prompt_len} tokens, "
          f"K={args.rs_k} samples of {args.rs_new_tokens} tokens at T=1, {args.gen_repeats} "
          "timed calls each, alternating (prefill included)")
    for name, r in runs.items():
      print(f"  {name:<36} wall s {_fmt(x[1] for x in r)}; CPU s {_fmt(x[2] for x in r)}; "
            f"generated tokens {r[-1][0]} (expected {tokens})")
      if r[-1][0] != tokens:
        raise RuntimeError(f"{name} generated {r[-1][0]} tokens, expected {tokens}")
    hf = runs["HF num_return_sequences"]
    rows.append(_row(f"RS sample K={args.rs_k}", tokens,
                     runs["llama_jax, one prefill per prompt"], hf))
    rows.append(_row("  (jax: K prefills)", tokens, runs["llama_jax, prompts repeated K times"],
                     hf))

  if not args.skip_train:
    n = args.warmup_steps + args.train_steps
    batches = [rng.integers(3, cfg.vocab_size, (args.train_batch, args.seq_len), dtype=np.int32)
               for _ in range(n)]
    jr, hr = bench_train(model, params, cfg, batches, args)
    w = args.warmup_steps
    print(f"\n[train] batch {args.train_batch} x {args.seq_len} tokens, AdamW, {w} warmup + "
          f"{args.train_steps} timed steps each, alternating")
    print(f"  llama_jax wall s: first (compile + run) {jr[0][1]:.2f}, timed "
          f"{_fmt(r[1] for r in jr[w:])}; CPU s {_fmt(r[2] for r in jr[w:])}")
    print(f"  HF        wall s: first {hr[0][1]:.2f}, timed {_fmt(r[1] for r in hr[w:])}; "
          f"CPU s {_fmt(r[2] for r in hr[w:])}")
    jl, hl = [r[0] for r in jr], [r[0] for r in hr]
    print(f"  loss per step: llama_jax {_fmt(jl, 4)} | HF {_fmt(hl, 4)} "
          f"(max |diff| {max(abs(a - b) for a, b in zip(jl, hl)):.1e})")
    rows.append(_row("train fwd+bwd+AdamW", args.train_batch * args.seq_len, jr[w:], hr[w:]))

  print("\n" + _HEADER)
  print("\n".join(rows))
  print("tok/s = tokens / median wall time per step (train) or per generate call (decode, "
        "prefill included);\ntok/CPU-s = tokens / median process CPU seconds (less sensitive to "
        "other load on the machine).")
  print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
  sys.exit(main())
