"""A study's figures: per-case Dice box plots per run, and one test slice with every run's contours."""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from livseg_jax import atomic_write
from livseg_jax.data import nifti
from livseg_jax.visualize import DISPLAY_HU, GT_STYLE, PRED_STYLE, pick_slices, plane_slice


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


def qualitative_panel(path: str | os.PathLike, image_path: str | os.PathLike, truth_path: str | os.PathLike,
                      predictions: Mapping[str, str | os.PathLike], title: str) -> pathlib.Path:
    """Returns `path` after writing a PNG: one axial slice (most tumour, else most liver) per run,
    ground truth solid and that run's prediction dashed (as the paper's Figures 5-6)."""
    image, geometry = nifti.read_image(image_path)
    truth, _ = nifti.read_label(truth_path, expected=geometry)
    axial = [(label, index) for label, plane, index in pick_slices(truth) if plane == "axial"]
    label, index = axial[-1]  # the tumour slice when there is a tumour
    sy, sx = (float(s) for s in geometry.spacing[1:])
    names = list(predictions)
    fig = Figure(figsize=(3.2 * len(names), 3.9), dpi=110, facecolor="black")
    axes = np.atleast_1d(fig.subplots(1, len(names)))
    for ax, name in zip(axes, names, strict=True):
        pred, _ = nifti.read_label(predictions[name], expected=geometry)
        ax.imshow(plane_slice(image, "axial", index), cmap="gray", vmin=DISPLAY_HU[0], vmax=DISPLAY_HU[1],
                  origin="lower", aspect=sy / sx, interpolation="nearest")
        for labels, style in ((truth, GT_STYLE), (pred, PRED_STYLE)):
            slab = plane_slice(labels, "axial", index)
            for structure, mask in (("liver", slab >= 1), ("tumor", slab == 2)):
                if mask.any():
                    ax.contour(mask.astype(np.float32), levels=[0.5], colors=[style[structure]],
                               linestyles=style["linestyle"], linewidths=1.0)
        ax.invert_xaxis()  # radiological convention, as visualize.py
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(name, color="white", fontsize=9)
    handles = [Line2D([], [], color=style[key], linestyle=style["linestyle"], label=f"{who}: {name}")
               for who, style in (("truth", GT_STYLE), ("prediction", PRED_STYLE))
               for key, name in (("liver", "liver"), ("tumor", "tumour"))]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False, labelcolor="white")
    fig.suptitle(f"{title}: axial slice {index} ({label})", color="white", fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.1, top=0.85, wspace=0.03)
    path = pathlib.Path(path)
    with atomic_write.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", facecolor=fig.get_facecolor())
    return path
