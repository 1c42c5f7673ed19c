"""PPO of Llama-2-Chat 13B with the paper's settings (Llama 2, Sec. 3.2.3), on 2 nodes x 8 GPUs.

As ``configs/ppo_7b.py`` (batch 512, minibatch 64, clip 0.2, constant LR 1e-6, beta 0.01 for 7B
and 13B) with 13B shapes, full remat and a (1, 2, 8) mesh (FSDP over the 2 nodes, tensor
parallel within one)::

  python train.py --config=configs/ppo_13b.py --workdir=/ckpt/ppo_13b \\
      --config.init_from=/ckpt/rs_4_13b/final --config.ppo.help_rm=/ckpt/rm_help/final \\
      --config.ppo.safety_rm=/ckpt/rm_safety/final
  XLA_FLAGS=--xla_force_host_platform_device_count=16 \\
      python train.py --config=configs/ppo_13b.py --dry_run
"""

from configs import ppo_7b


def get_config():
  c = ppo_7b.get_config()
  # Llama 2 13B (dim 5120, 40 layers, 40 heads, no GQA, ffn 13824).
  c.model.preset = "llama2_13b"
  # Full remat, as SFT 13B: policy + value model train states are twice SFT's.
  c.model.remat = "full"
  # beta 0.01 for 7B and 13B (Sec. 3.2.3).
  c.ppo.beta = 0.01
  # Two nodes of 8 GPUs: tensor parallel within a node, FSDP across the two. (All-FSDP (1, 16, 1)
  # as SFT 13B would give every GPU the whole bf16 model for generation: the rollouts plan
  # 95 GiB per device; docs/memory_plans.md.)
  c.mesh.shape = (1, 2, 8)
  # 64 rollouts per minibatch = 32 per FSDP shard: 8 microbatches of 4 (as ppo_7b).
  c.train.grad_accum_steps = 8
  return c
