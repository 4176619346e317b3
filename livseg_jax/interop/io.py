"""Safe reading and atomic writing of PyTorch weight files.

PyTorch files: `.pt` / `.pth` are read with `torch.load(..., weights_only=True)`, which refuses
pickles that would construct arbitrary objects or call code; `.safetensors` holds raw tensors only
and needs no torch. State dicts are exchanged as `{name: numpy array}`.

Flax weights live in run directories (`livseg_jax.run_dir`), whatever wrote them.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from livseg_jax.atomic_write import atomic_path

TORCH_SUFFIXES = (".pt", ".pth")
SAFETENSORS_SUFFIX = ".safetensors"
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


def save_state_dict(path: str | os.PathLike, state_dict: Mapping[str, np.ndarray],
                    force: bool = False) -> pathlib.Path:
    """Writes `state_dict` atomically as .pt/.pth (torch.save of tensors) or .safetensors; returns path."""
    path = pathlib.Path(path)
    suffix = _suffix(path)
    # np.array, not np.ascontiguousarray: the latter turns 0-d tensors (num_batches_tracked) into (1,).
    arrays = {k: np.array(v, order="C") for k, v in state_dict.items()}
    if suffix == SAFETENSORS_SUFFIX:
        from safetensors.numpy import save_file

        with atomic_path(path, force=force) as tmp:
            save_file(arrays, str(tmp))
    else:
        import torch

        tensors = {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}
        with atomic_path(path, force=force) as tmp:
            torch.save(tensors, tmp)
    return path
