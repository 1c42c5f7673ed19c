"""Safety context distillation of Llama 2 7B chat (SFT) (Llama 2 Sec. 4.2.4), 1 node x 8 GPUs: one
answer per adversarial prompt with and one without the safety preprompt, the distilled answer kept
where the safety RM scores it higher (targeted), SFT on the kept answers without the preprompt.

  python train.py --config=configs/distill_7b.py --workdir=/ckpt/distill_7b \\
      --config.init_from=/ckpt/sft_7b/final \\
      --config.rejection_sampling.help_rm=/ckpt/rm_help_7b/final \\
      --config.rejection_sampling.safety_rm=/ckpt/rm_safety_7b/final

The paper gives no prompt count, temperature or fine-tuning schedule for this step; the values
below are ours: the fine-tune of configs/raft_7b.py (the SFT step of configs/sft_7b.py, 1 epoch
at a constant 2e-5), 1,024 adversarial prompts of the stand-in data (HH-RLHF harmless-base
red-team prompts), the generic preprompt (the per-category templates need the synthetic world's
risk categories).
Memory plan (``XLA_FLAGS=--xla_force_host_platform_device_count=8 python train.py
--config=configs/distill_7b.py --dry_run``, XLA:CPU buffer assignment, 2026-12-02): the fine-tuning
step (``sft.train_step`` of configs/sft_7b.py) 3.14 GiB params + 6.28 GiB AdamW state + 34.33 GiB
temporaries = 43.75 GiB per device; the sampling pass (64 prompts x 2 answers, the benign
prompts' pass, the larger; generation layout) 12.55 + 35.40 = 47.95 GiB; both fit in 80 GiB (the
RMs' scoring is not planned). Date of the sampling figure: 2026-12-03.
"""

from configs import raft_7b


def distill(c):
  """``c`` (a rejection-sampling-style pod config) as context distillation with our settings."""
  c.stage = "context_distillation"
  cd = c.context_distillation
  cd.num_prompts = 1024
  cd.preprompt = "generic"
  cd.targeted = True
  # Benign prompts' best-of-2 answers in the fine-tune (our addition; on the synthetic world they
  # turned a rise in T=1 false refusals into a fall, README). The stand-in data's benign prompts
  # are the 165 Self-Instruct train seeds (HH-RLHF's are all safety prompts): a warning names the
  # shortfall; point data.sft_sources at a larger benign set for all 1,024.
  cd.benign_prompts = 1024
  cd.benign_k = 2
  r = c.rejection_sampling
  r.k = 1  # context distillation samples one answer per prompt and variant
  # 64 rows of 1024 + 256 tokens per generation batch at 7B: a KV cache of 64 x 1280 x 32 layers
  # x 2 x 4096 x 2 B = 43 GB in bf16, 5.4 GB per device with the rows split 8 ways.
  r.batch_size = 64
  return c


def get_config():
  return distill(raft_7b.get_config())  # the SFT step at 7B (bf16, minimal remat, (1, 8, 1))
