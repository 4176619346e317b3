"""ONNX export of a deploy-form network through its PyTorch twin (`torch_models`), batch axis dynamic.

The graph takes the JAX layout, `image` (batch, D, H, W, C) float32, and returns `logits`
(batch, D, H, W, K) float32 (no softmax): the twin's NCDHW layout is transposed inside the graph, so
the ONNX model and `model.apply(variables, x, train=False)` of the deploy network have the same
signature. The spatial shape is fixed at export (one sliding-window size); the batch is a symbolic
dimension. Key/value strings (the run's config, the window, post-processing; `inference.backends`)
go into the model's `metadata_props`, so one `.onnx` file carries all that prediction needs.

Exported with `torch.onnx.export(..., dynamo=True)` (torch.export, then onnxscript): the
TorchScript exporter (`dynamo=False`) is deprecated since torch 2.9. Needs the `onnx` extra.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from livseg_jax.atomic_write import atomic_path
from livseg_jax.interop import mapping

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
# The opset torch 2.13's op library (torchlib) is written in; the exporter's default (20) only converts
# it up, and 18 loads in older runtimes too (onnxruntime >= 1.14).
OPSET = 18


def check_exportable(model_config: Any) -> None:
    """Raises ValueError when the PyTorch twin cannot stand for the network (only the 3D forms have twins)."""
    dims = int(model_config.get("spatial_dims", 3))
    if dims != 3:
        raise ValueError(f"model.spatial_dims = {dims}: the axial (2D) form has no PyTorch twin, so it cannot "
                         "be exported to ONNX; export it with --to-stablehlo instead")


def deploy_twin(variables: Mapping[str, Any], model_config: Any):
    """Returns the float32 deploy-form PyTorch twin (evaluation mode) holding deploy-form Flax `variables`."""
    import torch

    from livseg_jax.interop.torch_models import torch_model_from_config

    if "batch_stats" in variables:
        raise ValueError("deploy_twin needs re-parameterised variables (livseg_jax.models.reparameterize)")
    check_exportable(model_config)
    state_dict = mapping.variables_to_state_dict(variables, model_config, deploy=True)
    twin = torch_model_from_config(model_config, deploy=True)
    twin.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in state_dict.items()}, strict=True)
    return twin.eval()


def channels_last(twin):
    """Returns a module running `twin` (NCDHW) on (batch, D, H, W, C) input and giving (batch, D, H, W, K)."""
    from torch import nn

    class ChannelsLast(nn.Module):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)

    return ChannelsLast(twin).eval()


@contextlib.contextmanager
def quiet_exporter():
    """Silences what torch's ONNX exporter prints that a user cannot act on: one warning per torchvision
    operator it skips when torchvision is absent (we export no such operator), and a FutureWarning
    from torch's own pytree code."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec.*")
            yield
    finally:
        registration.setLevel(level)


def export_onnx(variables: Mapping[str, Any], model_config: Any, window: Sequence[int],
                out_path: str | os.PathLike, metadata: Mapping[str, str] | None = None,
                in_channels: int = 1, force: bool = False) -> pathlib.Path:
    """Returns `out_path` after writing the ONNX model of deploy-form `variables` for one window, atomically.

    `metadata` (str -> str) is stored in the model's `metadata_props`.
    """
    import torch

    window = tuple(int(w) for w in window)
    module = channels_last(deploy_twin(variables, model_config))
    example = torch.zeros((2, *window, in_channels), dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad(), quiet_exporter():
        program = torch.onnx.export(module, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes={"x": {0: batch}}, dynamo=True, opset_version=OPSET,
                                    verbose=False)
    proto = program.model_proto
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), str(value)
    out_path = pathlib.Path(out_path)
    with atomic_path(out_path, force=force) as tmp:
        tmp.write_bytes(proto.SerializeToString())
    return out_path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Returns the `metadata_props` of an ONNX file as a dict (the weights are not read into memory twice)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}
