"""One clear line for every expected failure of a command-line entry point, and output checks.

Every entry point (`train`, `predict`, `evaluate`, `visualize`, `convert`, `data.ircadb`,
`models.summary`) runs its `main` through `run_main` (absl ones through `run_absl_app` /
`parse_absl_flags`). An expected failure (bad input, bad config, a flag error, a missing or
unreadable file, a read-only or full disk, a device out of memory) ends with

    error: <path or setting>: <problem>
    hint: <what to do>          (only where one helps)

on stderr and exit status 1; further lines of a long message (e.g. the keys of a weight file that
do not fit the model) follow indented. Anything else is a bug and keeps its traceback; `--debug`
(or the environment variable LIVSEG_DEBUG=1) keeps the traceback of expected failures too.

`check_output_dir` / `check_output_file` refuse an output location before any work starts: not a
folder, not creatable, not writable, or (where the size is known) too little free space. They
create nothing, so a refused run leaves nothing behind.
"""

from __future__ import annotations

import errno
import os
import pathlib
import re
import shutil
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TextIO

DEBUG_FLAG = "--debug"
DEBUG_ENV = "LIVSEG_DEBUG"
EXIT_ERROR = 1

_ERRNO_HINTS = {
    errno.ENOSPC: "free some space or choose an output on another disk",
    errno.EDQUOT: "free some space or choose an output on another disk",
    errno.EACCES: "check the permissions, or choose another location",
    errno.EPERM: "check the permissions, or choose another location",
    errno.EROFS: "the file system is read-only: choose another location",
}


class CliError(ValueError):
    """An expected failure: `path` (a file, folder, flag or config key), `problem`, optional `hint`."""

    def __init__(self, path: str | os.PathLike | None, problem: str, hint: str | None = None):
        self.path, self.problem, self.hint = (None if path is None else str(path)), problem, hint
        super().__init__(problem if path is None else f"{path}: {problem}")


# What helps when a device runs out of memory, for the commands that allocate on one.
OUT_OF_MEMORY_HINT = ("use less memory per step: train with a smaller data.batch_size or data.patch_size, or "
                      "model.dtype=bfloat16; predict with a smaller --batch-size; on a CPU the ':paper' "
                      "configs' 48x256x256 patches need tens of GB")


def out_of_memory(e: BaseException) -> CliError | None:
    """Returns a device's out-of-memory failure (XLA's RESOURCE_EXHAUSTED, raised as a JaxRuntimeError
    by a compile or a run) as an expected failure with a hint, else None. Checkpoints are written
    atomically, so nothing partial is left: a run that fails before its first checkpoint starts
    afresh with a smaller setting; a later one resumes only with compute-only changes (model.dtype;
    the patch size is one of run_dir.MEANING_KEYS)."""
    text = str(e)
    if type(e).__name__ != "JaxRuntimeError" or "RESOURCE_EXHAUSTED" not in text:
        return None
    line = next(line for line in text.splitlines() if "RESOURCE_EXHAUSTED" in line)
    detail = line.split("RESOURCE_EXHAUSTED", 1)[1].lstrip(": ").strip()
    return CliError(None, f"out of memory on the device: {detail or 'XLA could not allocate a buffer'}",
                    OUT_OF_MEMORY_HINT)


def debug_requested(argv: Sequence[str]) -> bool:
    """Returns whether tracebacks of expected failures are wanted (--debug or LIVSEG_DEBUG=1)."""
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _absl_flag_error() -> tuple[type[BaseException], ...]:
    try:
        from absl import flags
    except ImportError:  # absl is only needed by the absl entry points
        return ()
    return (flags.Error,)


def expected_errors() -> tuple[type[BaseException], ...]:
    """Returns the exception types that mean bad input or environment, not a bug."""
    # ImportError: a missing optional dependency; its message says what to install.
    return (CliError, ValueError, OSError, ImportError, *_absl_flag_error())


def as_expected(e: Exception) -> BaseException | None:
    """Returns `e` as the expected failure to report (itself, or a device out of memory as a
    CliError), or None for a bug, which keeps its traceback."""
    return e if isinstance(e, expected_errors()) else out_of_memory(e)


def _os_error_message(e: OSError) -> str:
    if e.filename is None or str(e.filename) in str(e.strerror or ""):
        return str(e) if e.strerror is None else str(e.strerror)
    names = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else str(e.filename)
    return f"{names}: {e.strerror}"


