"""SFT of Llama 2 13B with the paper's settings (Llama 2, Sec. 3.1), on 2 nodes x 8 GPUs (80 GB).

Memory plan (``docs/memory_plans.md``)::

  XLA_FLAGS=--xla_force_host_platform_device_count=16 \\
      python train.py --config=configs/sft_13b.py --dry_run

Run on a GPU cluster (one process per node; SLURM is detected, otherwise pass
``--coordinator_address``, ``--num_processes``, ``--process_id``)::

  python train.py --config=configs/sft_13b.py --workdir=/ckpt/sft_13b \\
      --config.init_from=/ckpt/llama2_13b_orbax

To train on your own curated SFT dialogs instead of the public stand-ins below, set
``--config.data.sft_sources=jsonl --config.data.sft_jsonl_path=/path/to/sft.jsonl`` (schema in the
README; several sources mix by ``data.sft_weights``).
"""

from configs import sft_7b


def get_config():
  # The paper's SFT settings (optimizer, data, batch 64 x 4096, 2 epochs) as configs/sft_7b.py.
  c = sft_7b.get_config()
  # Llama 2 13B (dim 5120, 40 layers, 40 heads, no GQA, ffn 13824).
  c.model.preset = "llama2_13b"
  # Full per-layer activation checkpointing. Measured on (1, 16, 1), XLA:CPU: full 27.5 GiB
  # (2026-11-21), minimal 61.6 GiB per device (before the attention change; fits, but with too
  # little headroom for XLA:GPU's differences).
  c.model.remat = "full"
  # Batch 64 over 16 devices is 4 sequences per device; 4 microbatches keep one 4096-token
  # sequence per device at a time (microbatch 64 / 4 = 16, divisible by data x fsdp = 16).
  c.train.grad_accum_steps = 4
  # Two nodes of 8 GPUs, all FSDP (ZeRO-3): f32 params + AdamW moments = 12 B x 13B / 16 =
  # 9.1 GiB per device (checkpoints ~156 GB each). dim 5120 is divisible by 16.
  c.mesh.shape = (1, 16, 1)
  return c
