"""Two-stage prediction (SPEC §4): liver on the whole volume, then tumour inside the liver's box.

For one CT volume in internal (D, H, W) order and HU:
1. `preprocess` with the liver model's settings (body crop, in-plane down-sampling, window).
2. Stage 1: sliding-window liver probabilities, argmax, keep the largest connected component.
   No liver: the case's label map is all background and a warning says so.
3. Stage 2: the preprocessed volume cropped to the liver's bounding box grown by the tumour
   model's `data.liver_margin_mm` (`stages.liver_crop_box`, exactly as the training crops were
   made); tumour voxels outside the stage-1 liver are removed. With the tumour run's stored
   post-processing (`postprocess.json`, `inference/postprocess.py`), the tumour is p(tumour) > its
   threshold (from the same sliding window's probabilities) and components below its minimum
   volume are removed, on the tumour model's grid.
   When the tumour model was trained with other preprocessing settings, the volume is preprocessed
   again with them and the liver mask is carried over through the original grid.
4. `restore` maps the 0/1/2 map back onto the original grid (shape, and with the input's geometry
   when written by `Predictor.predict_file`).

One-stage (`stage = "joint"`, `predict_joint_case`): steps 1 and 4 as above; in between one 3-class
sliding window over the whole preprocessed volume, argmax, and the same liver rule as stage 1:
only the largest connected component of label >= 1 is kept, with its 1/2 labels as predicted.

`StageModel` bundles one stage's compiled window predictor with its sliding-window settings;
`load_stage_model` builds it from a run directory (trained: best or latest checkpoint; or written
by `convert --from-torch`), re-parameterised (deploy form) by default. `load_ensemble` makes one
StageModel of several run directories (folds, or different networks) that averages their softmax
inside each window, in one jitted call on the device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from livseg_jax.data import nifti
from livseg_jax.data.preprocess import PreprocessSettings, preprocess, restore
from livseg_jax.data.regions import paste_into
from livseg_jax.data.stages import check_stage, liver_crop_box
from livseg_jax.inference import postprocess as pp
from livseg_jax.inference.components import largest_component  # on the accelerator when there is one
from livseg_jax.inference.memory import memory_record, reset_host_peak
from livseg_jax.inference.sliding_window import ensemble_window_fn, num_windows, sliding_window, window_predict_fn
from livseg_jax.models import build_model, check_patch_shape, reparameterize, variable_shapes
from livseg_jax.models.forms import CONV_FORM_KEYS, is_auto, resolve_forms
from livseg_jax.run_dir import load_variables

# progress(phase, number of windows) -> callback(windows done); phase is "liver", "tumor" or "joint".
ProgressFn = Callable[[str, int], Callable[[int], None]]
# One run directory, or several whose softmax is averaged (an ensemble).
RunPaths = str | os.PathLike | Sequence[str | os.PathLike]
# png_writer(path, image (D, H, W) HU, spacing, labels (D, H, W), title): renders an overlay.
PngWriter = Callable[[pathlib.Path, np.ndarray, Any, np.ndarray, str], Any]
ImageReader = Callable[[Any], tuple[np.ndarray, nifti.Geometry]]  # path -> ((D, H, W) HU, geometry)


@dataclasses.dataclass(frozen=True)
class StageModel:
    """One stage's network, its variables on the device, and its sliding-window and preprocessing settings."""

    stage: str  # "liver", "tumor" or "joint"
    # (variables, windows (N, D, H, W, 1)) -> probabilities (N, D, H, W, K), and its variables: the
    # jitted network and its weights, or an ONNX Runtime forward and its session (`inference.backends`).
    window_fn: Callable
    variables: Any
    num_classes: int
    window: tuple[int, int, int]
    preprocessing: PreprocessSettings
    overlap: float = 0.5
    batch_size: int = 2
    sigma_scale: float = 0.125
    liver_margin_mm: float = 10.0  # stage-2 crop margin (used from the tumour model)
    description: dict[str, Any] = dataclasses.field(default_factory=dict)  # provenance, for the JSON
    postprocess: pp.PostprocessSettings | None = None  # tumour / joint runs: their postprocess.json

    def settings(self) -> dict[str, Any]:
        """Returns the JSON-serialisable settings of this stage (window, overlap, source, post-processing ...)."""
        return {"window": list(self.window), "overlap": self.overlap, "batch_size": self.batch_size,
                "sigma_scale": self.sigma_scale, **self.description,
                "postprocess": None if self.postprocess is None else self.postprocess.to_dict()}