def error_lines(e: BaseException) -> list[str]:
    """Returns the lines reporting an expected failure: `error: ...`, indented details, a hint."""
    if isinstance(e, OSError) and e.errno is not None and e.strerror is not None:
        message = _os_error_message(e)
    else:
        message = str(e) or type(e).__name__
    first, *rest = [line for line in message.splitlines() if line.strip()] or [type(e).__name__]
    lines = [f"error: {first}"] + [f"  {line.strip()}" for line in rest]
    hint = getattr(e, "hint", None)
    if hint is None and isinstance(e, OSError):
        hint = _ERRNO_HINTS.get(e.errno)
    if hint is None and isinstance(e, ModuleNotFoundError) and e.name:
        hint = f"an optional dependency is missing: pip install {e.name.split('.')[0]}"
    if hint:
        lines.append(f"hint: {hint}")
    return lines


def report(e: BaseException, stream: TextIO | None = None) -> int:
    """Prints `error_lines(e)` to stderr; returns the exit status for it."""
    print("\n".join(error_lines(e)), file=stream or sys.stderr, flush=True)
    return EXIT_ERROR


def run_main(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Returns main(argv)'s exit status (None -> 0), or 1 after reporting an expected failure.

    `argv` excludes the program name (default: sys.argv[1:]); `--debug` is taken out of it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != DEBUG_FLAG]
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        if debug:
            return main(argv) or 0
        try:
            return main(argv) or 0
        except Exception as e:
            expected = as_expected(e)
            if expected is None:
                raise
            return report(expected)


_default_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Prints the package's own warnings (their messages name the file) as `warning: <message>`."""
    if category.__module__.startswith("livseg_jax"):
        print(f"warning: {message}", file=file or sys.stderr)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


# ----------------------------------------------------------------------------------- absl flags


def _override_of(argv: Sequence[str], leaf: str) -> str | None:
    """Returns the `--config.a.b=v` argument whose dotted key contains `leaf`, or None."""
    for arg in argv:
        key = arg.lstrip("-").split("=", 1)[0]
        if "." in key and leaf in key.split(".")[1:]:
            return key
    return None


def flag_error(e: BaseException, argv: Sequence[str]) -> CliError:
    """Returns the CliError for a failure while parsing absl / ml_collections config flags."""
    from absl import flags

    if isinstance(e, flags.UnrecognizedFlagError):
        return CliError(f"--{e.flagname}", "unknown flag", "see --help")
    if isinstance(e, AttributeError | KeyError):  # config_flags: an override names no existing key
        inner = e.args[0] if e.args else e
        leaf = str(inner.args[0] if isinstance(inner, KeyError) and inner.args else inner).strip("'\"")
        key = _override_of(argv, leaf)
        if key is not None:
            name, _, dotted = key.partition(".")
            return CliError(f"--{key}", f"unknown config key {dotted!r}",
                            f"check the spelling against the config file given by --{name}")
        return CliError(None, f"unknown config key {leaf!r}")
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return CliError(None, type(e).__name__)
    if len(lines) == 1:
        return CliError(None, lines[0].removeprefix("flag "))
    # config_flags wraps the config file's own error in a traceback: keep its flag and last line.
    head = lines[0].split(": ", 1)[0]
    tail = lines[-1]
    for marker in ("[Errno", "No such file"):
        found = [line for line in lines if marker in line]
        if found:
            tail = found[-1]
            break
    tail = re.sub(r"^\w+(Error|Exception): ", "", tail)  # "ValueError: configs/x.py: ..." -> the message
    return CliError(head.removeprefix("flag ") if head.startswith(("flag ", "--")) else None, tail)


def parse_absl_flags(flag_values: Any, argv: Sequence[str]) -> list[str]:
    """Returns the positional arguments after parsing `argv` (program name first) into
    `flag_values`; a bad flag raises CliError naming it."""
    from absl import flags

    try:
        remaining = flag_values(list(argv))
    except (flags.Error, AttributeError, KeyError, OSError, ValueError, TypeError, SyntaxError) as e:
        raise flag_error(e, argv) from e
    for name in flag_values:
        # config_flags defers a config file's IOError to the first attribute access: provoke it here.
        try:
            getattr(getattr(flag_values, name), "to_dict", None)
        except OSError as e:
            found = re.search(r"\[Errno \d+\] ([^:]+): '(.*)'", str(e))
            if found:
                raise CliError(found.group(2), f"{found.group(1)} (the --{name} file)") from e
            raise CliError(f"--{name}", str(e).splitlines()[-1].strip()) from e
    return remaining


