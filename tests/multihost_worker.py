"""One process of a multi-process SFT run on localhost, for tests/test_multihost.py.

Usage::

  python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz MESHES

``MESHES`` is a ";"-separated list of "data,fsdp,tensor" shapes (e.g. "4,1,1;1,2,2"), trained
one after the other in the same processes (one runtime start-up for all). Each process joins the
JAX runtime through ``sharding.initialize_distributed`` (CPU collectives over gloo), loads only
its own rows of the global batch (``make_batch``) with
``sharding.global_batch_from_process_local``, runs ``STEPS`` SFT steps of a tiny Llama per mesh,
and process 0 writes the gathered params, the per-step losses and the gathered global batch to
``OUT.npz`` (keys prefixed by the mesh text). The same functions run single-process in the test
as the control.
"""

from __future__ import annotations

import functools
import sys

import numpy as np

STEPS = 3
GLOBAL_BATCH, SEQ = 8, 16


def model_config():
  from llama_jax.config import LlamaConfig  # pylint: disable=import-outside-toplevel
  return LlamaConfig.tiny(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256,
                          multiple_of=16, max_seq_len=SEQ)


def make_batch(seed: int = 0) -> dict:
  """The global SFT batch, [GLOBAL_BATCH, SEQ] numpy arrays (same on every process)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, 256, (GLOBAL_BATCH, SEQ + 1), dtype=np.int32)
  loss_mask = (rng.random((GLOBAL_BATCH, SEQ)) < 0.7).astype(np.float32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": loss_mask,
          "segment_ids": np.ones((GLOBAL_BATCH, SEQ), np.int32),
          "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (GLOBAL_BATCH, SEQ)).copy()}


def make_optimizer():
  from llama_jax.train import optim  # pylint: disable=import-outside-toplevel
  return optim.make_optimizer(dict(lr=1e-2, b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.1,
                                   grad_clip=1.0, schedule="constant"), STEPS)


def train(mesh, local_batch: dict):
  """STEPS SFT steps on ``mesh`` from this process's rows; returns (state, losses, global batch)."""
  import jax  # pylint: disable=import-outside-toplevel
  from llama_jax import sharding  # pylint: disable=import-outside-toplevel
  from llama_jax.sft import step as sft  # pylint: disable=import-outside-toplevel
  from llama_jax.train.state import StateSetup  # pylint: disable=import-outside-toplevel
  cfg, optimizer = model_config(), make_optimizer()
  rules = sharding.DEFAULT_RULES
  setup = StateSetup(cfg, mesh, rules, optimizer, seed=0)
  state = setup.fresh_state(
      lambda: sharding.init_params_sharded(cfg, jax.random.key(0), mesh, rules))
  step = setup.jit_step(functools.partial(sft.train_step, cfg=cfg, optimizer=optimizer))
  batch = sharding.global_batch_from_process_local(local_batch, mesh, setup.batch_sharding)
  losses = []
  for _ in range(STEPS):
    state, metrics = step(state, batch, jax.random.key(0))
    losses.append(metrics["loss"])
  return state, losses, batch


def main(argv):
  pid, nproc, port, out, meshes = int(argv[1]), int(argv[2]), int(argv[3]), argv[4], argv[5]
  import jax  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  from llama_jax import sharding  # pylint: disable=import-outside-toplevel
  sharding.initialize_distributed(f"127.0.0.1:{port}", nproc, pid)
  full = make_batch()
  rows = GLOBAL_BATCH // jax.process_count()
  local = {k: v[pid * rows:(pid + 1) * rows] for k, v in full.items()}
  results = {"num_devices": np.asarray(jax.device_count()),
             "num_processes": np.asarray(jax.process_count())}
  for mesh_text in meshes.split(";"):
    mesh = sharding.make_mesh(tuple(int(x) for x in mesh_text.split(",")))
    state, losses, batch = train(mesh, local)
    params = multihost_utils.process_allgather(state.params, tiled=True)
    gathered_batch = multihost_utils.process_allgather(batch, tiled=True)
    results[f"{mesh_text}/losses"] = np.asarray([float(x) for x in jax.device_get(losses)])
    for p, x in jax.tree_util.tree_flatten_with_path(params)[0]:
      name = jax.tree_util.keystr(p, simple=True, separator="/")
      results[f"{mesh_text}/param/{name}"] = np.asarray(x)
    for k, v in gathered_batch.items():
      results[f"{mesh_text}/batch/{k}"] = np.asarray(v)
  if pid == 0:
    np.savez(out, **results)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv)
