"""Rejection sampling at 70B (Llama 2, Sec. 3.2.3): sample K answers per prompt with the 70B
RLHF model, keep the best under the reward models, fine-tune on the pooled best, on 8 x 8 GPUs.

The paper rejection-sampled with the 70B model only and distilled its best samples into the
smaller models. The fine-tuned policy is ``init_from``; the sampler is
``rejection_sampling.sample_from`` (empty = ``init_from``). 70B itself::

  python train.py --config=configs/rs_70b.py --workdir=/ckpt/rs_2_70b \\
      --config.init_from=/ckpt/rs_1_70b/final --config.rejection_sampling.iteration=2 \\
      --config.rejection_sampling.help_rm=/ckpt/rm_help/final \\
      --config.rejection_sampling.safety_rm=/ckpt/rm_safety/final \\
      --config.rejection_sampling.pool_from=/ckpt/rs_1_70b/sampled.jsonl

Distilled into 7B (the 7B policy fine-tuned on the 70B model's picks; same tokenizer)::

  python train.py --config=configs/rs_70b.py --workdir=/ckpt/rs_2_7b \\
      --config.model.preset=llama2_7b --config.model.remat=minimal \\
      --config.init_from=/ckpt/rs_1_7b/final \\
      --config.rejection_sampling.sample_from=/ckpt/rs_2_70b/final ...

In a pipeline, ``pipeline.rs_sample_from`` sets ``sample_from`` for every iteration. Plan of the
fine-tuning step: ``XLA_FLAGS=--xla_force_host_platform_device_count=64 python train.py
--config=configs/rs_70b.py --dry_run`` (the sampling pass has no plan yet).
"""

from configs import sft_70b


def get_config():
  # The fine-tune is the SFT step with the 70B SFT settings (bf16 compute, full remat, batch 64
  # x 4096, mesh (1, 8, 8)); its LR and length are rejection_sampling's fields below.
  c = sft_70b.get_config()
  c.stage = "rejection_sampling"
  r = c.rejection_sampling
  # Reward models and the policy are set on the command line (or by the pipeline).
  r.help_rm, r.safety_rm, r.sample_from = "", "", ""
  # Prompts per iteration (the paper gives none: our choice) from HH-RLHF + Self-Instruct.
  r.num_prompts = 10000
  # K = 10 samples per prompt (Fig. 7: N in 10..100); the temperature of the best max-reward
  # point of Fig. 8 on 64 prompts (the paper: 1.2-1.3 for RLHF models).
  r.k = 10
  r.auto_temperature = True
  r.plot_prompts, r.plot_k, r.plot_temperatures = 64, 10, "0.8,1.0,1.2,1.3,1.4"
  r.temperature = 1.2
  r.max_new_tokens = 1024
  r.max_prompt_len = 1024
  # 8 prompts x K = 80 rows per generation batch: the 70B KV cache of 80 x 2048 tokens is
  # 80 x 2048 x 80 layers x 2 x 8 x 128 x 2 B = 54 GB in bf16, split 8 ways by the tensor axis.
  r.batch_size = 8
  # Fine-tune on the pooled best: 1 epoch at the SFT LR 2e-5 (cosine to 10%), 3% warmup.
  r.num_steps = 0
  r.num_epochs = 1.0
  r.lr = 2e-5
  r.warmup_frac = 0.03
  r.safety_threshold = 0.15
  return c
