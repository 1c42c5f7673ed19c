"""Base configuration: every field of every stage, with its default and meaning.

Stage configs (``configs/tiny.py``, ``configs/sft_7b.py``, ...) start from ``get_config()`` here
and change what they need. Override any field on the command line, e.g.
``python train.py --config=configs/tiny.py --config.optimizer.lr=1e-5``.
"""

import ml_collections

from llama_jax.ppo.step import PPOConfig
from llama_jax.train import settings

PPO = PPOConfig()  # PPO's math defaults live in PPOConfig (llama_jax/ppo/step.py)


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Stage run by train.py: sft | reward | rejection_sampling | ppo | pipeline.
  c.stage = "sft"
  # Base seed: parameter init, data shuffling, sampling.
  c.seed = 0
  # Path of a converted checkpoint to start from (an orbax params directory written by
  # `python -m llama_jax.convert --to orbax`), or "" for random initialization.
  c.init_from = ""

  # ---- model (Meta params.json names; llama_jax.LlamaConfig) --------------------------------
  c.model = ml_collections.ConfigDict()
  # Preset the fields below override: tiny | llama2_7b | llama2_13b | llama2_34b | llama2_70b.
  c.model.preset = "tiny"
  # Architecture overrides; None keeps the preset's value.
  c.model.dim = ml_collections.config_dict.placeholder(int)
  c.model.n_layers = ml_collections.config_dict.placeholder(int)
  c.model.n_heads = ml_collections.config_dict.placeholder(int)
  c.model.n_kv_heads = ml_collections.config_dict.placeholder(int)
  # Vocabulary size; None = the tokenizer's size.
  c.model.vocab_size = ml_collections.config_dict.placeholder(int)
  c.model.multiple_of = ml_collections.config_dict.placeholder(int)
  c.model.ffn_dim_multiplier = ml_collections.config_dict.placeholder(float)
  c.model.norm_eps = ml_collections.config_dict.placeholder(float)
  c.model.rope_theta = ml_collections.config_dict.placeholder(float)
  # Longest sequence the model is used with (RoPE has no table, this is a validation bound).
  c.model.max_seq_len = ml_collections.config_dict.placeholder(int)
  # Compute dtype of activations (float32 | bfloat16); params and optimizer state stay float32.
  c.model.dtype = "float32"
  # Storage dtype of parameters.
  c.model.param_dtype = "float32"
  # nn.scan over layers (compiles one layer; False unrolls the same computation).
  c.model.scan_layers = True
  # Activation checkpointing per layer: none | minimal (save matmul outputs) | full.
  c.model.remat = "none"
  # jax.nn.dot_product_attention implementation: auto | xla | cudnn.
  c.model.attention_impl = "auto"

  # ---- tokenizer ------------------------------------------------------------------------------
  c.tokenizer = ml_collections.ConfigDict()
  # "world" = train the synthetic world's small BPE tokenizer into <workdir>/tokenizer.model;
  # otherwise a path to a SentencePiece model (e.g. ../shared/data/llama2-tokenizer/tokenizer.model).
  c.tokenizer.path = "world"
  # Vocabulary size of the world tokenizer (ignored for a path).
  c.tokenizer.world_vocab_size = 512

  # ---- data -----------------------------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  # SFT sources, comma-separated: world | hh_rlhf | self_instruct | jsonl.
  c.data.sft_sources = "world"
  # Sampling weights of the sources above, comma-separated ("" = proportional to their sizes).
  c.data.sft_weights = ""
  # Directory of the official HH-RLHF *.jsonl.gz files (e.g. ../shared/data/hh-rlhf).
  c.data.hh_rlhf_path = "../shared/data/hh-rlhf/harmless-base-test.jsonl.gz"
  # Self-Instruct seed tasks JSONL.
  c.data.self_instruct_path = "../shared/data/self-instruct/seed_tasks.jsonl"
  # Generic JSONL of SFT dialogs (schema in the README).
  c.data.sft_jsonl_path = ""
  # Share of each real-data source held out for evaluation (fixed-seed split).
  c.data.heldout_fraction = 0.05
  # Seed of the train/held-out split (kept separate from `seed` so runs share a split).
  c.data.split_seed = 1234
  # Synthetic world: number of SFT demonstrations and held-out prompts generated.
  c.data.world_sft_examples = 4000
  c.data.world_heldout_prompts = 200
  # Synthetic world: share of benign SFT demonstrations by careless annotators (non-answers and
  # false refusals; llama_jax.data.world.WorldConfig.careless_fraction). 0 = all gold.
  c.data.world_careless_fraction = 0.0
  # Synthetic world: benign task families (comma-separated, e.g. "count_words,reverse") whose
  # demonstrations are mostly a careless annotator's habit (world.HABITS: one non-answer or false
  # refusal per family), a share world_careless_task_fraction of them; the habit becomes SFT's
  # greedy answer on those families, a defect that preference feedback can see and fix.
  c.data.world_careless_tasks = ""
  c.data.world_careless_task_fraction = 0.6
  # Disjoint prompt streams of each split (world: a hash of the prompt text; file sources: of the
  # prompt): stages that draw prompts (annotation rounds, rejection-sampling iterations, PPO) take
  # different streams (their *.prompt_stream fields; the pipeline assigns them).
  c.data.prompt_streams = 8
  # Packed sequence length of SFT batches (Llama 2 SFT: 4096).
  c.data.max_seq_len = 256
  # Global batch size in packed sequences (Llama 2 SFT: 64).
  c.data.batch_size = 16
  # Where TFDS builders write their array_record files ("" = <workdir>/tfds).
  c.data.tfds_dir = ""

  # ---- optimizer, training loop, evaluation ------------------------------------------------------
  # Typed sections: every field's default, meaning and bounds are in llama_jax/train/settings.py
  # (Optimizer: AdamW 0.9 / 0.95 / 1e-5, weight decay 0.1, clip 1.0, cosine to 10%; Train: epochs,
  # steps, intervals, checkpoints; Eval: held-out samples and eval.py's prompt counts).
  c.optimizer = settings.config_section(settings.Optimizer)
  c.train = settings.config_section(settings.Train)
  c.eval = settings.config_section(settings.Eval)

  # ---- device mesh (llama_jax.sharding) ----------------------------------------------------------
  c.mesh = ml_collections.ConfigDict()
  # Mesh shape over (data, fsdp, tensor); -1 = the remaining devices.
  c.mesh.shape = (1, -1, 1)
  # Memory per device for the --dry_run fit verdict, in GiB (A100/H100: 80).
  c.mesh.device_memory_gib = 80.0

  # ---- on-policy preference annotation (stage "annotate"; llama_jax.recipe.annotate, Sec. 3.2.1) ----
  # Synthetic world only: K samples of the policy per train prompt, every pair of different
  # oracle quality kept as a preference pair (<workdir>/final/preferences.jsonl). The pipeline
  # runs it after SFT when num_prompts > 0 and adds the pairs to both reward models' mixtures
  # (source jsonl_preferences, weights pipeline.annotate_*_weight). Generation lengths and batch
  # size are rejection_sampling's.
  c.annotate = ml_collections.ConfigDict()
  c.annotate.num_prompts = 0
  c.annotate.k = 4
  c.annotate.temperature = 1.0
  # Pipeline: annotation rounds. 1 = once, on SFT samples; j > 1 adds a round before
  # rejection-sampling iteration j (or PPO) on the latest policy's samples, pairs accumulated,
  # RMs retrained (at most rs_iterations + 1 with PPO).
  c.annotate.rounds = 1
  # Set by the pipeline: this round's number (sampling key) and the previous round's pairs, which
  # are copied into this round's preferences.jsonl ("" = none).
  c.annotate.round = 1
  c.annotate.accumulate_from = ""
  # Train-prompt stream (data.prompt_streams; -1 = the whole split); set by the pipeline.
  c.annotate.prompt_stream = -1

  # ---- reward models (stage "reward"; llama_jax.reward, Llama 2 Sec. 3.2.2) --------------------
  # Generic JSONL of preference pairs (schema in llama_jax/data/sources.py), source
  # "jsonl_preferences" below.
  c.data.preference_jsonl_path = ""
  c.reward = ml_collections.ConfigDict()
  # Which reward model this run trains: helpfulness | safety (a label for logs and eval; the data
  # mixture below is what makes it one or the other).
  c.reward.model = "helpfulness"
  # Preference sources, comma-separated: world_helpfulness | world_safety | hh_rlhf |
  # jsonl_preferences. The first is the primary set: an epoch is one pass over it.
  c.reward.sources = "world_helpfulness,world_safety"
  # Mixture weights of the sources, same order ("" = proportional to their sizes). Paper: the
  # helpfulness RM takes all helpfulness data plus an equal amount from safety / open-source data
  # ("1,1"); the safety RM takes safety data (+ HH harmless) and helpfulness data at 90/10 ("0.9,0.1").
  c.reward.weights = "1,1"
  # Margin table m(rating) of the ranking loss (Table 27): none | small | large. Pairs without a
  # rating (e.g. HH-RLHF) get margin 0.
  c.reward.margin = "small"
  # Weight (>= 0) of the safety auxiliary loss added to the ranking loss (Llama 2 Appendix A.4,
  # Table 29): binary cross-entropy of sigmoid(r) against "this response is safe" from the pair's
  # safety label, so that Rs = 0.5 separates safe from unsafe responses (raises the recall of
  # unsafe responses). Pairs without a safety label get the ranking loss only. 0 = off; the
  # pipeline sets it for the safety RM.
  c.reward.safety_aux_weight = 0.0
  # Preference pairs per global batch (paper: 512 pairs = 1024 rows); divisible by processes and
  # by train.grad_accum_steps.
  c.reward.batch_size = 512
  # Row length of a response (prompt + response + EOS); set apart from SFT's data.max_seq_len
  # (Huang et al. 2024: preference data has its own length distribution).
  c.reward.max_seq_len = 4096
  # A pair longer than max_seq_len: "error" (rejected before step 0, naming file and line) or
  # "drop" (skipped, counted in <workdir>/data_stats.json).
  c.reward.overlong = "error"
  # Synthetic world: preference pairs generated per world source for train / held out.
  c.reward.world_train_pairs = 4000
  c.reward.world_heldout_pairs = 400
  # Held-out pairs per source scored at each evaluation (0 = all).
  c.reward.eval_pairs = 0

  # ---- rejection sampling (stage "rejection_sampling"; llama_jax.rejection_sampling.run, Llama 2 Sec. 3.2.3) ---
  c.rejection_sampling = ml_collections.ConfigDict()
  # Reward models (reward.save_reward_model directories, e.g. <rm workdir>/final). The safety RM
  # may be "" (then Rc = Rh).
  c.rejection_sampling.help_rm = ""
  c.rejection_sampling.safety_rm = ""
  # Checkpoint to sample from ("" = the policy in init_from); set it to a larger model's final/
  # to distil its best samples into the init_from policy (same tokenizer required).
  c.rejection_sampling.sample_from = ""
  # This iteration's number (RLHF-V<iteration>), recorded in every sampled record.
  c.rejection_sampling.iteration = 1
  # Sampled-set JSONL files of earlier iterations, comma-separated: their best samples are pooled
  # with this iteration's (the paper: choosing among the last iteration only caused regressions).
  c.rejection_sampling.pool_from = ""
  # Prompts sampled per iteration (world: from the train split; files: the prompt builders').
  c.rejection_sampling.num_prompts = 512
  # Samples per prompt (K) and their sampling settings.
  c.rejection_sampling.k = 8
  c.rejection_sampling.temperature = 1.0
  c.rejection_sampling.top_p = 1.0
  c.rejection_sampling.max_new_tokens = 64
  # Longest prompt in tokens (longer prompts are skipped, counted in data_stats.json).
  c.rejection_sampling.max_prompt_len = 192
  # Prompts per generation batch (each expands to batch_size * k rows).
  c.rejection_sampling.batch_size = 16
  # Rs cut of the combined reward (Llama 2: 0.15).
  c.rejection_sampling.safety_threshold = 0.15
  # Reward that picks the best sample: "rm" (the reward models above, Rc) | "oracle" (the
  # synthetic world's judge: the gold-reward control, llama_jax.reward.scoring).
  c.rejection_sampling.reward = "rm"
  # Sample at the temperature with the highest max-reward point of this iteration's Fig. 8 curve
  # (plot_prompts x plot_k samples per plot_temperatures) instead of `temperature` (the paper
  # re-tunes T per iteration; for RLHF models the optimum was 1.2-1.3).
  c.rejection_sampling.auto_temperature = False
  # Train-prompt stream (data.prompt_streams; -1 = the whole split); set by the pipeline.
  c.rejection_sampling.prompt_stream = -1
  # Fine-tuning on the pooled best samples (the SFT step): optimizer steps (0 = num_epochs
  # passes), epochs, peak LR (cosine to 10%, data.batch_size sequences of data.max_seq_len).
  c.rejection_sampling.num_steps = 0
  c.rejection_sampling.num_epochs = 1.0
  c.rejection_sampling.lr = 1e-5
  # Warmup of the fine-tuning LR as a share of its steps (the SFT warmup_steps do not apply).
  c.rejection_sampling.warmup_frac = 0.0
  # Figures 7/8: prompts sampled for the reward-vs-temperature curve (0 = skip it), the
  # temperatures, and K of those samples.
  c.rejection_sampling.plot_prompts = 32
  c.rejection_sampling.plot_temperatures = "0.6,0.8,1.0,1.2,1.4"
  c.rejection_sampling.plot_k = 8

  # ---- PPO (stage "ppo"; llama_jax.ppo.run, Llama 2 Sec. 3.2.3, Huang et al. 2024) --------------
  c.ppo = ml_collections.ConfigDict()
  # Frozen reward models (reward model directories); safety_rm "" = Rc = Rh.
  c.ppo.help_rm = ""
  c.ppo.safety_rm = ""
  # Value model initialization ("" = help_rm, as Huang et al. 2024; a policy checkpoint gets a new
  # head) and its head: "zero" (V = 0 at start, on the scale of the whitened returns, while the
  # RM head predicts raw RM logits) | "keep".
  c.ppo.value_from = ""
  c.ppo.value_head_init = "zero"
  # Reward: "rm" (the reward models' Rc) | "oracle" (the synthetic world's judge, the gold-reward
  # control of Gao et al. 2022; llama_jax.reward.scoring).
  c.ppo.reward = "rm"
  # SFT policy (final/ dir) for the held-out KL-to-SFT of every evaluation ("" = not logged):
  # the x-axis of the over-optimization curves (eval.py).
  c.ppo.sft_from = ""
  # Train-prompt stream (data.prompt_streams; -1 = the whole split); set by the pipeline.
  c.ppo.prompt_stream = -1
  # PPO iterations (paper: 200-400, with early stopping).
  c.ppo.num_iterations = 200
  # Prompts (rollouts) per iteration and per gradient step (paper: 512 and 64).
  c.ppo.batch_size = 512
  c.ppo.minibatch_size = PPO.minibatch_size
  # Passes over each rollout batch (paper: one gradient step per minibatch).
  c.ppo.epochs = PPO.epochs
  # KL coefficient (paper: 0.01 for 7B/13B, 0.005 for 34B/70B) and estimator k1 | k2 | k3.
  c.ppo.beta = PPO.beta
  c.ppo.kl_estimator = PPO.kl_estimator
  c.ppo.clip_eps = PPO.clip_eps
  c.ppo.value_clip = PPO.value_clip
  c.ppo.gamma = PPO.gamma
  c.ppo.lam = PPO.lam
  # Rollout sampling: temperature (also divides the logits of every log-prob), budget.
  c.ppo.temperature = PPO.temperature
  c.ppo.max_new_tokens = 64
  c.ppo.max_prompt_len = 192
  # EOS trick: whitened score of a completion without EOS (None = off).
  c.ppo.eos_penalty = PPO.eos_penalty
  c.ppo.safety_threshold = PPO.safety_threshold
  # Optimizer (policy and value alike): constant LR 1e-6 (paper); b1/b2/eps/weight decay/clip
  # come from c.optimizer (0.9, 0.95, 1e-5, 0.1, 1.0).
  c.ppo.lr = 1e-6
  c.ppo.value_lr = 1e-6
  # Training prompts: world: this many train-split prompts; file sources: this many of the
  # sources' train prompts (0 = all).
  c.ppo.num_prompts = 4096
  # Held-out evaluation every N iterations on eval_prompts distinct held-out prompts (one sample
  # each at ppo.temperature, fixed key), checkpoint selection by its mean reward, and early
  # stopping after `patience` evaluations without improvement (0 = never stop).
  c.ppo.eval_every = 10
  c.ppo.eval_prompts = 64
  c.ppo.patience = 3
  # Save a checkpoint every N iterations (the last one and SIGTERM always save).
  c.ppo.checkpoint_every = 10

  # ---- pipeline (stage "pipeline"; llama_jax.recipe.pipeline): SFT -> RMs -> RS x k -> PPO ------------
  c.pipeline = ml_collections.ConfigDict()
  # Rejection-sampling iterations (RLHF-V1..Vk) before PPO (0 = none).
  c.pipeline.rs_iterations = 2
  # Run PPO on top of the last rejection-sampled checkpoint.
  c.pipeline.ppo = True
  # Samples per prompt K of each rejection-sampling iteration, comma-separated ("" = every
  # iteration uses rejection_sampling.k).
  c.pipeline.rs_k = ""
  # A last rejection-sampling iteration on top of PPO (RLHF-V5 style: sample again after PPO).
  c.pipeline.rs_after_ppo = False
  # Sample every rejection-sampling iteration from this (larger) model's final/ dir and distil
  # its best samples into the pipeline's policy (Llama 2 sampled with 70B only); "" = the policy.
  c.pipeline.rs_sample_from = ""
  # Gold-reward control (synthetic world): a second PPO from the same policy with
  # ppo.reward="oracle" (stage ppo_oracle), so eval.py separates reward-model error from
  # optimization.
  c.pipeline.oracle_control = False
  # Safety RM's auxiliary safe/unsafe loss weight (reward.safety_aux_weight; Table 29).
  c.pipeline.safety_aux_weight = 1.0
  # Reward-model stages: sources / weights of each (c.reward's other fields apply to both).
  c.pipeline.help_sources = "world_helpfulness,world_safety"
  c.pipeline.help_weights = "1,1"
  c.pipeline.safety_sources = "world_safety,world_helpfulness"
  c.pipeline.safety_weights = "0.9,0.1"
  # Mixture weights of the annotated on-policy pairs (annotate.num_prompts > 0), added as the
  # last source of the helpfulness / safety reward model (ignored where the weights are "").
  c.pipeline.annotate_help_weight = 1.0
  c.pipeline.annotate_safety_weight = 0.1
  # Optimizer / length of the reward stages (the SFT settings above are the SFT stage's).
  c.pipeline.reward_lr = 1e-5
  c.pipeline.reward_num_epochs = 1.0
  c.pipeline.reward_num_steps = 0
  c.pipeline.reward_warmup_frac = 0.03
  return c
