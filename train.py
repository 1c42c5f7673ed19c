"""Train a stage of the Llama-2-Chat recipe: ``python train.py --config=configs/tiny.py``.

Flags: ``--config`` (an ml_collections config file; override fields with ``--config.x.y=v``),
``--workdir`` (checkpoints, logs, samples), ``--dry_run`` (compile the step for the configured
mesh and print the per-device memory plan instead of training; ``--plan_json=FILE`` also writes
it as JSON), ``--coordinator_address``,
``--num_processes``, ``--process_id`` (multi-host; SLURM is detected without them),
``--jax_cache_dir`` (JAX's persistent compilation cache, default ``~/.cache/llama_jax/jax``),
``--traceback`` (show the full traceback of a configuration, data or NaN error instead of one
line; such errors exit with status 2).
"""

import errno
import json
import logging
import os
import sys
import traceback

import ml_collections
from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Stage config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Directory for checkpoints, logs, samples.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the memory plan of the step and exit.")
_PLAN_JSON = flags.DEFINE_string("plan_json", "", "With --dry_run: also write the plan (every "
                                 "program's per-device bytes) as JSON to this file.")
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
  try:
    if _DRY_RUN.value:
      from llama_jax.recipe import dry_run  # pylint: disable=import-outside-toplevel
      plan = dry_run.plan(_load_config())
      print(dry_run.format_plan(plan))
      if _PLAN_JSON.value:
        with open(_PLAN_JSON.value, "w", encoding="utf-8") as f:
          json.dump(plan, f, indent=1)
      return
    result = stages.run(_load_config(), _WORKDIR.value)
  except (ValueError, FileNotFoundError, FloatingPointError) as err:  # the message says what
    if _TRACEBACK.value:
      raise
    where = traceback.extract_tb(err.__traceback__)[-1]
    print(f"train.py: error: {err}\n  (raised at {where.filename}:{where.lineno}; --traceback "
          "for the full traceback)", file=sys.stderr)
    sys.exit(2)
  except OSError as err:
    if err.errno != errno.ENOSPC or _TRACEBACK.value:
      raise
    print(f"train.py: error: the disk is full ({err}); free space and rerun the same command: "
          "the run resumes from its last complete checkpoint", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(result, indent=2, default=str))


def _load_config():
  """The --config file's config. Raises ValueError naming the file if it cannot be loaded (a
  missing file, a syntax error, no get_config) or get_config() returns no ConfigDict."""
  path = flags.FLAGS["config"].config_filename
  if not os.path.isfile(path.split(":")[0]):
    raise FileNotFoundError(f"--config={path}: no such config file")
  try:
    config = _CONFIG.value
  except Exception as err:  # pylint: disable=broad-except  (whatever the config file raised)
    raise ValueError(_cannot_load(err)) from err
  if not isinstance(config, ml_collections.ConfigDict):
    raise ValueError(f"--config={flags.FLAGS['config'].config_filename}: get_config() returned a "
                     f"{type(config).__name__}, not an ml_collections.ConfigDict")
  return config


def _cannot_load(err: BaseException, path: str = "") -> str:
  cause = err.__cause__ or err.__context__ or err
  return (f"--config={path or flags.FLAGS['config'].config_filename}: cannot load it "
          f"({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})")


def _parse_flags(argv):
  """absl's flag parsing, with an error of the config file itself (a syntax error, no
  get_config) printed as one line (exit 2) unless --traceback is given."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as err:
    print(f"{argv[0]}: {err}\nPass --helpfull to see the flags.", file=sys.stderr)
    sys.exit(1)
  except Exception as err:  # pylint: disable=broad-except  (raised by the config file)
    if "--traceback" in argv:
      raise
    path = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")] or ["configs/tiny.py"]
    print(f"train.py: error: {_cannot_load(err, path[-1])}\n  (--traceback for the full "
          "traceback)", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
