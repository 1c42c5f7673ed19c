"""RAFT of the tiny SFT policy on the synthetic world (Dong et al. 2023), CPU-sized: 4 rounds, each
K = 8 samples for 256 new prompts from the current policy, the best sample of each prompt kept
(local ranking), 2 epochs of SFT on them (a few minutes on 2 CPU cores).

Start from the SFT stage and reward models of a ``configs/tiny.py`` pipeline (the same world, so
the same tokenizer: copy it into the workdir, or give its path)::

  python train.py --config=configs/raft_tiny.py --workdir=/tmp/p/raft \\
      --config.init_from=/tmp/p/sft/final --config.tokenizer.path=/tmp/p/sft/tokenizer.model \\
      --config.rejection_sampling.help_rm=/tmp/p/rm_helpfulness/final \\
      --config.rejection_sampling.safety_rm=/tmp/p/rm_safety/final

``--config.raft.keep_fraction=0.125`` ranks globally (the top 1/8 of each round's 2,048 samples);
``--config.raft.kl_coef=0.1`` ranks by the KL-regularized reward (what configs/compare_tiny.py
uses: ranked by the RM reward alone, RAFT over-optimizes the tiny RMs; see the README);
``--config.rejection_sampling.reward=oracle`` ranks by the world's judge (the gold-reward
control). ``final/`` is a policy (``eval.py``, ``init_from``).
"""

from configs import tiny


def get_config():
  c = tiny.get_config()  # the tiny model and the world of the SFT run it starts from
  c.stage = "raft"
  # Set on the command line: the SFT workdir's final/ (model shapes come from its params.json).
  c.init_from = ""
  c.raft.num_rounds = 4
  c.raft.keep_fraction = 0.0  # local ranking: the best of K per prompt (the paper's default)
  r = c.rejection_sampling
  # Reward models on the command line (or reward="oracle" on the world).
  r.help_rm, r.safety_rm, r.sample_from, r.pool_from = "", "", "", ""
  # b = 256 prompts x K = 8 per round: 4 rounds sample as much as one rejection-sampling
  # iteration of configs/tiny.py (2,048 x 4) and fine-tune on ~1,000 kept samples in all (RS:
  # ~950 pooled); 64 prompts per round gave ~60 kept samples, one SFT step per epoch.
  r.num_prompts = 256
  r.k = 8
  # The paper samples at temperature 1 (lambda = 1); no Fig. 8 per round.
  r.temperature = 1.0
  r.top_p = 1.0
  r.auto_temperature = False
  r.plot_prompts = 0
  # The world's answers and prompts as configs/tiny.py's rejection sampling.
  r.max_new_tokens = 32
  r.max_prompt_len = 80
  r.batch_size = 64  # 64 prompts x K = 512 rows per generation batch
  # Fine-tuning of each round as configs/tiny.py's rejection sampling: 2 epochs at LR 1e-4
  # (cosine to 10%), a fresh optimizer per round, on the data.batch_size = 16 packed rows.
  r.num_steps = 0
  r.num_epochs = 2.0
  r.lr = 1e-4
  r.warmup_frac = 0.0
  c.eval.num_samples = 0
  return c
