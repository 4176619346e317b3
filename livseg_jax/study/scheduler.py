"""Several runs of a study at once: one worker process per run, each on its own group of devices.

Why processes, not threads in one process: each run builds its own input pipeline (worker
processes, memory-mapped caches), compiles its own programs and may preallocate most of its
devices' memory; a process per run keeps all of that apart, a crashed or killed run cannot take
the others down, and the device restriction is the platform's own (`CUDA_VISIBLE_DEVICES` ...)
rather than every JAX call having to be handed the right devices. The parent process never starts
a JAX backend itself (it would hold memory on every GPU): it counts the devices in a short probe
process, prepares what the workers would otherwise write concurrently (split, training list,
synthetic data, preprocessing caches), starts the workers and writes the tables when all are done.

A failed worker does not stop the others, nor the runs still queued (runs are independent): the
study finishes every run it can, writes the tables of the finished ones, then reports which runs
failed (with their logs) and exits non-zero. Finished stages stay finished (`study_done.json`), so
rerunning the same command retries only what failed.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from livseg_jax import atomic_write

# The variable that limits a worker to its devices, by JAX platform. On CPU the "devices" are
# virtual (JAX_NUM_CPU_DEVICES of them share the host's cores): a group's size is what matters.
VISIBLE_DEVICES_VAR = {"gpu": "CUDA_VISIBLE_DEVICES", "cuda": "CUDA_VISIBLE_DEVICES", "rocm": "HIP_VISIBLE_DEVICES",
                       "cpu": "JAX_NUM_CPU_DEVICES"}
WORKER_FILE = "worker.json"  # runs/<run>/worker.json: the worker's devices, command, times and exit status
LOG_FILE = "train.log"  # runs/<run>/train.log: the worker's stdout and stderr (appended on rerun)
_PROBE = ("import json, jax; d = jax.devices(); "
          "print(json.dumps({'platform': d[0].platform, 'runtime': d[0].client.platform_version, "
          "'kind': d[0].device_kind, 'count': len(d)}))")
_HOST_DEVICE_COUNT = re.compile(r"--xla_force_host_platform_device_count=\S+")


def probe_devices(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Returns {"platform", "kind", "count"} of the devices JAX sees, asked in a short child process.

    A child, so that this process starts no backend: on a GPU that would reserve memory the
    workers need. "platform" is "cuda" or "rocm" for GPUs (the runtime decides the variable).
    """
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ if env is None else env))
    if proc.returncode != 0:
        raise RuntimeError(f"counting the visible devices failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    platform = found["platform"]
    if platform == "gpu":
        platform = "rocm" if "rocm" in found["runtime"].lower() else "cuda"
    return {"platform": platform, "kind": found["kind"], "count": int(found["count"])}


def device_groups(visible: int, per_run: int, parallel_runs: int = 0) -> list[tuple[int, ...]]:
    """Returns the device groups runs are placed on: disjoint, `per_run` devices each (0: one group of all).

    At most `parallel_runs` groups (0: as many as fit); devices left over stay idle.
    """
    if per_run < 0 or parallel_runs < 0:
        raise ValueError(f"study.devices = {per_run}, study.parallel_runs = {parallel_runs}: must be >= 0")
    if per_run == 0:
        return [tuple(range(visible))]
    if per_run > visible:
        raise ValueError(f"study.devices = {per_run}: only {visible} device(s) visible")
    n = visible // per_run
    if parallel_runs:
        n = min(n, parallel_runs)
    return [tuple(range(i * per_run, (i + 1) * per_run)) for i in range(n)]


def worker_env(platform: str, device_ids: Sequence[int], base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Returns the environment of a worker limited to `device_ids` (indices among the parent's visible devices).

    GPUs: `CUDA_VISIBLE_DEVICES` / `HIP_VISIBLE_DEVICES` lists the ids, mapped through the parent's
    own value of it when set (index 1 of "4,5" is GPU 5). CPU: `JAX_NUM_CPU_DEVICES` = the group's
    size (a `--xla_force_host_platform_device_count` in XLA_FLAGS is dropped: it would override it).
    """
    env = dict(os.environ if base is None else base)
    if platform not in VISIBLE_DEVICES_VAR:
        raise ValueError(f"platform {platform!r}: running several study runs at once is supported on "
                         f"{sorted(VISIBLE_DEVICES_VAR)}; set study.parallel_runs = 1 (one run after another)")
    if not device_ids or len(set(device_ids)) != len(device_ids) or min(device_ids) < 0:
        raise ValueError(f"device ids {list(device_ids)}: need distinct indices >= 0")
    var = VISIBLE_DEVICES_VAR[platform]
    if platform == "cpu":
        env[var] = str(len(device_ids))
        flags = _HOST_DEVICE_COUNT.sub("", env.get("XLA_FLAGS", "")).split()
        env["XLA_FLAGS"] = " ".join(flags)
        return env
    given = [p.strip() for p in env.get(var, "").split(",") if p.strip()]
    if given and max(device_ids) >= len(given):
        raise ValueError(f"device ids {list(device_ids)}: {var}={env[var]} makes only {len(given)} visible")
    env[var] = ",".join(given[i] if given else str(i) for i in device_ids)
    return env


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_workers(runs: Sequence[str], groups: Sequence[tuple[int, ...]], command: Callable[[str], list[str]],
                env: Callable[[tuple[int, ...]], dict[str, str]], run_dir: Callable[[str], pathlib.Path],
                report: Callable[[str], None] = print, poll_s: float = 0.2) -> dict[str, int]:
    """Returns {run: exit status} after running `command(run)` for every run, one per free device group.

    Each worker's stdout and stderr are appended to `run_dir(run)/train.log`; `worker.json` beside
    it records its devices, command, start, end and exit status. `report` gets one line per start
    and finish. A failed worker does not stop the others. Interrupted (Ctrl-C), the workers are
    terminated and the interrupt raised.
    """
    if not groups:
        raise ValueError("no device groups to run on")
    queue, free = list(runs), list(groups)
    running: dict[str, tuple[subprocess.Popen, tuple[int, ...], Any, dict[str, Any], float]] = {}
    status: dict[str, int] = {}
    try:
        while queue or running:
            while queue and free:
                name, group = queue.pop(0), free.pop(0)
                folder = run_dir(name)
                folder.mkdir(parents=True, exist_ok=True)
                log = open(folder / LOG_FILE, "ab")  # noqa: SIM115 -- closed when the worker ends
                argv = command(name)
                proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env(group))
                record = {"run": name, "devices": list(group), "command": argv, "pid": proc.pid, "started": _now()}
                _write_record(folder, record)
                running[name] = (proc, group, log, record, time.monotonic())
                report(f"run {name}: started on device(s) {','.join(map(str, group))} (pid {proc.pid}, "
                       f"log {folder / LOG_FILE})")
            time.sleep(poll_s)
            for name in [n for n, (p, *_) in running.items() if p.poll() is not None]:
                proc, group, log, record, start = running.pop(name)
                log.close()
                status[name] = proc.returncode
                _write_record(run_dir(name), {**record, "finished": _now(), "returncode": proc.returncode})
                free.append(group)
                outcome = "finished" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
                report(f"run {name}: {outcome} on device(s) {','.join(map(str, group))} after "
                       f"{time.monotonic() - start:.0f} s")
    except BaseException:
        for proc, *_ in running.values():
            proc.terminate()
        for proc, _, log, _, _ in running.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
        raise
    return status


def _write_record(folder: pathlib.Path, record: Mapping[str, Any]) -> None:
    atomic_write.write_json(folder / WORKER_FILE, dict(record))
