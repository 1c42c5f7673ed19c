"""Real input: the whole pipeline (SFT -> RMs -> 2 rejection-sampling iterations -> PPO) of a tiny
Llama with the real Llama 2 tokenizer on HH-RLHF harmless-base + Self-Instruct (../shared/data).

``python train.py --config=configs/pipeline_hh_tiny.py --workdir=workdir/pipeline_hh_tiny`` then
``python eval.py --workdir=workdir/pipeline_hh_tiny`` (no oracle on real data: the comparison
reports reward-model scores, KL to SFT and the reward win rate against SFT).

Both reward models train on the HH-RLHF harmless-base pairs (the only preference file shipped);
HH prompts are safety prompts (``is_safety``), Self-Instruct prompts are not.
"""

from configs import sft_hh_tiny


def get_config():
  c = sft_hh_tiny.get_config()
  c.stage = "pipeline"
  # SFT: far shorter than sft_hh_tiny's 200 steps to keep the whole pipeline small on CPU.
  c.train.num_steps = 40
  c.train.checkpoint_every = 20
  c.eval.num_prompts = 32
  c.eval.max_new_tokens = 32
  # Reward models: HH-RLHF pairs (no ratings: margin 0), overlong pairs dropped.
  c.pipeline.help_sources = "hh_rlhf"
  c.pipeline.help_weights = ""
  c.pipeline.safety_sources = "hh_rlhf"
  c.pipeline.safety_weights = ""
  c.reward.batch_size = 8
  c.reward.max_seq_len = 320
  c.reward.overlong = "drop"
  c.reward.eval_pairs = 64
  c.pipeline.reward_lr = 3e-4
  c.pipeline.reward_num_steps = 24
  # Rejection sampling: 32 prompts x K=4, 48 new tokens, 8 fine-tuning steps per iteration.
  c.pipeline.rs_iterations = 2
  r = c.rejection_sampling
  r.num_prompts, r.k, r.temperature, r.max_new_tokens = 32, 4, 1.0, 48
  r.max_prompt_len, r.batch_size = 256, 32
  r.num_steps, r.lr = 8, 5e-4
  r.plot_prompts, r.plot_k, r.plot_temperatures = 16, 4, "0.6,1.0,1.4"
  # PPO: 6 iterations of 8 rollouts (minibatch 4), held-out eval every 3.
  p = c.ppo
  p.num_iterations, p.batch_size, p.minibatch_size = 6, 8, 4
  p.max_new_tokens, p.max_prompt_len, p.num_prompts = 48, 256, 0
  p.lr, p.value_lr = 1e-5, 1e-4
  p.eval_every, p.eval_prompts, p.patience = 3, 16, 3
  return c
