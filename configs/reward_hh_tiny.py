"""Real input: a safety reward model on HH-RLHF harmless-base pairs (Llama 2 Sec. 3.2.2).

Initialized from the ``configs/sft_hh_tiny.py`` run (same tiny model, real Llama 2 tokenizer)::

  python train.py --config=configs/sft_hh_tiny.py --workdir=workdir/sft_hh_tiny
  python train.py --config=configs/reward_hh_tiny.py --workdir=workdir/rm_hh_tiny \\
      --config.init_from=workdir/sft_hh_tiny/final
  python eval.py --workdir=workdir/rm_hh_tiny

HH-RLHF has no ratings, so the margin is ``none`` (plain Bradley-Terry). The train / held-out
split is the fixed-seed prompt hash of ``data.split_seed`` / ``data.heldout_fraction``, the same
as the SFT run's, so held-out pairs have prompts the SFT model never trained on.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.stage = "reward"
  # Set on the command line: <sft_hh_tiny workdir>/final (shapes come from its params.json).
  c.init_from = ""
  c.model.preset = "tiny"
  c.tokenizer.path = "../shared/data/llama2-tokenizer/tokenizer.model"
  c.data.hh_rlhf_path = "../shared/data/hh-rlhf/harmless-base-test.jsonl.gz"
  # Same split as configs/sft_hh_tiny.py.
  c.data.heldout_fraction = 0.05
  c.data.split_seed = 1234
  c.reward.model = "safety"
  # HH harmless only (the embedded world supplies the paper's helpfulness share in reward_tiny).
  c.reward.sources = "hh_rlhf"
  c.reward.weights = ""
  c.reward.margin = "none"
  c.reward.batch_size = 16
  # Pairs longer than 256 Llama tokens are skipped and counted in data_stats.json (CPU budget).
  c.reward.max_seq_len = 256
  c.reward.overlong = "drop"
  c.optimizer.lr = 3e-4
  c.optimizer.final_lr_ratio = 0.1
  c.optimizer.warmup_frac = 0.03
  c.optimizer.warmup_steps = 5
  c.train.num_epochs = 1.0
  c.train.log_every = 10
  c.train.checkpoint_every = 100
  c.mesh.shape = (1, -1, 1)
  return c
