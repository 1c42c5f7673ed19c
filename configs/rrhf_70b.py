"""RRHF of Llama 2 70B chat (SFT): as ``configs/rrhf_7b.py`` (K = 4, 64 prompts per step, rows of
2048 tokens, LR 2e-5 cosine) on 8 nodes x 8 GPUs.

  python train.py --config=configs/rrhf_70b.py --workdir=/ckpt/rrhf_70b \\
      --config.init_from=/ckpt/sft_70b/final \\
      --config.rrhf.sampled=/ckpt/rs_1/sampled.jsonl

Memory plan: ``docs/memory_plans.md`` (``benchmarks/memory_plans.py``).
"""

from configs import rrhf_7b


def get_config():
  c = rrhf_7b.get_config()
  c.model.preset = "llama2_70b"
  c.model.remat = "full"
  # As configs/sft_70b.py: tensor parallel over the 8 GPUs of a node, FSDP over the 8 nodes.
  c.mesh.shape = (1, 8, 8)
  # 64 prompts / 8 microbatches = 8 prompts (32 rows) per microbatch, split over data x fsdp = 8.
  c.train.grad_accum_steps = 8
  return c
