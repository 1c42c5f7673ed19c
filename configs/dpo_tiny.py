"""DPO of the tiny SFT policy on the synthetic world (Rafailov et al. 2023), CPU-sized.

Start from the SFT stage of ``configs/tiny.py`` (the same world, so the same tokenizer)::

  python train.py --config=configs/tiny.py --config.stage=sft --workdir=/tmp/dpo/sft
  python train.py --config=configs/dpo_tiny.py --workdir=/tmp/dpo/dpo \\
      --config.init_from=/tmp/dpo/sft/final

The SFT policy is also the reference: its log-probs of the pairs are computed once before step 0
(``<workdir>/reference_logps.npz``). ``final/`` is a policy (``eval.py``, ``init_from``).
"""

from configs import tiny


def get_config():
  c = tiny.get_config()  # the tiny model and the world of the SFT run it starts from
  c.stage = "dpo"
  # Set on the command line: the SFT workdir's final/ (model shapes come from its params.json).
  c.init_from = ""
  c.dpo.beta = 0.1
  # The helpfulness RM's mixture: all helpfulness pairs plus an equal amount of safety pairs.
  c.dpo.sources, c.dpo.weights = "world_helpfulness,world_safety", "1,1"
  # One epoch over 1,600 primary pairs in batches of 16 pairs: 200 steps (about a minute on 2
  # CPU cores, the reference pass included). World pairs are at most 100 tokens long.
  c.dpo.batch_size = 16
  c.dpo.max_seq_len = 128
  c.dpo.world_train_pairs = 1600
  c.dpo.world_heldout_pairs = 400
  c.dpo.eval_pairs = 0
  # The paper's schedule (linear warmup, then constant) with AdamW (the base optimizer) instead
  # of RMSprop; tiny models need a far larger LR than the paper's 1e-6.
  c.optimizer.lr = 1e-4
  c.optimizer.schedule = "constant"
  c.optimizer.warmup_steps = 20
  c.optimizer.warmup_frac = 0.0
  c.train.num_epochs = 1.0
  c.train.num_steps = 0
  c.train.grad_accum_steps = 1
  c.train.log_every = 20
  c.train.eval_every = 50
  c.train.checkpoint_every = 100
  c.mesh.shape = (1, -1, 1)
  return c
