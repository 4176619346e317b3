"""Checkpoints with orbax: periodic (keep k), best by validation Dice, resume from a workdir.

Layout of a run directory (`workdir`):
  config.json            the run's full config
  checkpoints/<step>/    periodic TrainState checkpoints (orbax; the newest k are kept)
  best/<step>/           the state with the best validation Dice so far (one kept)
  best.json              {"step", "dice"} of that state
  metrics.jsonl          one JSON object per logged step / validation
orbax writes each checkpoint into a temporary folder and renames it when complete, so a run killed
during a save leaves the previous checkpoints restorable.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

PERIODIC = "checkpoints"
BEST = "best"


def _manager(directory: pathlib.Path, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory.absolute(), options=options)


class RunCheckpoints:
    """The periodic and best checkpoint managers of one run directory."""

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
        write_json_atomic(self.workdir / "best.json", {"step": int(step), "dice": float(dice)})

    def forget_after(self, step: int) -> None:
        """Drops a best checkpoint newer than `step` (a resumed run recomputes those epochs)."""
        path = self.workdir / "best.json"
        if path.exists() and json.loads(path.read_text())["step"] > step:
            for old in self.best.all_steps():
                self.best.delete(old)
            path.unlink()

    def best_dice(self) -> float:
        """Returns the best validation Dice recorded so far (-1 when none)."""
        path = self.workdir / "best.json"
        return float(json.loads(path.read_text())["dice"]) if path.exists() else -1.0

    def restore(self, step: int, abstract_state: Any) -> Any:
        """Returns the periodic checkpoint at `step`, laid out like `abstract_state`."""
        return self.periodic.restore(step, args=ocp.args.StandardRestore(abstract_state))

    def close(self) -> None:
        """Releases the managers."""
        self.periodic.close()
        self.best.close()


def write_json_atomic(path: pathlib.Path, obj: Any) -> None:
    """Writes `obj` as JSON to `path` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def save_config(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
    """Writes the run's config as config.json beside the checkpoints."""
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = workdir / ".config.json.tmp"
    tmp.write_text(config.to_json_best_effort(indent=1))
    os.replace(tmp, workdir / "config.json")


def load_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """Returns the config saved in a run directory, raising FileNotFoundError naming the file."""
    path = pathlib.Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json; is {workdir} a livseg_jax run directory?")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def _restore_params(directory: pathlib.Path, step: int) -> dict[str, Any]:
    """Returns {"params", "batch_stats"} of a TrainState checkpoint, restored on the host."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with ocp.CheckpointManager(directory.absolute()) as mngr:
        # Restore onto one local device whatever mesh the run was trained on (the saved shardings
        # name devices that a prediction machine may not have).
        metadata = mngr.item_metadata(step)
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
        restored = mngr.restore(step, args=ocp.args.StandardRestore(target))
    return {"params": restored["params"], "batch_stats": restored["batch_stats"]}


def load_inference_variables(
    path: str | os.PathLike, which: str = "best"
) -> tuple[dict, ml_collections.ConfigDict]:
    """Returns (variables {"params", "batch_stats"}, config) from a run directory or converted weights.

    `path` may be a training run directory (`which` = "best" falls back to the latest periodic
    checkpoint when no validation has run; "latest" takes the newest), or a directory written by
    `python -m livseg_jax.convert` (variables.msgpack + config.json).
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint or run directory does not exist")
    config = load_config(path)
    if (path / "variables.msgpack").is_file():
        from livseg_jax.interop.io import load_variables

        variables, _ = load_variables(path)
        return variables, config
    candidates = [BEST, PERIODIC] if which == "best" else [PERIODIC]
    for sub in candidates:
        directory = path / sub
        if directory.is_dir():
            with ocp.CheckpointManager(directory.absolute()) as mngr:
                step = mngr.latest_step()
            if step is not None:
                return jax.device_get(_restore_params(directory, step)), config
    raise FileNotFoundError(f"{path}: no complete checkpoint under {' or '.join(candidates)}/")
