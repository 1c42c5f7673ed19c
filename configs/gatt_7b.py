"""Ghost Attention for Llama 2 7B chat (Llama 2 Sec. 3.3), 1 node x 8 GPUs: dialogs of 1-20 user
turns under a synthetic system instruction (hobby, language, public figure; randomly combined, the
paper's constraints), answered turn by turn with the instruction concatenated to every user turn,
then SFT on them with the instruction in the first turn only and the loss on the last answer.

  python train.py --config=configs/gatt_7b.py --workdir=/ckpt/gatt_7b \\
      --config.init_from=/ckpt/rlhf_7b/final

The paper samples its latest RLHF model and gives no dialog count or schedule; the values below
are ours: the fine-tune of configs/raft_7b.py (the SFT step of configs/sft_7b.py, 1 epoch at a
constant 2e-5), 1,024 dialogs whose user turns are the stand-in data's prompts (HH-RLHF
harmless-base + Self-Instruct seeds), every dialog whose answers all finished kept
(``gatt.keep="finished"``: off the synthetic world there is no checker of the instruction, and so
no adherence evaluation either).
Memory plan (``XLA_FLAGS=--xla_force_host_platform_device_count=8 python train.py
--config=configs/gatt_7b.py --dry_run``, XLA:CPU buffer assignment, 2026-12-03): the fine-tuning
step (configs/sft_7b.py's) 43.75 GiB per device; a turn's sampling call (64 dialogs of up to
3,840 context tokens + 256 new ones, generation layout) 12.55 GiB params + 43.13 GiB temporaries
= 55.68 GiB; both fit in 80 GiB.
"""

from configs import raft_7b


def gatt(c):
  """``c`` (a rejection-sampling-style pod config) as Ghost Attention with our settings."""
  c.stage = "gatt"
  g = c.gatt
  g.num_dialogs = 1024
  g.max_turns = 20  # the paper: multi-turn dialogs, until the context is full
  g.keep = "finished"
  g.eval_dialogs = 0
  r = c.rejection_sampling
  r.k = 1
  r.help_rm = r.safety_rm = ""  # GAtt scores nothing
  # 64 dialogs per generation call; the longest call fills the context (4,096 tokens at 7B): a KV
  # cache of 64 x 4096 x 32 layers x 2 x 4096 x 2 B = 137 GB in bf16, 17 GB per device.
  r.batch_size = 64
  return c


def get_config():
  return gatt(raft_7b.get_config())  # the SFT step at 7B (bf16, minimal remat, (1, 8, 1))
