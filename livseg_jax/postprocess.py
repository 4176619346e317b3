"""Choose a run's tumour post-processing on validation cases and store it in the run directory.

    python -m livseg_jax.postprocess --run TUMOR_RUN [--liver LIVER_RUN] [--cases DIR|LIST_FILE]
    python -m livseg_jax.postprocess --run JOINT_RUN [--cases DIR|LIST_FILE]

Predicts the validation cases with the run's model (one sliding window per case, probabilities
kept), grid-searches the tumour probability threshold (`none` = argmax) and the minimum lesion
volume (mm^3), and writes the best to RUN/postprocess.json atomically, with every grid point's
scores; `livseg_jax.predict` then applies it (`--no-postprocess` to predict without it).

Objective: mean tumour Dice over the cases minus `--fp-penalty` (default 0.01) times the mean
number of false-positive lesions per case (predicted components touching no true tumour;
26-neighbourhood); ties keep the gentler setting. Scores are computed on the tumour model's grid,
where prediction applies the post-processing.

Cases: `--cases` is a labelled dataset folder (LiTS or Decathlon layout) or a list file
(`image label` per line); by default the run's own validation cases (the last
`data.num_val_cases` of its `data.root` / `data.list_file`, or of its synthetic set). Tumour runs
crop around the liver as prediction does: the stage-1 liver of `--liver`, or without it the
ground-truth liver (the crops the tumour model was trained on).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import tqdm

from livseg_jax.cli_errors import run_main
from livseg_jax.data import nifti
from livseg_jax.data.layouts import CaseFiles, discover
from livseg_jax.data.nifti import DataError
from livseg_jax.data.preprocess import preprocess, restore
from livseg_jax.data.regions import largest_component
from livseg_jax.data.stages import liver_crop_box
from livseg_jax.inference import postprocess as pp
from livseg_jax.inference.two_stage import StageModel, load_stage_model, stage_mask, stage_probabilities
from livseg_jax.run_dir import load_config

OBJECTIVE = "mean tumour Dice - fp_penalty x mean false-positive lesions per case"


def validation_files(run: str | os.PathLike, cases: str | os.PathLike | None) -> list[CaseFiles]:
    """Returns the labelled cases to choose on: `cases` (folder or list file), else the run's validation split."""
    if cases is not None:
        path = pathlib.Path(cases)
        found = discover("", "list", path) if path.is_file() else discover(path)
    else:
        from livseg_jax.training.loop import split_case_files  # the training run's own split

        config = load_config(run)
        n_val = int(config.data.num_val_cases)
        if n_val <= 0 and not config.data.get("num_folds", 0):
            raise ValueError(f"{run}: the run has no validation cases (data.num_val_cases = {n_val}); "
                             "give --cases")
        found = split_case_files(config)[1]
    unlabelled = [c.case_id for c in found if c.label is None]
    if unlabelled:
        raise DataError(f"{cases or run}: validation cases need labels; none for {', '.join(unlabelled)}")
    if not found:
        raise DataError(f"{cases or run}: no validation cases")
    return found


def validation_case(case_id: str, image: np.ndarray, label: np.ndarray, spacing, model: StageModel,
                    liver: StageModel | None = None, connectivity: int = 1) -> pp.ValidationCase:
    """Returns the `ValidationCase` of one labelled (D, H, W) volume: the model's probabilities on its grid.

    Tumour models see the liver's box (grown by their margin) as in prediction, from the stage-1
    `liver` model or else the ground truth, and their tumour may lie only in that liver; joint
    models see the whole volume, their tumour kept in the largest liver component.
    """
    if model.stage not in ("tumor", "joint"):
        raise ValueError(f"post-processing is chosen for a tumour or joint run, got a {model.stage!r} model")
    m_image, m_label, record = preprocess(image, spacing, model.preprocessing, label)
    if model.stage == "joint":
        probs = stage_probabilities(model, m_image)
        region = largest_component(np.argmax(probs, axis=-1) >= 1, connectivity)
        return pp.ValidationCase(case_id, probs, m_label == 2, record.spacing, region)
    if liver is None:
        region = m_label >= 1
    else:
        l_image, _, l_record = preprocess(image, spacing, liver.preprocessing)
        found = restore(largest_component(stage_mask(liver, l_image), connectivity).astype(np.uint8), l_record)
        region = preprocess(image, spacing, model.preprocessing, found)[1] >= 1
    probs = np.zeros((*record.shape, model.num_classes), np.float32)
    probs[..., 0] = 1.0  # outside the crop: background
    box = liver_crop_box(region, record.spacing, model.liver_margin_mm)
    if box is not None:
        probs[box] = stage_probabilities(model, np.ascontiguousarray(m_image[box]))
    return pp.ValidationCase(case_id, probs, m_label == 2, record.spacing, region)


