"""TFDS builders for every data source, written as ``array_record`` and read without TensorFlow.

Each builder stores one validated record (``llama_jax.data.sources`` schemas) per example as a
JSON string feature ``"record"`` and has two splits, ``"train"`` and ``"held_out"``. Build and
read::

  cfg = SourceConfig(name="harmless_base", source_path=".../harmless-base-test.jsonl.gz")
  builder = HhRlhf(config=cfg, data_dir="/data/tfds")
  builder.download_and_prepare()        # parses and validates every record first
  source = builder.as_data_source(split="train")   # random access: source[i] == {"record": bytes}

Reading needs only a config with the same ``name`` (``HhRlhf(config=SourceConfig(name=...),
data_dir=...)``) or ``tfds.builder_from_directory(<data_dir>/hh_rlhf/harmless_base/1.0.0)``.
``llama_jax.data.input_pipeline.records_dataset`` decodes the JSON.

Splits are fixed by a seeded hash (``split_seed``) of each record's prompt (every turn before the
final response), so records sharing a prompt share a split. World builders use the world's own
prompt split. All records are read and validated before anything is written: a bad record raises
``ValueError`` naming file, line and field, and leaves the data dir untouched. The HH-RLHF builder
stores the counts of skipped defective pairs in ``builder.info.metadata["skipped"]``.

TFDS without TensorFlow needs ``file_format="array_record"`` (the default here) and
``as_data_source``; ``DatasetInfo`` is built as ``tfds.core.DatasetInfo(builder=self, ...)``.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import hashlib
import inspect
import json
from typing import Any, Iterable

from etils import epath
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils

from llama_jax.data import sources
from llama_jax.data import world as world_lib
from llama_jax.data import world_pairs

KINDS = ("sft", "preference", "prompt")


@dataclasses.dataclass(eq=False)
class SourceConfig(tfds.core.BuilderConfig):
  """Config of a file-backed builder; ``name`` names the data dir subfolder.

  Attributes:
    source_path: the source file (only needed to build, not to read).
    kind: record kind to store: ``"sft"``, ``"preference"`` or ``"prompt"`` (the builder's
      ``SUPPORTED_KINDS``).
    held_out_fraction: share of prompts in the ``"held_out"`` split, in (0, 1).
    split_seed: seed of the prompt hash that assigns splits.
    is_safety: the ``is_safety`` flag given to prompt records (e.g. True for HH harmless data).
  """
  source_path: str = ""
  kind: str = ""
  held_out_fraction: float = 0.05
  split_seed: int = 0
  is_safety: bool = False


@dataclasses.dataclass(eq=False)
class WorldBuilderConfig(tfds.core.BuilderConfig):
  """Config of the synthetic-world builder.

  Attributes:
    kind: ``"sft"`` (demonstrations), ``"helpfulness"`` / ``"safety"`` (preference pairs) or
      ``"prompt"``.
    world: the ``world.WorldConfig`` (seed and task settings).
    num_train, num_held_out: number of records generated for each split.
  """
  kind: str = "sft"
  world: world_lib.WorldConfig = dataclasses.field(default_factory=world_lib.WorldConfig)
  num_train: int = 1000
  num_held_out: int = 100


def _prompt_key(record: dict[str, Any]) -> str:
  turns = record["messages"][:-1] if "messages" in record else record["prompt"]
  return json.dumps(turns, sort_keys=True, ensure_ascii=False)


def split_records(records: Iterable[dict[str, Any]], held_out_fraction: float,
                  split_seed: int) -> dict[str, list[dict[str, Any]]]:
  """Assigns records to ``"train"`` / ``"held_out"`` by a seeded hash of their prompt.

  Raises:
    ValueError: if ``held_out_fraction`` is not in (0, 1).
  """
  if not 0.0 < held_out_fraction < 1.0:
    raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
  out = {"train": [], "held_out": []}
  for r in records:
    digest = hashlib.blake2b(f"{split_seed}\x00{_prompt_key(r)}".encode(), digest_size=8).digest()
    held = int.from_bytes(digest, "big") / 2.0**64 < held_out_fraction
    out["held_out" if held else "train"].append(r)
  return out


class _RecordBuilder(tfds.core.GeneratorBasedBuilder):
  """Base: one JSON ``record`` per example; subclasses implement ``_read_splits``."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  SUPPORTED_KINDS: tuple[str, ...] = KINDS

  def __init__(self, *, config: tfds.core.BuilderConfig, data_dir: str | None = None,
               file_format: str = "array_record", **kwargs):
    if not isinstance(config, self.BUILDER_CONFIG_CLASS):
      raise ValueError(f"{type(self).__name__} needs a {self.BUILDER_CONFIG_CLASS.__name__} "
                       f"config, got {config!r:.100}")
    self._prepared_splits: dict[str, list[dict[str, Any]]] | None = None
    self._skipped: collections.Counter = collections.Counter()
    super().__init__(config=config, data_dir=data_dir, file_format=file_format, **kwargs)

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's default resolves the package through `importlib_resources` (not installed here).
    return epath.Path(inspect.getfile(cls))

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=(type(self).__doc__ or "").split("\n")[0],
        features=tfds.features.FeaturesDict({"record": tfds.features.Text()}),
        metadata=tfds.core.MetadataDict())

  def _kind(self) -> str:
    kind = self.builder_config.kind or self.SUPPORTED_KINDS[0]
    if kind not in self.SUPPORTED_KINDS:
      raise ValueError(f"{type(self).__name__}: config kind {kind!r} is not one of "
                       f"{self.SUPPORTED_KINDS}")
    return kind

  @abc.abstractmethod
  def _read_splits(self) -> dict[str, list[dict[str, Any]]]:
    """``{"train": records, "held_out": records}``, every record validated."""

  def download_and_prepare(self, *args, **kwargs):
    """Reads and validates every record, then writes the splits (see the module docstring).

    Raises:
      ValueError: naming file, line and field of the first bad record (nothing is written).
    """
    if not self.is_prepared():
      self._prepared_splits = self._read_splits()
    return super().download_and_prepare(*args, **kwargs)

  def _split_generators(self, dl_manager):
    del dl_manager
    splits = self._prepared_splits if self._prepared_splits is not None else self._read_splits()
    self.info.metadata["skipped"] = dict(self._skipped)
    return {name: self._generate_examples(records) for name, records in splits.items()}

  def _generate_examples(self, records):
    for i, record in enumerate(records):
      yield i, {"record": json.dumps(record, ensure_ascii=False)}


