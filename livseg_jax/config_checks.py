"""Early validation of a training config: types, lengths and choices of the main keys.

`validate_config` runs before any work starts (`livseg_jax.train`), so a typo in a
`--config.x=y` override ends in one line naming the key instead of a failure deep inside training.
The choices come from the modules that use them, so this table cannot drift from them.
"""

from __future__ import annotations

import numbers
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from livseg_jax.config import BATCH_NORM_STATS, MODEL_NAMES
from livseg_jax.data.layouts import LAYOUTS
from livseg_jax.data.preprocess import SPACING_MODES
from livseg_jax.data.resample import IMAGE_ORDERS, LABEL_METHODS
from livseg_jax.data.stages import STAGE_CLASSES, STAGES
from livseg_jax.losses import LOSS_NAMES
from livseg_jax.models.unet import check_patch_shape


class ConfigError(ValueError):
    """A config value has the wrong type, length or value; `key` is its dotted name."""

    def __init__(self, key: str, problem: str):
        self.key, self.problem = key, problem
        super().__init__(f"{key}: {problem}")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _int_at_least(low: int) -> Callable[[Any], str | None]:
    return lambda v: None if _is_int(v) and v >= low else f"must be an integer >= {low}, got {v!r}"


def _number_in(low: float, high: float, high_open: bool = False) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        ok = _is_number(v) and low <= v and (v < high if high_open else v <= high)
        return None if ok else f"must be a number in [{low:g}, {high:g}{')' if high_open else ']'}, got {v!r}"
    return check


def _positive_number(v: Any) -> str | None:
    return None if _is_number(v) and v > 0 else f"must be a positive number, got {v!r}"


def step_programs_problem(v: Any) -> str | None:
    """The check of `train.step_programs` (1, 2, 3, or None: 2 on GPUs in a one-process run, else 1; see
    training/step_programs.py), also applied where the step is compiled."""
    if v is None or (_is_int(v) and v in (1, 2, 3)):
        return None
    return f"must be 1, 2, 3 or None (the default: 2 on GPUs in one process, else 1), got {v!r}"


def _choice(options: Sequence[Any]) -> Callable[[Any], str | None]:
    return lambda v: None if v in tuple(options) else f"must be one of {tuple(options)}, got {v!r}"


def _ints(length: int | None, low: int, what: str) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        ok = isinstance(v, Sequence) and not isinstance(v, str) and all(_is_int(x) and x >= low for x in v)
        if ok and (len(v) == length if length is not None else len(v) >= 2):
            return None
        count = f"{length}" if length is not None else "at least 2"
        return f"must be {count} integers >= {low} ({what}), got {v!r}"
    return check


# dotted key -> check returning the problem or None. Missing keys are left to the defaults' owners.
CHECKS: dict[str, Callable[[Any], str | None]] = {
    "stage": _choice(STAGES),
    "seed": _int_at_least(0),
    "model.name": _choice(MODEL_NAMES),
    "model.features": _ints(None, 1, "channels per level"),
    "model.num_classes": _int_at_least(2),
    "model.spatial_dims": _choice((2, 3)),
    "model.dtype": _choice(("auto", "float32", "bfloat16")),
    "model.dropout": _number_in(0.0, 1.0, high_open=True),
    "data.layout": _choice(LAYOUTS),
    "data.patch_size": _ints(3, 1, "D, H, W"),
    "data.batch_size": _int_at_least(1),
    "data.num_val_cases": _int_at_least(0),
    "data.num_folds": _int_at_least(0),
    "data.fold": _int_at_least(0),
    "data.foreground_fraction": _number_in(0.0, 1.0),
    "data.num_workers": _int_at_least(0),
    "data.tumor_crop_source": _choice(("ground_truth", "stage1")),
    "preprocess.spacing_mode": _choice(SPACING_MODES),
    "preprocess.image_interpolation": _choice(tuple(IMAGE_ORDERS)),
    "preprocess.label_interpolation": _choice(LABEL_METHODS),
    "loss.name": _choice(LOSS_NAMES),
    "optim.learning_rate": _positive_number,
    "train.num_epochs": _int_at_least(0),  # 0: set up the run directory only
    "train.steps_per_epoch": _int_at_least(1),
    "train.keep_checkpoints": _int_at_least(1),
    "train.batch_norm_stats": _choice(BATCH_NORM_STATS),
    "train.step_programs": step_programs_problem,
    "train.switch_compile_threads": _int_at_least(0),
    "inference.overlap": _number_in(0.0, 1.0, high_open=True),
    "inference.batch_size": _int_at_least(1),
}


def _lookup(config: ml_collections.ConfigDict, key: str) -> tuple[bool, Any]:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def validate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Returns `config` after checking the main keys; the first bad one raises ConfigError."""
    for key, check in CHECKS.items():
        present, value = _lookup(config, key)
        if present:
            problem = check(value)
            if problem is not None:
                raise ConfigError(key, problem)
    stage_classes = STAGE_CLASSES[config.stage]
    if config.model.num_classes != stage_classes:
        raise ConfigError("model.num_classes", f"stage {config.stage!r} needs {stage_classes} classes, "
                                               f"got {config.model.num_classes}")
    num_folds, fold = config.data.get("num_folds", 0), config.data.get("fold", 0)
    if num_folds == 1 or (num_folds and fold >= num_folds):
        raise ConfigError("data.num_folds" if num_folds == 1 else "data.fold",
                          f"data.num_folds = {num_folds}, data.fold = {fold}: need num_folds 0 (no folds) or "
                          ">= 2, and 0 <= fold < num_folds")
    for key in ("data.root", "data.list_file"):
        present, value = _lookup(config, key)
        if present and value and not pathlib.Path(value).exists():
            raise ConfigError(key, f"{value} does not exist")
    try:
        check_patch_shape(config.data.patch_size, len(config.model.features), config.model.spatial_dims)
    except ValueError as e:
        raise ConfigError("data.patch_size", str(e)) from None
    return config
