"""Evaluate predicted label maps against ground truth: per-case metrics, summary, lesions, tumour sizes.

    python -m livseg_jax.evaluate --pred DIR|FILE --gt DIR|FILE [--out DIR]
    python -m livseg_jax.evaluate --cv ROOT [--out DIR] [--which best|latest]

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

Cross-validation (`--cv ROOT`): ROOT holds the run directories of one k-fold training (liver or
joint runs trained with `data.num_folds`, each with its `splits.json`; every fold exactly once, all
from the same partition). Each fold's validation cases are predicted with that fold's run (the full
prediction pipeline of `livseg_jax.predict`, onto the original grid) into
`<out>/predictions/fold-<k>/`, beside `made_from.json`: the run directory and checkpoint
(sub-folder, step and the checkpoint folder's modification time) the fold's label maps come from,
written before the first of them. A label map already there is read instead of predicted again only
when that record names the checkpoint the fold's run gives now; otherwise (other runs, --which,
a retrained run, or no record) the folder's label maps are deleted and predicted again, with a
line on stderr saying why. They are evaluated against the cases' labels as above:
`cv_evaluation.csv` (one row per case, with its fold) and `cv_evaluation.json` (per-fold and pooled
summaries, the mean of the fold means, rows) in `<out>` (default `ROOT/cv`). Liver runs report
the liver only.
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
from livseg_jax.cli_errors import CliError, check_output_dir, run_main
from livseg_jax.data import nifti
from livseg_jax.data.cases import is_nifti_file, natural_key, output_name
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
                  min_overlap: float = 0.0, value_map=None) -> dict[str, Any]:
    """Returns one case's record: liver and tumour `binary_metrics`, lesion counts, tumour-size row.

    `value_map` remaps the ground truth's values as training does (a dataset's `CaseFiles.label_map`)."""
    truth, geometry = nifti.read_label(gt_path, value_map=value_map)
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


def csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """Returns `rows` as CSV text (the first row's keys as header; NaN as an empty cell)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    return buffer.getvalue()


def write_outputs(out_dir: str | os.PathLike, cases: Sequence[Mapping[str, Any]],
                  summary: Mapping[str, Any],
                  unmatched: Sequence[str] = ()) -> tuple[pathlib.Path, pathlib.Path]:
    """Returns the paths of evaluation.csv and evaluation.json after writing them atomically."""
    out_dir = pathlib.Path(out_dir)
    rows = csv_rows(cases)
    csv_path, json_path = out_dir / "evaluation.csv", out_dir / "evaluation.json"
    atomic_write.write_text(csv_path, csv_text(rows))
    report = {"cases": cases, "summary": summary, "ground_truth_without_prediction": list(unmatched)}
    atomic_write.write_text(json_path, json.dumps(jsonable(report), indent=1) + "\n")
    return csv_path, json_path


# ------------------------------------------------------------------------------ cross-validation

CV_PREDICTIONS = "predictions"
CV_SOURCE = "made_from.json"  # in each fold's prediction folder: the checkpoint its label maps come from
CV_STAGES = {"liver": ("liver",), "joint": STRUCTURES}  # stage of the fold runs -> structures scored


def fold_runs(root: str | os.PathLike) -> list[tuple[int, pathlib.Path, dict[str, Any]]]:
    """Returns [(fold, run directory, split)] of the fold runs in `root`, sorted by fold.

    Raises DataError naming the run when the runs do not make one k-fold partition: not fold runs,
    other folds (cases or seed), a fold given twice or missing.
    """
    from livseg_jax.data.folds import SPLITS_FILE, read_split

    root = pathlib.Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder of fold run directories")
    runs = sorted((p for p in root.iterdir() if (p / SPLITS_FILE).is_file()), key=lambda p: natural_key(p.name))
    if not runs:
        raise DataError(f"{root}: holds no fold run directories (folders with {SPLITS_FILE}, written by "
                        "`livseg_jax.train --config.data.num_folds=K --config.data.fold=k`)")
    found: dict[int, tuple[pathlib.Path, dict[str, Any]]] = {}
    for run in runs:
        split = read_split(run)
        if int(split["num_folds"]) < 2:
            raise DataError(f"{run / SPLITS_FILE}: not a fold run (num_folds {split['num_folds']}: trained "
                            "without data.num_folds)")
        first_run, first = found[min(found)] if found else (run, split)
        if split.get("folds") != first.get("folds"):
            raise DataError(f"{run / SPLITS_FILE}: its folds differ from those of {first_run} (other cases, "
                            "num_folds or seed); the runs of one cross-validation share one partition")
        fold = int(split["fold"])
        if fold in found:
            raise DataError(f"{run}: fold {fold} is already given by {found[fold][0]}")
        found[fold] = (run, split)
    num_folds = int(next(iter(found.values()))[1]["num_folds"])
    missing = [k for k in range(num_folds) if k not in found]
    if missing:
        raise DataError(f"{root}: fold(s) {', '.join(map(str, missing))} of {num_folds} have no run directory")
    return [(k, *found[k]) for k in sorted(found)]


def checkpoint_source(run: pathlib.Path, which: str) -> dict[str, Any]:
    """Returns what predictions made with a run's `which` checkpoint come from: the run directory
    (resolved), the checkpoint's sub-folder and step, and that folder's modification time (a run
    retrained from scratch reaches the same step with other weights)."""
    from livseg_jax.run_dir import checkpoint_step

    sub, step = checkpoint_step(run, which)
    return {"run": str(pathlib.Path(run).resolve()), "checkpoint": f"{sub}/{step}",
            "step": int(step), "checkpoint_mtime_ns": (pathlib.Path(run) / sub / str(step)).stat().st_mtime_ns}


def _recorded_source(folder: pathlib.Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / CV_SOURCE).read_text())
    except (OSError, ValueError):
        return None  # absent or damaged: the folder's label maps are of unknown origin


