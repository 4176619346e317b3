"""Prediction backends: the network of a sliding window run by JAX (default) or by ONNX Runtime.

The sliding window (`inference.sliding_window`) calls one "forward function"
`window_fn(variables, windows (N, D, H, W, 1)) -> probabilities (N, D, H, W, K)` and blends what it
returns; only that function differs between backends:

- "jax": the jitted deploy network of a run directory (`two_stage.load_stage_model`); the windows
  are cut and blended on the device.
- "onnxruntime": an `onnxruntime.InferenceSession` of a model written by
  `python -m livseg_jax.convert --to-onnx` (`variables` is the session; softmax and mirror TTA in
  NumPy). It is a `sliding_window.HostWindowFn`: the windows are cut and blended in NumPy on the
  host, so no window batch goes to a JAX device and back. The `.onnx` file is self-contained: the
  run's config (preprocessing, classes, stage, sliding-window settings), the window it was exported
  for and the tumour post-processing are in its `metadata_props` (`export_metadata`), so no run
  directory, Flax model or checkpoint is read.

Exports are always of the deploy form: `deploy_variables` re-parameterises a training-form run.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from livseg_jax.data.preprocess import PreprocessSettings
from livseg_jax.inference import postprocess as pp
from livseg_jax.inference.sliding_window import HostWindowFn, mirror_averaged
from livseg_jax.inference.two_stage import (
    Predictor,
    StageModel,
    check_variables_fit,
    checked_batch_size,
    checked_stage,
    stage_window,
)
from livseg_jax.models import reparameterize
from livseg_jax.run_dir import load_variables

BACKENDS = ("jax", "onnxruntime")
# metadata_props keys of an exported model (and of the JSON beside a StableHLO artefact).
FORMAT_KEY, CONFIG_KEY, WINDOW_KEY, POSTPROCESS_KEY, SOURCE_KEY = (
    "livseg_jax.format", "livseg_jax.config", "livseg_jax.window", "livseg_jax.postprocess", "livseg_jax.source")
FORMAT = "deploy-logits-ndhwc/1"  # image (batch, D, H, W, 1) float32 -> logits (batch, D, H, W, K) float32
PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


def deploy_variables(path: str | os.PathLike, which: str = "best") -> tuple[dict, ml_collections.ConfigDict]:
    """Returns (deploy-form variables, config) of a run directory: a training-form run is re-parameterised."""
    variables, config = load_variables(path, which)
    stored_deploy = bool(config.model.get("deploy", False)) or not variables.get("batch_stats")
    check_variables_fit(variables, config.model, stored_deploy, f"{path} ({which} checkpoint)")
    if not stored_deploy:
        variables = reparameterize(variables)
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.deploy = True
    return variables, config


def export_metadata(path: str | os.PathLike, config: ml_collections.ConfigDict, window: Sequence[int],
                    which: str = "best") -> dict[str, str]:
    """Returns the str -> str metadata an exported model carries: config, window, post-processing, source."""
    stage = str(config.get("stage", ""))
    settings = pp.read_settings(path) if stage in ("tumor", "joint") else None
    return {FORMAT_KEY: FORMAT, CONFIG_KEY: config.to_json_best_effort(),
            WINDOW_KEY: json.dumps([int(w) for w in window]),
            POSTPROCESS_KEY: json.dumps(None if settings is None else settings.to_dict()),
            SOURCE_KEY: json.dumps({"run": str(path), "which": which})}


def softmax(logits: np.ndarray) -> np.ndarray:
    """Returns the float32 softmax over the last axis of `logits`."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (shifted / shifted.sum(axis=-1, keepdims=True)).astype(np.float32)


def contiguous_flip(x: np.ndarray, axes) -> np.ndarray:
    """Returns `np.flip(x, axes)` as a C-contiguous copy (ONNX Runtime takes contiguous inputs)."""
    return np.ascontiguousarray(np.flip(x, axes))


def onnx_window_fn(mirror: bool = False) -> HostWindowFn:
    """Returns `(session, windows (N, D, H, W, 1)) -> softmax probabilities (N, D, H, W, K)` as NumPy.

    With `mirror`, probabilities are averaged over the 8 flips of the spatial axes, as
    `sliding_window.window_predict_fn` does on the device. It is a `HostWindowFn`: the sliding
    window cuts and blends its windows on the host, so ONNX Runtime's inputs and outputs never
    make a round trip through a JAX device.
    """

    def probabilities(session, windows) -> np.ndarray:
        x = np.asarray(windows, np.float32)
        name = session.get_inputs()[0].name
        def window_probabilities(xf):
            return softmax(session.run(None, {name: xf})[0])

        if not mirror:
            return window_probabilities(x)
        return mirror_averaged(window_probabilities, x, contiguous_flip).astype(np.float32)

    return HostWindowFn(probabilities)


