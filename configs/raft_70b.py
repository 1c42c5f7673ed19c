"""RAFT of Llama 2 70B chat (SFT) (Dong et al. 2023) on 8 x 8 GPUs: the rounds of
configs/raft_7b.py with the 70B model and the fine-tuning settings of configs/rs_70b.py.

  python train.py --config=configs/raft_70b.py --workdir=/ckpt/raft_70b \\
      --config.init_from=/ckpt/sft_70b/final \\
      --config.rejection_sampling.help_rm=/ckpt/rm_help/final \\
      --config.rejection_sampling.safety_rm=/ckpt/rm_safety/final

Memory plan (``XLA_FLAGS=--xla_force_host_platform_device_count=64 python train.py
--config=configs/raft_70b.py --dry_run``, XLA:CPU, 2026-12-02): the fine-tuning step 4.02 GiB
params + 8.04 GiB AdamW state + 26.12 GiB temporaries = 38.18 GiB per device; the sampling pass
(8 prompts x K = 8 rows of 1024 + 1024 tokens) 16.06 + 32.64 = 48.70 GiB; both fit in 80 GiB
(the reward models' scoring is not planned).
"""

from configs import rs_70b


def get_config():
  # 70B on (1, 8, 8): bf16 compute, full remat, the SFT step of configs/sft_70b.py; sampling 8
  # prompts x K rows per batch and fine-tuning 1 epoch at 2e-5 (cosine, 3% warmup) as rs_70b.
  c = rs_70b.get_config()
  c.stage = "raft"
  c.init_from = ""
  c.raft.num_rounds = 4
  c.raft.keep_fraction = 0.0  # local ranking (the paper's default)
  r = c.rejection_sampling
  r.help_rm, r.safety_rm, r.sample_from, r.pool_from = "", "", "", ""
  # b = 512 prompts per round, K = 8 (LMFlow's top 1/8) at temperature 1, no Fig. 8 per round.
  r.num_prompts = 512
  r.k = 8
  r.temperature = 1.0
  r.auto_temperature = False
  r.plot_prompts = 0
  return c
