"""Joining a multi-process JAX job: `jax.distributed` before any backend starts.

A module of its own, importing nothing of ours: evosax creates arrays when it is imported,
which starts JAX's backend, and `jax.distributed.initialize()` must run before that. The
command line calls `maybe_initialize` first thing.
"""

from __future__ import annotations

import os

import jax


def maybe_initialize() -> tuple[int, int]:
  """Starts `jax.distributed` when a multi-process cluster environment is present.

  Recognised: JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES and JAX_PROCESS_ID (passed on:
  JAX reads only the address), a SLURM job step with more than one task, Open MPI with more
  than one rank, and multi-host TPU slices (jax.distributed.initialize() reads those
  itself). Returns (process index, process count).
  """
  env = os.environ
  multi = (bool(env.get("JAX_COORDINATOR_ADDRESS"))
           or int(env.get("SLURM_NTASKS", "1") or 1) > 1
           or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1
           or "," in env.get("TPU_WORKER_HOSTNAMES", ""))
  if not multi:
    return 0, 1
  if not jax.distributed.is_initialized():
    # JAX reads JAX_COORDINATOR_ADDRESS itself but not the process count and index.
    explicit = {k: int(env[v]) for k, v in (("num_processes", "JAX_NUM_PROCESSES"),
                                            ("process_id", "JAX_PROCESS_ID")) if env.get(v)}
    jax.distributed.initialize(**explicit)
  return jax.process_index(), jax.process_count()