def onnx_session(path: str | os.PathLike, providers: Sequence[str] | None = None):
    """Returns an ONNX Runtime session of `path` on `providers` (default: CUDA where available, then CPU)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ValueError(f"{path}: running an ONNX model needs onnxruntime (pip install -e \".[onnx]\")") from e
    available = ort.get_available_providers()
    if providers is None:
        providers = [p for p in PREFERRED_PROVIDERS if p in available]
    missing = [p for p in providers if p not in available]
    if missing:
        raise ValueError(f"ONNX Runtime provider(s) {missing} not available here; available: {available}")
    options = ort.SessionOptions()
    # Without its CPU arena, ONNX Runtime frees activations between runs instead of keeping each
    # session's peak reserved: the liver and tumour sessions then stop holding two peaks at once.
    # 3D-IRCADb 1.17, :paper networks, 2 cores: peak RSS 14.3 -> 6.1 GiB, same labels, no slower; a
    # 512x512x1000 CT: 15.7 -> 7.5 GiB but 29% slower (experiments/bench_ort_arena.py, docs/benchmarks.md).
    options.enable_cpu_mem_arena = False
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
    except Exception as e:  # onnxruntime's own error types (InvalidProtobuf, Fail, ...)
        raise ValueError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from e


def _metadata_config(path: pathlib.Path, metadata: dict[str, str]) -> tuple[ml_collections.ConfigDict, tuple, Any]:
    """Returns (config, window, post-processing dict or None) read from an export's metadata."""
    if metadata.get(FORMAT_KEY) != FORMAT:
        raise ValueError(f"{path}: not a livseg_jax export (metadata {FORMAT_KEY!r} is "
                         f"{metadata.get(FORMAT_KEY)!r}, expected {FORMAT!r}); export a run directory with "
                         "python -m livseg_jax.convert --to-onnx")
    try:
        config = ml_collections.ConfigDict(json.loads(metadata[CONFIG_KEY]))
        window = tuple(int(w) for w in json.loads(metadata[WINDOW_KEY]))
        post = json.loads(metadata.get(POSTPROCESS_KEY, "null"))
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: damaged livseg_jax metadata ({type(e).__name__}: {e})") from e
    return config, window, post


def load_onnx_stage_model(
    path: str | os.PathLike,
    expected_stage: str | None = None,
    mirror: bool | None = None,
    overlap: float | None = None,
    batch_size: int | None = None,
    postprocess: bool = True,
    providers: Sequence[str] | None = None,
) -> StageModel:
    """Returns a `StageModel` running an exported `.onnx` file in ONNX Runtime; None options use its config."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file")
    session = onnx_session(path, providers)
    config, window, post = _metadata_config(path, dict(session.get_modelmeta().custom_metadata_map))
    stage = checked_stage(path, config, expected_stage, "metadata config")
    inf = config.inference
    mirror = bool(inf.mirror_tta) if mirror is None else bool(mirror)
    batch_size = checked_batch_size(inf, batch_size)
    description = {"source": str(path), "backend": "onnxruntime", "providers": session.get_providers(),
                   "stage": stage, "model": str(config.model.name),
                   "features": [int(f) for f in config.model.features], "deploy": True, "mirror_tta": mirror}
    return StageModel(
        stage=stage or (expected_stage or "liver"),
        window_fn=onnx_window_fn(mirror),
        variables=session,
        num_classes=int(config.model.num_classes),
        window=stage_window(path, config, window),
        preprocessing=PreprocessSettings.from_config(config.preprocess),
        overlap=float(inf.overlap) if overlap is None else float(overlap),
        batch_size=batch_size,
        sigma_scale=float(inf.gaussian_sigma_scale),
        liver_margin_mm=float(config.data.liver_margin_mm),
        description=description,
        postprocess=pp.PostprocessSettings.from_dict(post, f"{path} metadata") if postprocess and post else None,
    )


def onnx_predictor(liver: str | os.PathLike | None = None, tumor: str | os.PathLike | None = None,
                   connectivity: int = 1, joint: str | os.PathLike | None = None, **options: Any):
    """Returns a `two_stage.Predictor` of exported `.onnx` stages (`options` as for `load_onnx_stage_model`)."""
    if joint is not None:
        if liver is not None or tumor is not None:
            raise ValueError("give a liver model (two-stage) or a joint model (one-stage), exactly one of them")
        return Predictor(connectivity=connectivity, joint=load_onnx_stage_model(joint, "joint", **options))
    if liver is None:
        raise ValueError("give a liver model (two-stage) or a joint model (one-stage), exactly one of them")
    return Predictor(load_onnx_stage_model(liver, "liver", **options),
                     load_onnx_stage_model(tumor, "tumor", **options) if tumor is not None else None, connectivity)
