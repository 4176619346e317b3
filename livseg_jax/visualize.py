"""PNG overlays of liver and tumour contours on CT slices, prediction against ground truth.

    python -m livseg_jax.visualize --image CT --pred PRED [--gt GT] -o OUT.png
    python -m livseg_jax.visualize --image DIR --pred DIR [--gt DIR] -o OUT_DIR

Panels: the axial slice with the most liver, the axial slice with the most tumour (when there is
one) and the coronal slice with the most liver, chosen on the ground truth when given, else on the
prediction. Contours: ground truth solid (liver green, tumour red), prediction dashed (liver
yellow, tumour cyan). Radiological convention: the patient's right on the image's left, anterior
(axial) and superior (coronal) at the top; pixels have their true aspect ratio. The CT is shown
with an abdominal window (W 400, L 40). Folders are paired by case id (`data.cases.case_key`), as
in `livseg_jax.evaluate`; each case gives `OUT_DIR/<case id>.png`. `--number-lesions` writes each
predicted lesion's number (as in `predict --statistics`: components of the tumour numbered by
decreasing volume, `livseg_jax.inference.statistics`) at its centre in every panel that shows it.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from livseg_jax import atomic_write
from livseg_jax.cli_errors import check_output_dir, report, run_main
from livseg_jax.data import nifti
from livseg_jax.data.cases import case_key
from livseg_jax.data.layouts import find_inputs, prediction_files, truth_files
from livseg_jax.data.nifti import DataError
from livseg_jax.inference.statistics import lesion_components

DISPLAY_HU = (-160.0, 240.0)  # abdominal window W 400 / L 40
GT_STYLE = {"liver": "#33dd33", "tumor": "#ff3030", "linestyle": "solid"}
PRED_STYLE = {"liver": "#ffe000", "tumor": "#00e5ff", "linestyle": "dashed"}


def pick_slices(reference: np.ndarray) -> list[tuple[str, str, int]]:
    """Returns [(panel title, plane "axial"|"coronal", index)] for a (D, H, W) 0/1/2 label map."""
    liver, tumour = reference >= 1, reference == 2
    per_axial = liver.sum(axis=(1, 2))
    panels = []
    if per_axial.any():
        panels.append(("most liver", "axial", int(np.argmax(per_axial))))
    else:
        panels.append(("middle", "axial", reference.shape[0] // 2))
    per_axial_t = tumour.sum(axis=(1, 2))
    if per_axial_t.any():
        panels.append(("most tumour", "axial", int(np.argmax(per_axial_t))))
    per_coronal = liver.sum(axis=(0, 2))
    coronal = int(np.argmax(per_coronal)) if per_coronal.any() else reference.shape[1] // 2
    panels.append(("most liver", "coronal", coronal))
    return panels


def plane_slice(volume: np.ndarray, plane: str, index: int) -> np.ndarray:
    """Returns a slice of (D, H, W): axial (H, W) at depth `index`, coronal (D, W) at row `index`."""
    if plane == "axial":
        return volume[index]
    if plane == "coronal":
        return volume[:, index]
    raise ValueError(f"plane must be 'axial' or 'coronal', got {plane!r}")


def render_overlay(image: np.ndarray, spacing: Sequence[float], pred: np.ndarray | None,
                   gt: np.ndarray | None = None, title: str = "",
                   hu_window: tuple[float, float] = DISPLAY_HU, number_lesions: bool = False,
                   lesions: np.ndarray | None = None) -> Figure:
    """Returns a matplotlib Figure of CT slices (D, H, W) with prediction / truth contours.

    `number_lesions`: the prediction's lesions are numbered as in `predict --statistics`;
    `lesions`: their map when already computed (`statistics.lesion_components(pred == 2)[0]`).
    """
    reference = gt if gt is not None else pred
    if reference is None:
        raise ValueError("render_overlay needs a prediction or a ground truth")
    for name, arr in (("prediction", pred), ("ground truth", gt)):
        if arr is not None and arr.shape != image.shape:
            raise ValueError(f"{name} shape {arr.shape} differs from the image shape {image.shape}")
    sz, sy, sx = (float(s) for s in spacing)
    panels = pick_slices(reference)
    if not number_lesions or pred is None:
        lesions = None
    elif lesions is None:
        lesions = lesion_components(pred == 2)[0]
    fig = Figure(figsize=(4.0 * len(panels), 4.6), dpi=110, facecolor="black")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (label, plane, index) in zip(axes, panels, strict=True):
        aspect = sy / sx if plane == "axial" else sz / sx
        ax.imshow(plane_slice(image, plane, index), cmap="gray", vmin=hu_window[0], vmax=hu_window[1],
                  origin="lower", aspect=aspect, interpolation="nearest")
        for labels, style in ((gt, GT_STYLE), (pred, PRED_STYLE)):
            if labels is None:
                continue
            slab = plane_slice(labels, plane, index)
            for structure, mask in (("liver", slab >= 1), ("tumor", slab == 2)):
                if mask.any():
                    ax.contour(mask.astype(np.float32), levels=[0.5], colors=[style[structure]],
                               linestyles=style["linestyle"], linewidths=1.1)
        if lesions is not None:
            _number_lesions(ax, plane_slice(lesions, plane, index))
        ax.invert_xaxis()  # radiological: the patient's right (high W) on the left
        ax.set_xticks([])
        ax.set_yticks([])
        top = "A" if plane == "axial" else "S"
        for x, y, text in ((0.02, 0.5, "R"), (0.98, 0.5, "L"), (0.5, 0.97, top)):
            ax.text(x, y, text, color="white", fontsize=8, ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{plane} {index} ({label})", color="white", fontsize=9)
    handles = []
    for name, style in (("truth", GT_STYLE), ("prediction", PRED_STYLE)):
        if (gt if name == "truth" else pred) is None:
            continue
        for structure in ("liver", "tumor"):
            handles.append(Line2D([], [], color=style[structure], linestyle=style["linestyle"],
                                  label=f"{name}: {'tumour' if structure == 'tumor' else 'liver'}"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False,
               labelcolor="white")
    if title:
        fig.suptitle(title, color="white", fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.08, top=0.88, wspace=0.03)
    return fig


def _number_lesions(ax, lesion_slice: np.ndarray) -> None:
    """Writes each lesion's number at the centre of its pixels in this panel."""
    for number in np.unique(lesion_slice[lesion_slice > 0]):
        rows, cols = np.nonzero(lesion_slice == number)
        ax.text(cols.mean(), rows.mean(), str(number), color="white", fontsize=7, fontweight="bold",
                ha="center", va="center")


