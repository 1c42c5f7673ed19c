"""Multi-process JAX runtime startup (re-exported as ``llama_jax.sharding.initialize_distributed``).

Every process of a multi-host job calls ``initialize_distributed`` before any other JAX call; the
meshes of ``llama_jax.sharding`` then span the devices of all processes.
"""

from __future__ import annotations

from typing import Optional

import jax


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
  """Starts the multi-process JAX runtime (call first, before any other JAX call).

  With no arguments, ``jax.distributed.initialize()`` detects the cluster from the environment
  (SLURM, Open MPI, Kubernetes, TPU pods); otherwise all three arguments are required. CPU
  collectives use gloo (``jax_cpu_collectives_implementation``; harmless on GPU/TPU). Does nothing
  if the runtime is already initialized.

  Raises:
    ValueError: if only some arguments are given, num_processes < 1, or process_id is not in
      [0, num_processes).
  """
  given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
           "process_id": process_id}
  missing = [k for k, v in given.items() if v is None]
  if missing and len(missing) != len(given):
    raise ValueError(f"initialize_distributed: give all of coordinator_address, num_processes and "
                     f"process_id, or none (auto-detect); missing {missing}")
  if not missing:
    if not isinstance(num_processes, int) or num_processes < 1:
      raise ValueError(f"initialize_distributed: num_processes must be >= 1, got {num_processes!r}")
    if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
      raise ValueError(f"initialize_distributed: process_id must be in [0, {num_processes}), "
                       f"got {process_id!r}")
  if jax.distributed.is_initialized():
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
