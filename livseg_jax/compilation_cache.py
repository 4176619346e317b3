"""JAX's persistent compilation cache for the command-line entry points.

A full-size train step compiles in 1.5-3 minutes on a GPU and each prediction stage in 10-25 s;
with the cache a restarted run or a second `predict` call loads the compiled programs (and XLA's
GPU autotuning results, so a restart picks the same kernels) instead. The entry points turn it
on; library calls (`train_and_evaluate`, `Predictor`) leave JAX's global configuration alone.

The cache is trusted code: keep it in a directory only you can write (JAX's documentation).
"""

from __future__ import annotations

import os
import pathlib

import jax

OFF = ("", "off")


def resolve_cache_dir(setting: str, cache_root: pathlib.Path) -> pathlib.Path | None:
    """"auto" -> `cache_root`/jax_compilation; "" or "off" -> None; anything else is a path."""
    if setting in OFF:
        return None
    if setting == "auto":
        return cache_root / "jax_compilation"
    return pathlib.Path(setting).expanduser()


def enable_compilation_cache(path: pathlib.Path, min_compile_secs: float = 1.0) -> pathlib.Path:
    """Stores every program that took at least `min_compile_secs` to compile under `path`."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"compilation cache {path}: cannot create it ({e.strerror}); "
                      "choose another directory or turn the cache off") from e
    if not os.access(path, os.W_OK):
        raise PermissionError(f"compilation cache {path}: not writable; choose another directory "
                              "or turn the cache off")
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_secs)
    return path


def use_compilation_cache(setting: str, cache_root: pathlib.Path, min_compile_secs: float = 1.0) -> pathlib.Path | None:
    """The entry points' one call: resolves `setting` and turns the cache on; returns its directory."""
    path = resolve_cache_dir(setting, cache_root)
    return None if path is None else enable_compilation_cache(path, min_compile_secs)
