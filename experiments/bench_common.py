"""Shared helpers of the GPU benchmarks: environment record, timing, result files."""

from __future__ import annotations

import ast
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from livseg_jax.atomic_write import write_json

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"


def host_cpu() -> dict:
    """Returns the host CPU's model and load: compile times of one program differ by up to 20 s
    between H200 machines (docs/benchmarks.md, session 11), and these say which host a row ran on."""
    info = {}
    try:
        cpuinfo = pathlib.Path("/proc/cpuinfo").read_text()
        match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
        info["cpu_model"] = match.group(1).strip() if match else None
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def environment() -> dict:
    """Returns device, driver, library versions and XLA flags for a result file."""
    info = {"python": sys.version.split()[0], "platform": platform.platform(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "hostname_cpus": os.cpu_count(),
            **host_cpu()}
    try:
        import jax
        import jaxlib

        info.update(jax=jax.__version__, jaxlib=jaxlib.__version__,
                    jax_devices=[d.device_kind for d in jax.devices()])
    except ImportError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = out.stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        info["nvidia_smi"] = []
    return info


def parse_overrides(text: str) -> dict[str, str]:
    """Returns {"key": "value"} from "key=value,key=value" (model config overrides).

    A comma starts a new item only where a `key=` follows, so a tuple value keeps its commas:
    "features=(8,16,16,32,32),dtype=bfloat16".
    """
    items = [item for item in re.split(r",(?=\s*\w+\s*=)", text) if item.strip()]
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--overrides item {item!r} is not key=value")
        overrides[key.strip()] = value.strip()
    return overrides


def parse_value(text: str, current):
    """Returns `text` parsed as a value of the type of `current` (bool, int, float, str or tuple)."""
    if isinstance(current, bool):  # before int: bool("False") would be True
        lowered = text.lower()
        if lowered not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true or false, got {text!r}")
        return lowered in ("true", "1")
    if isinstance(current, tuple):
        value = ast.literal_eval(text if text.lstrip().startswith(("(", "[")) else f"({text},)")
        if not isinstance(value, tuple | list):
            raise ValueError(f"expected a tuple, got {text!r}")
        return tuple(value)
    if isinstance(current, int | float | str):
        return type(current)(text)
    raise ValueError(f"cannot override a value of type {type(current).__name__}")


def apply_overrides(model_config, overrides: dict[str, str]):
    """Returns `model_config` (a `model` ConfigDict) with each override set, parsed to the type of
    the current value."""
    for key, value in overrides.items():
        if key not in model_config:
            raise SystemExit(f"unknown model config key {key!r} in --overrides")
        current = model_config[key]
        if current is None:  # a typed None ("auto" dense_pack_channels) parses as its field's type
            current = model_config.get_ref(key).get_type()()
        try:
            model_config[key] = parse_value(value, current)
        except (ValueError, SyntaxError) as err:
            raise SystemExit(f"--overrides {key}={value}: {err}") from None
    return model_config


def median_time(fn: Callable[[], None], sync: Callable[[], None], warmup: int, repeats: int) -> dict:
    """Returns {"median_ms", "min_ms", "times_ms"} of `fn`, synchronising around each call."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    ordered = sorted(times)
    return {"median_ms": ordered[len(ordered) // 2], "min_ms": ordered[0], "times_ms": times}


def back_to_back_ms(step, sync, steps: int, repeats: int = 3) -> dict:
    """Returns the median and all of `repeats` runs of ms per step when `steps` steps are dispatched
    without waiting in between (one wait at the end): the host runs ahead while the device works,
    as in a training loop. `median_time` waits after every call instead, so its times also hold
    the host's dispatch and launch latency."""
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3 / steps)
    return {"back_to_back_ms": sorted(times)[len(times) // 2], "back_to_back_runs_ms": times}


def write_result(name: str, payload: dict) -> pathlib.Path:
    """Writes `payload` as results/<name>.json (and a copy under $OUT when set); returns the path.
    $LIVSEG_RESULTS_DIR, when set, replaces results/ (a test's smoke run leaves the checkout alone)."""
    path = write_json(pathlib.Path(os.environ.get("LIVSEG_RESULTS_DIR") or RESULTS) / f"{name}.json", payload)
    if os.environ.get("OUT"):
        write_json(pathlib.Path(os.environ["OUT"], f"{name}.json"), payload)
    return path


def enable_compilation_cache(path: str = ".cache/jax") -> None:
    """The entry points' persistent compilation cache, kept in the checkout: on the GPU machine
    it survives between commands while the machine stays warm."""
    from livseg_jax.compilation_cache import enable_compilation_cache as enable

    enable(pathlib.Path(path).resolve())


RESULT_PREFIX = "RESULT "


def print_result(row: dict) -> None:
    """Prints a measuring child process's result line (with its environment) for `run_child`."""
    print(RESULT_PREFIX + json.dumps({**row, "environment": environment()}), flush=True)


def run_child(module: str, args: Sequence[str], env: dict[str, str] | None = None,
              cpus: Sequence[int] | None = None) -> dict:
    """Returns {"wall_s", **the child's result} after `python -m module *args` in a fresh process
    (each measurement gets the device's memory to itself), or {"wall_s", "error"} when it failed.

    `env`: the child's whole environment (default: this process's); `cpus`: cores to pin it to.
    """
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO, env=env,
                          preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    found = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    row = {"wall_s": time.perf_counter() - t0}
    if proc.returncode or not found:
        row["error"] = (proc.stderr or proc.stdout)[-1500:]
    else:
        row.update(json.loads(found[-1][len(RESULT_PREFIX):]))
    return row


def stage_step_parts(config, patch: str = "") -> tuple:
    """Returns (patch shape, steps per epoch, model, optimiser, one-device mesh, random batch on the
    device) of a stage config, built as `train` builds them. XLA flags must be set before (the
    model's build starts the backend). `patch` "D,H,W" replaces the config's patch."""
    import jax
    import numpy as np

    from livseg_jax.models import build_model
    from livseg_jax.training.schedules import make_optimizer
    from livseg_jax.training.step import make_mesh

    shape = int_tuple(patch) if patch else tuple(config.data.patch_size)
    spe = int(config.train.steps_per_epoch)
    model = build_model(config.model, deploy=False)
    optimizer = make_optimizer(config.optim, spe)
    mesh = make_mesh(jax.devices()[:1])
    rng = np.random.default_rng(0)
    size = int(config.data.batch_size)
    batch = {"image": jax.device_put(rng.normal(size=(size, *shape, 1)).astype(np.float32)),
             "label": jax.device_put((rng.random((size, *shape)) < 0.1).astype(np.int32))}
    return shape, spe, model, optimizer, mesh, batch


def apply_train_xla_flags(config, autotune: str | None = "shipped") -> None:
    """Sets the XLA flags `train` sets for a stage config (its forms' and `train.xla_flags`) and, unless
    `autotune` is None, loads those autotuning results ("shipped": the package's), before the backend starts."""
    from livseg_jax.xla_flags import apply_model_xla_flags, autotune_xla_flags

    flag = autotune_xla_flags(autotune)[0] if autotune is not None else ""
    apply_model_xla_flags([config.model], " ".join(f for f in (config.train.get("xla_flags", ""), flag) if f))


def stage_train_step(config, model, optimizer, mesh):
    """Returns the stage config's train step (not jitted) as `train` makes it: its steps per epoch,
    device augmentation and BatchNorm statistics, for `mesh`."""
    from livseg_jax.data.augment_device import device_augment_settings
    from livseg_jax.training.step import make_train_step

    return make_train_step(model, optimizer, config.loss, int(config.train.steps_per_epoch),
                           device_augment_settings(config.data), config.train.get("batch_norm_stats", "global"), mesh)


def int_tuple(text: str) -> tuple[int, ...]:
    """Returns (48, 256, 256) from "48,256,256" (a shape, window or widths argument)."""
    return tuple(int(v) for v in text.split(","))
