"""RAFT of Llama 2 7B chat (SFT) (Dong et al. 2023), 1 node x 8 GPUs: 4 rounds, each K = 8 samples
for 512 new prompts from the current policy, the best per prompt kept, SFT on them.

  python train.py --config=configs/raft_7b.py --workdir=/ckpt/raft_7b \\
      --config.init_from=/ckpt/sft_7b/final \\
      --config.rejection_sampling.help_rm=/ckpt/rm_help_7b/final \\
      --config.rejection_sampling.safety_rm=/ckpt/rm_safety_7b/final

Settings as LMFlow's RAFT script (``scripts/archive/run_raft_align.sh``: local ranking, the top
1/8 = best of K = 8, fine-tuning LR 2e-5 constant); the paper used the HH-RLHF train prompts.
The stand-in prompts (HH-RLHF harmless-base test + Self-Instruct seeds, ~2,300 train prompts)
hold 4 rounds of 512; for more rounds point ``data.hh_rlhf_path`` at an HH-RLHF train file.
Memory plan (``XLA_FLAGS=--xla_force_host_platform_device_count=8 python train.py
--config=configs/raft_7b.py --dry_run``, XLA:CPU buffer assignment, 2026-12-02): a round's
fine-tuning step (``sft.train_step`` of configs/sft_7b.py) 3.14 GiB params + 6.28 GiB AdamW state
+ 34.33 GiB temporaries = 43.75 GiB per device; its sampling pass (16 prompts x K = 8 rows,
generation layout) 12.55 + 35.40 = 47.95 GiB; both fit in 80 GiB (the RMs' scoring is not
planned).
"""

from configs import sft_7b


def get_config():
  # The fine-tuning step is SFT at 7B (bf16 compute, minimal remat, batch 64 x 4096, mesh
  # (1, 8, 1)); its LR and length are rejection_sampling's fields below.
  c = sft_7b.get_config()
  c.stage = "raft"
  c.init_from = ""
  c.raft.num_rounds = 4
  c.raft.keep_fraction = 0.0  # local ranking (the paper's default)
  r = c.rejection_sampling
  r.help_rm, r.safety_rm, r.sample_from, r.pool_from = "", "", "", ""
  # b = 512 prompts per round (our choice: the stand-in set holds 4 rounds), K = 8.
  r.num_prompts = 512
  r.k = 8
  r.temperature = 1.0
  r.top_p = 1.0
  r.auto_temperature = False
  r.plot_prompts = 0
  r.max_new_tokens = 256
  r.max_prompt_len = 1024
  # 16 prompts x K = 128 rows per generation batch: a KV cache of 128 x 1280 tokens x 32 layers
  # x 2 x 4096 x 2 B = 86 GB in bf16, 10.7 GB per device with the rows split 8 ways.
  r.batch_size = 16
  # Fine-tune each round on its kept samples: 1 epoch at a constant 2e-5 (LMFlow), fresh AdamW.
  r.num_steps = 0
  r.num_epochs = 1.0
  r.lr = 2e-5
  r.warmup_frac = 0.0
  c.optimizer.schedule = "constant"
  r.safety_threshold = 0.15
  return c
