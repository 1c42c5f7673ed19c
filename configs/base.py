"""Base configuration: every field of every stage, with its default and meaning.

Stage configs (``configs/tiny.py``, ``configs/sft_7b.py``, ...) start from ``get_config()`` here
and change what they need. Override any field on the command line, e.g.
``python train.py --config=configs/tiny.py --config.optimizer.lr=1e-5``.
"""

import ml_collections


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
  # Packed sequence length of SFT batches (Llama 2 SFT: 4096).
  c.data.max_seq_len = 256
  # Global batch size in packed sequences (Llama 2 SFT: 64).
  c.data.batch_size = 16
  # Where TFDS builders write their array_record files ("" = <workdir>/tfds).
  c.data.tfds_dir = ""

  # ---- optimizer (llama_jax.optim) ------------------------------------------------------------
  c.optimizer = ml_collections.ConfigDict()
  # Peak learning rate (Llama 2 SFT: 2e-5).
  c.optimizer.lr = 2e-5
  # AdamW moments and epsilon (Llama 2: 0.9, 0.95, 1e-5).
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-5
  # Decoupled weight decay on matrices (not RMSNorm scales).
  c.optimizer.weight_decay = 0.1
  # Gradient clipping by global norm (0 = off).
  c.optimizer.grad_clip = 1.0
  # cosine (decay to final_lr_ratio * lr) | constant.
  c.optimizer.schedule = "cosine"
  c.optimizer.final_lr_ratio = 0.1
  # Warmup: max(warmup_steps, warmup_frac * total steps).
  c.optimizer.warmup_steps = 0
  c.optimizer.warmup_frac = 0.0

  # ---- training loop ----------------------------------------------------------------------------
  c.train = ml_collections.ConfigDict()
  # Number of epochs over the training set (Llama 2 SFT: 2); used when num_steps is 0.
  c.train.num_epochs = 2.0
  # Total optimizer steps; 0 = derived from num_epochs.
  c.train.num_steps = 0
  # Stop after this many steps in one invocation (0 = run to the end); the next invocation resumes
  # from the checkpoint, bitwise identically (for time-limited jobs).
  c.train.stop_after_steps = 0
  # Microbatches per step (gradient accumulation); the batch size must be divisible by it.
  c.train.grad_accum_steps = 1
  # Log train metrics every N steps.
  c.train.log_every = 10
  # Held-out evaluation every N steps (0 = only at the end).
  c.train.eval_every = 0
  # Save a checkpoint every N steps (0 = only at the end / on SIGTERM).
  c.train.checkpoint_every = 100
  # Checkpoints kept.
  c.train.keep_checkpoints = 2
  # Save checkpoints asynchronously.
  c.train.async_checkpoint = True

  # ---- evaluation -------------------------------------------------------------------------------
  c.eval = ml_collections.ConfigDict()
  # Held-out batches for loss/perplexity (0 = all).
  c.eval.num_batches = 0
  # Sampled completions written to <workdir>/samples/ at each evaluation.
  c.eval.num_samples = 8
  # Generation settings of evaluation samples (0 = greedy).
  c.eval.max_new_tokens = 48
  c.eval.temperature = 0.0
  # Held-out prompts judged by the oracle in eval.py (synthetic world).
  c.eval.num_prompts = 200

  # ---- device mesh (llama_jax.sharding) ----------------------------------------------------------
  c.mesh = ml_collections.ConfigDict()
  # Mesh shape over (data, fsdp, tensor); -1 = the remaining devices.
  c.mesh.shape = (1, -1, 1)
  # Memory per device for the --dry_run fit verdict, in GiB (A100/H100: 80).
  c.mesh.device_memory_gib = 80.0

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
  return c
