"""Real input: the whole pipeline (SFT -> RMs -> 2 rejection-sampling iterations -> PPO) of a tiny
Llama with the real Llama 2 tokenizer on HH-RLHF harmless-base + Self-Instruct (../shared/data).

``python train.py --config=configs/pipeline_hh_tiny.py --workdir=workdir/pipeline_hh_tiny`` then
``python eval.py --workdir=workdir/pipeline_hh_tiny`` (no oracle on real data: the comparison
reports reward-model scores with intervals, KL to SFT, lengths and truncation, and the reward win
rate against SFT).

Both reward models train on the HH-RLHF harmless-base pairs (the only preference file shipped);
HH prompts are safety prompts (``is_safety``), Self-Instruct prompts are not. The train prompts
are split into three disjoint streams (``data.prompt_streams``), one each for RLHF-V1, RLHF-V2
and PPO (about 600 prompts each); 15% of the prompts are held out (about 300, of which PPO
selects its checkpoint with 64 and ``eval.py`` evaluates on the rest).
"""

from configs import sft_hh_tiny


def get_config():
  c = sft_hh_tiny.get_config()
  c.stage = "pipeline"
  c.data.heldout_fraction = 0.15
  c.data.prompt_streams = 3
  # SFT: shorter than sft_hh_tiny's 150 steps to keep the whole pipeline within 25 min on CPU.
  c.train.num_steps = 100
  c.train.checkpoint_every = 50
  # eval.py: every held-out prompt (the file sources have fewer than 1,000), 4 samples each.
  c.eval.num_prompts = 1000
  c.eval.max_new_tokens = 48
  c.eval.samples_per_prompt = 4
  # Reward models: HH-RLHF pairs (no ratings: margin 0), overlong pairs dropped, one epoch.
  c.pipeline.help_sources = "hh_rlhf"
  c.pipeline.help_weights = ""
  c.pipeline.safety_sources = "hh_rlhf"
  c.pipeline.safety_weights = ""
  c.pipeline.safety_aux_weight = 0.0  # HH pairs carry no safety labels
  c.reward.batch_size = 8
  c.reward.max_seq_len = 320
  c.reward.overlong = "drop"
  c.reward.eval_pairs = 0
  c.pipeline.reward_lr = 3e-4
  c.pipeline.reward_num_steps = 0
  c.pipeline.reward_num_epochs = 1.0
  # Rejection sampling: every prompt of its stream (~600) x K=4, 48 new tokens, at the best
  # temperature of Fig. 8; one epoch over the pooled best at LR 3e-4.
  c.pipeline.rs_iterations = 2
  r = c.rejection_sampling
  # num_prompts above the stream's size: all of them.
  r.num_prompts, r.k, r.temperature, r.max_new_tokens = 100000, 4, 1.0, 48
  r.auto_temperature = True
  r.max_prompt_len, r.batch_size = 256, 32
  r.num_steps, r.num_epochs, r.lr = 0, 1.0, 3e-4
  r.plot_prompts, r.plot_k, r.plot_temperatures = 16, 4, "0.6,0.8,1.0,1.2"
  # PPO: 20 iterations of 64 rollouts (minibatch 16, 2 epochs) from its stream (~600 prompts),
  # held-out evaluation every 5 on 64 prompts.
  p = c.ppo
  p.num_iterations, p.batch_size, p.minibatch_size, p.epochs = 20, 64, 16, 2
  p.max_new_tokens, p.max_prompt_len, p.num_prompts = 48, 256, 0
  p.lr, p.value_lr, p.beta = 1e-4, 1e-3, 0.05
  p.eval_every, p.eval_prompts, p.patience = 5, 64, 3
  return c
