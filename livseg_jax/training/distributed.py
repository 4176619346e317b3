"""Multi-host start-up: `jax.distributed.initialize()` when the environment describes a cluster."""

from __future__ import annotations

import os

import jax


def cluster_requested(env: dict[str, str] | None = None) -> bool:
    """Returns True when the environment asks for multi-process JAX.

    Recognised: LIVSEG_DISTRIBUTED=1 (explicit), JAX_COORDINATOR_ADDRESS (set by hand for
    multi-node GPU), SLURM with more than one task, and Cloud TPU pod slices (several worker
    hostnames). LIVSEG_DISTRIBUTED=0 forces a single process.
    """
    env = dict(os.environ) if env is None else env
    flag = env.get("LIVSEG_DISTRIBUTED", "")
    if flag in ("0", "1"):
        return flag == "1"
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return True
    return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def maybe_initialize_distributed() -> bool:
    """Initialises multi-process JAX if `cluster_requested()`; returns whether it did."""
    if not cluster_requested():
        return False
    # With no arguments JAX discovers coordinator, process count and index from the cluster
    # environment (TPU metadata, SLURM, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    # JAX_PROCESS_ID).
    jax.distributed.initialize()
    return True
