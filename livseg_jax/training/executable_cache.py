"""Compiled programs kept on disk and loaded without tracing: the train step's warm start.

JAX's persistent compilation cache keys a program by its lowered form, so even a warm start traces
and lowers the step first: 6.5-9 s of Python for the paper network on an H200 host (docs/benchmarks.md),
more than loading the program. This cache keys the step instead by everything it is made from, and
stores the compiled executable itself (`jax.experimental.serialize_executable`):

- the package's own source (every `livseg_jax/**/*.py`, hashed) and the versions of what builds and
  compiles the program: jax, jaxlib, flax, optax, numpy, the JAX CUDA plugin and cuDNN
  (`xla_flags.runtime_versions`), and the backend's platform version;
- the whole run config, the program's name, and its arguments' shapes, dtypes and shardings with
  the ids of the devices each sharding uses, in order;
- `XLA_FLAGS`, every JAX setting as the calling thread sees it, every device (kind, id, process)
  and this process's index.

A change to any of them is another key, so an entry is never used for another program; the cost of
that caution is a miss (one normal compile) after edits that would not have changed the program.
Entries are pickles, trusted like JAX's own cache: keep the directory writable by you only.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import pickle
from typing import Any

import jax
import ml_collections
from jax.experimental import serialize_executable

from livseg_jax.atomic_write import sweep_stale_temps, write_bytes
from livseg_jax.training.step_programs import SplitCompiled
from livseg_jax.xla_flags import AUTOTUNE_VERSIONED, runtime_versions

PACKAGE_ROOT = pathlib.Path(__file__).resolve().parents[1]
SUBDIR = "livseg_executables"
LIBRARIES = ("jax", "jaxlib", "flax", "optax", "numpy")
KEEP_PER_PROGRAM = 3  # entries kept per program name (train step, initialisation): the newest
FORMAT = "livseg-executables-3"  # session 14: an entry holds one program or the step's parts (two or three)


def executable_cache_dir() -> pathlib.Path | None:
    """Returns where compiled programs are kept: beside JAX's persistent compilation cache when it
    is on (`livseg_jax.train` turns it on) in a one-process run; else None (no executable cache).

    Several processes each compile for their own devices, and JAX's cache is off there too
    (train.py says why).
    """
    root = jax.config.jax_compilation_cache_dir
    if not root or jax.process_count() > 1:
        return None
    return pathlib.Path(root) / SUBDIR


@functools.cache
def source_digest(root: pathlib.Path = PACKAGE_ROOT) -> str:
    """Returns the SHA-256 of the package's Python sources (relative paths and contents)."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _sharding_ids(sharding: Any) -> list[int]:
    """Returns the ids of the devices `sharding` uses, in order (a NamedSharding's repr shows only the
    mesh's axis sizes: meshes over devices [0, 1] and [2, 3] print alike)."""
    return [d.id for d in sharding._device_assignment]  # no public accessor keeps the order


def _leaf_key(path: Any, leaf: Any) -> tuple:
    sharding = getattr(leaf, "sharding", None)
    devices = None if sharding is None else _sharding_ids(sharding)
    return str(path), leaf.shape, str(leaf.dtype), repr(sharding), devices


def program_key(name: str, config: ml_collections.ConfigDict, args: Any) -> str:
    """Returns the key of program `name` of a run with `config` for `args` (arrays or
    ShapeDtypeStructs with shardings): the hash of everything the module docstring lists."""
    shapes = [_leaf_key(path, a) for path, a in jax.tree_util.tree_flatten_with_path(args)[0]]
    parts = {
        "name": name,
        "source": source_digest(),
        "versions": {**runtime_versions((*LIBRARIES, *AUTOTUNE_VERSIONED)),
                     "platform": jax.devices()[0].client.platform_version},
        "config": config.to_json(sort_keys=True),
        "args": repr(shapes) + repr(jax.tree.structure(args)),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax_config": sorted((k, repr(v)) for k, v in jax.config.values.items()),
        "devices": [(d.id, d.device_kind, d.process_index) for d in jax.devices()],
        "process": jax.process_index(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()


def device_ids(compiled: jax.stages.Compiled) -> list[int]:
    """Returns the ids of the devices `compiled` runs on, in its order (its first input's sharding, or
    its first output's for a program without inputs)."""
    return _sharding_ids((jax.tree.leaves(compiled.input_shardings) or jax.tree.leaves(compiled.output_shardings))[0])


def prune(directory: pathlib.Path, keep: int = KEEP_PER_PROGRAM) -> None:
    """Deletes all but the `keep` newest entries of each program in `directory`, and temporary files
    of killed writers: each edit of the package makes new entries, and a GPU program is large."""
    sweep_stale_temps(directory)
    by_program: dict[str, list[pathlib.Path]] = {}
    for path in directory.glob("*.pkl"):
        by_program.setdefault(path.name.rsplit("-", 1)[0], []).append(path)
    for paths in by_program.values():
        for old in sorted(paths, key=lambda p: p.stat().st_mtime, reverse=True)[keep:]:
            old.unlink(missing_ok=True)


def store(path: pathlib.Path, compiled: Any) -> None:
    """Writes `compiled` (a `jax.stages.Compiled`, or a `SplitCompiled` of them) and the ids of
    each program's devices to `path` atomically (a crash leaves no partial entry)."""
    split = isinstance(compiled, SplitCompiled)
    entries = [(serialize_executable.serialize(p), device_ids(p)) for p in (compiled.parts if split else (compiled,))]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, pickle.dumps((FORMAT, split, entries)))
    prune(path.parent)


def _load_one(entry) -> jax.stages.Compiled:
    (payload, in_tree, out_tree), ids = entry
    by_id = {d.id: d for d in jax.devices()}
    return serialize_executable.deserialize_and_load(payload, in_tree, out_tree,
                                                     execution_devices=[by_id[i] for i in ids])


def load(path: pathlib.Path) -> Any:
    """Returns the program(s) stored at `path`, loaded onto the devices they were compiled for (left
    to itself, JAX would load them onto all of them). Raises ValueError for another format's entry."""
    stored = pickle.loads(path.read_bytes())
    if not (isinstance(stored, tuple) and len(stored) == 3 and stored[0] == FORMAT):
        raise ValueError(f"not an entry of format {FORMAT}")
    _, split, entries = stored
    programs = tuple(_load_one(entry) for entry in entries)
    return SplitCompiled(programs) if split else programs[0]
