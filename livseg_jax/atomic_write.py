"""Atomic file and folder writes: a reader sees the old content or the new, never half of it.

Everything the package writes (label maps, cache entries, JSON records, weight files, run
directories) goes through here: the data is written to a hidden temporary sibling (same folder,
so the final `os.replace` is a rename on one file system) and moved into place only when the
write succeeded. On any failure, including KeyboardInterrupt, the temporary is removed;
`exit_on_sigterm` makes SIGTERM do the same (it raises SystemExit in the main thread).

A process killed outright (SIGKILL, power loss) cannot clean up: its temporaries stay behind.
Their names say who wrote them (`.<name>.<origin>-<pid>-<random>.tmp<endings>`, origin a hash of
the host name and PID namespace), so `sweep_stale_temps`, called when training, prediction, the
importer and the cache build start, removes exactly those of dead processes of this machine and
namespace, and names (without touching) temporaries it cannot attribute.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

PathLike = str | os.PathLike
_STARTED = time.time()  # about this process's start: temporaries modified since are never swept
# Ours: `.<name>.<origin>-<pid>-<random>.tmp<endings>`; older versions wrote no origin.
_TEMP_NAME = re.compile(r"^\..+\.(?:(?P<origin>[0-9a-f]{6})-)?(?P<pid>\d+)-[0-9a-f]{8}\.tmp(?:\..*)?$")


def _origin() -> str:
    """Returns 6 hex digits naming this host and PID namespace: where a temporary's pid means something."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return hashlib.sha1(f"{socket.gethostname()}|{namespace}".encode()).hexdigest()[:6]


_ORIGIN = _origin()


def temp_path_for(path: PathLike) -> pathlib.Path:
    """Returns a unique hidden temporary path next to `path`, keeping its file-name endings."""
    path = pathlib.Path(path)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    return path.with_name(f".{path.name}.{_ORIGIN}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{suffix}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep_stale_temps(folder: PathLike, log: Callable[[str], None] | None = None) -> list[pathlib.Path]:
    """Returns the temporaries of crashed writers removed from `folder` (not recursive).

    Removed: names of our pattern written on this host and PID namespace by a process that no
    longer runs, last modified before this process started. Named through `log` (default:
    stderr) but left alone: names of our pattern from another host or namespace, or from older
    versions (no origin), over an hour old; whether their writer still runs is not knowable here.
    Anything else is never touched.
    """
    folder = pathlib.Path(folder)
    log = log or (lambda line: print(line, file=sys.stderr))
    removed, unknown = [], []
    try:
        entries = list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for path in entries:
        match = _TEMP_NAME.match(path.name)
        if match is None:
            continue
        try:
            modified = path.lstat().st_mtime
        except FileNotFoundError:
            continue  # its writer finished meanwhile
        if match["origin"] != _ORIGIN:
            if modified < _STARTED - 3600:  # an hour old: no live write looks like that
                unknown.append(path)
            continue
        if _pid_alive(int(match["pid"])) or modified >= _STARTED:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        log(f"note: removed {len(removed)} temporary file(s) of interrupted earlier runs in {folder}")
    if unknown:
        log(f"note: left {len(unknown)} temporary file(s) of unknown writers in {folder} (remove them "
            f"when nothing else writes there): {', '.join(p.name for p in unknown[:5])}"
            + (" ..." if len(unknown) > 5 else ""))
    return removed


class Terminated(SystemExit):
    """Raised in the main thread on SIGTERM (exit status 143, like a process killed by it)."""


def _inside_gc_callback(frame) -> bool:
    """Returns whether `frame` runs inside a garbage-collector callback (JAX installs one)."""
    callbacks = {getattr(callback, "__code__", None) for callback in gc.callbacks}
    while frame is not None:
        if frame.f_code in callbacks:
            return True
        frame = frame.f_back
    return False


def _sent_again_if_it_would_be_lost(signum, frame) -> bool:
    """Returns True after arranging for `signum` to be sent again, when `frame` is inside a collector
    callback: Python prints and drops an exception raised there ("Exception ignored in: <function
    _xla_gc_callback ...>"), and the run would go on as if never signalled."""
    if not _inside_gc_callback(frame):
        return False
    threading.Timer(0.01, os.kill, (os.getpid(), signum)).start()
    return True


def _raise_terminated(signum, frame) -> None:
    if not _sent_again_if_it_would_be_lost(signum, frame):
        raise Terminated(128 + signal.SIGTERM)


def _raise_interrupt(signum, frame) -> None:
    if not _sent_again_if_it_would_be_lost(signum, frame):
        raise KeyboardInterrupt


def exit_on_sigterm() -> None:
    """Makes SIGTERM raise `Terminated` (a SystemExit) so cleanup runs as for Ctrl-C; neither
    signal is lost when it lands in a garbage-collector callback (`_sent_again_if_it_would_be_lost`).

    Without it SIGTERM ends Python at once: `finally` blocks do not run and temporaries stay.
    Call from a command line's main thread, before work starts.
    """
    if threading.current_thread() is threading.main_thread():  # signal.signal works there only
        signal.signal(signal.SIGTERM, _raise_terminated)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # Ctrl-C: Python's own, made safe
            signal.signal(signal.SIGINT, _raise_interrupt)


def refuse_overwrite(paths: Sequence[PathLike], force: bool = False) -> None:
    """Returns None unless one of `paths` is an existing file or non-empty folder and `force` is
    off: then raises FileExistsError naming it (and --force). The one check of every `force`."""
    if force:
        return
    for path in map(pathlib.Path, paths):
        if path.is_dir():
            if any(path.iterdir()):
                raise FileExistsError(f"{path}: folder exists and is not empty; pass --force to replace it")
        elif path.exists():
            raise FileExistsError(f"{path}: exists; pass --force to overwrite")


@contextlib.contextmanager
def atomic_path(path: PathLike, force: bool = True) -> Iterator[pathlib.Path]:
    """Yields a temporary path next to `path` (same endings); moves it to `path` on success only.

    With `force=False` an existing `path` raises FileExistsError before anything is written.
    """
    path = pathlib.Path(path)
    refuse_overwrite([path], force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = temp_path_for(path)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_paths(paths: Sequence[PathLike]) -> Iterator[list[pathlib.Path]]:
    """Yields temporary paths for several files; on success moves them into place in the given order.

    Nothing is moved unless the whole block succeeded; a crash between the renames (microseconds)
    can leave the first files without the later ones, so list first what is harmless alone.
    """
    paths = [pathlib.Path(p) for p in paths]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmps = [temp_path_for(p) for p in paths]
    try:
        yield tmps
        for tmp, path in zip(tmps, paths, strict=True):
            os.replace(tmp, path)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


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
    refuse_overwrite([directory], force)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(directory)
    tmp.mkdir()
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
