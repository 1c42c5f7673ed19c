"""SFT of Llama 2 7B with the paper's settings (Llama 2, Sec. 3.1), on 1 node x 8 GPUs (80 GB).

Memory plan (``docs/memory_plans.md``)::

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python train.py --config=configs/sft_7b.py --dry_run

Run on a GPU cluster (one process per node; SLURM is detected, otherwise pass
``--coordinator_address``, ``--num_processes``, ``--process_id``)::

  python train.py --config=configs/sft_7b.py --workdir=/ckpt/sft_7b \\
      --config.init_from=/ckpt/llama2_7b_orbax

To train on your own curated SFT dialogs instead of the public stand-ins below, set
``--config.data.sft_sources=jsonl --config.data.sft_jsonl_path=/path/to/sft.jsonl`` (schema in the
README; several sources mix by ``data.sft_weights``).
"""

from configs import base


def get_config():
  c = base.get_config()
  # Stage: supervised fine-tuning (llama_jax.sft.run).
  c.stage = "sft"
  # Start from the pretrained base model (an orbax params directory written by
  # `python -m llama_jax.convert --to orbax`); "" would train from random init.
  c.init_from = ""

  # ---- model ----
  # Llama 2 7B (dim 4096, 32 layers, 32 heads, no GQA, ffn 11008).
  c.model.preset = "llama2_7b"
  # Compute in bfloat16 (activations, matmuls); the f32 master params below keep AdamW exact.
  c.model.dtype = "bfloat16"
  # Parameters (and so optimizer moments) in float32.
  c.model.param_dtype = "float32"
  # Scan over the 80 layers: compile one layer, and remat saves only the scan carry per layer.
  c.model.scan_layers = True
  # Save matmul outputs per layer and recompute the rest (cheaper than full remat). Measured on
  # (1, 8, 1), XLA:CPU: minimal 43.8 GiB, full 29.1 GiB, none 223 GiB per device (does not fit)
  # (minimal re-measured 2026-11-21; full and none are from before the attention change).
  c.model.remat = "minimal"
  # cuDNN flash attention on GPU when available (XLA's materialized scores elsewhere).
  c.model.attention_impl = "auto"

  # ---- tokenizer ----
  # The real Llama 2 SentencePiece model (32000 pieces).
  c.tokenizer.path = "../shared/data/llama2-tokenizer/tokenizer.model"

  # ---- data ----
  # Public stand-ins for the paper's ~27.5k curated annotations: HH-RLHF chosen dialogs and the
  # Self-Instruct seed tasks. Use "jsonl" + data.sft_jsonl_path for your curated data.
  c.data.sft_sources = "hh_rlhf,self_instruct"
  # Mix proportionally to source sizes.
  c.data.sft_weights = ""
  # Pack prompt + answer to the paper's 4096-token sequences.
  c.data.max_seq_len = 4096
  # The paper's batch of 64 sequences (global, across all processes).
  c.data.batch_size = 64

  # ---- optimizer (paper Sec. 3.1 + the base optimizer of Sec. 2.2) ----
  # Cosine from a peak LR of 2e-5 ...
  c.optimizer.lr = 2e-5
  c.optimizer.schedule = "cosine"
  # ... down to 10% of the peak at the last step.
  c.optimizer.final_lr_ratio = 0.1
  # AdamW moments and epsilon.
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-5
  # Decoupled weight decay 0.1 (matrices and embeddings, not RMSNorm scales).
  c.optimizer.weight_decay = 0.1
  # Gradient clipping at global norm 1.0.
  c.optimizer.grad_clip = 1.0
  # No warmup is given for SFT in the paper.
  c.optimizer.warmup_steps = 0
  c.optimizer.warmup_frac = 0.0

  # ---- training loop ----
  # Two epochs over the SFT set (steps derived from the packed token count).
  c.train.num_epochs = 2.0
  c.train.num_steps = 0
  # Batch 64 over 8 devices is 8 sequences per device; 8 microbatches keep one 4096-token
  # sequence per device at a time (microbatch 64 / 8 = 8, divisible by data x fsdp = 8).
  c.train.grad_accum_steps = 8
  # Log every 10 steps; evaluate held-out loss every 100; checkpoint every 100 steps.
  c.train.log_every = 10
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
  # Keep the two latest checkpoints (each ~81 GB of f32 params + AdamW moments).
  c.train.keep_checkpoints = 2

  # ---- mesh ----
  # One node of 8 GPUs, all FSDP (ZeRO-3): f32 params + AdamW moments = 12 B x 6.7B / 8 = 9.4 GiB
  # per device; no tensor parallelism needed at 7B. For 8 nodes use (8, 8, 1) (data parallel
  # across nodes; the batch of 64 is then one sequence per device: set grad_accum_steps = 1).
  c.mesh.shape = (1, 8, 1)
  # A100 / H100 80 GB.
  c.mesh.device_memory_gib = 80.0
  return c
