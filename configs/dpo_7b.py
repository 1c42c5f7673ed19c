"""DPO of Llama 2 7B chat (SFT) with the DPO paper's settings (Rafailov et al. 2023,
App. B), 1 node x 8 GPUs.

  python train.py --config=configs/dpo_7b.py --workdir=/ckpt/dpo_7b \\
      --config.init_from=/ckpt/sft_7b/final \\
      --config.data.preference_jsonl_path=/data/helpfulness_pairs.jsonl

The SFT model is the policy's start and the reference: its log-probs of every pair are computed
once before step 0 (``dpo.reference_logps``, the reference params freed afterwards) and cached
in ``<workdir>/reference_logps.npz`` for resumes. Preference JSONL schema:
llama_jax/data/sources.py (the reward models' data; the on-policy annotation batches too).
Memory plan (``XLA_FLAGS=--xla_force_host_platform_device_count=8 python train.py
--config=configs/dpo_7b.py --dry_run``, XLA:CPU buffer assignment, 2026-12-02): ``dpo.train_step``
3.14 GiB params + 6.28 GiB AdamW state + 21.94 GiB temporaries = 31.36 GiB per device; the
reference pass (``dpo.reference_logps``, 8 pairs per call, the SFT params alone) 9.11 GiB; both fit
in 80 GiB.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.stage = "dpo"
  # The SFT (chat) model's final/ directory: the start and the reference policy.
  c.init_from = ""
  c.model.preset = "llama2_7b"
  # bf16 compute, f32 params and AdamW moments; full remat (2 rows of 4096 tokens per device per
  # microbatch: a pair's chosen and rejected rows).
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.scan_layers = True
  c.model.remat = "full"
  c.tokenizer.path = "../shared/data/llama2-tokenizer/tokenizer.model"
  # The helpfulness RM's mixture: your pairs plus an equal amount of HH-RLHF.
  c.dpo.sources, c.dpo.weights = "jsonl_preferences,hh_rlhf", "1,1"
  # DPO paper: beta 0.1, batch 64 pairs.
  c.dpo.beta = 0.1
  c.dpo.batch_size = 64
  c.dpo.max_seq_len = 4096
  c.dpo.overlong = "error"
  # Optimizer: the paper's RMSprop is replaced by the project's AdamW (0.9 / 0.95, eps 1e-5,
  # clip 1.0); weight decay 0 (RMSprop had none). LR 1e-6, linear warmup over 150 steps, then
  # constant (the paper's schedule).
  c.optimizer.lr = 1e-6
  c.optimizer.schedule = "constant"
  c.optimizer.warmup_steps = 150
  c.optimizer.warmup_frac = 0.0
  c.optimizer.weight_decay = 0.0
  c.optimizer.grad_clip = 1.0
  c.train.num_epochs = 1.0
  c.train.num_steps = 0
  # 64 pairs / 8 microbatches = 8 pairs (16 rows) per microbatch: one pair per device; the
  # reference pass scores one microbatch at a time.
  c.train.grad_accum_steps = 8
  c.train.log_every = 10
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
  c.mesh.shape = (1, 8, 1)
  c.mesh.device_memory_gib = 80.0
  return c
