"""The run directory: the one on-disk contract between training, conversion, prediction and export.

Every model this package writes or reads is a run directory:

    config.json          the run's full config (the only thing that says what the model is)
    checkpoints/<step>/  periodic orbax checkpoints: a TrainState for trained runs; for runs
                         written by `convert --from-torch`, step 0 holds {"params"[, "batch_stats"]}
    best/<step>/         the state with the best validation Dice so far (one kept; trained runs)
    best.json            {"step", "dice"} of that state: the record of which best/<step> counts
    metrics.jsonl        one JSON object per logged step / validation (trained runs)

orbax writes each checkpoint into a temporary folder and renames it when complete, so a run killed
during a save keeps its previous checkpoints; temporary folders of killed saves are removed when
training opens the run again. A new best checkpoint is complete, then recorded in best.json,
before the old one is deleted, so a kill at any moment leaves the recorded best intact.
`write_variables` builds a whole run directory in a temporary folder and renames it into place.
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
from livseg_jax.config import base_config

CONFIG_FILE = "config.json"
PERIODIC = "checkpoints"
BEST = "best"
BEST_RECORD = "best.json"
METRICS_FILE = "metrics.jsonl"
WHICH = ("best", "latest")
# The variable collections a model needs; a TrainState holds them beside optimiser state.
VARIABLE_COLLECTIONS = ("params", "batch_stats")

# The config keys (dotted; a section stands for every key in it) that say what a run directory's
# checkpoints are: the task (stage), the network (its parameter tree, classes, blocks), the grid and
# intensities it was trained on (preprocess), the patch and stage-2 crop margin prediction takes from
# config.json, and what continuing the same state needs (the schedule's epoch length, the data
# order's seed). Resuming under another value would make config.json describe checkpoints it did not
# produce, so it is refused. Everything else (batch size, workers, epochs, logging and checkpoint
# frequency, learning rate, loss, XLA flags, inference settings, data location) may change.
MEANING_KEYS = ("stage", "model", "preprocess", "data.patch_size", "data.liver_margin_mm",
                "train.steps_per_epoch", "seed")
# Model keys that choose how the same parameters are computed or regularised, not what they are: a
# run may resume under another value (e.g. float32 after a bf16 run stopped on a NaN, einsum 1x1s).
COMPUTE_ONLY_MODEL_KEYS = ("dtype", "depthwise_impl", "pointwise_impl", "dense_pack_channels", "batch_norm_impl",
                           "dropout")


def _manager(directory: pathlib.Path, keep: int | None = None) -> ocp.CheckpointManager:
    # orbax prunes beyond max_to_keep only after the new checkpoint is complete; the temporary
    # folders of saves that were killed are removed when a manager opens the folder for writing.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(directory.absolute(), options=options)


def read_best_record(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """Returns best.json ({"step", "dice"}) of a run directory, or None when there is none."""
    path = pathlib.Path(workdir) / BEST_RECORD
    try:
        record = json.loads(path.read_text())
        return {"step": int(record["step"]), "dice": float(record["dice"])}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: unreadable best-checkpoint record ({type(e).__name__}: {e}); "
                         "use --which latest, or delete it and best/ to forget the best checkpoint") from e


class RunCheckpoints:
    """The periodic and best checkpoint managers of one run directory (training writes through it)."""

    def __init__(self, workdir: str | os.PathLike, keep: int):
        self.workdir = pathlib.Path(workdir)
        atomic_write.sweep_stale_temps(self.workdir)  # config.json, best.json ... of killed runs
        self.periodic = _manager(self.workdir / PERIODIC, keep)
        # No max_to_keep: save_best deletes the previous best itself, after recording the new one.
        self.best = _manager(self.workdir / BEST)

    def latest_step(self) -> int | None:
        """Returns the newest complete periodic checkpoint's step, or None."""
        return self.periodic.latest_step()

    def save(self, step: int, state: Any) -> None:
        """Saves a periodic checkpoint of `state` at `step` (blocking until it is complete)."""
        self.periodic.save(step, args=ocp.args.StandardSave(state), force=True)
        self.periodic.wait_until_finished()

    def save_best(self, step: int, state: Any, dice: float) -> None:
        """Replaces the best checkpoint with `state` and records its Dice in best.json.

        Order: the new checkpoint complete, then best.json naming it, then the old one deleted;
        a kill in between leaves best.json naming a complete checkpoint.
        """
        for stale in (s for s in self.best.all_steps() if s >= step):  # unrecorded, from a killed run
            self.best.delete(stale)
        self.best.save(step, args=ocp.args.StandardSave(state), force=True)
        self.best.wait_until_finished()
        if jax.process_index() == 0:  # every process saves its shards; one writes the shared record
            atomic_write.write_json(self.workdir / BEST_RECORD, {"step": int(step), "dice": float(dice)})
        for old in self.best.all_steps():
            if old != step:
                self.best.delete(old)

    def forget_after(self, step: int) -> None:
        """Drops best checkpoints newer than `step` (a resumed run recomputes those epochs) and
        any that best.json does not name (left by a run killed during save_best)."""
        record = read_best_record(self.workdir)
        if record is not None and record["step"] > step:
            (self.workdir / BEST_RECORD).unlink()
            record = None
        for old in self.best.all_steps():
            if record is None or old != record["step"]:
                self.best.delete(old)

    def best_dice(self) -> float:
        """Returns the best validation Dice recorded so far (-1 when none)."""
        record = read_best_record(self.workdir)
        return -1.0 if record is None else record["dice"]

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


