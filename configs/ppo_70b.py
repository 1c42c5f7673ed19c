"""PPO of Llama-2-Chat 70B with the paper's settings (Llama 2, Sec. 3.2.3), on 8 nodes x 8 GPUs.

As ``configs/ppo_7b.py`` with beta 0.005 (34B/70B), GQA 70B shapes, full remat and the SFT 70B
mesh (1, 8, 8): FSDP over 8, tensor parallel over the 8 GPUs of a node (the generation layout
keeps the tensor split and consolidates the FSDP shards per node, Sec. 3.2.3: ~330 s/iteration).

  XLA_FLAGS=--xla_force_host_platform_device_count=64 \\
      python train.py --config=configs/ppo_70b.py --dry_run
"""

from configs import ppo_7b


def get_config():
  c = ppo_7b.get_config()
  c.model.preset = "llama2_70b"
  # Full remat: at 70B the saved activations of 80 layers do not fit otherwise (as SFT 70B).
  c.model.remat = "full"
  # beta 0.005 for 34B and 70B.
  c.ppo.beta = 0.005
  # Mesh (data, fsdp, tensor) = (1, 8, 8): 64 GPUs; batch 512 / minibatch 64 split over fsdp 8.
  c.mesh.shape = (1, 8, 8)
  c.mesh.device_memory_gib = 80.0
  # Each minibatch of 64 rollouts (8 per device) in 8 microbatches of 1 row per device: the same
  # gradient, an eighth of the activations (ppo_train_step temporaries 98 -> 25 GiB).
  c.train.grad_accum_steps = 8
  # The train state (24 GiB per device) waits in host memory while rollouts generate (as 7B);
  # GQA keeps the KV cache of all 512 rollouts small (5 GiB per device): one generation batch.
  c.ppo.offload_state = True
  c.ppo.generation_batch_size = 0
  return c
