"""`bench_scaling --processes N`: the same devices driven by one process, and by N processes of one host.

One process dispatching to every GPU is how `train` runs on one host; one process per GPU is how
PyTorch DDP (`torchrun`) runs, and how `train` runs when started with JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID and JAX_LOCAL_DEVICE_IDS (docs/training.md). Whether the
host's dispatch to several devices costs the 2-GPU step its last few percent (issue 21 target 3)
is what the side-by-side answers. Both are measured by `bench_scaling` children, since a process
that has started a GPU backend holds most of each GPU's memory:

1. one process, every `--devices` count (the 1-device row is the baseline of both);
2. `--processes` processes on 127.0.0.1, each with its share of the largest count's devices
   (JAX_LOCAL_DEVICE_IDS on GPUs; JAX_NUM_CPU_DEVICES on a CPU, for the smoke test), that count only.

The launcher merges their rows into one result (each row's `processes` says which) with the
speed-ups against the one 1-device row.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile

from experiments.bench_common import REPO, write_result
from livseg_jax.study.scheduler import device_groups

STRIPPED = ("--processes", "--devices", "--rows-to", "--tag")  # options the launcher sets for its children


def child_argv(argv: list[str]) -> list[str]:
    """Returns the command line without the options the launcher sets itself (both spellings)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in STRIPPED:
            skip = True
            continue
        if arg.split("=", 1)[0] in STRIPPED:
            continue
        kept.append(arg)
    return kept


def device_shares(largest: int, processes: int) -> list[list[int]]:
    """Returns the local device ids of each process: consecutive equal shares of `largest` devices
    (the study scheduler's groups). They reach JAX as JAX_LOCAL_DEVICE_IDS, as docs/training.md
    starts `train` in several processes, not as the scheduler's CUDA_VISIBLE_DEVICES (independent
    runs): every process still sees every GPU."""
    if largest % processes:
        raise SystemExit(f"--processes {processes}: the largest --devices count, {largest}, must be a multiple of it")
    return [list(group) for group in device_groups(largest, largest // processes)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_children(commands: list[tuple[list[str], dict[str, str]]], timeout: float | None = None) -> None:
    """Starts every (argv, environment) at once and waits for all; exits naming the first that failed."""
    procs = [subprocess.Popen(argv, env=env) for argv, env in commands]
    codes = [p.wait(timeout=timeout) for p in procs]
    failed = [i for i, code in enumerate(codes) if code]
    if failed:
        first = failed[0]
        raise SystemExit(f"error: bench_scaling child {first} of {len(procs)} exited with status {codes[first]}")


def launch(args: argparse.Namespace, argv: list[str]) -> None:
    """Runs the one-process and the `args.processes`-process measurements; writes the merged result."""
    from experiments.bench_scaling import add_speedups, print_rows

    counts = sorted({int(v) for v in args.devices.split(",")})
    largest = counts[-1]
    shares = device_shares(largest, args.processes)
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_scaling_processes_"))
    base = [sys.executable, "-m", "experiments.bench_scaling", *child_argv(argv)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COORDINATOR")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO), env.get("PYTHONPATH"))))  # from any directory

    one = work / "one_process.json"
    run_children([([*base, f"--devices={','.join(map(str, counts))}", f"--rows-to={one}"], env)])
    several = work / "processes.json"
    port = free_port()
    run_children([([*base, f"--devices={largest}", f"--processes={args.processes}", f"--rows-to={several}"],
                   {**env, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(args.processes),
                    "JAX_PROCESS_ID": str(i), "JAX_LOCAL_DEVICE_IDS": ",".join(map(str, ids)),
                    "JAX_NUM_CPU_DEVICES": str(len(ids))})  # the CPU backend's stand-in for a share of GPUs
                  for i, ids in enumerate(shares)])

    payload = json.loads(one.read_text())
    extra = json.loads(several.read_text())
    rows = payload["rows"] + extra["rows"]
    add_speedups(rows)  # the processes' rows against the one-process run's 1-device row
    payload.update(rows=rows, processes={"count": args.processes, "local_device_ids": shares,
                                         "environment": extra["environment"]})
    print_rows(rows, payload.get("profiles", []))
    print(f"wrote {write_result('bench_scaling' + (f'_{args.tag}' if args.tag else ''), payload)}")