@dataclasses.dataclass
class CaseResult:
    """The prediction of one case: labels (D, H, W) uint8 0/1/2 on the original grid, and a record."""

    labels: np.ndarray
    liver_found: bool
    timings: dict[str, float]  # seconds per phase
    info: dict[str, Any]  # shapes, window counts, crop box, voxel counts
    warnings: list[str]


# ------------------------------------------------------------------------------ pure pipeline


class PhaseTimer:
    """Accumulates wall-clock seconds per named phase (`with timer("phase"): ...`)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def stage_labels(model: StageModel, image: np.ndarray, progress: ProgressFn | None = None) -> np.ndarray:
    """Returns the stage's labels (D, H, W) uint8: argmax of blended window probabilities."""
    callback = None
    if progress is not None:
        callback = progress(model.stage, num_windows(image.shape, model.window, model.overlap))
    return sliding_window(image, model.window_fn, model.variables, model.window, model.overlap,
                          model.batch_size, model.sigma_scale, model.preprocessing.air_value, callback,
                          output="labels", num_classes=model.num_classes)


def stage_mask(model: StageModel, image: np.ndarray, progress: ProgressFn | None = None) -> np.ndarray:
    """Returns the stage's foreground mask (D, H, W) bool: argmax of blended window probabilities > 0."""
    return stage_labels(model, image, progress) > 0


def stage_probabilities(model: StageModel, image: np.ndarray, progress: ProgressFn | None = None) -> np.ndarray:
    """Returns the stage's blended window probabilities (D, H, W, K) float32."""
    callback = None
    if progress is not None:
        callback = progress(model.stage, num_windows(image.shape, model.window, model.overlap))
    return sliding_window(image, model.window_fn, model.variables, model.window, model.overlap,
                          model.batch_size, model.sigma_scale, model.preprocessing.air_value, callback,
                          output="probs", num_classes=model.num_classes)


def _threshold(model: StageModel) -> float | None:
    return None if model.postprocess is None else model.postprocess.tumor_threshold


def tumor_stage_mask(model: StageModel, image: np.ndarray, progress: ProgressFn | None = None) -> np.ndarray:
    """Returns the tumour stage's mask (D, H, W) bool: p(tumour) > the stored threshold, else the argmax."""
    threshold = _threshold(model)
    if threshold is None:  # only the argmax leaves the device
        return stage_mask(model, image, progress)
    return pp.threshold_tumor(stage_probabilities(model, image, progress), threshold)


def _postprocess_tumor(tumour: np.ndarray, spacing, model: StageModel, info: dict[str, Any]) -> np.ndarray:
    """Returns the tumour mask after the model's minimum lesion volume; records what it did in `info`."""
    if model.postprocess is None:
        return tumour
    kept = pp.postprocess_tumor(tumour, spacing, model.postprocess)
    info["postprocess"] = {**model.postprocess.to_dict(), "tumor_voxels_before": int(np.count_nonzero(tumour)),
                           "tumor_voxels_removed": int(np.count_nonzero(tumour & ~kept))}
    return kept


def _box_list(box) -> list[list[int]]:
    return [[int(s.start), int(s.stop)] for s in box]


def _preprocessed(image_dhw: np.ndarray, spacing: Sequence[float], first: StageModel, role: str,
                  timer: PhaseTimer) -> tuple[np.ndarray, np.ndarray, Any, dict[str, Any]]:
    """Returns (input as an array, the first stage's preprocessed image, its record, the case's
    info so far) with the preprocessing timed: what every prediction starts with."""
    image_dhw = np.asarray(image_dhw)
    info: dict[str, Any] = {"input_shape": list(image_dhw.shape), "input_spacing": [float(s) for s in spacing]}
    with timer("preprocess"):
        image, _, record = preprocess(image_dhw, spacing, first.preprocessing)
    info.update(preprocessed_shape=list(record.shape), preprocessed_spacing=list(record.spacing),
                body_found=record.body_found)
    info[f"{role}_windows"] = num_windows(image.shape, first.window, first.overlap)
    return image_dhw, image, record, info


