"""SFT of Llama 2 70B with the paper's settings (Llama 2, Sec. 3.1), on 8 nodes x 8 GPUs (80 GB).

Memory plan (``docs/memory_plans.md``)::

  XLA_FLAGS=--xla_force_host_platform_device_count=64 \\
      python train.py --config=configs/sft_70b.py --dry_run

Run on a GPU cluster (one process per node; SLURM is detected, otherwise pass
``--coordinator_address``, ``--num_processes``, ``--process_id``)::

  python train.py --config=configs/sft_70b.py --workdir=/ckpt/sft_70b \\
      --config.init_from=/ckpt/llama2_70b_orbax

To train on your own curated SFT dialogs instead of the public stand-ins below, set
``--config.data.sft_sources=jsonl --config.data.sft_jsonl_path=/path/to/sft.jsonl`` (schema in the
README; several sources mix by ``data.sft_weights``).
"""

from configs import sft_7b


def get_config():
  # The paper's SFT settings (optimizer, data, batch 64 x 4096, 2 epochs) as configs/sft_7b.py.
  c = sft_7b.get_config()
  # Llama 2 70B shapes (dim 8192, 80 layers, 64 heads, 8 KV heads, ffn 28672).
  c.model.preset = "llama2_70b"
  # Full per-layer activation checkpointing: keep only each layer's input [b, t, d] and recompute
  # the layer in the backward pass. Measured plan on (1, 8, 8): 38 GiB per device (full) on
  # XLA:CPU; at t=4096 the saved activations of 80 layers without remat do not fit in 80 GB.
  c.model.remat = "full"
  # Batch 64 is split over data x fsdp = 8 ways (8 sequences per device); 8 microbatches keep one
  # 4096-token sequence per device at a time (the microbatch 64 / 8 = 8 stays divisible by 8).
  c.train.grad_accum_steps = 8
  # 8 nodes x 8 GPUs: tensor parallel (Megatron) over the 8 GPUs of a node (NVLink), FSDP
  # (ZeRO-3) over the 8 nodes. f32 params + AdamW moments = 12 B x 69B / 64 = 12 GiB per device
  # (checkpoints ~830 GB each). Compared with (1, 64, 1) (pure FSDP, also fits: 48.8 GiB
  # measured), each device all-gathers 1/8 of a layer's weights across nodes instead of the whole
  # layer (8x less inter-node traffic), and attention / MLP activations are split 8 ways (38.2 GiB
  # measured, more headroom for XLA:GPU's differences). kv heads (8), heads (64), ffn (28672) and
  # vocab (32000) divide 8.
  c.mesh.shape = (1, 8, 8)
  return c
