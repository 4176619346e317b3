"""The PyTorch <-> Flax name table and the converters built on it (numpy, no torch).

The torch twins (`livseg_jax.interop.torch_models`) give every module the name of its Flax
counterpart, so one short list of rules maps every tensor of every variant, training or deploy
form. The rules are tried in order; the first whose pattern matches the whole torch name wins:

    torch name                          flax path                     transform
    <m>.num_batches_tracked             (none)                        drop   (export writes 0)
    <m>.running_mean                    batch_stats/<m>/mean          copy
    <m>.running_var                     batch_stats/<m>/var           copy
    <m>.weight  (m ends bn|identity|normN|pre_bn) params/<m>/scale    copy   (BatchNorm / affine)
    <m>.bias    (m ends bn|identity|normN|pre_bn) params/<m>/bias     copy
    upN.weight                          params/upN/kernel             conv_transpose
    <m>.weight                          params/<m>/kernel             conv
    <m>.bias                            params/<m>/bias               copy
    <m>.layer_scaleN                    params/<m>/layer_scaleN       copy   (MSCA, shape (C,))

where <m> is the module path, "." in torch and "/" in Flax, and the module names the rules test
(bn, identity, norm1/norm2, pre_bn, upN) are those of `livseg_jax.models.names`. Kernel transforms:
    conv            torch (O, I/groups, *k) -> flax (*k, I/groups, O)   Conv3d, Conv2d, depthwise
    conv_transpose  torch (I, O, 2, 2, 2)   -> flax (2, 2, 2, I, O)     ConvTranspose3d <-> Upsample2x
`mapping_table(torch_keys)` applies the rules to a model's keys and returns the full table.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from livseg_jax.models import names

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
    """One row of the rule table: torch name regex -> flax path template ({0}, {1}: groups)."""

    torch_pattern: str
    flax_template: str | None
    transform: str


# A BatchNorm (or its deploy affine) is told from a conv by its module name (models/names.py).
_BN = rf"((?:.+\.)?(?:{'|'.join(names.NORM_MODULES)}))"
RULES: tuple[Rule, ...] = (
    Rule(r"(.+)\.num_batches_tracked", None, "drop"),
    Rule(r"(.+)\.running_mean", "batch_stats/{0}/mean", "copy"),
    Rule(r"(.+)\.running_var", "batch_stats/{0}/var", "copy"),
    Rule(_BN + r"\.weight", "params/{0}/scale", "copy"),
    Rule(_BN + r"\.bias", "params/{0}/bias", "copy"),
    Rule(rf"({names.UP}\d+)\.weight", "params/{0}/kernel", "conv_transpose"),
    Rule(r"(.+)\.weight", "params/{0}/kernel", "conv"),
    Rule(r"(.+)\.bias", "params/{0}/bias", "copy"),
    Rule(r"((?:.+\.)?layer_scale\d+)", "params/{0}", "copy"),
)


def _conv_to_flax(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (*range(2, w.ndim), 1, 0))


def _conv_to_torch(k: np.ndarray) -> np.ndarray:
    return np.transpose(k, (k.ndim - 1, k.ndim - 2, *range(k.ndim - 2)))


def _convt_to_flax(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (*range(2, w.ndim), 0, 1))


def _convt_to_torch(k: np.ndarray) -> np.ndarray:
    return np.transpose(k, (k.ndim - 2, k.ndim - 1, *range(k.ndim - 2)))


def _copy(x: np.ndarray) -> np.ndarray:
    return np.array(x, copy=True)


# transform name -> (torch -> flax, flax -> torch)
TRANSFORMS = {
    "copy": (_copy, _copy),
    "conv": (_conv_to_flax, _conv_to_torch),
    "conv_transpose": (_convt_to_flax, _convt_to_torch),
}


@dataclasses.dataclass(frozen=True)
class Row:
    """One tensor's mapping: its torch name, its flax path ("params/enc0/..."), the transform."""

    torch_name: str
    flax_path: str | None
    transform: str


class ConversionError(ValueError):
    """A state dict and a variable tree do not correspond; lists every offending key."""

    def __init__(self, direction: str, missing: Sequence[str], unexpected: Sequence[str],
                 mismatched: Sequence[str]):
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        parts = [f"{direction}: the weights do not fit the model"]
        for title, items in (("missing", missing), ("unexpected", unexpected),
                             ("shape mismatch", mismatched)):
            if items:
                parts.append(f"  {title} ({len(items)}):")
                parts.extend(f"    {item}" for item in items)
        super().__init__("\n".join(parts))


def map_name(torch_name: str) -> Row | None:
    """Returns the Row of the first rule matching `torch_name`, or None when no rule does."""
    for rule in RULES:
        m = re.fullmatch(rule.torch_pattern, torch_name)
        if m:
            path = None
            if rule.flax_template is not None:
                groups = [g.replace(".", "/") for g in m.groups()]
                path = rule.flax_template.format(*groups)
            return Row(torch_name, path, rule.transform)
    return None


def mapping_table(torch_keys: Iterable[str]) -> list[Row]:
    """Returns one Row per torch key, in the given order; raises ConversionError for unmatched keys."""
    rows, unmatched = [], []
    for key in torch_keys:
        row = map_name(key)
        if row is None:
            unmatched.append(f"{key} (no rule matches)")
        else:
            rows.append(row)
    if unmatched:
        raise ConversionError("mapping", [], unmatched, [])
    return rows


