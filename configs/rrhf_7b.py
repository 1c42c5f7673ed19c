"""RRHF of Llama 2 7B chat (SFT), 1 node x 8 GPUs (Yuan et al. 2023).

  python train.py --config=configs/rrhf_7b.py --workdir=/ckpt/rrhf_7b \\
      --config.init_from=/ckpt/sft_7b/final \\
      --config.rrhf.sampled=/ckpt/rs_1/sampled.jsonl

The candidates are sampled-set JSONL records (llama_jax/rejection_sampling/step.py), e.g. a
rejection-sampling iteration's ``sampled.jsonl``: K samples per prompt of the SFT policy scored by
the reward models; other sources (a dataset's chosen / rejected, demonstrations) enter as extra
samples of a record. Memory plan: ``docs/memory_plans.md`` (``benchmarks/memory_plans.py``).
"""

from configs import base


def get_config():
  c = base.get_config()
  c.stage = "rrhf"
  # The SFT (chat) model's final/ directory and the sampled sets: set on the command line.
  c.init_from = ""
  c.rrhf.sampled = ""
  c.model.preset = "llama2_7b"
  # bf16 compute, f32 params and AdamW moments; full remat.
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.scan_layers = True
  c.model.remat = "full"
  c.tokenizer.path = "../shared/data/llama2-tokenizer/tokenizer.model"
  # RRHF's loss as in the paper: rank weight 1, length penalty 1 (mean token log-prob).
  c.rrhf.rank_weight = 1.0
  c.rrhf.length_penalty = 1.0
  # K = 4 candidates per prompt (the paper's HH runs rank 4-6 responses), 64 prompts per step,
  # rows of 2048 tokens (longer candidates are dropped and counted in data_stats.json).
  c.rrhf.k = 4
  c.rrhf.batch_size = 64
  c.rrhf.max_seq_len = 2048
  c.rrhf.overlong = "drop"
  # Llama 2's SFT optimizer (AdamW 0.9 / 0.95, eps 1e-5, wd 0.1, clip 1) at its SFT LR 2e-5,
  # cosine with 3% warmup over 3 epochs (the schedule and epochs of the RRHF training script).
  c.optimizer.lr = 2e-5
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 0
  c.optimizer.warmup_frac = 0.03
  c.train.num_epochs = 3.0
  c.train.num_steps = 0
  # 64 prompts / 8 microbatches = 8 prompts (32 rows) per microbatch: one prompt's 4 rows per
  # device.
  c.train.grad_accum_steps = 8
  c.train.log_every = 10
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
  c.mesh.shape = (1, 8, 1)
  c.mesh.device_memory_gib = 80.0
  return c