def _plain(value: Any) -> Any:
    value = value.to_dict() if hasattr(value, "to_dict") else value
    return json.loads(json.dumps(value, sort_keys=True, default=list))  # tuples -> lists, as in config.json


def _differences(key: str, old: Any, new: Any) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new))
                for d in _differences(f"{key}.{k}", old.get(k, "<absent>"), new.get(k, "<absent>"))]
    return [] if old == new else [f"{key} ({json.dumps(old)} -> {json.dumps(new)})"]


def meaning_changes(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> list[str]:
    """Returns "key (old -> new)" for every MEANING_KEYS value that differs between two configs."""
    defaults = base_config()
    changes = []
    for key in MEANING_KEYS:
        old, new, default = saved, config, defaults
        for part in key.split("."):
            old, new, default = (c.get(part) if c is not None else None for c in (old, new, default))
        old, new, default = _plain(old), _plain(new), _plain(default)
        # A key added after the run was saved had its default value in that run.
        if old is None:
            old = default
        if isinstance(old, dict) and isinstance(new, dict):
            old = {**{k: v for k, v in (default or {}).items() if k in new}, **old}
            if key == "model":
                old, new = ({k: v for k, v in d.items() if k not in COMPUTE_ONLY_MODEL_KEYS} for d in (old, new))
        changes += _differences(key, old, new)
    return changes


def check_resumable(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
    """Raises ValueError naming every MEANING_KEYS change against the run's config.json (none: ok)."""
    try:
        saved = load_config(workdir)
    except FileNotFoundError:
        return
    changes = meaning_changes(saved, config)
    if changes:
        raise ValueError(
            f"{workdir}: holds checkpoints of a run with other settings; these differ from its "
            f"{CONFIG_FILE}: {'; '.join(changes)}. They change what its checkpoints mean: use a new "
            "--workdir, or the run's own values (compute-only settings may change)")


def _latest_step(directory: pathlib.Path) -> int | None:
    if not directory.is_dir():
        return None
    with ocp.CheckpointManager(directory.absolute(), item_handlers=ocp.StandardCheckpointHandler()) as mngr:
        return mngr.latest_step()


def _restore_variables(directory: pathlib.Path, step: int) -> dict[str, Any]:
    """Returns the model collections of the checkpoint at `step`, restored onto the host."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    # The handler must be named for `item_metadata` to describe the arrays (without it orbax returns
    # no metadata, and the restore falls back to the saved shardings: a "topology mismatch" on any
    # machine with other devices than the training run's).
    with ocp.CheckpointManager(directory.absolute(), item_handlers=ocp.StandardCheckpointHandler()) as mngr:
        # Restore onto one local device whatever mesh, device or process count the run was trained
        # on (the saved shardings name devices that a prediction machine may not have).
        metadata = mngr.item_metadata(step)
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
        restored = mngr.restore(step, args=ocp.args.StandardRestore(target))
    return {k: restored[k] for k in VARIABLE_COLLECTIONS if restored.get(k)}


def _complete_steps(directory: pathlib.Path) -> list[int]:
    if not directory.is_dir():
        return []
    with ocp.CheckpointManager(directory.absolute()) as mngr:
        return list(mngr.all_steps())


def checkpoint_step(path: str | os.PathLike, which: str = "best") -> tuple[str, int]:
    """Returns (sub-folder, step) of the checkpoint `which` names in a run directory.

    "best" is the checkpoint best.json names, which must be complete (else ValueError: never
    another one in its place); with no best.json and no best checkpoint (no validation has run,
    converted runs) the newest periodic one. "latest" is the newest periodic checkpoint.
    """
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    path = pathlib.Path(path)
    if which == "best":
        record, steps = read_best_record(path), _complete_steps(path / BEST)
        if record is not None:
            if record["step"] not in steps:
                raise ValueError(f"{path / BEST / str(record['step'])}: the best checkpoint that "
                                 f"{path / BEST_RECORD} names is missing or incomplete; use --which latest")
            return BEST, record["step"]
        if steps:
            raise ValueError(f"{path / BEST}: holds step(s) {steps} but {path / BEST_RECORD} is missing, so "
                             "which one is best is unknown; use --which latest (resuming training cleans it up)")
    step = _latest_step(path / PERIODIC)
    if step is None:
        raise FileNotFoundError(f"{path}: no complete checkpoint under {PERIODIC}/")
    return PERIODIC, step


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
