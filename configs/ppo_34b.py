"""PPO of Llama-2-Chat 34B with the paper's settings (Llama 2, Sec. 3.2.3), on 8 nodes x 8 GPUs.

As ``configs/ppo_7b.py`` with the 34B shapes (GQA, 8 KV heads; unreleased, shapes as the public
34B Llama-2-based models), beta 0.005 (34B and 70B), full remat and the 70B mesh (1, 8, 8)::

  XLA_FLAGS=--xla_force_host_platform_device_count=64 \\
      python train.py --config=configs/ppo_34b.py --dry_run
"""

from configs import ppo_7b


def get_config():
  c = ppo_7b.get_config()
  c.model.preset = "llama2_34b"
  c.model.remat = "full"
  # beta 0.005 for 34B and 70B (Sec. 3.2.3).
  c.ppo.beta = 0.005
  # FSDP over 8 nodes, tensor parallel over a node's 8 GPUs (heads 64, KV heads 8, ffn 22016 and
  # vocab 32000 divide 8).
  c.mesh.shape = (1, 8, 8)
  return c
