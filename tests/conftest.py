"""Shared test fixtures: persistent compilation cache and the ../shared/data location."""

import os
import pathlib

import hypothesis
import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("LLAMA_JAX_SHARED_DATA", ROOT.parent / "shared" / "data"))

# CI must not be flaky: under CI=true every property test draws the same examples on every run
# (a failure found locally becomes an explicit regression test). Loaded before the test modules
# build their own settings, which inherit it.
hypothesis.settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI") == "true":
  hypothesis.settings.load_profile("ci")

jax.config.update("jax_compilation_cache_dir", str(ROOT / ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def shared_file(relpath: str) -> pathlib.Path:
  """Path of a file under ../shared/data; skip if absent, but fail under CI=true."""
  path = SHARED_DATA / relpath
  if not path.exists():
    msg = f"{path} not found (the real data in ../shared/data is needed for this test)"
    if os.environ.get("CI") == "true":
      pytest.fail(msg)
    pytest.skip(msg)
  return path


@pytest.fixture
def llama2_tokenizer_path():
  return shared_file("llama2-tokenizer/tokenizer.model")


@pytest.fixture
def hh_rlhf_path():
  return shared_file("hh-rlhf/harmless-base-test.jsonl.gz")


@pytest.fixture
def self_instruct_path():
  return shared_file("self-instruct/seed_tasks.jsonl")

