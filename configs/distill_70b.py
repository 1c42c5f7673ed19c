"""Safety context distillation of Llama 2 70B chat (SFT) (Llama 2 Sec. 4.2.4) on 8 x 8 GPUs: the
settings of configs/distill_7b.py with the 70B model and the sampling and fine-tuning settings of
configs/raft_70b.py (configs/rs_70b.py's fine-tune).

  python train.py --config=configs/distill_70b.py --workdir=/ckpt/distill_70b \\
      --config.init_from=/ckpt/sft_70b/final \\
      --config.rejection_sampling.help_rm=/ckpt/rm_help/final \\
      --config.rejection_sampling.safety_rm=/ckpt/rm_safety/final

Memory plan (``XLA_FLAGS=--xla_force_host_platform_device_count=64 python train.py
--config=configs/distill_70b.py --dry_run``, XLA:CPU, 2026-12-02): the fine-tuning step 4.02 GiB
params + 8.04 GiB AdamW state + 26.12 GiB temporaries = 38.18 GiB per device; the sampling pass
(64 prompts of 1024 + 1024 tokens x 2 answers, the benign prompts' pass; 2026-12-03) 16.06 +
33.28 = 49.34 GiB; both fit in 80 GiB (the reward models' scoring is not planned).
"""

from configs import distill_7b, raft_70b


def get_config():
  # 70B on (1, 8, 8): bf16, full remat, the SFT step of sft_70b; 64 rows of 1024 + 1024 tokens
  # per generation batch (raft_70b: 8 prompts x K = 8).
  return distill_7b.distill(raft_70b.get_config())
