"""A study's figure: per-case liver and tumour Dice of every run as box plots (matplotlib)."""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure

from livseg_jax import atomic_write


def dice_values(cases: Sequence[Mapping[str, Any]], structure: str) -> list[float]:
    """Returns the defined per-case Dice values of one structure from `evaluate_case` records."""
    values = [float(c[structure]["dice"]) for c in cases]
    return [v for v in values if not math.isnan(v)]


def dice_box_plot(path: str | os.PathLike, per_case: Mapping[str, Sequence[Mapping[str, Any]]],
                  title: str) -> pathlib.Path:
    """Returns `path` after writing a PNG of per-case Dice box plots per run (liver, tumour) atomically."""
    names = list(per_case)
    fig = Figure(figsize=(max(5.0, 1.1 * len(names) + 2.0), 6.5), dpi=110)
    axes = fig.subplots(2, 1, sharex=True)
    for ax, structure, label in zip(axes, ("liver", "tumor"), ("liver Dice", "tumour Dice"), strict=True):
        data = [dice_values(per_case[n], structure) for n in names]
        ax.boxplot(data, showmeans=True)
        for i, values in enumerate(data, start=1):  # the cases themselves: studies have few
            ax.plot([i] * len(values), values, "o", color="0.3", markersize=3, alpha=0.6)
        ax.set_ylabel(label)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right")
    fig.suptitle(title)
    fig.tight_layout()
    path = pathlib.Path(path)
    with atomic_write.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
