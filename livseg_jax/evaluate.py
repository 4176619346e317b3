"""Evaluate predicted label maps against ground truth: per-case metrics, summary, lesions, tumour sizes.

    python -m livseg_jax.evaluate --pred DIR|FILE --gt DIR|FILE [--out DIR]

Cases are paired by id: `segmentation-N` / `volume-N` are case `volume-N` (LiTS); other files
drop `.nii[.gz]` and a trailing `_seg` (what `livseg_jax.predict` appends). The ground truth may be
a LiTS folder (its `segmentation-N` files), a Medical Segmentation Decathlon folder (`labelsTr`), or
a folder of label files. A prediction without ground truth is an error; ground truth without a
prediction is reported and left out.

Liver = label >= 1, tumour = label == 2; the voxel spacing comes from the ground truth's header and
the prediction must lie on the same grid (shape and affine). Metrics are those of SPEC §3
(`livseg_jax.metrics`, edge cases in docs/metrics.md). Writes `evaluation.csv` (one row per case)
and `evaluation.json` (rows, summary, lesion detection, tumour-size study) to `--out` (default:
the prediction folder) atomically, and prints the tables as Markdown. The output folder is checked
before any metric is computed; bad inputs end in one `error:` line naming the file.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tqdm

from livseg_jax import atomic_write, metrics
from livseg_jax.cli_errors import check_output_dir, run_main
from livseg_jax.data import nifti
from livseg_jax.data.layouts import prediction_files, truth_files
from livseg_jax.data.nifti import DataError

STRUCTURES = ("liver", "tumor")
COUNT_KEYS = ("n_pred", "n_truth", "n_intersection")
LESION_KEYS = ("n_true", "n_hit", "n_missed", "n_pred", "n_false_positive")


# ------------------------------------------------------------------------------------ pairing


Pair = tuple[str, pathlib.Path, pathlib.Path]  # (case id, prediction, ground truth)


def pair_cases(pred: str | os.PathLike, gt: str | os.PathLike) -> tuple[list[Pair], list[str]]:
    """Returns ([(case id, prediction, truth)], case ids with truth but no prediction)."""
    preds, truths = prediction_files(pred), truth_files(gt)
    if pathlib.Path(pred).is_file() and pathlib.Path(gt).is_file():
        (key,) = preds
        return [(key, preds[key], next(iter(truths.values())))], []
    missing = [k for k in preds if k not in truths]
    if missing:
        raise DataError(f"{gt}: no ground truth for predicted case(s) {', '.join(missing)} "
                        f"(prediction {preds[missing[0]]})")
    pairs = [(k, preds[k], truths[k]) for k in preds]
    return pairs, [k for k in truths if k not in preds]


# ------------------------------------------------------------------------------------ metrics


def evaluate_case(case_id: str, pred_path: str | os.PathLike, gt_path: str | os.PathLike,
                  connectivity: int = metrics.DEFAULT_LESION_CONNECTIVITY,
                  min_overlap: float = 0.0) -> dict[str, Any]:
    """Returns one case's record: liver and tumour `binary_metrics`, lesion counts, tumour-size row."""
    truth, geometry = nifti.read_label(gt_path)
    pred, _ = nifti.read_label(pred_path, expected=geometry)
    spacing = geometry.spacing
    liver = metrics.binary_metrics(pred >= 1, truth >= 1, spacing)
    pred_t, truth_t = pred == 2, truth == 2
    tumor = metrics.binary_metrics(pred_t, truth_t, spacing)
    lesions = metrics.lesion_detection(pred_t, truth_t, spacing, connectivity, min_overlap)
    size = metrics.tumor_size_row(case_id, pred_t, truth_t, spacing, connectivity)
    return {
        "case_id": case_id,
        "pred": str(pred_path),
        "gt": str(gt_path),
        "shape": list(geometry.shape_dhw),
        "spacing_mm": [float(s) for s in spacing],
        "liver": liver,
        "tumor": tumor,
        "lesions": {k: lesions[k] for k in LESION_KEYS},
        "tumor_size": size,
    }


def summarize_cases(cases: Sequence[Mapping[str, Any]], threshold: float = 0.6) -> dict[str, Any]:
    """Returns {liver, tumor} summaries (mean ± std, global Dice), lesion totals and the size study."""
    out: dict[str, Any] = {s: metrics.summarize([c[s] for c in cases]) for s in STRUCTURES}
    out["lesions"] = {k: int(sum(c["lesions"][k] for c in cases)) for k in LESION_KEYS}
    out["tumor_size"] = metrics.tumor_size_groups([c["tumor_size"] for c in cases], threshold)
    return out


