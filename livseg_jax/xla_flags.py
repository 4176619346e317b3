"""XLA flags put into `XLA_FLAGS` before JAX starts a backend: those the model's computation
forms need, and the user's own.

XLA reads `XLA_FLAGS` once, when the first backend starts, so the entry points (`train`,
`predict`) apply flags before anything touches a device. A flag the user already set in the
environment wins over the same flag from the user's config, which wins over the forms' flags.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

from jax._src import xla_bridge  # no public way to ask whether a backend has started

from livseg_jax.models.forms import may_run_gpu_forms

# The GPU forms (models/forms.py) were measured fastest with channels-last cuDNN convolutions
# (docs/benchmarks.md). XLA's CPU backend ignores `--xla_gpu_*` flags, so "auto" forms, which
# resolve only once the backend runs, may ask for it without knowing the backend.
GPU_FORM_FLAGS = "--xla_gpu_force_conv_nhwc=true"


def _flag_name(flag: str) -> str:
    return flag.split("=", 1)[0]


def merge_xla_flags(existing: str, wanted: str) -> str:
    """Returns `existing` followed by each flag of `wanted` whose name `existing` does not set."""
    present = {_flag_name(f) for f in existing.split()}
    added = [f for f in wanted.split() if _flag_name(f) not in present]
    return " ".join(existing.split() + added)


def model_xla_flags(model_configs: Iterable[Mapping[str, Any]]) -> str:
    """Returns the XLA flags the computation forms of these `model` config sections need ("": none)."""
    return GPU_FORM_FLAGS if any(may_run_gpu_forms(m) for m in model_configs) else ""


def apply_xla_flags(wanted: str, environ: MutableMapping[str, str] = os.environ) -> str:
    """Adds `wanted` to `environ["XLA_FLAGS"]`; returns the result.

    Raises RuntimeError if a JAX backend already started, since XLA would ignore the change.
    """
    for flag in wanted.split():
        if not flag.startswith("--xla_") or "=" not in flag:
            raise ValueError(f"XLA flag {flag!r} is not of the form --xla_name=value")
    existing = environ.get("XLA_FLAGS", "")
    merged = merge_xla_flags(existing, wanted)
    if merged.split() == existing.split():  # nothing to add (spacing aside): nothing to apply
        return existing
    if xla_bridge.backends_are_initialized():
        raise RuntimeError(f"XLA flags ({wanted!r}) must be applied before JAX starts a "
                           "backend; XLA would ignore them now")
    environ["XLA_FLAGS"] = merged
    return merged


def apply_model_xla_flags(model_configs: Iterable[Mapping[str, Any]], extra: str = "",
                          environ: MutableMapping[str, str] = os.environ) -> str:
    """Adds the flags the models' forms need and the user's `extra` flags (which win) to
    `environ["XLA_FLAGS"]`; returns the result. Raises as `apply_xla_flags`."""
    return apply_xla_flags(merge_xla_flags(extra, model_xla_flags(model_configs)), environ)
