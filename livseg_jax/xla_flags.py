"""XLA flags put into `XLA_FLAGS` before JAX starts a backend: those the model's computation
forms need, and the user's own.

XLA reads `XLA_FLAGS` once, when the first backend starts, so the entry points (`train`,
`predict`) apply flags before anything touches a device. A flag the user already set in the
environment wins over the same flag from the user's config, which wins over the forms' flags.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
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


# XLA's GPU autotuning results shipped with the package (livseg_jax/autotune/, made by
# tools/ship_autotune_results.py): the kernel each convolution and fusion of the shipped configs'
# programs measured fastest on the GPU models listed there. XLA keys every entry by the GPU's
# description and the fused computation, so entries of other GPUs or other programs are never
# used; whatever they do not cover is autotuned as usual. The entries name cuDNN engines and
# Triton tilings of one XLA build: they are used only with the exact package versions that made them.
SHIPPED_AUTOTUNE_DIR = pathlib.Path(__file__).parent / "autotune"
AUTOTUNE_MANIFEST = "manifest.json"
# The distributions whose versions decide what an autotuning result means (XLA, its CUDA plugin, cuDNN).
AUTOTUNE_VERSIONED = ("jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin",
                      "jax-cuda13-pjrt", "nvidia-cudnn-cu12", "nvidia-cudnn-cu13")


def runtime_versions(names: Iterable[str] = AUTOTUNE_VERSIONED) -> dict[str, str]:
    """Returns {distribution: version} of the installed distributions among `names`."""
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def has_cuda_plugin(versions: Mapping[str, str]) -> bool:
    """Returns whether `versions` (`runtime_versions`) includes a JAX CUDA plugin."""
    return any(name.startswith("jax-cuda") for name in versions)


def shipped_autotune_file(versions: Mapping[str, str] | None = None,
                          directory: pathlib.Path = SHIPPED_AUTOTUNE_DIR) -> tuple[pathlib.Path | None, str]:
    """Returns (the shipped results file made with exactly `versions`, or None; why not, or "")."""
    versions = runtime_versions() if versions is None else versions
    if not has_cuda_plugin(versions):
        return None, ""  # no GPU to autotune for: nothing to say
    manifest = directory / AUTOTUNE_MANIFEST
    entries = json.loads(manifest.read_text())["files"] if manifest.exists() else []
    for entry in entries:
        if entry["versions"] == dict(versions):
            return directory / entry["file"], ""
    shipped = "; ".join(" ".join(f"{k} {v}" for k, v in e["versions"].items()) for e in entries) or "none"
    return None, (f"no shipped XLA autotuning results for {' '.join(f'{k} {v}' for k, v in versions.items())} "
                  f"(shipped: {shipped}); the first compile autotunes every kernel")


def autotune_xla_flags(setting: str, versions: Mapping[str, str] | None = None,
                       directory: pathlib.Path = SHIPPED_AUTOTUNE_DIR) -> tuple[str, str]:
    """Returns (the XLA flag loading the autotuning results `setting` names, or ""; a note, or "").

    `setting` is `train.autotune_results`: "shipped" (the package's results for these exact
    versions, when there are any), "off" / "", or the path of a results file
    (`--xla_gpu_dump_autotune_results_to` writes one). Raises FileNotFoundError for a missing path.
    """
    if setting in ("", "off"):
        return "", ""
    if setting == "shipped":
        path, why_not = shipped_autotune_file(versions, directory)
        if path is None:
            return "", why_not
        if any(c.isspace() for c in str(path)):
            return "", (f"the shipped XLA autotuning results are not loaded: XLA_FLAGS cannot carry their path "
                        f"{str(path)!r} (it has spaces)")
    else:
        path = pathlib.Path(setting).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"train.autotune_results = {setting!r}: no such file")
    if any(c.isspace() for c in str(path)):  # XLA_FLAGS is split at white space
        raise ValueError(f"{path}: XLA cannot load autotuning results from a path with spaces (XLA_FLAGS "
                         "splits at them); set train.autotune_results to a copy elsewhere, or to 'off'")
    return f"--xla_gpu_load_autotune_results_from={path}", ""


def apply_training_xla_flags(model_configs: Iterable[Mapping[str, Any]], user_flags: str, autotune_setting: str,
                             environ: MutableMapping[str, str] = os.environ) -> str:
    """Adds the models' flags, the user's `user_flags` and the autotuning results `autotune_setting`
    names (`autotune_xla_flags`) to `environ["XLA_FLAGS"]`; returns the line to print about the
    autotuning results ("" for none). The environment's and the user's flags win over both."""
    flag, note = autotune_xla_flags(autotune_setting)
    merged = apply_model_xla_flags(model_configs, merge_xla_flags(user_flags, flag), environ)
    if flag and flag not in merged.split():
        return "note: XLA_FLAGS or train.xla_flags choose the autotuning results file"
    if flag:
        return f"XLA autotuning results: {flag.split('=', 1)[1]}"
    return f"note: {note}" if note else ""