def reset_stale_predictions(folder: pathlib.Path, source: Mapping[str, Any], fold: int) -> None:
    """Deletes the fold folder's label maps unless its `made_from.json` records `source`, then records it.

    The record is written before any prediction, so every label map in the folder was made from
    the checkpoint it names (a run stopped half way resumes with the same checkpoint)."""
    recorded = _recorded_source(folder)
    if recorded == dict(source):
        return
    stale = [p for p in folder.iterdir() if is_nifti_file(p)] if folder.is_dir() else []
    if stale:
        made_from = (f"{recorded.get('run')} ({recorded.get('checkpoint')})" if isinstance(recorded, dict)
                     else f"unrecorded checkpoints (no readable {CV_SOURCE})")
        print(f"fold {fold}: the {len(stale)} label map(s) in {folder} were made from {made_from}, not "
              f"{source['run']} ({source['checkpoint']}): predicting again", file=sys.stderr)
    (folder / CV_SOURCE).unlink(missing_ok=True)  # first: an interrupted reset leaves no false record
    for path in stale:
        path.unlink()
    atomic_write.write_json(folder / CV_SOURCE, dict(source))


def predict_fold(run: pathlib.Path, split: Mapping[str, Any], folder: pathlib.Path,
                 which: str = "best", fold: int = 0) -> list[tuple[str, pathlib.Path, pathlib.Path, Any]]:
    """Returns [(case id, prediction, truth, the truth's label_map)] of a fold's validation cases,
    predicting those not in `folder` yet (all of them when its label maps came from another
    checkpoint: `reset_stale_predictions`)."""
    from livseg_jax.inference.two_stage import Predictor
    from livseg_jax.run_dir import load_config
    from livseg_jax.training.loop import dataset_cases

    config = load_config(run)
    if config.stage not in CV_STAGES:
        raise DataError(f"{run}: is a {config.stage!r} run; --cv takes liver or joint fold runs (a tumour "
                        "model needs a liver stage in front of it: predict with `predict --liver ... --tumor "
                        "...` and evaluate with --pred/--gt)")
    cases = {c.case_id: c for c in dataset_cases(config)}
    missing = [c for c in split["val"] if c not in cases or cases[c].label is None]
    if missing:
        raise DataError(f"{run}: validation case(s) {', '.join(missing)} of splits.json have no labelled case "
                        "in the run's dataset (config.json data.root / list_file)")
    reset_stale_predictions(folder, checkpoint_source(run, which), fold)
    predictor = None
    pairs = []
    for cid in split["val"]:
        out = folder / output_name(cid)
        if not out.exists():
            if predictor is None:  # compiled only when a case needs predicting
                paths = {"liver_path": run} if config.stage == "liver" else {"joint_path": run}
                predictor = Predictor.from_checkpoints(**paths, which=which)
            predictor.predict_file(cases[cid].image, out)
        pairs.append((cid, out, cases[cid].label, cases[cid].label_map))
    return pairs


def _scored(summary: Mapping[str, Any], structures: Sequence[str]) -> dict[str, Any]:
    """Returns a `summarize_cases` summary without the parts of structures the runs do not predict."""
    return {k: v for k, v in summary.items() if k in structures or ("tumor" in structures and k not in STRUCTURES)}


def _mean_of_defined(values: Sequence[float | None]) -> float | None:
    defined = [float(v) for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(defined)) if defined else None