def predict_case(
    image_dhw: np.ndarray,
    spacing,
    liver: StageModel,
    tumor: StageModel | None = None,
    progress: ProgressFn | None = None,
    connectivity: int = 1,
) -> CaseResult:
    """Returns the two-stage `CaseResult` for a (D, H, W) HU volume with spacing (sz, sy, sx) mm.

    `tumor=None` predicts the liver only (labels 0/1). `connectivity` (1, 2 or 3, as in
    `scipy.ndimage.generate_binary_structure`) defines the liver's largest connected component.
    A one-stage ("joint") model is refused: `predict_joint_case` predicts with it.
    """
    for model, role in ((liver, "liver"), (tumor, "tumor")):
        if model is not None and model.stage == "joint":
            raise ValueError(f"a one-stage 'joint' model was given as the {role} model; "
                             "predict with it alone (predict_joint_case, or predict --joint)")
    timer, notes = PhaseTimer(), []
    image_dhw, image, record, info = _preprocessed(image_dhw, spacing, liver, "liver", timer)
    with timer("liver_inference"):
        raw = stage_mask(liver, image, progress)
    with timer("liver_postprocess"):
        liver_mask = largest_component(raw, connectivity)
    info.update(liver_voxels_raw=int(np.count_nonzero(raw)), liver_voxels=int(np.count_nonzero(liver_mask)))
    del raw

    if not liver_mask.any():
        notes.append("stage 1 found no liver: the label map is all background")
        info.update(tumor_windows=0, tumor_voxels=0)
        return CaseResult(np.zeros(image_dhw.shape, np.uint8), False, timer.seconds, info, notes)

    if tumor is None:
        with timer("restore"):
            labels = restore(liver_mask.astype(np.uint8), record)
        return CaseResult(labels, True, timer.seconds, info, notes)

    same = liver.preprocessing == tumor.preprocessing
    liver_orig = None
    if same:
        t_image, t_liver, t_record = image, liver_mask, record
    else:
        with timer("tumor_preprocess"):
            liver_orig = restore(liver_mask.astype(np.uint8), record)
            t_image, t_label, t_record = preprocess(image_dhw, spacing, tumor.preprocessing, liver_orig)
            t_liver = t_label >= 1
    box = liver_crop_box(t_liver, t_record.spacing, tumor.liver_margin_mm)
    if box is None:  # the liver vanished when moved to the tumour model's coarser grid
        notes.append("the liver is empty on the tumour model's grid: no tumour predicted")
        with timer("restore"):
            labels = liver_orig if liver_orig is not None else restore(liver_mask.astype(np.uint8), record)
        info.update(tumor_windows=0, tumor_voxels=0)
        return CaseResult(labels, True, timer.seconds, info, notes)
    crop = np.ascontiguousarray(t_image[box])
    info.update(tumor_crop=_box_list(box), tumor_crop_shape=list(crop.shape),
                tumor_windows=num_windows(crop.shape, tumor.window, tumor.overlap))
    with timer("tumor_inference"):
        tumour = tumor_stage_mask(tumor, crop, progress)
    with timer("tumor_postprocess"):
        tumour &= t_liver[box]
        tumour = _postprocess_tumor(tumour, t_record.spacing, tumor, info)
        tumour_full = paste_into(tumour, box, t_record.shape, False)
    info["tumor_voxels"] = int(np.count_nonzero(tumour))

    with timer("restore"):
        if same:
            labels = restore(liver_mask.astype(np.uint8) + tumour_full.astype(np.uint8), record)
        else:
            labels = liver_orig
            labels[(restore(2 * tumour_full.astype(np.uint8), t_record) == 2) & (labels >= 1)] = 2
    return CaseResult(labels, True, timer.seconds, info, notes)


