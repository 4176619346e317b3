"""Safe reading and atomic writing of PyTorch weight files.

PyTorch files: `.pt` / `.pth` are read with `torch.load(..., weights_only=True)`, which refuses
pickles that would construct arbitrary objects or call code; `.safetensors` holds raw tensors only
and needs no torch. State dicts are exchanged as `{name: numpy array}`.

Flax weights live in run directories (`livseg_jax.run_dir`), whatever wrote them.
"""

from __future__ import annotations

import os
import pathlib
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from livseg_jax.atomic_write import atomic_path

TORCH_SUFFIXES = (".pt", ".pth")
SAFETENSORS_SUFFIX = ".safetensors"
# Integer tensors the model never reads (BatchNorm's step counter); every other tensor must be float.
INTEGER_KEYS = ("num_batches_tracked",)
# Keys under which training scripts commonly nest the model's state dict.
NESTED_KEYS = ("state_dict", "model_state_dict", "model")


def _suffix(path: pathlib.Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX):
        raise ValueError(f"{path}: unknown weight file type {suffix!r}; expected .pt, .pth or "
                         ".safetensors")
    return suffix


def _to_numpy(path: pathlib.Path, name: str, value: Any) -> np.ndarray:
    """Returns a torch tensor as numpy; bfloat16 (which numpy lacks) as ml_dtypes.bfloat16."""
    import torch

    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
    value = value.detach().cpu()
    if value.dtype == torch.bfloat16:
        import ml_dtypes

        return value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return value.numpy()


def _is_counter(name: str) -> bool:
    """Returns whether a tensor is BatchNorm's step counter, an integer the model never reads."""
    return name.endswith(INTEGER_KEYS)


def check_dtypes(path: str | os.PathLike, state_dict: dict[str, np.ndarray],
                 log=print) -> dict[str, np.ndarray]:
    """Returns `state_dict` with float16 / bfloat16 tensors cast to float32 (noted through `log`).

    The model's weights are floating point: an integer, boolean or complex tensor (other than
    BatchNorm's `num_batches_tracked` counter) raises ValueError naming the file and the tensor,
    instead of being cast into a model that then predicts nothing."""
    halves = []
    out = {}
    for name, value in state_dict.items():
        kind = np.dtype(value.dtype)
        if _is_counter(name):
            out[name] = value
            continue
        if kind.name == "bfloat16" or kind == np.float16:
            halves.append(name)
            out[name] = np.asarray(value, dtype=np.float32)
        elif kind.kind == "f":
            out[name] = value
        else:
            raise ValueError(f"{path}: tensor {name!r} has dtype {kind.name}; the model's weights are "
                             "floating point (is this the right file?)")
    if halves:
        log(f"note: {path}: {len(halves)} half-precision tensor(s) (e.g. {halves[0]!r}) cast to float32",
            file=sys.stderr)
    return out


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
        return check_dtypes(path, _load_safetensors(path))

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
    return check_dtypes(path, out)


def _load_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Returns the tensors of a .safetensors file; bfloat16 ones (numpy has none) through torch."""
    from safetensors.numpy import load_file

    try:
        return dict(load_file(str(path)))
    except TypeError as e:  # "data type 'bfloat16' not understood"
        if "bfloat16" not in str(e):
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
        try:
            from safetensors.torch import load_file as load_torch
        except ImportError:
            raise ValueError(f"{path}: holds bfloat16 tensors, which need torch to read "
                             "(pip install torch)") from e
        return {k: _to_numpy(path, k, v) for k, v in load_torch(str(path)).items()}
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e


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
