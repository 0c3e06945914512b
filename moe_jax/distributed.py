"""Multi-host runs through ``jax.distributed`` (the engine TPU pods and GPU clusters use); nothing of our own.

One process per host (or per GPU) calls :func:`initialize` before any other JAX call; every process then
sees all devices in ``jax.devices()``, ordered by process, so ``sharding.make_mesh`` puts the between-host
dimension on the leading ``data`` axis. Each process feeds only its own slice of the global batch with
:func:`global_batch`.

On TPU pods and under SLURM, ``jax.distributed.initialize()`` with no arguments detects the coordinator,
process count and id from the environment; pass them explicitly elsewhere (or to run several processes on
one machine, as the tests do with CPU devices).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_cpu_devices: int | None = None,
) -> None:
    """Joins this process to a multi-process JAX run.

    Args:
        coordinator_address: ``host:port`` of process 0; ``None`` auto-detects (TPU, SLURM).
        num_processes: total processes; ``None`` auto-detects.
        process_id: this process's rank; ``None`` auto-detects.
        local_cpu_devices: run on CPU with this many devices per process (tests and CPU clusters); sets
            the gloo CPU collectives that cross-process CPU all-reduce/all-to-all need.

    Raises:
        ValueError: only some of ``coordinator_address`` / ``num_processes`` / ``process_id`` are given.
    """
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError(
            "distributed: pass coordinator_address, num_processes and process_id together, or none of them "
            "to auto-detect them (TPU pods, SLURM)"
        )
    if local_cpu_devices is not None:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", int(local_cpu_devices))
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )


def process_slice(global_batch_size: int) -> slice:
    """Rows of the global batch this process feeds (contiguous blocks in process order).

    Raises:
        ValueError: the global batch does not divide over the processes.
    """
    n, i = jax.process_count(), jax.process_index()
    if global_batch_size % n:
        raise ValueError(f"batch size {global_batch_size} is not divisible by the {n} processes")
    per = global_batch_size // n
    return slice(i * per, (i + 1) * per)


def global_batch(local_rows: np.ndarray, mesh: jax.sharding.Mesh, spec: PartitionSpec) -> jax.Array:
    """One global array from every process's local rows (dim 0 sharded by ``spec``)."""
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), np.asarray(local_rows))