class _FileBuilder(_RecordBuilder):
  """A builder over one source file."""

  BUILDER_CONFIG_CLASS = SourceConfig

  @abc.abstractmethod
  def _records(self, path: str, kind: str) -> Iterable[dict[str, Any]]:
    """The validated records of ``path`` for record ``kind``."""

  def _read_splits(self):
    cfg = self.builder_config
    if not cfg.source_path:
      raise ValueError(f"{type(self).__name__}: config {cfg.name!r} has no source_path to "
                       "build from")
    kind = self._kind()
    records = list(self._records(cfg.source_path, kind))
    if kind == "prompt":
      records = [_as_prompt(r, cfg.is_safety) for r in records]
    splits = split_records(records, cfg.held_out_fraction, cfg.split_seed)
    for name, part in splits.items():
      if not part:
        raise ValueError(
            f"{cfg.source_path}: the {name!r} split is empty ({len(records)} record(s), "
            f"held-out fraction {cfg.held_out_fraction} by prompt hash); add records or change "
            "config.data.heldout_fraction / config.data.split_seed")
    return splits


def _as_prompt(record: dict[str, Any], is_safety: bool) -> dict[str, Any]:
  if "messages" in record:
    return {"prompt": record["messages"][:-1], "is_safety": is_safety}
  return sources.prompt_from_preference(record, is_safety)


class HhRlhf(_FileBuilder):
  """Anthropic HH-RLHF (official jsonl.gz): preference pairs, chosen dialogs (sft) or prompts."""

  SUPPORTED_KINDS = ("preference", "sft", "prompt")

  def _records(self, path, kind):
    if kind == "sft":
      return sources.read_hh_rlhf_sft(path, skipped=self._skipped)
    return sources.read_hh_rlhf_pairs(path, skipped=self._skipped)


class JsonlSft(_FileBuilder):
  """Generic JSONL SFT dialogs (``sources.read_jsonl_sft`` schema): sft or prompts."""

  SUPPORTED_KINDS = ("sft", "prompt")

  def _records(self, path, kind):
    return sources.read_jsonl_sft(path)


class JsonlPreferences(_FileBuilder):
  """Generic JSONL preference pairs (``sources.read_jsonl_preferences`` schema) or their prompts."""

  SUPPORTED_KINDS = ("preference", "prompt")

  def _records(self, path, kind):
    return sources.read_jsonl_preferences(path)


class SelfInstruct(_FileBuilder):
  """Self-Instruct seed tasks (``seed_tasks.jsonl``): sft dialogs or prompts."""

  SUPPORTED_KINDS = ("sft", "prompt")

  def _records(self, path, kind):
    return sources.read_self_instruct(path)


class World(_RecordBuilder):
  """The synthetic assistant world (``llama_jax.data.world``); splits are the world's own."""

  BUILDER_CONFIG_CLASS = WorldBuilderConfig
  SUPPORTED_KINDS = ("sft", "helpfulness", "safety", "prompt")

  def _read_splits(self):
    cfg = self.builder_config
    kind = self._kind()
    if cfg.num_train < 1 or cfg.num_held_out < 1:
      raise ValueError(f"World config {cfg.name!r}: num_train and num_held_out must be >= 1, got "
                       f"{cfg.num_train}, {cfg.num_held_out}")
    make, validate = {
        "sft": (world_lib.sft_demonstrations, sources.validate_sft),
        "helpfulness": (world_pairs.helpfulness_pairs, sources.validate_preference),
        "safety": (world_pairs.safety_pairs, sources.validate_preference),
        "prompt": (world_lib.sample_prompts, sources.validate_prompt),
    }[kind]
    out = {}
    for split, n in (("train", cfg.num_train), ("held_out", cfg.num_held_out)):
      out[split] = [validate(r, f"world {cfg.name!r}, {split} record {i + 1}")
                    for i, r in enumerate(make(cfg.world, split, n))]
    return out