def predict_joint_case(
    image_dhw: np.ndarray,
    spacing,
    joint: StageModel,
    progress: ProgressFn | None = None,
    connectivity: int = 1,
) -> CaseResult:
    """Returns the one-stage `CaseResult` of a (D, H, W) HU volume: the 3-class argmax of `joint`.

    Only the largest connected component of liver (label >= 1, `connectivity` as in `predict_case`)
    is kept, with the 1/2 labels predicted inside it: the rule stage 1 applies to the liver and
    stage 2 to the tumour (kept inside the liver), so one- and two-stage predictions differ by their
    networks, not their post-processing.
    """
    if joint.stage != "joint" or joint.num_classes != 3:
        raise ValueError(f"predict_joint_case needs a 3-class 'joint' model, got stage {joint.stage!r} "
                         f"with {joint.num_classes} classes")
    timer, notes = PhaseTimer(), []
    image_dhw, image, record, info = _preprocessed(image_dhw, spacing, joint, "joint", timer)
    with timer("joint_inference"):
        if _threshold(joint) is None:
            raw = stage_labels(joint, image, progress)
        else:  # liver where the argmax is liver or tumour; tumour inside it where p(tumour) > threshold
            probs = stage_probabilities(joint, image, progress)
            raw = (np.argmax(probs, axis=-1) >= 1).astype(np.uint8)
            raw[(raw == 1) & pp.threshold_tumor(probs, _threshold(joint))] = 2
            del probs
    with timer("joint_postprocess"):
        liver = largest_component(raw >= 1, connectivity)
        labels = np.where(liver, raw, 0).astype(np.uint8)
        if joint.postprocess is not None:  # removed tumour components become liver again
            tumour = labels == 2
            labels[tumour & ~_postprocess_tumor(tumour, record.spacing, joint, info)] = 1
    info.update(liver_voxels_raw=int(np.count_nonzero(raw >= 1)), liver_voxels=int(np.count_nonzero(liver)),
                tumor_voxels_raw=int(np.count_nonzero(raw == 2)), tumor_voxels=int(np.count_nonzero(labels == 2)))
    del raw
    if not liver.any():
        notes.append("the joint model found no liver: the label map is all background")
        return CaseResult(np.zeros(image_dhw.shape, np.uint8), False, timer.seconds, info, notes)
    with timer("restore"):
        labels = restore(labels, record)
    return CaseResult(labels, True, timer.seconds, info, notes)


# ------------------------------------------------------------------------------- checkpoints


def check_variables_fit(variables: dict, model_config: Any, deploy: bool, where: str) -> None:
    """Raises ValueError naming `where` and the parameters whose shapes do not fit the model."""
    from flax.traverse_util import flatten_dict

    want = {"/".join(k): tuple(v.shape) for k, v in
            flatten_dict(variable_shapes(build_model(model_config, deploy=deploy))).items()}
    have = {"/".join(k): tuple(np.shape(v)) for k, v in flatten_dict(variables).items()}
    problems = [f"{k}: missing" for k in want if k not in have]
    problems += [f"{k}: not in the model" for k in have if k not in want]
    problems += [f"{k}: shape {have[k]}, the model expects {want[k]}" for k in want
                 if k in have and have[k] != want[k]]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(f"{where}: the checkpoint does not fit the model of config.json: "
                         f"{'; '.join(problems[:3])}{more}")


# Prediction on a CPU computes the depthwise convolutions as fused shifted sums: 27% less CPU time
# per `:paper` window than XLA:CPU's grouped convolutions (docs/benchmarks.md, "Prediction on a
# CPU"). Training keeps the reference forms, which compile in half the time.
CPU_INFERENCE_FORMS = {"depthwise_impl": "shift"}


def inference_model_config(model_config: Any, backend: str) -> Any:
    """Returns the model config a stage predicts with on `backend`: on a CPU, the forms left
    "auto" take `CPU_INFERENCE_FORMS` (same parameters and outputs); elsewhere `model_config`."""
    if backend != "cpu":
        return model_config
    chosen = {k: v for k, v in CPU_INFERENCE_FORMS.items() if is_auto(model_config.get(k))}
    if not chosen:
        return model_config
    config = model_config.copy_and_resolve_references()
    config.update(chosen)
    return config


