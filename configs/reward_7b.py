"""Reward models of Llama 2 7B with the paper's settings (Llama 2 Sec. 3.2.2), 1 node x 8 GPUs.

Initialized from the 7B chat (SFT) model, next-token head replaced by a scalar head::

  python train.py --config=configs/reward_7b.py:helpfulness --workdir=/ckpt/rm_help_7b \\
      --config.init_from=/ckpt/sft_7b/final \\
      --config.data.preference_jsonl_path=/data/helpfulness_pairs.jsonl
  python train.py --config=configs/reward_7b.py:safety --workdir=/ckpt/rm_safe_7b \\
      --config.init_from=/ckpt/sft_7b/final \\
      --config.data.preference_jsonl_path=/data/safety_pairs.jsonl

Preference JSONL schema: llama_jax/data/sources.py (prompt, chosen, rejected, rating,
safety_label). Public stand-in for the open-source share: HH-RLHF (``data.hh_rlhf_path``).
Memory plan (``XLA_FLAGS=--xla_force_host_platform_device_count=8 python train.py
--config=configs/reward_7b.py --dry_run``, XLA:CPU buffer assignment): 3.08 GiB params + 6.16 GiB
AdamW state + 20.72 GiB temporaries = 29.96 GiB per device, fits in 80 GiB.
"""

from configs import base

# model -> (sources, weights). Helpfulness: all helpfulness pairs plus an equal amount of
# open-source (HH) pairs. Safety: safety pairs and HH harmless (90%); the paper's 10% helpfulness
# share needs a second JSONL source (one JSONL path today): put those pairs in the same file.
MIXTURES = {
    "helpfulness": ("jsonl_preferences,hh_rlhf", "1,1"),
    "safety": ("jsonl_preferences,hh_rlhf", ""),
}


def get_config(model: str = "helpfulness"):
  if model not in MIXTURES:
    raise ValueError(f"configs/reward_7b.py: model must be one of {tuple(MIXTURES)}, got {model!r}")
  c = base.get_config()
  c.stage = "reward"
  # The SFT (chat) model's final/ directory.
  c.init_from = ""
  c.model.preset = "llama2_7b"
  # bf16 compute, f32 params and AdamW moments; full remat: 2 rows of 4096 tokens per device.
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.scan_layers = True
  c.model.remat = "full"
  c.tokenizer.path = "../shared/data/llama2-tokenizer/tokenizer.model"
  c.reward.model = model
  c.reward.sources, c.reward.weights = MIXTURES[model]
  # Margin helps most on separable pairs (Table 28); HH pairs have no rating -> margin 0.
  c.reward.margin = "small"
  # 512 pairs (1024 rows) per batch.
  c.reward.batch_size = 512
  c.reward.max_seq_len = 4096
  c.reward.overlong = "error"
  # Base optimizer (AdamW 0.9 / 0.95, eps 1e-5, wd 0.1, clip 1.0); max LR 1e-5, cosine to 10%,
  # warmup 3% of steps (at least 5).
  c.optimizer.lr = 1e-5
  c.optimizer.final_lr_ratio = 0.1
  c.optimizer.warmup_frac = 0.03
  c.optimizer.warmup_steps = 5
  # One epoch (longer overfits).
  c.train.num_epochs = 1.0
  c.train.num_steps = 0
  # 512 pairs / 64 microbatches = 8 pairs (16 rows) per microbatch: one pair per device.
  c.train.grad_accum_steps = 64
  c.train.log_every = 10
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
  c.mesh.shape = (1, 8, 1)
  c.mesh.device_memory_gib = 80.0
  return c
