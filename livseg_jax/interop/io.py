"""Safe reading and atomic writing of PyTorch weights, and the portable Flax checkpoint format.

PyTorch files: `.pt` / `.pth` are read with `torch.load(..., weights_only=True)`, which refuses
pickles that would construct arbitrary objects or call code; `.safetensors` holds raw tensors only
and needs no torch. State dicts are exchanged as `{name: numpy array}`.

Portable Flax checkpoint: a folder with `variables.msgpack` (flax msgpack of
`{"params", ["batch_stats"]}`) and `config.json` (the full run config), written atomically.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from livseg_jax.interop.mapping import flatten, unflatten

TORCH_SUFFIXES = (".pt", ".pth")
SAFETENSORS_SUFFIX = ".safetensors"
VARIABLES_FILE = "variables.msgpack"
CONFIG_FILE = "config.json"
# Keys under which training scripts commonly nest the model's state dict.
NESTED_KEYS = ("state_dict", "model_state_dict", "model")


def _suffix(path: pathlib.Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX):
        raise ValueError(f"{path}: unknown weight file type {suffix!r}; expected .pt, .pth or "
                         ".safetensors")
    return suffix


def _to_numpy(path: pathlib.Path, name: str, value: Any) -> np.ndarray:
    import torch

    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
    value = value.detach().cpu()
    if value.dtype == torch.bfloat16:
        value = value.float()
    return value.numpy()


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Returns `{name: numpy array}` read safely from a .pt/.pth (weights only) or .safetensors file.

    A .pt whose top level nests the weights under "state_dict", "model_state_dict" or "model"
    is unwrapped, and a "module." prefix on every key (DataParallel) is removed.
    """
    path = pathlib.Path(path)
    suffix = _suffix(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weight file")
    if suffix == SAFETENSORS_SUFFIX:
        from safetensors.numpy import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from e

    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for refused pickles; zip / EOF errors for damaged files
        raise ValueError(f"{path}: refused or unreadable: torch.load(weights_only=True) failed "
                         f"(a pickle that carries code or custom objects is never loaded): {e}") from e
    if isinstance(obj, Mapping):
        for key in NESTED_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    out = {str(k): _to_numpy(path, str(k), v) for k, v in obj.items()}
    if all(k.startswith("module.") for k in out):
        out = {k[len("module."):]: v for k, v in out.items()}
    return out


def _atomic_file(path: pathlib.Path, write, force: bool) -> None:
    """Calls write(tmp_path) on a temporary file next to `path`, then renames it into place."""
    if path.exists() and not force:
        raise FileExistsError(f"{path}: exists; pass force=True (--force) to overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_state_dict(path: str | os.PathLike, state_dict: Mapping[str, np.ndarray],
                    force: bool = False) -> pathlib.Path:
    """Writes `state_dict` atomically as .pt/.pth (torch.save of tensors) or .safetensors; returns path."""
    path = pathlib.Path(path)
    suffix = _suffix(path)
    # np.array, not np.ascontiguousarray: the latter turns 0-d tensors (num_batches_tracked) into (1,).
    arrays = {k: np.array(v, order="C") for k, v in state_dict.items()}
    if suffix == SAFETENSORS_SUFFIX:
        from safetensors.numpy import save_file

        _atomic_file(path, lambda tmp: save_file(arrays, tmp), force)
    else:
        import torch

        tensors = {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}
        _atomic_file(path, lambda tmp: torch.save(tensors, tmp), force)
    return path


def save_variables(directory: str | os.PathLike, variables: Mapping[str, Any],
                   config: ml_collections.ConfigDict, force: bool = False) -> pathlib.Path:
    """Writes `variables.msgpack` and `config.json` into `directory` atomically; returns it.

    The files are written into a temporary sibling folder that is renamed into place, so a reader
    never sees half a checkpoint. An existing non-empty `directory` is refused unless `force`.
    """
    from flax import serialization

    directory = pathlib.Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory}: exists and is not a folder")
    if directory.is_dir() and any(directory.iterdir()) and not force:
        raise FileExistsError(f"{directory}: folder exists and is not empty; pass --force to replace")
    nested = unflatten({p: np.asarray(v) for p, v in flatten(variables).items()})
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        (tmp / VARIABLES_FILE).write_bytes(serialization.msgpack_serialize(nested))
        (tmp / CONFIG_FILE).write_text(config.to_json(indent=2) + "\n")
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_variables(directory: str | os.PathLike) -> tuple[dict[str, Any], ml_collections.ConfigDict]:
    """Returns (variables {"params", ["batch_stats"]} of numpy arrays, config) from `save_variables`."""
    from flax import serialization

    directory = pathlib.Path(directory)
    var_path, cfg_path = directory / VARIABLES_FILE, directory / CONFIG_FILE
    for p in (var_path, cfg_path):
        if not p.is_file():
            raise FileNotFoundError(f"{directory}: not a livseg_jax portable checkpoint ({p.name} "
                                    "is missing)")
    try:
        variables = serialization.msgpack_restore(var_path.read_bytes())
    except Exception as e:
        raise ValueError(f"{var_path}: unreadable msgpack ({e})") from e
    try:
        config = ml_collections.ConfigDict(json.loads(cfg_path.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: invalid JSON ({e})") from e
    if "params" not in variables:
        raise ValueError(f"{var_path}: has no 'params' collection (found {sorted(variables)})")
    return dict(variables), config

