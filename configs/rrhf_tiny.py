"""RRHF of the tiny SFT policy on the synthetic world (Yuan et al. 2023), CPU-sized.

Start from the SFT stage of ``configs/tiny.py`` (the same world, so the same tokenizer) and a
sampled set: K samples per prompt of that policy scored by the reward models, e.g. the first
rejection-sampling iteration's ``sampled.jsonl`` of a pipeline run (``configs/tiny.py``)::

  python train.py --config=configs/rrhf_tiny.py --workdir=/tmp/rrhf \\
      --config.init_from=<pipeline>/sft/final \\
      --config.rrhf.sampled=<pipeline>/rs_1/sampled.jsonl

``final/`` is a policy (``eval.py``, ``init_from``).
"""

from configs import tiny


def get_config():
  c = tiny.get_config()  # the tiny model and the world of the SFT run it starts from
  c.stage = "rrhf"
  # Set on the command line: the SFT workdir's final/ and the sampled-set JSONL file(s).
  c.init_from = ""
  c.rrhf.sampled = ""
  # The tiny pipeline's first rejection-sampling iteration samples K = 4 per prompt, at most 80
  # prompt + 32 response tokens: rows of 128 tokens hold every finished sample.
  c.rrhf.k = 4
  c.rrhf.batch_size = 16
  c.rrhf.max_seq_len = 128
  c.rrhf.rank_weight = 1.0
  c.rrhf.length_penalty = 1.0
  # The rejection-sampling fine-tune's settings on the same samples (LR 1e-4, 2 epochs), so the
  # two methods differ only in what they learn from the K samples.
  c.optimizer.lr = 1e-4
  c.optimizer.warmup_steps = 0
  c.optimizer.warmup_frac = 0.0
  c.train.num_epochs = 2.0
  c.train.num_steps = 0
  c.train.grad_accum_steps = 1
  c.train.log_every = 20
  c.train.eval_every = 64
  c.train.checkpoint_every = 64
  c.mesh.shape = (1, -1, 1)
  return c
