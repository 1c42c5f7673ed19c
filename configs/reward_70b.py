"""Reward models of Llama 2 70B (Llama 2 Sec. 3.2.2): as ``configs/reward_7b.py`` with max LR
5e-6, on 8 nodes x 8 GPUs (FSDP over all 64 devices).

  python train.py --config=configs/reward_70b.py:helpfulness --workdir=/ckpt/rm_help_70b \\
      --config.init_from=/ckpt/sft_70b/final \\
      --config.data.preference_jsonl_path=/data/helpfulness_pairs.jsonl

Memory plan (``XLA_FLAGS=--xla_force_host_platform_device_count=64 python train.py
--config=configs/reward_70b.py --dry_run``, XLA:CPU buffer assignment): 4.00 GiB params + 8.01 GiB
AdamW state + 49.10 GiB temporaries = 61.12 GiB per device (2026-11-21): fits in 80 GiB with
18.9 GiB to spare (XLA:GPU temporaries differ); lower ``reward.max_seq_len`` if it does not fit.
"""

from configs import reward_7b


def get_config(model: str = "helpfulness"):
  c = reward_7b.get_config(model)
  c.model.preset = "llama2_70b"
  # Paper: max LR 5e-6 for the 70B reward model (1e-5 otherwise).
  c.optimizer.lr = 5e-6
  # 64 devices, all FSDP: f32 params + AdamW moments = 12 B x 69B / 64 = 12.9 GB per device.
  c.mesh.shape = (1, 64, 1)
  # 512 pairs / 8 microbatches = 64 pairs (128 rows) per microbatch: one pair per device.
  c.train.grad_accum_steps = 8
  return c
