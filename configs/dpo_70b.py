"""DPO of Llama 2 70B chat (SFT): as ``configs/dpo_7b.py`` (beta 0.1, batch 64, LR 1e-6 with
150 linear warmup steps, AdamW for the paper's RMSprop) on 8 nodes x 8 GPUs.

  python train.py --config=configs/dpo_70b.py --workdir=/ckpt/dpo_70b \\
      --config.init_from=/ckpt/sft_70b/final \\
      --config.data.preference_jsonl_path=/data/helpfulness_pairs.jsonl

Memory plan (``XLA_FLAGS=--xla_force_host_platform_device_count=64 python train.py
--config=configs/dpo_70b.py --dry_run``, XLA:CPU buffer assignment, 2026-12-02): ``dpo.train_step``
4.02 GiB params + 8.04 GiB AdamW state + 41.20 GiB temporaries = 53.26 GiB per device (26.7 GiB
to spare in 80 GiB; XLA:GPU temporaries differ); the reference pass 5.43 GiB.
"""

from configs import dpo_7b


def get_config():
  c = dpo_7b.get_config()
  c.model.preset = "llama2_70b"
  c.model.remat = "full"
  # As configs/sft_70b.py: tensor parallel over the 8 GPUs of a node, FSDP over the 8 nodes.
  c.mesh.shape = (1, 8, 8)
  # 64 pairs / 8 microbatches = 8 pairs (16 rows) per microbatch, split over data x fsdp = 8.
  c.train.grad_accum_steps = 8
  return c