def choose_for_run(run: str | os.PathLike, files: Sequence[CaseFiles], liver_run: str | os.PathLike | None = None,
                   which: str = "best", thresholds=pp.DEFAULT_THRESHOLDS, min_volumes=pp.DEFAULT_MIN_VOLUMES_MM3,
                   fp_penalty: float = pp.DEFAULT_FP_PENALTY, progress: bool = True
                   ) -> tuple[pp.PostprocessSettings, dict[str, Any]]:
    """Returns (chosen settings, the record for postprocess.json) for a tumour or joint run on labelled cases."""
    model = load_stage_model(run, which=which, postprocess=False)
    if model.stage not in ("tumor", "joint"):
        raise ValueError(f"{run}: is a {model.stage!r} run; post-processing is chosen for a tumour or joint run")
    if model.stage == "joint" and liver_run is not None:
        raise ValueError("--liver is for tumour runs; a joint run finds its own liver")
    liver = load_stage_model(liver_run, "liver", which=which) if liver_run is not None else None
    cases = []
    for files_ in tqdm.tqdm(files, desc="validation cases", unit="case", disable=not progress):
        case = nifti.read_case(files_.image, files_.label, files_.case_id, value_map=files_.label_map)
        cases.append(validation_case(case.case_id, case.image, case.label, case.spacing, model, liver))
    settings, rows = pp.choose_settings(cases, thresholds, min_volumes, fp_penalty)
    chosen = next(r for r in rows if (r["tumor_threshold"], r["tumor_min_volume_mm3"])
                  == (settings.tumor_threshold, settings.tumor_min_volume_mm3))
    record = {"objective": OBJECTIVE, "fp_penalty": fp_penalty, "which": which,
              "cases": [c.case_id for c in cases],
              "liver_source": str(liver_run) if liver_run is not None else (
                  "ground truth" if model.stage == "tumor" else "the joint model"),
              "chosen": chosen, "without_postprocessing": rows[0] if rows[0]["tumor_threshold"] is None and
              rows[0]["tumor_min_volume_mm3"] == 0 else None, "grid": rows}
    return settings, record


def _grid(text: str, name: str, allow_none: bool) -> list:
    values = []
    for part in text.split(","):
        part = part.strip()
        if allow_none and part.lower() == "none":
            values.append(None)
            continue
        try:
            values.append(float(part))
        except ValueError:
            raise ValueError(f"{name}: {part!r} is not a number{' or none' if allow_none else ''}") from None
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m livseg_jax.postprocess", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--run", required=True, help="tumour or joint run directory (postprocess.json goes here)")
    p.add_argument("--liver", help="liver run for the tumour crops (default: the ground-truth liver)")
    p.add_argument("--cases", help="labelled validation folder or list file (default: the run's validation cases)")
    p.add_argument("--which", choices=("best", "latest"), default="best", help="checkpoint (default: best)")
    p.add_argument("--thresholds", default=",".join("none" if t is None else str(t) for t in pp.DEFAULT_THRESHOLDS),
                   help="tumour probability thresholds, 'none' = argmax (default: %(default)s)")
    p.add_argument("--min-volumes", default=",".join(str(v) for v in pp.DEFAULT_MIN_VOLUMES_MM3),
                   help="minimum lesion volumes in mm^3 (default: %(default)s)")
    p.add_argument("--fp-penalty", type=float, default=pp.DEFAULT_FP_PENALTY,
                   help="objective cost of one false-positive lesion per case (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="print the choice, write nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (0 ok, 1 for bad inputs, one `error:` line)."""
    return run_main(_run, argv)


def _run(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    thresholds = _grid(args.thresholds, "--thresholds", allow_none=True)
    min_volumes = _grid(args.min_volumes, "--min-volumes", allow_none=False)
    files = validation_files(args.run, args.cases)
    settings, record = choose_for_run(args.run, files, args.liver, args.which, thresholds, min_volumes,
                                      args.fp_penalty, progress=not args.no_progress)
    base, chosen = record["without_postprocessing"], record["chosen"]
    if base is not None:
        print(f"without post-processing: tumour Dice {base['dice']:.4f}, "
              f"{base['false_positive_lesions']:.1f} false-positive lesions per case")
    print(f"chosen on {len(files)} case(s): threshold {settings.tumor_threshold}, minimum volume "
          f"{settings.tumor_min_volume_mm3:g} mm^3: tumour Dice {chosen['dice']:.4f}, "
          f"{chosen['false_positive_lesions']:.1f} false-positive lesions per case")
    if not args.dry_run:
        print(f"wrote {pp.write_settings(args.run, settings, record)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
