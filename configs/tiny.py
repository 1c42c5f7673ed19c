"""The embedded default: the whole Llama-2-Chat pipeline of a tiny Llama on the synthetic
assistant world (no downloads): SFT -> on-policy preference annotation -> helpfulness and safety
RMs -> rejection sampling (RLHF-V1) -> new annotation round, RMs retrained -> RLHF-V2 -> again ->
PPO, in ``<workdir>/{sft,annotate,rm_helpfulness,rm_safety,rs_1,annotate_2,...,ppo}``.

``python train.py --config=configs/tiny.py`` runs it (under 20 minutes on 2 CPU cores);
``--config.stage=sft`` runs the SFT stage alone. ``python eval.py --workdir=<workdir>`` compares
the SFT, rejection-sampled and PPO policies.
"""

from configs import base


def get_config():
  c = base.get_config()
  # The whole recipe (llama_jax.recipe.pipeline); the SFT settings below are its first stage's.
  c.stage = "pipeline"
  # A tiny GQA Llama; vocab_size comes from the world tokenizer (512 pieces).
  c.model.preset = "tiny"
  c.model.dim = 128
  c.model.n_layers = 2
  c.model.n_heads = 4
  c.model.n_kv_heads = 2
  c.model.multiple_of = 32
  c.model.max_seq_len = 256
  c.tokenizer.path = "world"
  c.data.sft_sources = "world"
  c.data.world_sft_examples = 4000
  c.data.world_heldout_prompts = 200
  # Careless annotators (real SFT data varies in quality, Llama 2 Sec. 5.1): 60% of the
  # demonstrations of three task families are that family's habit (a non-answer or a false
  # refusal), so SFT's greedy answer there is the habit; 10% of all benign demonstrations are
  # careless at random. The RMs, which only compare, let RLHF move past both.
  c.data.world_careless_fraction = 0.1
  c.data.world_careless_tasks = "count_words,reverse,count_letter"
  c.data.world_careless_task_fraction = 0.6
  c.data.max_seq_len = 256
  c.data.batch_size = 16
  # Tiny models need a far larger LR than the paper's 2e-5 for 7B-70B.
  c.optimizer.lr = 3e-3
  c.optimizer.warmup_steps = 20
  c.train.num_epochs = 8.0
  c.train.log_every = 10
  c.train.eval_every = 0
  c.train.checkpoint_every = 100
  c.eval.num_samples = 8
  # eval.py: 1,000 held-out prompts (about 750 benign: standard error of helpfulness ~0.018).
  c.eval.num_prompts = 1000
  c.mesh.shape = (1, -1, 1)

  # ---- pipeline stages after SFT (stage "pipeline") --------------------------------------------
  c.pipeline.rs_iterations = 2
  c.pipeline.ppo = True
  # The gold-reward control: a second PPO from the same policy on the same prompts with the
  # oracle as its reward (stage ppo_oracle), so eval.py separates reward-model error from
  # optimization.
  c.pipeline.oracle_control = True
  # On-policy preference batch (Sec. 3.2.1): 2,048 train prompts x 4 SFT samples judged by the
  # oracle; the pairs join both RMs' mixtures. Without it the tiny RMs, trained only on the
  # world's templated pairs, pick wrong answers among the policy's own samples.
  c.annotate.num_prompts = 2048
  c.annotate.k = 4
  # Three rounds: on SFT, RLHF-V1 and RLHF-V2 samples, each retraining both RMs on all batches so
  # far (measured: PPO's oracle helpfulness 0.407 -> 0.430 greedy, 0.322 -> 0.339 sampled vs one
  # round; +4 min).
  c.annotate.rounds = 3
  # Reward models as configs/reward_tiny.py: one epoch over 1,600 primary pairs, batch 16 pairs.
  c.reward.batch_size = 16
  c.reward.max_seq_len = 128
  c.reward.margin = "small"
  c.reward.world_train_pairs = 1600
  c.reward.world_heldout_pairs = 400
  c.pipeline.reward_lr = 3e-4
  c.pipeline.reward_num_epochs = 1.0
  c.pipeline.reward_warmup_frac = 0.03
  # Rejection sampling: 2,048 prompts x K=4 samples per iteration, 2 epochs over the pooled best
  # at LR 1e-4 (256 prompts and 8-32 steps at LR 5e-4 lowered the oracle accuracy even with the
  # oracle's own picks: a small pooled set fine-tuned hard overwrites what SFT learned).
  c.rejection_sampling.num_prompts = 2048
  c.rejection_sampling.k = 4
  c.rejection_sampling.temperature = 1.0
  # Each iteration samples at the best temperature of its own Fig. 8 curve (32 prompts x 4).
  c.rejection_sampling.auto_temperature = True
  c.rejection_sampling.max_new_tokens = 32
  c.rejection_sampling.max_prompt_len = 80
  c.rejection_sampling.batch_size = 128
  c.rejection_sampling.num_steps = 0
  c.rejection_sampling.num_epochs = 2.0
  c.rejection_sampling.lr = 1e-4
  c.rejection_sampling.plot_prompts = 32
  c.rejection_sampling.plot_k = 4
  # PPO: 256 rollouts per iteration in minibatches of 32, 2 passes (epochs) over each batch (16
  # gradient steps per iteration); tiny models need a far larger LR than the paper's 1e-6.
  # Measured on the RLHF-V2 policy: with 64 rollouts per iteration the updates were noise (at LR
  # 5e-4 even the oracle-reward control collapsed); with 256 the control gained steadily.
  c.ppo.num_iterations = 20
  c.ppo.batch_size = 256
  c.ppo.minibatch_size = 32
  c.ppo.epochs = 2
  c.ppo.max_new_tokens = 32
  c.ppo.max_prompt_len = 80
  c.ppo.lr = 1.5e-4
  c.ppo.value_lr = 1e-3
  # beta 0.1, not the paper's 0.01: the tiny RMs barely check answers and PPO exploits them.
  # Measured from RLHF-V2 (greedy oracle helpfulness 0.454 on eval.py's prompts, SFT 0.310),
  # 20 iterations: beta 0.05 / LR 2e-4 -> 0.313 (KL grew to 2-3 nats: over-optimization);
  # beta 0.1 / LR 1.5e-4 -> 0.426 (clipfrac 0.017).
  c.ppo.beta = 0.1
  c.ppo.num_prompts = 2048
  c.ppo.eval_every = 5
  c.ppo.eval_prompts = 256
  c.ppo.patience = 3
  c.ppo.checkpoint_every = 10
  return c
