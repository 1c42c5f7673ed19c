"""The embedded default: SFT of a tiny Llama on the synthetic assistant world (no downloads).

``python train.py --config=configs/tiny.py`` runs in a few minutes on 2 CPU cores.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.stage = "sft"
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
  c.data.max_seq_len = 256
  c.data.batch_size = 16
  # Tiny models need a far larger LR than the paper's 2e-5 for 7B-70B.
  c.optimizer.lr = 3e-3
  c.optimizer.warmup_steps = 20
  c.train.num_epochs = 3.0
  c.train.log_every = 10
  c.train.eval_every = 0
  c.train.checkpoint_every = 100
  c.eval.num_samples = 8
  c.mesh.shape = (1, -1, 1)
  return c