def format_table(rows: Sequence[Row]) -> str:
    """Returns the table as aligned text, one tensor per line."""
    width = max((len(r.torch_name) for r in rows), default=10)
    return "\n".join(f"{r.torch_name:<{width}}  {r.flax_path or '(dropped)':<60}  {r.transform}"
                     for r in rows)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Returns {"params/enc0/conv/kernel": leaf, ...} for a nested variable tree."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, path))
        else:
            flat[path] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Returns the nested tree of a {"a/b/c": leaf} mapping."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def torch_to_flax(state_dict: Mapping[str, np.ndarray],
                  flax_shapes: Mapping[str, Any]) -> dict[str, Any]:
    """Returns the Flax variables `{"params", ["batch_stats"]}` holding a torch state dict.

    `flax_shapes` is the target tree (arrays or ShapeDtypeStructs, e.g. from `flax_variable_shapes`).
    Every torch tensor must land on a target leaf of the same shape and every target leaf must be
    filled; otherwise ConversionError lists the missing, unexpected and mismatched keys.
    """
    target = {p: (tuple(v.shape), np.dtype(v.dtype)) for p, v in flatten(flax_shapes).items()}
    out: dict[str, np.ndarray] = {}
    seen: set[str] = set()
    unexpected, mismatched = [], []
    for row in mapping_table(state_dict):
        if row.transform == "drop":
            continue
        if row.flax_path not in target or row.flax_path in seen:
            unexpected.append(f"{row.torch_name} -> {row.flax_path}")
            continue
        seen.add(row.flax_path)
        value = TRANSFORMS[row.transform][0](np.asarray(state_dict[row.torch_name]))
        shape, dtype = target[row.flax_path]
        if value.shape != shape:
            mismatched.append(f"{row.torch_name} {tuple(state_dict[row.torch_name].shape)} -> "
                              f"{row.flax_path} {value.shape}, model expects {shape}")
            continue
        out[row.flax_path] = value.astype(dtype)
    missing = [p for p in target if p not in seen]
    if missing or unexpected or mismatched:
        raise ConversionError("torch -> flax", missing, unexpected, mismatched)
    return unflatten(out)


def flax_to_torch(variables: Mapping[str, Any],
                  torch_shapes: Mapping[str, tuple[Shape, Any]]) -> dict[str, np.ndarray]:
    """Returns a torch state dict (numpy arrays, keys in `torch_shapes` order) holding `variables`.

    `torch_shapes` maps every key of the target model's state dict to (shape, numpy dtype).
    `num_batches_tracked` has no Flax counterpart and is written as 0 (it is only read when the
    torch BatchNorm momentum is None). Unused Flax leaves, missing ones and shape mismatches raise
    ConversionError.
    """
    flat = {p: np.asarray(v) for p, v in flatten(variables).items()}
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()
    missing, mismatched = [], []
    for row in mapping_table(torch_shapes):
        shape, dtype = torch_shapes[row.torch_name]
        if row.transform == "drop":
            out[row.torch_name] = np.zeros(shape, dtype)
            continue
        if row.flax_path not in flat:
            missing.append(f"{row.flax_path} (for {row.torch_name})")
            continue
        used.add(row.flax_path)
        value = TRANSFORMS[row.transform][1](flat[row.flax_path])
        if value.shape != tuple(shape):
            mismatched.append(f"{row.flax_path} {flat[row.flax_path].shape} -> {row.torch_name} "
                              f"{value.shape}, model expects {tuple(shape)}")
            continue
        out[row.torch_name] = value.astype(dtype)
    unexpected = [p for p in flat if p not in used]
    if missing or unexpected or mismatched:
        raise ConversionError("flax -> torch", missing, unexpected, mismatched)
    return out


def flax_variable_shapes(model_config, deploy: bool | None = None, in_channels: int = 1) -> dict:
    """Returns the ShapeDtypeStruct tree of `build_model(model_config, deploy)`'s variables."""
    from livseg_jax.models import build_model, variable_shapes

    return variable_shapes(build_model(model_config, deploy=deploy), in_channels=in_channels)


def is_deploy_state_dict(keys: Iterable[str]) -> bool:
    """Returns True when a torch state dict has no BatchNorm statistics (re-parameterised form)."""
    return not any(k.endswith(".running_mean") for k in keys)


def state_dict_to_variables(state_dict: Mapping[str, np.ndarray], model_config,
                            deploy: bool | None = None) -> dict[str, Any]:
    """Returns Flax variables of `build_model(model_config, deploy)` from a torch state dict.

    `deploy=None` reads the form from the keys (no running statistics: re-parameterised).
    """
    if deploy is None:
        deploy = is_deploy_state_dict(state_dict)
    return torch_to_flax(state_dict, flax_variable_shapes(model_config, deploy))


def variables_to_state_dict(variables: Mapping[str, Any], model_config,
                            deploy: bool | None = None) -> dict[str, np.ndarray]:
    """Returns the torch twin's state dict (numpy) holding Flax `variables`; needs torch.

    `deploy=None` reads the form from the tree (no batch_stats: re-parameterised).
    """
    from livseg_jax.interop.torch_models import state_shapes, torch_model_from_config

    if deploy is None:
        deploy = "batch_stats" not in variables
    return flax_to_torch(variables, state_shapes(torch_model_from_config(model_config, deploy)))