def stage_window(path: str | os.PathLike, config: Any, window: Sequence[int] | None = None) -> tuple[int, int, int]:
    """Returns the sliding window of a run: `window`, else `inference.window`, else `data.patch_size`, checked."""
    window = tuple(int(w) for w in (window or config.inference.window or config.data.patch_size))
    if len(window) != 3:
        raise ValueError(f"{path}: window must be 3 sizes (D, H, W), got {window}")
    try:
        check_patch_shape(window, len(config.model.features), config.model.get("spatial_dims", 3))
    except ValueError as e:
        raise ValueError(f"{path}: inference window {window}: {e}") from e
    return window


def checked_stage(path: str | os.PathLike, config: ml_collections.ConfigDict, expected_stage: str | None,
                  source: str) -> str:
    """Returns the stage of a model's config ("" for an old run without one); ValueError when it is
    not `expected_stage` or its class count does not fit it (`source` names where the config came from)."""
    stage = str(config.get("stage", ""))
    if expected_stage is not None and stage != expected_stage:
        hint = "; a one-stage model predicts alone (predict --joint)" if stage == "joint" else ""
        raise ValueError(f"{path}: is a {stage!r} model ({source} stage), but it was given as the "
                         f"{expected_stage!r} model{hint}")
    if stage:
        try:
            check_stage(stage, config.model.num_classes)
        except ValueError as e:
            raise ValueError(f"{path}: {source}: {e}") from e
    return stage


def checked_batch_size(inference_config: ml_collections.ConfigDict, batch_size: int | None) -> int:
    """Returns the windows per network call: `batch_size`, or the config's; ValueError below 1."""
    batch_size = int(inference_config.batch_size) if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    return batch_size


def load_stage_model(
    path: str | os.PathLike,
    expected_stage: str | None = None,
    which: str = "best",
    deploy: bool | None = None,
    mirror: bool | None = None,
    overlap: float | None = None,
    batch_size: int | None = None,
    window: tuple[int, int, int] | None = None,
    postprocess: bool = True,
) -> StageModel:
    """Returns a `StageModel` from a run directory (trained or converted); None options use the config.

    `deploy` (default `inference.deploy`) folds BatchNorm and the RepConv branches into single
    convolutions first; `expected_stage` raises ValueError when the checkpoint's `stage` differs.
    `postprocess` loads a tumour or joint run's stored post-processing (`postprocess.json`), if any.
    """
    variables, config = load_variables(path, which)
    stage = checked_stage(path, config, expected_stage, "config.json")
    inf = config.inference
    deploy = bool(inf.deploy) if deploy is None else bool(deploy)
    mirror = bool(inf.mirror_tta) if mirror is None else bool(mirror)
    overlap = float(inf.overlap) if overlap is None else float(overlap)
    batch_size = checked_batch_size(inf, batch_size)
    window = stage_window(path, config, window)

    stored_deploy = bool(config.model.get("deploy", False)) or not variables.get("batch_stats")
    check_variables_fit(variables, config.model, stored_deploy, f"{path} ({which} checkpoint)")
    if stored_deploy:  # converted deploy weights: nothing to fold, no training form to go back to
        deploy = True
    elif deploy:
        variables = reparameterize(variables)
    model_config = inference_model_config(config.model, jax.default_backend())
    model = build_model(model_config, deploy=deploy)
    variables = jax.device_put(variables)
    window_fn = window_predict_fn(lambda v, x: model.apply(v, x, train=False), mirror)
    description = {"source": str(path), "which": which, "stage": stage, "model": str(config.model.name),
                   "features": [int(f) for f in config.model.features], "deploy": deploy,
                   "mirror_tta": mirror,
                   "forms": resolve_forms(model_config, jax.default_backend(), CONV_FORM_KEYS)}
    return StageModel(
        stage=stage or (expected_stage or "liver"),
        window_fn=window_fn,
        variables=variables,
        num_classes=int(config.model.num_classes),
        window=window,
        preprocessing=PreprocessSettings.from_config(config.preprocess),
        overlap=overlap,
        batch_size=batch_size,
        sigma_scale=float(inf.gaussian_sigma_scale),
        liver_margin_mm=float(config.data.liver_margin_mm),
        description=description,
        postprocess=pp.read_settings(path) if postprocess and stage in ("tumor", "joint") else None,
    )


