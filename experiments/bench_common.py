"""Shared helpers of the GPU benchmarks: environment record, timing, result files."""

from __future__ import annotations

import json
import os
import pathlib
import platform
import subprocess
import sys
import time
from collections.abc import Callable

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def environment() -> dict:
    """Returns device, driver, library versions and XLA flags for a result file."""
    info = {"python": sys.version.split()[0], "platform": platform.platform(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "hostname_cpus": os.cpu_count()}
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
    """Returns {"key": "value"} from "key=value,key=value" (model config overrides)."""
    return dict(item.split("=", 1) for item in text.split(",") if item)


def apply_overrides(model_config, overrides: dict[str, str]):
    """Sets each override on a `model` ConfigDict, converted to the type of the current value."""
    for key, value in overrides.items():
        if key not in model_config:
            raise SystemExit(f"unknown model config key {key!r} in --overrides")
        current = model_config[key]
        model_config[key] = eval(value) if isinstance(current, tuple) else type(current)(value)
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


def write_result(name: str, payload: dict) -> pathlib.Path:
    """Writes `payload` as results/<name>.json (and a copy under $OUT when set); returns the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=1)
    path = RESULTS / f"{name}.json"
    path.write_text(text)
    if os.environ.get("OUT"):
        pathlib.Path(os.environ["OUT"], f"{name}.json").write_text(text)
    return path


def enable_compilation_cache(path: str = ".cache/jax") -> None:
    """The entry points' persistent compilation cache, kept in the checkout: on the GPU machine
    it survives between commands while the machine stays warm."""
    from livseg_jax.compilation_cache import enable_compilation_cache as enable

    enable(pathlib.Path(path).resolve())
