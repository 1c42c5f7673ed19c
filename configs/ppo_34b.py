"""PPO of Llama-2-Chat 34B with the paper's settings (Llama 2, Sec. 3.2.3), on 8 nodes x 8 GPUs.

As ``configs/ppo_70b.py`` (beta 0.005 for 34B and 70B, full remat, mesh (1, 8, 8): FSDP over 8
nodes, tensor parallel over a node's 8 GPUs; heads 64, KV heads 8, ffn 22016 and vocab 32000
divide 8) with the 34B shapes (GQA, 8 KV heads; unreleased, shapes as the public 34B
Llama-2-based models)::

  XLA_FLAGS=--xla_force_host_platform_device_count=64 \\
      python train.py --config=configs/ppo_34b.py --dry_run
"""

from configs import ppo_70b


def get_config():
  c = ppo_70b.get_config()
  c.model.preset = "llama2_34b"
  return c
