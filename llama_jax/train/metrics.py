"""Metric logging: TensorBoard event files (tensorboardX) plus a JSONL of the same scalars,
and a tqdm progress bar with step, loss, tokens/s and ETA. Only process 0 writes."""

from __future__ import annotations

import json
import os
from typing import Mapping, Optional

import jax
import numpy as np
from tensorboardX import SummaryWriter
from tqdm.auto import tqdm


class MetricWriter:
  """Write scalars to ``<logdir>/events.*`` (TensorBoard) and ``<logdir>/metrics.jsonl``.

  Each JSONL line is ``{"step": int, "split": str, <name>: float, ...}``; ``split`` is e.g.
  ``train`` or ``eval`` (the TensorBoard tag is ``<split>/<name>``).

  ``resume_step``: a run resuming from its checkpoint at this step drops what an interrupted
  run logged after it (JSONL rows with a larger step, or all rows when it is 0; TensorBoard's
  ``purge_step``), so no step appears twice.
  """

  def __init__(self, logdir: str, enabled: Optional[bool] = None,
               resume_step: Optional[int] = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.logdir = logdir
    self._tb = None
    self._jsonl = None
    if self.enabled:
      os.makedirs(logdir, exist_ok=True)
      path = os.path.join(logdir, "metrics.jsonl")
      purge = None
      if resume_step is not None:
        purge = resume_step + 1 if resume_step > 0 else 0
        if os.path.exists(path):
          keep = [r for r in read_jsonl(path) if 0 < resume_step and r["step"] <= resume_step]
          with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)
      self._tb = SummaryWriter(logdir, purge_step=purge)
      self._jsonl = open(path, "a")

  def write(self, step: int, scalars: Mapping[str, float], split: str = "train"):
    if not self.enabled:
      return
    clean = {k: float(np.asarray(v)) for k, v in scalars.items()}
    for name, value in clean.items():
      self._tb.add_scalar(f"{split}/{name}", value, step)
    self._jsonl.write(json.dumps({"step": int(step), "split": split, **clean}) + "\n")
    self._jsonl.flush()

  def close(self):
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


def read_jsonl(path: str):
  """Records of a ``metrics.jsonl`` file, in order."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """tqdm bar over steps showing loss and tokens/s; ETA comes from tqdm."""

  def __init__(self, total: int, initial: int = 0, desc: str = "train"):
    self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                     disable=jax.process_index() != 0)

  def update(self, n: int = 1, **postfix):
    self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                          refresh=False)
    self._bar.update(n)

  def close(self):
    self._bar.close()