def save_overlay(path: str | os.PathLike, image: np.ndarray, spacing: Sequence[float],
                 pred: np.ndarray | None, gt: np.ndarray | None = None, title: str = "",
                 number_lesions: bool = False, lesions: np.ndarray | None = None) -> pathlib.Path:
    """Returns `path` after writing the `render_overlay` PNG atomically."""
    path = pathlib.Path(path)
    fig = render_overlay(image, spacing, pred, gt, title, number_lesions=number_lesions, lesions=lesions)
    with atomic_write.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", facecolor=fig.get_facecolor())
    return path


def overlay_files(image: str | os.PathLike, pred: str | os.PathLike, gt: str | os.PathLike | None,
                  out: str | os.PathLike, number_lesions: bool = False) -> pathlib.Path:
    """Returns the PNG path after rendering one case from its NIfTI files (all on the image's grid)."""
    ct, geometry = nifti.read_image(image)
    pred_labels, _ = nifti.read_label(pred, expected=geometry)
    gt_labels = nifti.read_label(gt, expected=geometry)[0] if gt is not None else None
    return save_overlay(out, ct, geometry.spacing, pred_labels, gt_labels, title=pathlib.Path(pred).name,
                        number_lesions=number_lesions)


Job = tuple[str, pathlib.Path, pathlib.Path, pathlib.Path | None, pathlib.Path]  # id, image, pred, gt, png


def _jobs(args: argparse.Namespace) -> list[Job]:
    image, pred, out = pathlib.Path(args.image), pathlib.Path(args.pred), pathlib.Path(args.output)
    if image.is_file() and pred.is_file():
        # A folder is created by the first write (atomic_path): a failed case leaves none behind.
        target = out if out.suffix.lower() == ".png" and not out.is_dir() else out / f"{case_key(pred)}.png"
        return [(case_key(pred), image, pred, pathlib.Path(args.gt) if args.gt else None, target)]
    images = {case_key(c.image): c.image for c in find_inputs(image)}
    preds = prediction_files(pred)
    truths = truth_files(args.gt) if args.gt else {}
    jobs = []
    for key, p in preds.items():
        if key not in images:
            raise DataError(f"{image}: no CT image for predicted case {key} ({p})")
        jobs.append((key, images[key], p, truths.get(key), out / f"{key}.png"))
    return jobs


def _run(argv: list[str]) -> int:
    """Runs the CLI; returns the exit status (0 ok, 1 when a case failed)."""
    p = argparse.ArgumentParser(prog="python -m livseg_jax.visualize", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--image", required=True, help="CT .nii/.nii.gz file or folder")
    p.add_argument("--pred", required=True, help="predicted label map or folder")
    p.add_argument("--gt", help="ground-truth label map or folder (optional)")
    p.add_argument("-o", "--output", required=True, help="PNG file (one case) or output folder")
    p.add_argument("--number-lesions", action="store_true",
                   help="number the predicted lesions as predict --statistics does")
    args = p.parse_args(argv)
    jobs = _jobs(args)
    for folder in sorted({out.parent for *_, out in jobs}):
        check_output_dir(folder)
    failed = 0
    for key, image, pred, gt, out in jobs:
        try:
            print(f"{key}: {overlay_files(image, pred, gt, out, args.number_lesions)}")
        except (DataError, ValueError, OSError) as e:  # one bad case must not stop the others
            report(e)
            failed += 1
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (0 ok, 1 for bad inputs, one `error:` line each)."""
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
