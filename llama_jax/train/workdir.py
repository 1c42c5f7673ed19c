"""What a stage leaves in its workdir, written one way for every stage.

``<workdir>/config.json`` (the config that ran), ``data_stats.json``, ``checkpoints/`` (orbax,
resumable), ``logs/`` (TensorBoard events + ``metrics.jsonl``), ``samples/`` and, when finished,
``final/`` (the stage's output: ``params.json`` + orbax ``params/`` for a policy or reward model,
``preferences.jsonl`` for annotation) and ``result.json``. A stage is done when it has both
``final/`` and ``result.json`` (:func:`is_done`); only process 0 writes files.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
from typing import Any, Callable, Dict, List, Mapping, Optional

import jax

from llama_jax import convert
from llama_jax.config import LlamaConfig

log = logging.getLogger(__name__)

FINAL = "final"
RESULT = "result.json"
CONFIG = "config.json"
# A stage's cost in result.json: tokens trained (non-padding tokens of its optimizer steps'
# batches) and tokens sampled (generated, EOS included); None = not counted (an older version).
TOKEN_COUNTS = ("tokens_trained", "tokens_sampled")


def sum_counts(counts) -> Optional[int]:
  """The sum of token ``counts`` (ints), or None when any of them is None (unknown)."""
  counts = list(counts)
  return None if any(c is None for c in counts) else int(sum(counts))


@contextlib.contextmanager
def clean_on_failure(workdir: str, existed: Optional[bool] = None):
  """If ``workdir`` did not exist before (``existed``, default: checked now) and the block
  raises, remove it: a run that fails validation (bad record, bad config) leaves nothing."""
  existed = os.path.exists(workdir) if existed is None else existed
  try:
    yield
  except BaseException:
    if not existed and jax.process_index() == 0:
      shutil.rmtree(workdir, ignore_errors=True)
    raise


def write_json(path: str, obj: Any) -> None:
  """``obj`` as indented JSON at ``path`` (parent directories created; process 0 only),
  atomically: a ``.tmp`` file renamed over ``path``, so a run killed while writing leaves the
  previous file (or none), never a truncated one that a resumed run could not read."""
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump(obj, f, indent=2, default=str)
    os.replace(path + ".tmp", path)


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
  """Replace ``<workdir>/<name>/`` by what ``write(path)`` writes there, plus its
  ``checksums.json`` (``convert.write_checksums``: every loader verifies it); returns the path."""
  path = os.path.join(workdir, name)
  if jax.process_index() == 0 and os.path.exists(path):
    shutil.rmtree(path)
  write(path)
  if jax.process_index() == 0:
    convert.write_checksums(path)
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


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.model.json")  # the world tokenizer + settings


def share_tokenizer(config, src_dir: str, sub_dir: str) -> None:
  """Copy the world tokenizer (model and settings sidecar) of ``src_dir`` into ``sub_dir``, so
  ``build.tokenizer`` there reuses it instead of training it again (process 0 copies; every
  process waits). A no-op unless ``config.tokenizer.path == "world"``; files already in
  ``sub_dir`` are kept."""
  if config.tokenizer.path != "world":
    return
  if jax.process_index() == 0:
    os.makedirs(sub_dir, exist_ok=True)
    for name in TOKENIZER_FILES:
      src, dst = os.path.join(src_dir, name), os.path.join(sub_dir, name)
      if os.path.exists(src) and not os.path.exists(dst):
        shutil.copy2(src, dst)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(f"tokenizer shared with {sub_dir}")


def write_result(workdir: str, result: dict) -> None:
  """``<workdir>/result.json``: written once, when the stage finished."""
  write_json(os.path.join(workdir, RESULT), result)


# Fields that may differ when a run resumes: they change how a run is observed or cut, never
# what it computes (anything else differing is refused unless train.allow_config_change).
HARMLESS = ("train.log_every", "train.eval_every", "train.checkpoint_every",
            "train.keep_checkpoints", "train.async_checkpoint", "train.checkpoint_checksums",
            "train.stop_after_steps",
            "train.max_nonfinite_steps", "train.allow_config_change", "train.stop_grace_s",
            "mesh.device_memory_gib", "ppo.offload_state",
            "eval.")
# Fields added after runs were made, with the value that computes what the older code did: a
# config.json without the field resumes when the new config has that value.
ADDED_FIELDS = {"ppo.forward_batch_size": 0, "pipeline.methods": "", "pipeline.method_lr": 0.0,
                "pipeline.method_epochs": 0.0, "data.select": "all", "data.select_fraction": 1.0,
                "data.select_clusters": 16, "data.select_embed_from": "",
                "data.world_unsafe_fraction": 0.0, "data.world_safety_preprompt_fraction": 0.0,
                "data.world_instruction_fraction": 0.0, "data.world_multiturn_fraction": 0.0,
                "data.world_max_turns": 20, "raft.kl_coef": 0.0,
                "context_distillation.benign_prompts": 0, "context_distillation.benign_k": 2,
                "pipeline.select_fraction": 0.05}
# Config sections added after runs were made (with a stage of their own): a config.json with none
# of a section's fields predates it, its stage did not read them, so they are not compared.
ADDED_SECTIONS = ("dpo", "rrhf", "raft", "context_distillation", "gatt")
LOCK = ".lock"


def _flat(tree: Any, prefix: str = "") -> Dict[str, Any]:
  out: Dict[str, Any] = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> List[str]:
  """``"field: old -> new"`` for every field (dotted) that differs and is not :data:`HARMLESS`
  (a field of :data:`ADDED_FIELDS` absent from ``old`` and at its listed value in ``new``, or of
  an :data:`ADDED_SECTIONS` section wholly absent from ``old``, does not differ)."""
  a, b = _flat(dict(old)), _flat(dict(new))
  new_sections = {s for s in ADDED_SECTIONS if not any(k.startswith(s + ".") for k in a)}
  added = lambda k: k not in a and ((k in ADDED_FIELDS and b.get(k) == ADDED_FIELDS[k])
                                    or k.split(".")[0] in new_sections)
  return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
          for k in sorted(set(a) | set(b))
          if a.get(k) != b.get(k) and not added(k)
          and not any(k == h or (h.endswith(".") and k.startswith(h)) for h in HARMLESS)]


def check_resume(workdir: str, config, started: bool) -> None:
  """Refuse to resume ``workdir`` with a config that changes the math.

  When the workdir holds a run (``started``: a checkpoint, ``result.json`` or the stage's own
  intermediate files) and its ``config.json``, every field outside :data:`HARMLESS` must be
  equal (``config.stage`` too: another stage's workdir is refused); with
  ``config.train.allow_config_change`` the differences are logged and allowed.

  Raises:
    ValueError: naming the differing fields, old and new values, and the way out.
  """
  old = read_json(os.path.join(workdir, CONFIG))
  if not started or old is None:
    return
  changes = config_changes(old, config.to_dict())
  if not changes:
    return
  if config.get("train", {}).get("allow_config_change", False):
    log.warning("resuming %s with a changed config (train.allow_config_change): %s", workdir,
                "; ".join(changes))
    return
  raise ValueError(f"{workdir} holds a run of another config; resuming it would mix two runs. "
                   f"Differing fields: {'; '.join(changes)}. Use another --workdir, or set "
                   "--config.train.allow_config_change=True to resume anyway")


class Lock:
  """An exclusive lock on ``<workdir>/.lock`` (``fcntl.flock``, process 0 only; released on
  exit, also when the process dies), so two runs never write one workdir."""

  def __init__(self, workdir: str):
    self.path, self._file = os.path.join(workdir, LOCK), None

  def __enter__(self):
    if jax.process_index() != 0:
      return self
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    f = open(self.path, "a+")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      f.seek(0)
      owner = f.read().strip() or "unknown"
      f.close()
      raise ValueError(f"{os.path.dirname(self.path)} is in use by another run (pid {owner}); "
                       "wait for it to finish or use another --workdir") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    self._file = f
    return self

  def __exit__(self, *exc):
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None
    return False


def is_done(workdir: str) -> bool:
  """A stage is done when its workdir has ``final/`` and ``result.json``."""
  return (os.path.isdir(os.path.join(workdir, FINAL))
          and os.path.isfile(os.path.join(workdir, RESULT)))
