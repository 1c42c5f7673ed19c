"""Real input: a tiny Llama with the real Llama 2 tokenizer, fine-tuned on HH-RLHF harmless-base
chosen dialogs plus the Self-Instruct seed tasks from ../shared/data (paths configurable).

``python train.py --config=configs/sft_hh_tiny.py --workdir=workdir/sft_hh_tiny``
"""

from configs import base


def get_config():
  c = base.get_config()
  c.stage = "sft"
  # Tiny GQA model over the real 32,000-piece vocabulary.
  c.model.preset = "tiny"
  c.model.dim = 128
  c.model.n_layers = 2
  c.model.n_heads = 4
  c.model.n_kv_heads = 2
  c.model.multiple_of = 32
  c.model.max_seq_len = 512
  # The real Llama 2 SentencePiece model (32,000 pieces, BOS 1, EOS 2).
  c.tokenizer.path = "../shared/data/llama2-tokenizer/tokenizer.model"
  # HH-RLHF harmless-base chosen dialogs + Self-Instruct seed tasks, mixed by size.
  c.data.sft_sources = "hh_rlhf,self_instruct"
  c.data.hh_rlhf_path = "../shared/data/hh-rlhf/harmless-base-test.jsonl.gz"
  c.data.self_instruct_path = "../shared/data/self-instruct/seed_tasks.jsonl"
  # 5% of prompts held out by a fixed-seed hash (config.data.split_seed).
  c.data.heldout_fraction = 0.05
  # 256-token packed rows (longer HH dialogs are truncated, counted in data_stats.json).
  c.data.max_seq_len = 256
  c.data.batch_size = 8
  c.optimizer.lr = 2e-3
  c.optimizer.warmup_steps = 10
  # 150 steps of 8 x 256 tokens (~0.3 M tokens, about one pass over the truncated dialogs) keep
  # the run to minutes on 2 CPU cores; set num_steps = 0 and num_epochs for a longer run.
  c.train.num_steps = 150
  c.train.log_every = 10
  c.train.checkpoint_every = 100
  c.eval.num_samples = 4
  c.eval.num_batches = 8
  return c
