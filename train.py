"""Train a stage of the Llama-2-Chat recipe: ``python train.py --config=configs/tiny.py``.

Flags: ``--config`` (an ml_collections config file; override fields with ``--config.x.y=v``),
``--workdir`` (checkpoints, logs, samples), ``--dry_run`` (compile the step for the configured
mesh and print the per-device memory plan instead of training), ``--coordinator_address``,
``--num_processes``, ``--process_id`` (multi-host; SLURM is detected without them),
``--jax_cache_dir`` (JAX's persistent compilation cache, default ``~/.cache/llama_jax/jax``),
``--traceback`` (show the full traceback of a configuration, data or NaN error instead of one
line; such errors exit with status 2).
"""

import json
import logging
import os
import sys
import traceback

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Stage config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Directory for checkpoints, logs, samples.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the memory plan of the step and exit.")
_COORD = flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
_NPROC = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
_MULTIHOST = flags.DEFINE_bool("distributed", False,
                               "Call jax.distributed.initialize (implied by the flags above).")
_JAX_CACHE = flags.DEFINE_string(
    "jax_cache_dir", os.environ.get("JAX_COMPILATION_CACHE_DIR", "~/.cache/llama_jax/jax"),
    "JAX persistent compilation cache ('' = off): later stages and runs reuse compiled steps.")
_TRACEBACK = flags.DEFINE_bool("traceback", False,
                               "Show the full traceback of a configuration or data error.")


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax/TFDS chatter
  # TFDS's warnings about its own bookkeeping of local files ("Using custom data configuration",
  # "has no dataset_info.json") are noise in every stage; its errors still show.
  logging.getLogger("absl").addFilter(
      lambda r: r.levelno >= logging.ERROR or "tensorflow_datasets" not in r.pathname)
  from llama_jax import sharding  # pylint: disable=import-outside-toplevel
  from llama_jax.train import build  # pylint: disable=import-outside-toplevel
  from llama_jax.recipe import stages  # pylint: disable=import-outside-toplevel
  build.enable_compilation_cache(_JAX_CACHE.value)
  if _MULTIHOST.value or _COORD.value or _NPROC.value is not None:
    sharding.initialize_distributed(_COORD.value, _NPROC.value, _PID.value)
  if _DRY_RUN.value:
    from llama_jax.recipe import dry_run  # pylint: disable=import-outside-toplevel
    print(dry_run.report(_CONFIG.value))
    return
  try:
    result = stages.run(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, FloatingPointError) as err:  # the message says what
    if _TRACEBACK.value:
      raise
    where = traceback.extract_tb(err.__traceback__)[-1]
    print(f"train.py: error: {err}\n  (raised at {where.filename}:{where.lineno}; --traceback "
          "for the full traceback)", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
  app.run(main)
