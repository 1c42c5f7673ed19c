"""Reward models of the embedded world on the tiny Llama (Llama 2 Sec. 3.2.2), CPU-sized.

Start from the SFT run of ``configs/tiny.py``::

  python train.py --config=configs/tiny.py --workdir=/tmp/rw/sft
  python train.py --config=configs/reward_tiny.py:helpfulness --workdir=/tmp/rw/rm_help \\
      --config.init_from=/tmp/rw/sft/final
  python train.py --config=configs/reward_tiny.py:safety --workdir=/tmp/rw/rm_safe \\
      --config.init_from=/tmp/rw/sft/final

The argument after ``:`` picks the model and its mixture (default ``helpfulness``).
"""

from configs import base

# model -> (sources, weights): the paper's mixtures on the world's pair sets.
MIXTURES = {
    # All helpfulness pairs plus an equal amount of safety pairs.
    "helpfulness": ("world_helpfulness,world_safety", "1,1"),
    # Safety pairs mixed 90/10 with helpfulness pairs.
    "safety": ("world_safety,world_helpfulness", "0.9,0.1"),
}


def get_config(model: str = "helpfulness"):
  if model not in MIXTURES:
    raise ValueError(f"configs/reward_tiny.py: model must be one of {tuple(MIXTURES)}, got {model!r}")
  c = base.get_config()
  c.stage = "reward"
  # Set on the command line: the SFT workdir's final/ (model shapes come from its params.json).
  c.init_from = ""
  c.model.preset = "tiny"
  c.tokenizer.path = "world"
  c.reward.model = model
  c.reward.sources, c.reward.weights = MIXTURES[model]
  c.reward.margin = "small"
  # One epoch over 1,600 primary pairs in batches of 16 pairs: 200 steps (helpfulness) / 112
  # (safety), ~2-3 min each on 2 CPU cores. World pairs are at most 100 tokens long.
  c.reward.batch_size = 16
  c.reward.max_seq_len = 128
  c.reward.world_train_pairs = 1600
  c.reward.world_heldout_pairs = 600
  # Tiny models need a far larger LR than the paper's 1e-5; schedule as the paper (cosine to 10%,
  # warmup 3% of steps, at least 5).
  c.optimizer.lr = 3e-4
  c.optimizer.final_lr_ratio = 0.1
  c.optimizer.warmup_frac = 0.03
  c.optimizer.warmup_steps = 5
  c.train.num_epochs = 1.0
  c.train.log_every = 20
  c.train.eval_every = 0
  c.train.checkpoint_every = 200
  c.mesh.shape = (1, -1, 1)
  return c
