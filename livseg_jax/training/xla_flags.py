"""XLA flags named by a config, put into `XLA_FLAGS` before JAX starts a backend.

XLA reads `XLA_FLAGS` once, when the first backend starts, so a config can only choose flags if
they are applied before anything touches a device. A flag the user already set in the
environment wins over the config's value for the same flag.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

from jax._src import xla_bridge  # no public way to ask whether a backend has started


def _flag_name(flag: str) -> str:
    return flag.split("=", 1)[0]


def merge_xla_flags(existing: str, wanted: str) -> str:
    """`existing` followed by each flag of `wanted` whose name `existing` does not set."""
    present = {_flag_name(f) for f in existing.split()}
    added = [f for f in wanted.split() if _flag_name(f) not in present]
    return " ".join(existing.split() + added)


def apply_xla_flags(wanted: str, environ: MutableMapping[str, str] = os.environ) -> str:
    """Adds `wanted` to `environ["XLA_FLAGS"]`; returns the result.

    Raises RuntimeError if a JAX backend already started, since XLA would ignore the change.
    """
    for flag in wanted.split():
        if not flag.startswith("--xla_") or "=" not in flag:
            raise ValueError(f"train.xla_flags: {flag!r} is not of the form --xla_name=value")
    existing = environ.get("XLA_FLAGS", "")
    merged = merge_xla_flags(existing, wanted)
    if merged.split() == existing.split():  # nothing to add (spacing aside): nothing to apply
        return existing
    if xla_bridge.backends_are_initialized():
        raise RuntimeError(f"train.xla_flags ({wanted!r}) must be applied before JAX starts a "
                           "backend; XLA would ignore them now")
    environ["XLA_FLAGS"] = merged
    return merged