def cv_report(root: str | os.PathLike, stage: str, folds: Sequence[tuple[int, pathlib.Path, Sequence[Mapping]]],
              threshold: float = 0.6) -> dict[str, Any]:
    """Returns the cross-validation record: per-fold and pooled summaries, the mean of the fold means, cases."""
    structures = CV_STAGES[stage]
    per_fold = [{"fold": k, "run": str(run), "case_ids": [c["case_id"] for c in cases],
                 "summary": _scored(summarize_cases(cases, threshold), structures)} for k, run, cases in folds]
    pooled = [dict(c, fold=k) for k, _, cases in folds for c in cases]
    fold_means = {s: {m: _mean_of_defined([f["summary"][s][m]["mean"] for f in per_fold])
                      for m in metrics.METRIC_NAMES} for s in structures}
    return {"root": str(root), "stage": stage, "structures": list(structures), "num_folds": len(folds),
            "folds": per_fold, "pooled": _scored(summarize_cases(pooled, threshold), structures),
            "mean_of_fold_means": fold_means, "cases": pooled}


def write_cv_outputs(out_dir: pathlib.Path, report: Mapping[str, Any]) -> tuple[pathlib.Path, pathlib.Path]:
    """Returns the paths of cv_evaluation.csv and cv_evaluation.json after writing them atomically."""
    keep = tuple(f"{s}_" for s in report["structures"]) + (("lesions_",) if "tumor" in report["structures"] else ())
    rows = [{"fold": c["fold"], **{k: v for k, v in row.items() if k == "case_id" or k.startswith(keep)}}
            for c, row in zip(report["cases"], csv_rows(report["cases"]), strict=True)]
    csv_path, json_path = out_dir / "cv_evaluation.csv", out_dir / "cv_evaluation.json"
    atomic_write.write_text(csv_path, csv_text(rows))
    atomic_write.write_text(json_path, json.dumps(jsonable(report), indent=1) + "\n")
    return csv_path, json_path


def cv_markdown(report: Mapping[str, Any]) -> str:
    """Returns the per-fold and pooled mean ± std Dice of each scored structure as a Markdown table."""
    structures = report["structures"]
    titles = {"liver": "liver Dice", "tumor": "tumour Dice"}
    lines = ["| fold | run | cases | " + " | ".join(titles[s] for s in structures) + " |",
             "|---" * (3 + len(structures)) + "|"]
    for f in report["folds"]:
        lines.append(f"| {f['fold']} | {f['run']} | {len(f['case_ids'])} | "
                     + " | ".join(_mean_std(f["summary"][s]["dice"], 3) for s in structures) + " |")
    lines.append(f"| pooled | | {len(report['cases'])} | "
                 + " | ".join(_mean_std(report["pooled"][s]["dice"], 3) for s in structures) + " |")
    return "\n".join(lines)


def _run_cv(args: argparse.Namespace) -> int:
    root = pathlib.Path(args.cv)
    folds = fold_runs(root)
    out_dir = pathlib.Path(args.out) if args.out else root / "cv"
    check_output_dir(out_dir)
    from livseg_jax.run_dir import load_config

    stages = {str(load_config(run).stage) for _, run, _ in folds}
    if len(stages) != 1:
        raise DataError(f"{root}: the fold runs are of different stages ({', '.join(sorted(stages))})")
    scored = []
    for k, run, split in folds:
        folder = out_dir / CV_PREDICTIONS / f"fold-{k}"
        pairs = predict_fold(run, split, folder, args.which, k)
        cases = [evaluate_case(cid, p, g, args.connectivity, args.min_overlap, value_map)
                 for cid, p, g, value_map in tqdm.tqdm(pairs, desc=f"evaluate fold {k}", unit="case", disable=None,
                                            file=sys.stderr)]
        scored.append((k, run, cases))
    report = cv_report(root, stages.pop(), scored, args.size_threshold)
    csv_path, json_path = write_cv_outputs(out_dir, report)
    print(cv_markdown(report))
    print(f"\nwrote {csv_path} and {json_path}")
    return 0


# ----------------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m livseg_jax.evaluate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--pred", help="predicted label map or folder of them")
    p.add_argument("--gt", help="ground-truth label map or folder (LiTS, MSD or plain)")
    p.add_argument("--cv", metavar="ROOT", help="folder of fold run directories: cross-validation metrics "
                                                "over the folds' validation cases (instead of --pred/--gt)")
    p.add_argument("--which", choices=("best", "latest"), default="best",
                   help="--cv: checkpoint of each fold run (default: best)")
    p.add_argument("--out", help="folder for evaluation.csv and .json (default: the prediction folder; "
                                 "with --cv: ROOT/cv)")
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
    if args.cv is not None:
        if args.pred is not None or args.gt is not None:
            raise CliError(None, "--cv cannot be used with --pred/--gt: it predicts the folds' validation cases itself")
        return _run_cv(args)
    if args.pred is None or args.gt is None:
        raise CliError(None, "give --pred and --gt, or --cv ROOT")
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
