"""TRL side of ``benchmarks/ppo_vs_peers.py``: PPO iterations of TRL 0.11.4's ``PPOv2Trainer``
(PyTorch eager), run in the TRL virtualenv as a subprocess; prints one JSON line on stdout.

``PPOv2Trainer.train()`` runs unchanged; the phases are timed by wrapping three of its pieces:
generation = ``trl.trainer.utils.batch_generation`` (HF ``generate``: prefill + decode, with the
per-step scores TRL takes its old log-probs from); scoring = from the end of generation to the
first update forward (``log_softmax`` of the generation scores, reference forward, value forward,
reward forward, KL-penalized rewards, GAE, advantage whitening: 3 forwards); update = from the
first update forward (``trl.trainer.utils.forward`` called with the policy+value wrapper) to the
end of the last ``optimizer.step()`` of the iteration (one AdamW step per minibatch over the
policy and value parameters together, loss = pg_loss + vf_coef * vf_loss).

Models: ``LlamaForCausalLM`` policy, a deep copy as reference, ``LlamaForSequenceClassification``
(``num_labels=1``, trunk + ``[dim, 1]`` score head) as value and reward model; HF's random init.
EOS is disabled (``eos_token_id=None``: every row samples ``--new_tokens`` tokens) and pad = EOS =
``vocab`` (an id never sampled). Usage (normally via ``ppo_vs_peers.py --trl_python``)::

  /work/venvs/trl/bin/python benchmarks/ppo_peer_trl.py --dim 128 --n_layers 2 --ffn_dim 512 \
      --vocab 1000 --repeats 2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time

import numpy as np
import torch
import transformers
from datasets import Dataset
from tokenizers import Tokenizer, models
from transformers import (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification,
                          PreTrainedTokenizerFast, TrainerCallback)
from transformers.trainer_callback import PrinterCallback, ProgressCallback
import trl
from trl import PPOv2Config, PPOv2Trainer
from trl.trainer import ppov2_trainer


def id_tokenizer(vocab: int):
  """Token ids as words; pad = EOS = ``vocab`` (the collator needs a pad id, TRL an EOS id)."""
  tok = Tokenizer(models.WordLevel({str(i): i for i in range(vocab + 1)}, unk_token="0"))
  return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=str(vocab), eos_token=str(vocab))


class Marks(TrainerCallback):
  """Per-iteration phase times from wrapped TRL pieces; closed at each ``on_step_end``."""

  def __init__(self):
    self.iters, self.cur = [], {}

  def on_step_end(self, args, state, control, **kwargs):
    c = self.cur
    self.iters.append({"generation": c["gen_end"] - c["gen_start"],
                       "scoring": c["update_start"] - c["gen_end"],
                       "update": c["update_end"] - c["update_start"],
                       "tokens": c["tokens"], "min_row_tokens": c["min_row_tokens"],
                       "steps": c["steps"]})
    self.cur = {}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  for name, default in [("dim", 512), ("n_layers", 8), ("n_heads", 8), ("ffn_dim", 1536),
                        ("vocab", 32000), ("prompts", 16), ("prompt_len", 64), ("new_tokens", 64),
                        ("minibatch", 16), ("warmup", 2), ("repeats", 5), ("seed", 0)]:
    ap.add_argument(f"--{name}", type=int, default=default)
  args = ap.parse_args()
  torch.manual_seed(args.seed)
  hf = LlamaConfig(hidden_size=args.dim, intermediate_size=args.ffn_dim,
                   num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                   num_key_value_heads=args.n_heads, vocab_size=args.vocab, rms_norm_eps=1e-5,
                   rope_theta=10000.0, max_position_embeddings=args.prompt_len + args.new_tokens,
                   tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                   pad_token_id=None, num_labels=1, torch_dtype=torch.float32)
  policy = LlamaForCausalLM(hf)
  ref = copy.deepcopy(policy)
  value = LlamaForSequenceClassification(hf)
  reward = LlamaForSequenceClassification(hf)
  count = lambda m: sum(p.numel() for p in m.parameters())
  tok = id_tokenizer(args.vocab)
  prompts = np.random.RandomState(args.seed).randint(3, args.vocab,
                                                     (args.prompts, args.prompt_len))
  data = Dataset.from_dict({"input_ids": prompts.tolist()})
  iters = args.warmup + args.repeats
  config = PPOv2Config(
      output_dir=tempfile.mkdtemp(prefix="ppo_peer_trl_"),
      per_device_train_batch_size=args.minibatch, gradient_accumulation_steps=1,
      num_mini_batches=args.prompts // args.minibatch,
      local_rollout_forward_batch_size=args.prompts, num_ppo_epochs=1,
      response_length=args.new_tokens, temperature=1.0, total_episodes=args.prompts * iters,
      num_sample_generations=0, learning_rate=1e-6, kl_coef=0.01, stop_token=None,
      missing_eos_penalty=None, report_to=[], save_strategy="no", logging_steps=10**9,
      disable_tqdm=True, use_cpu=True, seed=args.seed)
  trainer = PPOv2Trainer(config=config, tokenizer=tok, policy=policy, ref_policy=ref,
                         reward_model=reward, value_model=value, train_dataset=data,
                         eval_dataset=data)
  for cb in (PrinterCallback, ProgressCallback):
    trainer.remove_callback(cb)
  marks = Marks()
  trainer.add_callback(marks)

  gen_fn, fwd_fn = ppov2_trainer.batch_generation, ppov2_trainer.forward

  def batch_generation(model, queries, *a, **k):
    marks.cur["gen_start"] = time.perf_counter()
    query_responses, logits = gen_fn(model, queries, *a, **k)
    marks.cur["gen_end"] = time.perf_counter()
    response = query_responses[:, queries.shape[1]:]
    lengths = (response != tok.pad_token_id).sum(1)
    marks.cur.update(tokens=int(lengths.sum()), min_row_tokens=int(lengths.min()), steps=0)
    return query_responses, logits

  def forward(model, *a, **k):
    if hasattr(model, "value_model") and "update_start" not in marks.cur:
      marks.cur["update_start"] = time.perf_counter()
    return fwd_fn(model, *a, **k)

  opt_step = trainer.optimizer.step

  def step(*a, **k):
    out = opt_step(*a, **k)
    marks.cur["update_end"] = time.perf_counter()
    marks.cur["steps"] += 1
    return out

  ppov2_trainer.batch_generation, ppov2_trainer.forward = batch_generation, forward
  trainer.optimizer.step = step
  t0 = time.perf_counter()
  trainer.train()
  total = time.perf_counter() - t0
  print(json.dumps({
      "system": "trl", "versions": {"trl": trl.__version__, "torch": torch.__version__,
                                    "transformers": transformers.__version__},
      "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
      "params": {"policy": count(policy), "value": count(value), "reward": count(reward)},
      "iterations": marks.iters, "warmup": args.warmup, "wall_s": total,
      "pid": os.getpid()}))


if __name__ == "__main__":
  main()
