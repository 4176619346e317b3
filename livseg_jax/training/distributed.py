"""Multi-host start-up: `jax.distributed.initialize(...)` from the environment that describes a cluster.

Four launchers are recognised (docs/training.md shows a command for each):
- explicit variables: JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
  JAX_PROCESS_ID, optionally JAX_LOCAL_DEVICE_IDS ("0,1"); passed to JAX as arguments, because
  JAX itself reads only the coordinator address from the environment;
- SLURM (SLURM_NTASKS > 1), Open MPI (OMPI_COMM_WORLD_SIZE > 1) and Cloud TPU pod slices (several
  TPU_WORKER_HOSTNAMES): JAX's own cluster detection finds the rest.
LIVSEG_DISTRIBUTED=0 forces one process; LIVSEG_DISTRIBUTED=1 demands a cluster and fails clearly
when none is described.

A process that dies must stop the others within seconds, not after JAX's default 100 s heartbeat
timeout: `HEARTBEAT_TIMEOUT_S` (override: LIVSEG_HEARTBEAT_TIMEOUT_S). Checkpoints are written
atomically (`run_dir`), so a run stopped this way resumes from its last complete checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax
from jax.experimental import multihost_utils

T = TypeVar("T")

EXPLICIT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
HEARTBEAT_TIMEOUT_S = 10
# A restarted process that compiles while its peers load the compiled step from the persistent
# cache reaches the first collective later; the coordinator waits this long for every process
# to connect at start-up (JAX's default: 300 s).
INITIALIZATION_TIMEOUT_S = 300


def _int_setting(env: Mapping[str, str], name: str, minimum: int = 0) -> int:
    value = env.get(name, "")
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: not an integer") from None
    if number < minimum:
        raise ValueError(f"{name}={number}: must be >= {minimum}")
    return number


def cluster_arguments(env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """Returns the keyword arguments for `jax.distributed.initialize`, or None for one process.

    Explicit variables give every argument; SLURM, Open MPI and TPU pods give {} beside the timeouts
    (JAX detects them). Incomplete or invalid explicit variables raise ValueError naming them.
    """
    env = dict(os.environ) if env is None else env
    flag = env.get("LIVSEG_DISTRIBUTED", "")
    if flag not in ("", "0", "1"):
        raise ValueError(f"LIVSEG_DISTRIBUTED={flag!r}: use 1 (a cluster is required) or 0 (one process)")
    if flag == "0":
        return None
    heartbeat = (_int_setting(env, "LIVSEG_HEARTBEAT_TIMEOUT_S", 1) if env.get("LIVSEG_HEARTBEAT_TIMEOUT_S")
                 else HEARTBEAT_TIMEOUT_S)
    timeouts = {"heartbeat_timeout_seconds": heartbeat, "initialization_timeout": INITIALIZATION_TIMEOUT_S}
    given = [name for name in EXPLICIT if env.get(name)]
    if given:
        missing = [name for name in EXPLICIT if name not in given]
        if missing:
            raise ValueError(f"multi-host start-up: {', '.join(given)} set but {', '.join(missing)} missing; "
                             f"set all of {', '.join(EXPLICIT)} (docs/training.md)")
        num_processes = _int_setting(env, "JAX_NUM_PROCESSES", 1)
        process_id = _int_setting(env, "JAX_PROCESS_ID")
        if process_id >= num_processes:
            raise ValueError(f"JAX_PROCESS_ID={process_id}: must be below JAX_NUM_PROCESSES={num_processes}")
        arguments = {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"], "num_processes": num_processes,
                     "process_id": process_id, **timeouts}
        if env.get("JAX_LOCAL_DEVICE_IDS"):
            try:
                arguments["local_device_ids"] = [int(i) for i in env["JAX_LOCAL_DEVICE_IDS"].split(",")]
            except ValueError:
                raise ValueError(f"JAX_LOCAL_DEVICE_IDS={env['JAX_LOCAL_DEVICE_IDS']!r}: "
                                 "expected comma-separated integers, e.g. 0,1") from None
        return arguments
    detected = (int(env.get("SLURM_NTASKS", "1") or 1) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1
                or "," in env.get("TPU_WORKER_HOSTNAMES", ""))
    if detected:
        return timeouts
    if flag == "1":
        raise ValueError("LIVSEG_DISTRIBUTED=1 but no cluster is described: set " + ", ".join(EXPLICIT)
                         + " or run under SLURM, Open MPI or on a Cloud TPU pod slice (docs/training.md)")
    return None


def maybe_initialize_distributed(env: Mapping[str, str] | None = None) -> bool:
    """Initialises multi-process JAX when the environment describes a cluster; returns whether it did."""
    arguments = cluster_arguments(env)
    if arguments is None:
        return False
    # CPU devices (tests, CPU-only clusters) reduce across processes through JAX's default CPU
    # collectives, gloo; GPUs and TPUs use NCCL and ICI.
    jax.distributed.initialize(**arguments)
    return True


def process_label() -> str:
    """Returns "" in a single-process run, else "[process i/n] " to prefix console lines with."""
    if jax.process_count() == 1:
        return ""
    return f"[process {jax.process_index()}/{jax.process_count()}] "


def chief_first(name: str, fn: Callable[[], T]) -> T:
    """Returns `fn()`, run by process 0 before the others in a multi-process run.

    For work that writes shared files (the synthetic dataset, the preprocessed cache): process 0
    writes them while the others wait at a barrier, then the others find them written and only
    read. A single process just calls `fn`.
    """
    if jax.process_count() == 1:
        return fn()
    if jax.process_index() == 0:
        result = fn()
        multihost_utils.sync_global_devices(f"livseg_jax:{name}")
        return result
    multihost_utils.sync_global_devices(f"livseg_jax:{name}")
    return fn()
