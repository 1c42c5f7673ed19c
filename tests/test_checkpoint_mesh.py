"""A TrainState checkpoint saved on one mesh restores onto another (llama_jax.train.checkpoint).

Runs in a subprocess with 8 emulated CPU devices (the device count is fixed before jax is
imported; this pytest process has already imported it). The state is trained one step on mesh
(1, 8, 1) (FSDP), saved with ``Checkpointer``, and restored into the abstract sharded state of
mesh (2, 2, 2); every leaf must equal the saved value exactly once gathered, and carry the new
mesh's sharding (shard shapes written out here by hand).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = r'''
import functools, json, sys
import jax, numpy as np
from llama_jax import sharding
from llama_jax.config import LlamaConfig
from llama_jax.sft import step as sft
from llama_jax.train import optim
from llama_jax.train.checkpoint import Checkpointer
from llama_jax.train.state import StateSetup

directory = sys.argv[1]
cfg = LlamaConfig.tiny(dim=64, n_heads=8, n_kv_heads=4, vocab_size=256, multiple_of=16)
opt = optim.make_optimizer(dict(lr=1e-2, b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.1,
                                grad_clip=1.0, schedule="constant"), 10)
rules = sharding.DEFAULT_RULES

def setup_for(shape):
  mesh = sharding.make_mesh(shape)
  return mesh, StateSetup(cfg, mesh, rules, opt, seed=0)

mesh_a, setup_a = setup_for((1, 8, 1))
state = setup_a.fresh_state(
    lambda: sharding.init_params_sharded(cfg, jax.random.key(0), mesh_a, rules))
step = setup_a.jit_step(functools.partial(sft.train_step, cfg=cfg, optimizer=opt))
rng = np.random.default_rng(0)
tok = rng.integers(0, 256, (8, 17), dtype=np.int32)
batch = {"inputs": tok[:, :-1], "targets": tok[:, 1:], "loss_mask": np.ones((8, 16), np.float32),
         "segment_ids": np.ones((8, 16), np.int32),
         "positions": np.tile(np.arange(16, dtype=np.int32), (8, 1))}
batch = jax.device_put(batch, setup_a.batch_sharding)
state, _ = step(state, batch, jax.random.key(0))
saved = jax.tree.map(np.asarray, jax.device_get(state))
ckpt = Checkpointer(directory, async_save=False)
ckpt.save(1, state)
ckpt.close()

mesh_b, setup_b = setup_for((2, 2, 2))
restored = Checkpointer(directory).restore(setup_b.abstract_sharded_state())
flat_saved = jax.tree_util.tree_flatten_with_path(saved)[0]
flat_restored = jax.tree.leaves(restored)
leaves = {}
for (path, want), got in zip(flat_saved, flat_restored):
  name = jax.tree_util.keystr(path)
  leaves[name] = {
      "equal": bool(np.array_equal(np.asarray(got), want)) and got.dtype == want.dtype,
      "mesh": dict(got.sharding.mesh.shape),
      "shard_shape": list(got.sharding.shard_shape(got.shape)),
      "shape": list(got.shape)}
same = jax.tree.structure(saved) == jax.tree.structure(restored)
print("RESULT " + json.dumps({"step": int(restored.step), "leaves": leaves, "same_structure": same}))
'''


def test_checkpoint_restores_onto_another_mesh(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_COMPILATION_CACHE_DIR=str(ROOT / ".jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "ckpt")], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stderr[-4000:]
  result = json.loads(lines[-1][len("RESULT "):])
  assert result["same_structure"] and result["step"] == 1
  leaves = result["leaves"]
  not_equal = [k for k, v in leaves.items() if not v["equal"]]
  assert not not_equal, not_equal
  assert all(v["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2} for v in leaves.values())
  # Shard shapes on (2, 2, 2): embed / fsdp 2, heads, kv heads, ffn, vocab / tensor 2.
  # d 64, n 8, k 4, h 8, ffn 176 (Meta's rounding of 2/3 * 4d to multiple_of 16), v 256, L 2.
  expected = {"['tok_embeddings']": [128, 32], "['output']": [32, 128], "['norm']": [64],
              "['layers']['attention']['wq']": [2, 32, 4, 8],
              "['layers']['attention']['wk']": [2, 32, 2, 8],
              "['layers']['attention']['wo']": [2, 4, 8, 32],
              "['layers']['feed_forward']['w2']": [2, 88, 32]}
  for suffix, shard in expected.items():
    matches = [k for k in leaves if k.endswith(suffix)]
    assert len(matches) >= 3, (suffix, matches)  # params, AdamW mu and nu
    for k in matches:
      assert leaves[k]["shard_shape"] == shard, (k, leaves[k])
