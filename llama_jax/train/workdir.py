"""What a stage leaves in its workdir, written one way for every stage.

``<workdir>/config.json`` (the config that ran), ``data_stats.json``, ``checkpoints/`` (orbax,
resumable), ``logs/`` (TensorBoard events + ``metrics.jsonl``), ``samples/`` and, when finished,
``final/`` (the stage's output: ``params.json`` + orbax ``params/`` for a policy or reward model,
``preferences.jsonl`` for annotation) and ``result.json``. A stage is done when it has both
``final/`` and ``result.json`` (:func:`is_done`); only process 0 writes files.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Any, Callable

import jax

from llama_jax import convert
from llama_jax.config import LlamaConfig

FINAL = "final"
RESULT = "result.json"
CONFIG = "config.json"


@contextlib.contextmanager
def clean_on_failure(workdir: str):
  """If ``workdir`` did not exist before and the block raises, remove it: a run that fails
  validation (bad record, bad config) leaves nothing behind."""
  existed = os.path.exists(workdir)
  try:
    yield
  except BaseException:
    if not existed and jax.process_index() == 0:
      shutil.rmtree(workdir, ignore_errors=True)
    raise


def write_json(path: str, obj: Any) -> None:
  """``obj`` as indented JSON at ``path`` (parent directories created; process 0 only)."""
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
      json.dump(obj, f, indent=2, default=str)


def read_json(path: str, default: Any = None) -> Any:
  """The JSON at ``path``, or ``default`` when the file does not exist."""
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return json.load(f)


def write_config(workdir: str, config) -> None:
  """``<workdir>/config.json``: the settings of this run (an ml_collections config)."""
  write_json(os.path.join(workdir, CONFIG), config.to_dict())


def publish(workdir: str, write: Callable[[str], Any], name: str = FINAL) -> str:
  """Replace ``<workdir>/<name>/`` by what ``write(path)`` writes there; returns the path."""
  path = os.path.join(workdir, name)
  if jax.process_index() == 0 and os.path.exists(path):
    shutil.rmtree(path)
  write(path)
  return path


def export_params(workdir: str, cfg: LlamaConfig, params: Any, name: str = FINAL) -> str:
  """``<workdir>/<name>/`` = ``params.json`` + orbax ``params/`` (``convert.save_orbax``), the
  format ``config.init_from`` of the next stage reads; replaces an older export."""
  return publish(workdir, lambda path: convert.save_orbax(path, cfg, params), name)


def copy_final(src: str, workdir: str) -> str:
  """``<workdir>/final/`` = a copy of the directory ``src`` (e.g. a sub-run's ``final/``)."""
  def copy(path):
    if jax.process_index() == 0:
      shutil.copytree(src, path)
  return publish(workdir, copy)


def write_result(workdir: str, result: dict) -> None:
  """``<workdir>/result.json``: written once, when the stage finished."""
  write_json(os.path.join(workdir, RESULT), result)


def is_done(workdir: str) -> bool:
  """A stage is done when its workdir has ``final/`` and ``result.json``."""
  return (os.path.isdir(os.path.join(workdir, FINAL))
          and os.path.isfile(os.path.join(workdir, RESULT)))