def csv_rows(cases: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Returns flat per-case rows: case_id, <structure>_<metric>, voxel counts, lesion counts."""
    rows = []
    for c in cases:
        row: dict[str, Any] = {"case_id": c["case_id"]}
        for s in STRUCTURES:
            for k in (*metrics.METRIC_NAMES, *COUNT_KEYS):
                row[f"{s}_{k}"] = c[s][k]
        for k in LESION_KEYS:
            row[f"lesions_{k}"] = c["lesions"][k]
        row["tumor_mean_major_axis_mm"] = c["tumor_size"]["mean_major_axis_mm"]
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------- formatting


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _mean_std(entry: Mapping[str, Any], digits: int) -> str:
    text = f"{_fmt(entry['mean'], digits)} ± {_fmt(entry['std'], digits)}"
    return text + (f" ({entry['n_undefined']} n/a)" if entry["n_undefined"] else "")


_HEADINGS = {"dice": "Dice", "iou": "IoU", "precision": "precision", "recall": "recall", "rvd": "RVD",
             "asd": "ASD mm", "hd95": "HD95 mm"}


def markdown_report(cases: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> str:
    """Returns the per-case tables, the summary, lesion detection and tumour-size tables as Markdown."""
    names = metrics.METRIC_NAMES
    lines = []
    for s, title in (("liver", "Liver"), ("tumor", "Tumour")):
        extra = " | lesions hit / true | false-positive lesions" if s == "tumor" else ""
        lines += [f"### {title}, per case", "",
                  "| case | " + " | ".join(_HEADINGS[k] for k in names) + extra + " |",
                  "|---" * (len(names) + 1 + (2 if extra else 0)) + "|"]
        for c in cases:
            cells = [c["case_id"], *(_fmt(c[s][k], 2 if k in ("asd", "hd95") else 3) for k in names)]
            if extra:
                les = c["lesions"]
                cells += [f"{les['n_hit']} / {les['n_true']}", str(les["n_false_positive"])]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    n = summary["liver"]["n_cases"]
    lines += [f"### Summary (mean ± std over {n} case{'s' if n != 1 else ''})", "",
              "| metric | liver | tumour |", "|---|---|---|"]
    for k in names:
        digits = 2 if k in ("asd", "hd95") else 3
        lines.append(f"| {_HEADINGS[k]} | {_mean_std(summary['liver'][k], digits)} | "
                     f"{_mean_std(summary['tumor'][k], digits)} |")
    lines.append(f"| global Dice | {_fmt(summary['liver'].get('global_dice'))} | "
                 f"{_fmt(summary['tumor'].get('global_dice'))} |")
    les = summary["lesions"]
    lines += ["", "### Lesion detection (all cases)", "",
              "| true lesions | hit | missed | predicted components | false positives |",
              "|---|---|---|---|---|",
              f"| {les['n_true']} | {les['n_hit']} | {les['n_missed']} | {les['n_pred']} | "
              f"{les['n_false_positive']} |", "",
              f"### Tumour size by tumour Dice (cases without tumour left out: "
              f"{summary['tumor_size']['n_cases_without_tumor']})", "",
              "| group | cases | tumours | mean major axis (mm) |", "|---|---|---|---|"]
    for name, g in summary["tumor_size"]["groups"].items():
        lines.append(f"| {name} | {g['n_cases']} | {g['n_tumors']} | "
                     f"{_fmt(g['mean_major_axis_mm'], 2)} ± {_fmt(g['std_major_axis_mm'], 2)} |")
    return "\n".join(lines)


def jsonable(obj: Any) -> Any:
    """Returns `obj` with NaN / infinite floats as None and numpy scalars as Python numbers."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_outputs(out_dir: str | os.PathLike, cases: Sequence[Mapping[str, Any]],
                  summary: Mapping[str, Any],
                  unmatched: Sequence[str] = ()) -> tuple[pathlib.Path, pathlib.Path]:
    """Returns the paths of evaluation.csv and evaluation.json after writing them atomically."""
    out_dir = pathlib.Path(out_dir)
    rows = csv_rows(cases)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    csv_path, json_path = out_dir / "evaluation.csv", out_dir / "evaluation.json"
    atomic_write.write_text(csv_path, buffer.getvalue())
    report = {"cases": cases, "summary": summary, "ground_truth_without_prediction": list(unmatched)}
    atomic_write.write_text(json_path, json.dumps(jsonable(report), indent=1) + "\n")
    return csv_path, json_path


# ----------------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m livseg_jax.evaluate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--pred", required=True, help="predicted label map or folder of them")
    p.add_argument("--gt", required=True, help="ground-truth label map or folder (LiTS, MSD or plain)")
    p.add_argument("--out", help="folder for evaluation.csv and .json (default: the prediction folder)")
    p.add_argument("--connectivity", type=int, choices=(1, 2, 3), default=metrics.DEFAULT_LESION_CONNECTIVITY,
                   help="lesion connectivity: 1 faces, 2 +edges, 3 +corners (default 3)")
    p.add_argument("--min-overlap", type=float, default=0.0,
                   help="fraction of a true lesion to cover for a hit (default 0: any voxel)")
    p.add_argument("--size-threshold", type=float, default=0.6,
                   help="tumour Dice separating the two groups of the tumour-size table (default 0.6)")
    return p.parse_args(argv)


def _run(argv: list[str]) -> int:
    """Runs the CLI; returns the exit status (0 ok)."""
    args = parse_args(argv)
    pred = pathlib.Path(args.pred)
    out_dir = pathlib.Path(args.out) if args.out else (pred if pred.is_dir() else pred.parent)
    check_output_dir(out_dir)  # before any metric is computed
    pairs, unmatched = pair_cases(args.pred, args.gt)
    progress = tqdm.tqdm(pairs, desc="evaluate", unit="case", disable=None, file=sys.stderr)
    cases = [evaluate_case(k, p, g, args.connectivity, args.min_overlap) for k, p, g in progress]
    for key in unmatched:
        print(f"warning: case {key} has ground truth but no prediction; left out", file=sys.stderr)
    summary = summarize_cases(cases, args.size_threshold)
    csv_path, json_path = write_outputs(out_dir, cases, summary, unmatched)
    print(markdown_report(cases, summary))
    print(f"\nwrote {csv_path} and {json_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (0 ok, 1 for bad inputs, one `error:` line)."""
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
