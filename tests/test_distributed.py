"""Tests of llama_jax.distributed (multi-process startup; the multi-host run itself is
tests/test_multihost.py)."""

from __future__ import annotations

import jax
import pytest

from llama_jax import distributed, sharding


def test_initialize_distributed_is_reexported_by_sharding():
  assert sharding.initialize_distributed is distributed.initialize_distributed


def test_initialize_distributed_validates_before_starting():
  with pytest.raises(ValueError, match=r"missing \['num_processes', 'process_id'\]"):
    distributed.initialize_distributed(coordinator_address="127.0.0.1:1234")
  with pytest.raises(ValueError, match=r"process_id must be in \[0, 2\)"):
    distributed.initialize_distributed("127.0.0.1:1234", num_processes=2, process_id=2)
  with pytest.raises(ValueError, match="num_processes must be >= 1"):
    distributed.initialize_distributed("127.0.0.1:1234", num_processes=0, process_id=0)
  assert not jax.distributed.is_initialized()