def parse_dhw(text: str, flag: str) -> tuple[int, int, int]:
    """Returns the (D, H, W) of a "D,H,W" flag value (`--patch`, `--window`); CliError naming
    `flag` unless it is exactly three positive integers."""
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or min(sizes) < 1:
        raise CliError(flag, f"expected three positive integers D,H,W such as 48,256,256, got {text!r}")
    return sizes


def parse_command_flags(flag_values: Any, argv: Sequence[str], doc: str) -> bool:
    """Returns False after printing `doc` and the flags' help when `argv` asks for help; else True
    after parsing `argv` (program name first) into `flag_values`, positional arguments refused."""
    if {"-h", "--help", "--helpfull"} & set(argv[1:]):
        print(doc + "\n" + flag_values.get_help())
        return False
    extra = parse_absl_flags(flag_values, argv)[1:]
    if extra:
        raise CliError(None, f"unexpected arguments {extra}", "see --help")
    return True


def run_absl_app(main: Callable[[list[str]], Any]) -> None:
    """Runs `main` with absl's app.run (global FLAGS), reporting flag and expected failures in one line."""
    from absl import app, flags

    argv = list(sys.argv)
    debug = debug_requested(argv[1:])
    argv = [a for a in argv if a != DEBUG_FLAG]

    def parser(args: list[str]) -> list[str]:
        try:
            return parse_absl_flags(flags.FLAGS, args)
        except CliError as e:
            if debug:
                raise
            sys.exit(report(e))

    def wrapped(args: list[str]) -> Any:
        if debug:
            return main(args)
        try:
            return main(args)
        except app.UsageError:
            raise
        except Exception as e:
            expected = as_expected(e)
            if expected is None:
                raise
            sys.exit(report(expected))

    app.run(wrapped, argv=argv, flags_parser=parser)


# ------------------------------------------------------------------------------- output checks


def _existing_ancestor(path: pathlib.Path) -> pathlib.Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _size(n: float) -> str:
    """Returns a byte count for people: 512 bytes, 3.1 MiB, 2.0 GiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def _check_writable_folder(folder: pathlib.Path, shown: pathlib.Path, need_bytes: int) -> None:
    if not folder.is_dir():
        raise CliError(shown, f"cannot be created: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CliError(shown, f"not writable (permission denied on {folder})",
                       _ERRNO_HINTS[errno.EACCES])
    if hasattr(os, "statvfs") and os.statvfs(folder).f_flag & os.ST_RDONLY:
        raise CliError(shown, f"not writable ({folder} is on a read-only file system)",
                       _ERRNO_HINTS[errno.EROFS])
    if need_bytes > 0:
        free = shutil.disk_usage(folder).free
        if free < need_bytes:
            raise CliError(shown, f"needs about {_size(need_bytes)} but only {_size(free)} is free",
                           _ERRNO_HINTS[errno.ENOSPC])


def check_output_dir(path: str | os.PathLike, need_bytes: int = 0) -> pathlib.Path:
    """Returns `path` after checking that it is (or can be created as) a writable folder with
    `need_bytes` free; raises CliError naming it otherwise. Creates nothing."""
    path = pathlib.Path(path)
    if path.exists() and not path.is_dir():
        raise CliError(path, "output exists and is not a folder", "give a folder, or remove the file")
    _check_writable_folder(_existing_ancestor(path), path, need_bytes)
    return path


def check_output_file(path: str | os.PathLike, need_bytes: int = 0) -> pathlib.Path:
    """Returns `path` after checking that a file can be written there (its folder exists or can be
    created, is writable, has `need_bytes` free); raises CliError naming it otherwise."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise CliError(path, "output is a folder; expected a file name")
    _check_writable_folder(_existing_ancestor(path.parent), path, need_bytes)
    return path


def total_size(paths: Sequence[str | os.PathLike]) -> int:
    """Returns the summed size in bytes of the regular files among `paths` (folders: their files)."""
    total = 0
    for p in map(pathlib.Path, paths):
        if p.is_file():
            total += p.stat().st_size
        elif p.is_dir():
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return total
