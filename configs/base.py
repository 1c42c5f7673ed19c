"""Base configuration: every field of every stage. The ``model`` section is written out below
(its fields are checked by ``LlamaConfig``); every other section is built from its typed
dataclass, where each field's default, meaning and bounds live: ``llama_jax/train/settings.py``
(``optimizer``, ``train``, ``eval``) and ``llama_jax/recipe/sections.py`` (the others).

Stage configs (``configs/tiny.py``, ``configs/sft_7b.py``, ...) start from ``get_config()`` here
and change what they need. Override any field on the command line, e.g.
``python train.py --config=configs/tiny.py --config.optimizer.lr=1e-5``.
"""

import ml_collections

from llama_jax.recipe import sections
from llama_jax.train import settings


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Stage run by train.py: sft | annotate | reward | rejection_sampling | ppo | dpo | rrhf | raft |
  # context_distillation | gatt | pipeline.
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

  # ---- tokenizer, data (fields documented in llama_jax/recipe/sections.py: Tokenizer, Data) ----
  # tokenizer: "world" (the synthetic world's BPE tokenizer) or a SentencePiece model path.
  c.tokenizer = settings.config_section(sections.Tokenizer)
  # data: SFT sources and weights, file paths, the synthetic world, split, packing, batch size.
  c.data = settings.config_section(sections.Data)

  # ---- optimizer, training loop, evaluation ------------------------------------------------------
  # Typed sections: every field's default, meaning and bounds are in llama_jax/train/settings.py
  # (Optimizer: AdamW 0.9 / 0.95 / 1e-5, weight decay 0.1, clip 1.0, cosine to 10%; Train: epochs,
  # steps, intervals, checkpoints; Eval: held-out samples and eval.py's prompt counts).
  c.optimizer = settings.config_section(settings.Optimizer)
  c.train = settings.config_section(settings.Train)
  c.eval = settings.config_section(settings.Eval)

  # ---- stage sections: every field's default, meaning and bounds are in
  # llama_jax/recipe/sections.py (PPO's math defaults come from PPOConfig, llama_jax/ppo/step.py).
  # Device mesh (llama_jax.sharding): shape over (data, fsdp, tensor), memory for --dry_run.
  c.mesh = settings.config_section(sections.Mesh)
  # On-policy preference annotation (stage "annotate"; llama_jax.recipe.annotate, Sec. 3.2.1).
  c.annotate = settings.config_section(sections.Annotate)
  # Reward models (stage "reward"; llama_jax.reward, Sec. 3.2.2).
  c.reward = settings.config_section(sections.Reward)
  # DPO (stage "dpo"; llama_jax.dpo, Rafailov et al. 2023): beta, the preference mixture, lengths.
  c.dpo = settings.config_section(sections.DPO)
  # RRHF (stage "rrhf"; llama_jax.rrhf, Yuan et al. 2023): ranking K scored responses per prompt.
  c.rrhf = settings.config_section(sections.RRHF)
  # RAFT (stage "raft"; llama_jax.raft, Dong et al. 2023): rounds of sample, rank, fine-tune.
  c.raft = settings.config_section(sections.RAFT)
  # Safety context distillation (stage "context_distillation"; Llama 2 Sec. 4.2.4).
  c.context_distillation = settings.config_section(sections.ContextDistillation)
  # Ghost Attention (stage "gatt"; llama_jax.gatt, Llama 2 Sec. 3.3).
  c.gatt = settings.config_section(sections.GAtt)
  # Rejection sampling (stage "rejection_sampling"; llama_jax.rejection_sampling.run, Sec. 3.2.3).
  c.rejection_sampling = settings.config_section(sections.RejectionSampling)
  # PPO (stage "ppo"; llama_jax.ppo.run, Sec. 3.2.3, Huang et al. 2024).
  c.ppo = settings.config_section(sections.PPO)
  # The whole recipe (stage "pipeline"; llama_jax.recipe.pipeline): SFT -> RMs -> RS x k -> PPO.
  c.pipeline = settings.config_section(sections.Pipeline)
  return c
