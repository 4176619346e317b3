"""Atomic file and folder writes: a reader sees the old content or the new, never half of it.

Everything the package writes (label maps, cache entries, JSON records, weight files, run
directories) goes through here: the data is written to a hidden temporary sibling (same folder,
so the final `os.replace` is a rename on one file system) and moved into place only when the
write succeeded. On any failure, including KeyboardInterrupt, the temporary is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

PathLike = str | os.PathLike


def temp_path_for(path: PathLike) -> pathlib.Path:
    """Returns a unique hidden temporary path next to `path`, keeping its file-name endings."""
    path = pathlib.Path(path)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{suffix}")


@contextlib.contextmanager
def atomic_path(path: PathLike, force: bool = True) -> Iterator[pathlib.Path]:
    """Yields a temporary path next to `path` (same endings); moves it to `path` on success only.

    With `force=False` an existing `path` raises FileExistsError before anything is written.
    """
    path = pathlib.Path(path)
    if not force and path.exists():
        raise FileExistsError(f"{path}: exists; pass --force to overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = temp_path_for(path)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_bytes(path: PathLike, data: bytes) -> pathlib.Path:
    """Returns `path` after writing `data` to it atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return pathlib.Path(path)


def write_text(path: PathLike, text: str) -> pathlib.Path:
    """Returns `path` after writing `text` (UTF-8) to it atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, obj: Any, indent: int = 1) -> pathlib.Path:
    """Returns `path` after writing `obj` as JSON to it atomically."""
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


@contextlib.contextmanager
def atomic_dir(directory: PathLike, force: bool = False) -> Iterator[pathlib.Path]:
    """Yields an empty temporary folder that replaces `directory` when the block succeeds.

    An existing non-empty `directory` is refused (FileExistsError) unless `force`; with `force`
    it is swapped out only after the new content is complete.
    """
    directory = pathlib.Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory}: exists and is not a folder")
    if directory.is_dir() and any(directory.iterdir()) and not force:
        raise FileExistsError(f"{directory}: folder exists and is not empty; pass --force to replace it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        yield tmp
        if directory.exists():
            old = temp_path_for(directory)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
