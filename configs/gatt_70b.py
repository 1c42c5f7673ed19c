"""Ghost Attention for Llama 2 70B chat (Llama 2 Sec. 3.3) on 8 x 8 GPUs: the settings of
configs/gatt_7b.py with the 70B model and the sampling and fine-tuning settings of
configs/raft_70b.py (configs/rs_70b.py's fine-tune).

  python train.py --config=configs/gatt_70b.py --workdir=/ckpt/gatt_70b \\
      --config.init_from=/ckpt/rlhf_70b/final

Memory plan (``XLA_FLAGS=--xla_force_host_platform_device_count=64 python train.py
--config=configs/gatt_70b.py --dry_run``, XLA:CPU, 2026-12-03): the fine-tuning step 38.18 GiB
per device; a turn's sampling call (64 dialogs filling the 4,096-token context) 16.06 GiB params
+ 33.80 GiB temporaries = 49.87 GiB; both fit in 80 GiB.
"""

from configs import gatt_7b, raft_70b


def get_config():
  # 70B on (1, 8, 8): bf16, full remat, the SFT step of sft_70b.
  return gatt_7b.gatt(raft_70b.get_config())