def compiled_stage(model: StageModel) -> StageModel:
    """Returns `model` with its window program compiled ahead of time for its batch of windows.

    Nothing is run: evaluating a batch of windows to trigger the compilation, as `jax.jit` would,
    costs as much as compiling on a CPU (15-30 s for the `:paper` liver stage), on every start.
    """
    windows = jax.ShapeDtypeStruct((model.batch_size, *model.window, 1), jnp.float32)
    return dataclasses.replace(model, window_fn=jax.jit(model.window_fn).lower(model.variables, windows).compile())


# What the members of one ensemble must share: their probabilities are averaged window by window.
ENSEMBLE_AGREEMENT = ("stage", "num_classes", "window", "preprocessing", "overlap", "batch_size", "sigma_scale",
                      "liver_margin_mm", "postprocess")


def ensemble_stage_model(models: Sequence[StageModel]) -> StageModel:
    """Returns one StageModel whose windows are the mean of the members' softmax (one jitted call).

    The members (folds of one run, or different networks) must agree on `ENSEMBLE_AGREEMENT`;
    otherwise ValueError names the two runs and the setting. One member is returned as it is.
    """
    models = list(models)
    if not models:
        raise ValueError("an ensemble needs at least one run")
    if len(models) == 1:
        return models[0]
    first = models[0]
    for other in models[1:]:
        for name in ENSEMBLE_AGREEMENT:
            a, b = getattr(first, name), getattr(other, name)
            if a != b:
                raise ValueError(f"{other.description.get('source')}: {name} {_shown(b)} differs from "
                                 f"{_shown(a)} of {first.description.get('source')}; the runs of one ensemble "
                                 "must agree on stage, classes, window, sliding-window, preprocessing and "
                                 "post-processing settings")
    description = {"source": " + ".join(str(m.description.get("source")) for m in models),
                   "ensemble": [m.description for m in models]}
    return dataclasses.replace(first, window_fn=ensemble_window_fn([m.window_fn for m in models]),
                               variables=tuple(m.variables for m in models), description=description)


def _shown(value: Any) -> Any:
    return value.to_dict() if hasattr(value, "to_dict") else value


