"""The run directory: the one on-disk contract between training, conversion, prediction and export.

Every model this package writes or reads is a run directory:

    config.json          the run's full config (the only thing that says what the model is)
    checkpoints/<step>/  periodic orbax checkpoints: a TrainState for trained runs; for runs
                         written by `convert --from-torch`, step 0 holds {"params"[, "batch_stats"]}
    best/<step>/         the state with the best validation Dice so far (one kept; trained runs)
    best.json            {"step", "dice"} of that state
    metrics.jsonl        one JSON object per logged step / validation (trained runs)

orbax writes each checkpoint into a temporary folder and renames it when complete, so a run killed
during a save keeps its previous checkpoints; `write_variables` builds a whole run directory in a
temporary folder and renames it into place.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from livseg_jax import atomic_write

CONFIG_FILE = "config.json"
PERIODIC = "checkpoints"
BEST = "best"
BEST_RECORD = "best.json"
METRICS_FILE = "metrics.jsonl"
WHICH = ("best", "latest")
# The variable collections a model needs; a TrainState holds them beside optimiser state.
VARIABLE_COLLECTIONS = ("params", "batch_stats")


def _manager(directory: pathlib.Path, keep: int | None = None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory.absolute(), options=options)


class RunCheckpoints:
    """The periodic and best checkpoint managers of one run directory (training writes through it)."""

    def __init__(self, workdir: str | os.PathLike, keep: int):
        self.workdir = pathlib.Path(workdir)
        self.periodic = _manager(self.workdir / PERIODIC, keep)
        self.best = _manager(self.workdir / BEST, 1)

    def latest_step(self) -> int | None:
        """Returns the newest complete periodic checkpoint's step, or None."""
        return self.periodic.latest_step()

    def save(self, step: int, state: Any) -> None:
        """Saves a periodic checkpoint of `state` at `step` (blocking until it is complete)."""
        self.periodic.save(step, args=ocp.args.StandardSave(state), force=True)
        self.periodic.wait_until_finished()

    def save_best(self, step: int, state: Any, dice: float) -> None:
        """Replaces the best checkpoint with `state` and records its Dice in best.json."""
        for old in self.best.all_steps():
            self.best.delete(old)
        self.best.save(step, args=ocp.args.StandardSave(state), force=True)
        self.best.wait_until_finished()
        atomic_write.write_json(self.workdir / BEST_RECORD, {"step": int(step), "dice": float(dice)})

    def forget_after(self, step: int) -> None:
        """Drops a best checkpoint newer than `step` (a resumed run recomputes those epochs)."""
        path = self.workdir / BEST_RECORD
        if path.exists() and json.loads(path.read_text())["step"] > step:
            for old in self.best.all_steps():
                self.best.delete(old)
            path.unlink()

    def best_dice(self) -> float:
        """Returns the best validation Dice recorded so far (-1 when none)."""
        path = self.workdir / BEST_RECORD
        return float(json.loads(path.read_text())["dice"]) if path.exists() else -1.0

    def restore(self, step: int, abstract_state: Any) -> Any:
        """Returns the periodic checkpoint at `step`, laid out like `abstract_state`."""
        return self.periodic.restore(step, args=ocp.args.StandardRestore(abstract_state))

    def close(self) -> None:
        """Releases the managers."""
        self.periodic.close()
        self.best.close()


def save_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> pathlib.Path:
    """Returns the path of config.json after writing the run's config there atomically."""
    workdir = pathlib.Path(workdir)
    return atomic_write.write_text(workdir / CONFIG_FILE, config.to_json_best_effort(indent=1) + "\n")


def load_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """Returns the config of a run directory; FileNotFoundError / ValueError name the file."""
    path = pathlib.Path(path)
    config_path = path / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: run directory does not exist")
    if not config_path.is_file():
        hint = " (a portable checkpoint of an older livseg_jax: convert its torch weights again)" if (
            path / "variables.msgpack").is_file() else ""
        raise FileNotFoundError(f"{config_path}: missing; is {path} a livseg_jax run directory?{hint}")
    try:
        data = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path}: invalid JSON ({e}); the run directory's config is damaged") from e
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ValueError(f"{config_path}: not a livseg_jax run config (expected a JSON object with a "
                         f"'model' section, got {type(data).__name__})")
    return ml_collections.ConfigDict(data)


def _latest_step(directory: pathlib.Path) -> int | None:
    if not directory.is_dir():
        return None
    with ocp.CheckpointManager(directory.absolute()) as mngr:
        return mngr.latest_step()


def _restore_variables(directory: pathlib.Path, step: int) -> dict[str, Any]:
    """Returns the model collections of the checkpoint at `step`, restored onto the host."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with ocp.CheckpointManager(directory.absolute()) as mngr:
        # Restore onto one local device whatever mesh the run was trained on (the saved shardings
        # name devices that a prediction machine may not have).
        metadata = mngr.item_metadata(step)
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
        restored = mngr.restore(step, args=ocp.args.StandardRestore(target))
    return {k: restored[k] for k in VARIABLE_COLLECTIONS if restored.get(k)}


def checkpoint_step(path: str | os.PathLike, which: str = "best") -> tuple[str, int]:
    """Returns (sub-folder, step) of the checkpoint `which` names in a run directory.

    "best" is the best-validation checkpoint, falling back to the newest periodic one when no
    validation has run (and for converted runs); "latest" is the newest periodic checkpoint.
    """
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    path = pathlib.Path(path)
    candidates = (BEST, PERIODIC) if which == "best" else (PERIODIC,)
    for sub in candidates:
        step = _latest_step(path / sub)
        if step is not None:
            return sub, step
    raise FileNotFoundError(f"{path}: no complete checkpoint under {' or '.join(c + '/' for c in candidates)}")


def load_variables(path: str | os.PathLike, which: str = "best") -> tuple[dict, ml_collections.ConfigDict]:
    """Returns (variables {"params"[, "batch_stats"]} as numpy arrays, config) of a run directory."""
    config = load_config(path)
    sub, step = checkpoint_step(path, which)
    try:
        variables = _restore_variables(pathlib.Path(path) / sub, step)
    except (OSError, ValueError, KeyError, TypeError) as e:  # orbax names no path in its errors
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{pathlib.Path(path) / sub / str(step)}: cannot restore the checkpoint "
                         f"(damaged?): {type(e).__name__}: {first}") from e
    if "params" not in variables:
        raise ValueError(f"{pathlib.Path(path) / sub / str(step)}: checkpoint has no 'params'")
    return jax.device_get(variables), config


def write_variables(path: str | os.PathLike, variables: Mapping[str, Any], config: ml_collections.ConfigDict,
                    force: bool = False) -> pathlib.Path:
    """Returns `path` after writing a run directory holding `variables` as its step-0 checkpoint.

    Built in a temporary folder and renamed into place, so a reader never sees half a run; an
    existing non-empty `path` is refused unless `force`.
    """
    unknown = set(variables) - set(VARIABLE_COLLECTIONS)
    if unknown or "params" not in variables:
        raise ValueError(f"variables must hold 'params' and optionally 'batch_stats', got {sorted(variables)}")
    tree = {k: jax.tree.map(np.asarray, dict(v)) for k, v in variables.items() if v}
    with atomic_write.atomic_dir(path, force=force) as tmp:
        save_config(tmp, config)
        with _manager(tmp / PERIODIC) as mngr:
            mngr.save(0, args=ocp.args.StandardSave(tree))
            mngr.wait_until_finished()
    return pathlib.Path(path)
