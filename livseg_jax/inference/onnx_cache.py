"""ONNX Runtime as the CPU backend of run directories: each stage exported once, then cached.

On a 2-core CPU ONNX Runtime runs the `:paper` networks' windows about 5x faster than XLA:CPU
(docs/benchmarks.md, "Prediction on a CPU"), so `predict --backend auto` (the default) runs run
directories through ONNX Runtime on CPU-only machines. The export (the PyTorch twin through
`torch.onnx`, `interop.onnx_export`) takes tens of seconds per stage, so it happens once: the file
is kept under `<cache root>/onnx/<fingerprint>.onnx`, where the fingerprint covers the run's
resolved path, the checkpoint choice and the size and modification time of every file of the run
that holds weights or settings. A retrained or re-post-processed run is exported again; logs and
pictures do not count. Files are written atomically, so a killed export leaves no cache entry.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pathlib
from collections.abc import Callable

from livseg_jax.inference import backends
from livseg_jax.inference.two_stage import stage_window

# What the export and ONNX Runtime need (the `onnx` and `torch` extras).
REQUIRED_MODULES = ("torch", "onnx", "onnxscript", "onnxruntime")
# Files of a run directory that never change its exported network.
IGNORED_SUFFIXES = (".jsonl", ".log", ".png", ".txt")
EXPORT_VERSION = 1  # bump when the export's form changes, so old cache entries are not reused


def missing_onnx_modules() -> list[str]:
    """Returns the modules the ONNX Runtime backend needs that are not installed (empty: usable)."""
    return [name for name in REQUIRED_MODULES if importlib.util.find_spec(name) is None]


def run_fingerprint(run_path: str | os.PathLike, which: str) -> str:
    """Returns a hex digest of what the export of `run_path` at checkpoint `which` depends on."""
    root = pathlib.Path(run_path).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{run_path}: no such run directory")
    entries = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.name.endswith(IGNORED_SUFFIXES):
            stat = path.stat()
            entries.append([str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns])
    record = {"run": str(root), "which": which, "version": EXPORT_VERSION, "files": entries}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:32]


def cached_onnx(run_path: str | os.PathLike, which: str, cache_root: str | os.PathLike,
                log: Callable[[str], None] = print) -> pathlib.Path:
    """Returns the cached ONNX export of a run directory's stage, exporting it first when absent.

    Raises ValueError for a network the export cannot stand for (the axial 2D forms).
    """
    from livseg_jax.interop import onnx_export

    path = pathlib.Path(cache_root) / "onnx" / f"{run_fingerprint(run_path, which)}.onnx"
    if path.is_file():
        return path
    variables, config = backends.deploy_variables(run_path, which)
    onnx_export.check_exportable(config.model)
    window = stage_window(run_path, config, None)
    log(f"exporting {run_path} to ONNX for ONNX Runtime (first use of this run only; cached in {path.parent})")
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = backends.export_metadata(run_path, config, window, which)
    return onnx_export.export_onnx(variables, config.model, window, path, metadata, force=True)
