"""StableHLO export of the jitted deploy forward with `jax.export`, batch axis symbolic.

`model.stablehlo` holds `jax.export.Exported.serialize()`: the StableHLO module of
`x (b, D, H, W, C) float32 -> logits (b, D, H, W, K) float32` with the weights inside it as
constants, lowered for the platforms asked for (default cpu and cuda; `Exported.call` picks the
one it runs on). Beside it: `model.stablehlo.json`, the same key/value metadata as an exported
ONNX model (`inference.backends`) plus the signature, and `model.stablehlo.mlirbc`, the bare
StableHLO module (portable-artifact bytecode, `Exported.mlir_module_serialized`) for servers
without JAX (PJRT from C++: docs/interop.md, Export). With `batch` given the batch is static
instead of the symbol `b`. Reloading needs only JAX:

    exported = jax.export.deserialize(path.read_bytes())
    logits = exported.call(windows)          # any batch size b >= 1

No `livseg_jax` code runs at reload (tests/test_export_stablehlo.py checks this in a fresh process).
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from livseg_jax.atomic_write import atomic_paths, refuse_overwrite
from livseg_jax.models import build_model

DEFAULT_PLATFORMS = ("cpu", "cuda")
METADATA_SUFFIX = ".json"
MODULE_SUFFIX = ".mlirbc"


def metadata_path(path: str | os.PathLike) -> pathlib.Path:
    """Returns where the metadata of a StableHLO artefact lies: `<path>.json`."""
    path = pathlib.Path(path)
    return path.with_name(path.name + METADATA_SUFFIX)


def module_path(path: str | os.PathLike) -> pathlib.Path:
    """Returns where the bare StableHLO module of an artefact lies: `<path>.mlirbc`."""
    path = pathlib.Path(path)
    return path.with_name(path.name + MODULE_SUFFIX)


def output_paths(path: str | os.PathLike) -> list[pathlib.Path]:
    """Returns the files `export_stablehlo` writes for `path`, the harmless-alone ones first."""
    return [metadata_path(path), module_path(path), pathlib.Path(path)]


def export_deploy_forward(variables: Mapping[str, Any], model_config: Any, window: Sequence[int],
                          platforms: Sequence[str] = DEFAULT_PLATFORMS, in_channels: int = 1,
                          batch: int | None = None) -> jax.export.Exported:
    """Returns the `Exported` deploy forward `(b, *window, C) -> float32 logits (b, *window, K)`, b symbolic
    unless `batch` is given."""
    if "batch_stats" in variables:
        raise ValueError("export_deploy_forward needs re-parameterised variables (livseg_jax.models.reparameterize)")
    model = build_model(model_config, deploy=True)
    weights = jax.tree_util.tree_map(jnp.asarray, dict(variables))

    def forward(x):
        return model.apply(weights, x, train=False).astype(jnp.float32)

    if batch is None:
        (batch,) = jax.export.symbolic_shape("b")
    elif int(batch) < 1:
        raise ValueError(f"batch must be >= 1 (or None: symbolic), got {batch}")
    spec = jax.ShapeDtypeStruct((batch, *(int(w) for w in window), in_channels), jnp.float32)
    return jax.export.export(jax.jit(forward), platforms=tuple(platforms))(spec)


def export_stablehlo(variables: Mapping[str, Any], model_config: Any, window: Sequence[int],
                     out_path: str | os.PathLike, metadata: Mapping[str, str] | None = None,
                     platforms: Sequence[str] = DEFAULT_PLATFORMS, force: bool = False,
                     batch: int | None = None) -> pathlib.Path:
    """Returns `out_path` after writing the serialised deploy forward, its metadata `<out_path>.json` and
    its bare module `<out_path>.mlirbc` atomically."""
    out_path = pathlib.Path(out_path)
    paths = output_paths(out_path)
    refuse_overwrite(paths, force)
    exported = export_deploy_forward(variables, model_config, window, platforms, batch=batch)
    record = {"platforms": list(exported.platforms), "input": str(exported.in_avals[0]),
              "platform_index_argument": len(exported.platforms) > 1,
              "output": str(exported.out_avals[0]),
              "calling_convention_version": exported.calling_convention_version, **dict(metadata or {})}
    with atomic_paths(paths) as (tmp_side, tmp_module, tmp):
        tmp_side.write_text(json.dumps(record, indent=1) + "\n")
        tmp_module.write_bytes(bytes(exported.mlir_module_serialized))
        tmp.write_bytes(bytes(exported.serialize()))
    return out_path
