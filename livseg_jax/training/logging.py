"""What a user sees of a run: JSON-lines metrics, optional TensorBoard, and the final curves plot."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from livseg_jax import atomic_write
from livseg_jax.run_dir import METRICS_FILE


class MetricWriter:
    """Appends metrics as JSON lines to `<workdir>/metrics.jsonl` (and TensorBoard if asked)."""

    def __init__(self, workdir: pathlib.Path, tensorboard: bool = False, is_chief: bool = True):
        self.path = workdir / METRICS_FILE
        self.is_chief = is_chief
        self.tb = None
        if tensorboard and is_chief:
            try:
                from tensorboardX import SummaryWriter
            except ImportError as e:
                raise ImportError(
                    "train.tensorboard=True needs tensorboardX: pip install 'livseg_jax[tensorboard]'"
                ) from e
            self.tb = SummaryWriter(str(workdir / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drops logged lines of steps after `step` (they are recomputed when a run resumes)."""
        if not self.is_chief or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError):  # a line torn by a kill during a write
                continue
        atomic_write.write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, step: int, kind: str, values: dict[str, Any]) -> None:
        """Appends one record `{"step", "kind", **values}`."""
        if not self.is_chief:
            return
        record = {"step": int(step), "kind": kind, **{k: _plain(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, int | float) and k != "step":
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        """Flushes TensorBoard."""
        if self.tb is not None:
            self.tb.close()


def _plain(v: Any) -> Any:
    try:
        return float(v) if getattr(v, "ndim", 0) == 0 and not isinstance(v, str | int) else v
    except TypeError:
        return v


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """Returns the records of a run's metrics.jsonl."""
    path = pathlib.Path(workdir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(workdir: pathlib.Path) -> pathlib.Path:
    """Writes `curves.png` (training loss and validation Dice against step) and returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(workdir)
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="total (deep supervision)")
    ax_loss.plot([r["step"] for r in train], [r["loss_final_head"] for r in train], label="final head")
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
    ax_loss.legend()
    ax_dice.plot([r["step"] for r in val], [r["dice"] for r in val], "o-")
    ax_dice.set(xlabel="step", ylabel="Dice", title="validation Dice (foreground)", ylim=(0, 1))
    fig.tight_layout()
    out = workdir / "curves.png"
    with atomic_write.atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return out