def load_ensemble(paths: str | os.PathLike | Sequence[str | os.PathLike], expected_stage: str | None = None,
                  **options: Any) -> StageModel:
    """Returns the StageModel of one run directory, or the `ensemble_stage_model` of several (`options` as
    for `load_stage_model`)."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    return ensemble_stage_model([load_stage_model(p, expected_stage, **options) for p in paths])


def _check_roles(liver: Any, tumor: Any, joint: Any) -> None:
    if (liver is None) == (joint is None):
        raise ValueError("give a liver model (two-stage) or a joint model (one-stage), exactly one of them")
    if joint is not None and tumor is not None:
        raise ValueError("a joint (one-stage) model predicts liver and tumour itself: give no tumour model with it")


class Predictor:
    """The loaded models (liver [+ tumour], or one joint model) and file-level prediction of one case."""

    def __init__(self, liver: StageModel | None = None, tumor: StageModel | None = None, connectivity: int = 1,
                 joint: StageModel | None = None):
        _check_roles(liver, tumor, joint)
        self.liver = liver
        self.tumor = tumor
        self.joint = joint
        self.connectivity = connectivity
        self.compile_seconds: dict[str, float] = {}
        self.device: jax.Device | None = None  # where the variables live (None: the default device)

    @classmethod
    def from_checkpoints(cls, liver_path: RunPaths | None = None, tumor_path: RunPaths | None = None,
                         connectivity: int = 1, joint_path: RunPaths | None = None, **options: Any) -> Predictor:
        """Returns a Predictor loading the two stages or the joint model (`options` as for `load_stage_model`);
        a stage given several run directories is their ensemble (`load_ensemble`)."""
        _check_roles(liver_path, tumor_path, joint_path)
        if joint_path is not None:
            return cls(connectivity=connectivity, joint=load_ensemble(joint_path, "joint", **options))
        liver = load_ensemble(liver_path, "liver", **options)
        tumor = load_ensemble(tumor_path, "tumor", **options) if tumor_path is not None else None
        return cls(liver, tumor, connectivity)

    def predict_array(self, image_dhw: np.ndarray, spacing, progress: ProgressFn | None = None) -> CaseResult:
        """Returns the `CaseResult` of a (D, H, W) HU volume: two-stage, or one-stage with a joint model."""
        if self.joint is not None:
            return predict_joint_case(image_dhw, spacing, self.joint, progress, self.connectivity)
        return predict_case(image_dhw, spacing, self.liver, self.tumor, progress, self.connectivity)

    def warmup(self) -> dict[str, float]:
        """Returns seconds spent compiling (or loading from the persistent cache) each stage's window
        program; the stages then run the compiled programs."""
        for role in ("liver", "tumor", "joint"):
            model = getattr(self, role)
            if model is None or model.stage in self.compile_seconds:
                continue
            start = time.perf_counter()
            if model.description.get("backend") != "onnxruntime":  # a session needs no compiling
                setattr(self, role, compiled_stage(model))
            self.compile_seconds[model.stage] = time.perf_counter() - start
        return dict(self.compile_seconds)

    def settings(self) -> dict[str, Any]:
        """Returns the JSON-serialisable settings of the models ({"liver", "tumor", "joint"}, None if absent)."""
        return {**{role: model.settings() if model is not None else None
                   for role, model in (("liver", self.liver), ("tumor", self.tumor), ("joint", self.joint))},
                "largest_component_connectivity": self.connectivity}

    def predict_file(self, image_path: str | os.PathLike, output_path: str | os.PathLike | None,
                     progress: ProgressFn | None = None, png_path: str | os.PathLike | None = None,
                     png_writer: PngWriter | None = None,
                     reader: ImageReader = nifti.read_image_native) -> tuple[CaseResult, dict[str, Any]]:
        """Returns (result, JSON record) after writing the label map of one NIfTI CT atomically.

        With `png_path`, also renders an overlay of the prediction there with `png_writer`
        (the command line passes `visualize.save_overlay`). `reader` returns the (D, H, W) HU
        volume and its geometry (`predict` passes a DICOM series reader for DICOM inputs); with
        `output_path` None no label map is written (the caller writes other formats).
        Raises `nifti.DataError` naming the file for unreadable, corrupt or non-finite input;
        nothing is written then.
        """
        start = time.perf_counter()
        reset_host_peak()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            read_start = time.perf_counter()
            image, geometry = reader(image_path)
            read_s = time.perf_counter() - read_start
            result = self.predict_array(image, geometry.spacing, progress)
        for w in caught:  # show them as usual, and keep them in the record
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        write_start = time.perf_counter()
        if output_path is not None:
            nifti.write_label_map(result.labels, geometry, output_path)
        timings = {"read": read_s, **result.timings, "write": time.perf_counter() - write_start}
        if png_path is not None:
            if png_writer is None:
                raise ValueError("png_path needs a png_writer")
            png_start = time.perf_counter()
            png_writer(pathlib.Path(png_path), image, geometry.spacing, result.labels,
                       pathlib.Path(image_path).name)
            timings["png"] = time.perf_counter() - png_start
        timings["total"] = time.perf_counter() - start
        record = case_record(image_path, output_path, png_path, geometry, result,
                             [str(w.message) for w in caught], timings)
        record["memory"] = memory_record(self.device or jax.devices()[0], "this case")
        for note in result.warnings:
            warnings.warn(f"{image_path}: {note}", stacklevel=2)
        return result, record


def case_record(image_path, output_path, png_path, geometry: nifti.Geometry, result: CaseResult,
                read_warnings: Sequence[str], timings: dict[str, float]) -> dict[str, Any]:
    """Returns the JSON record of one predicted case (the timings JSON, without "case_id" and "run")."""
    # count_nonzero, not bincount: bincount converts a CT-sized uint8 map to intp first (0.2 s vs 0.02 s).
    liver, tumour = np.count_nonzero(result.labels), np.count_nonzero(result.labels == 2)
    return {
        "input": str(image_path),
        "output": None if output_path is None else str(output_path),
        **({"png": str(png_path)} if png_path is not None else {}),
        "disk_shape": list(geometry.disk_shape),
        "spacing_mm": [float(s) for s in geometry.spacing],
        "liver_found": result.liver_found,
        "warnings": list(read_warnings) + result.warnings,
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "label_voxels": {"liver": int(liver), "tumor": int(tumour)},
        **result.info,
    }

