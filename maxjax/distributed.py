"""Multi-host runs: join this process to the others before anything touches a device.

Every host runs the same script (SPMD). After ``initialize()``, ``jax.devices()`` lists the devices of all
hosts, so ``load_pipeline(model, tensor_parallel=..., data_parallel=...)`` builds one mesh over all of them;
each process then feeds the same requests in the same order to its pipeline (the host loop runs in
lockstep), every device program runs once across the hosts, and every process reads the same tokens.

    import maxjax.distributed
    maxjax.distributed.initialize()          # coordinator, process count and id from the environment
    tokenizer, pipeline = maxjax.load_pipeline(model, tensor_parallel=16)

Arguments win over the environment variables ``MAXJAX_COORDINATOR`` (host:port of process 0),
``MAXJAX_NUM_PROCESSES`` and ``MAXJAX_PROCESS_ID``; with none of them JAX detects the cluster itself
(TPU pods, SLURM, Open MPI, Kubernetes) or reads ``JAX_COORDINATOR_ADDRESS``.
"""

from __future__ import annotations

import os

import jax


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: list[int] | None = None,
               cpu_collectives: str | None = "gloo") -> None:
    """``jax.distributed.initialize`` with maxjax's environment variables; call once, before any JAX use.

    ``cpu_collectives``: the CPU backend's cross-process collectives ("gloo", or "mpi"); without them a
    mesh of CPU devices on several processes cannot run (accelerators ignore it).
    """
    coordinator_address = coordinator_address or os.environ.get("MAXJAX_COORDINATOR") or None
    num_processes = num_processes if num_processes is not None else _env_int("MAXJAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("MAXJAX_PROCESS_ID")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be positive, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids)


def is_leader() -> bool:
    """True on process 0: the one that should print or write files (outputs are the same on every process)."""
    return jax.process_index() == 0
