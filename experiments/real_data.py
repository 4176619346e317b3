"""Real-data benchmark (issue 17): both stages trained on real CT, leave-one-out, four recipes compared.

    python -m experiments.real_data [--data ../shared/data] [--arms a,b,c,d] [--folds all] [--jobs 3]
    python -m experiments.real_data --prepare-only     # the cases as NIfTI under WORKDIR/cases (pydicom)
    python -m experiments.real_data --table            # docs/real_data.md's table from the JSON
    python -m experiments.real_data --smoke            # tiny, CPU, minutes: proves the script end to end

Cases: the three of `../shared/data` (README there): 3D-IRCADb 1.17 (DICOM zips, converted by
`livseg_jax.data.ircadb`), the LiTS 117 crop and the TotalSegmentator example (liver only, 3 mm).
Each fold holds one case out, trains the liver and the tumour stage on the others (no validation
split: there are two), and predicts the held-out case on its original grid. Arms:

  a  the paper: in-plane factor 2, slices kept; flips, 90-degree rotations, intensity scale/shift
  b  (a) with every case resampled to --target-spacing (preprocess.spacing_mode = "target")
  c  (b) with the full device augmentation (--augment-override, default data.augment.device=True;
     refused until that key exists in the config)
  d  (c)'s models with tumour post-processing chosen on the fold's training cases
     (`livseg_jax.postprocess`; the choice sees the cases the models were trained on, so it is
     optimistic about how much they miss and over-confident about their lesions)

Reported per held-out case: liver and tumour Dice and ASD (mm), true lesions hit / missed and
false-positive lesions (26-connected components, `livseg_jax.metrics`), training and prediction
seconds. Results: one part file per (arm, fold) under WORKDIR/parts, merged after each into
experiments/results/real_data.json (atomically); a rerun skips finished parts and resumes a
training from its last checkpoint, so a run cut at a command's time limit continues where it
stopped. `--jobs N` trains N folds at once in separate processes (their compiles overlap; each
takes 1/N of the GPU's memory).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import time
from typing import Any

import numpy as np

from experiments.bench_common import REPO, RESULTS, environment, parse_value
from livseg_jax.atomic_write import write_json, write_text

ARMS = {
    "a": "paper preprocessing (in-plane factor 2) + paper augmentation",
    "b": "target spacing + paper augmentation",
    "c": "target spacing + full device augmentation",
    "d": "(c) + tumour post-processing chosen on the training cases",
}
TRAINED_ARM = {"a": "a", "b": "b", "c": "c", "d": "c"}  # d predicts with c's models
DEFAULT_AUGMENT_OVERRIDE = "data.augment.device=True"
STAGES = ("liver", "tumor")
DOC = REPO / "docs" / "real_data.md"
TABLE_BEGIN, TABLE_END = "<!-- real_data table: begin -->", "<!-- real_data table: end -->"
# Rough H200 costs for the first estimate (docs/benchmarks.md: a 48x256x256 float32 step of the
# paper network ~95 ms; the tumour patch has a quarter of the voxels); replaced by measurements
# as trainings finish.
GUESS_STEP_S = {"liver": 0.095, "tumor": 0.035}
GUESS_COLD_COMPILE_S = 120.0  # per train-step program not in the compilation cache (docs: 90-150 s)
GUESS_OVERHEAD_S = 30.0  # per training: data, compilation read back from the cache, checkpoints
GUESS_PREDICT_S = 30.0  # per held-out case and arm, window programs included


# ------------------------------------------------------------------------------------ cases


def prepare_cases(data: pathlib.Path, cases_dir: pathlib.Path) -> dict[str, tuple[pathlib.Path, pathlib.Path]]:
    """Returns {case id: (image, label)} of the benchmark's cases as NIfTI in `cases_dir` (made once)."""
    cases_dir.mkdir(parents=True, exist_ok=True)
    out = {}

    def add(name, image, label):
        dst_image, dst_label = cases_dir / f"{name}.nii.gz", cases_dir / f"{name}_label.nii.gz"
        if not (dst_image.exists() and dst_label.exists()):
            for src, dst in ((image, dst_image), (label, dst_label)):
                if not pathlib.Path(src).is_file():
                    raise SystemExit(f"{src}: missing (see {data}/README.md)")
                shutil.copyfile(src, dst.with_suffix(".tmp"))
                os.replace(dst.with_suffix(".tmp"), dst)
        out[name] = (dst_image, dst_label)

    for patient in sorted((data / "3Dircadb1").glob("3Dircadb1.*")):
        name = f"ircad-{patient.name.removeprefix('3Dircadb')}"
        if not (cases_dir / f"{name}.nii.gz").exists():
            from livseg_jax.data.ircadb import import_patient  # pydicom only when converting

            tmp = cases_dir / f".{name}"
            number = int(patient.name.rsplit(".", 1)[1])
            print(import_patient(patient, tmp, number).summary())
            add(name, tmp / f"volume-{number}.nii.gz", tmp / f"segmentation-{number}.nii.gz")
            shutil.rmtree(tmp)
        else:
            add(name, cases_dir / f"{name}.nii.gz", cases_dir / f"{name}_label.nii.gz")
    for volume in sorted((data / "lits-sample").glob("volume-*.nii*")):
        number = volume.name.split("-")[1].split(".")[0]
        add(f"lits-{number}", volume, volume.with_name(volume.name.replace("volume", "segmentation")))
    ts = data / "totalsegmentator-example"
    if (ts / "example_ct_sm.nii.gz").exists():
        add("totalseg-example", ts / "example_ct_sm.nii.gz", ts / "example_ct_sm_liver.nii.gz")
    if not data.is_dir():  # a machine without the data folder: the cases prepared and carried here
        for label in sorted(cases_dir.glob("*_label.nii.gz")):
            name = label.name.removesuffix("_label.nii.gz")
            add(name, cases_dir / f"{name}.nii.gz", label)
    if len(out) < 2:
        raise SystemExit(f"{data}: found {len(out)} case(s); leave-one-out needs at least 2")
    return out


# ----------------------------------------------------------------------------------- configs


def set_key(config, dotted: str, text: str) -> None:
    """Sets an existing config key from text (typed like its current value); unknown keys raise ValueError."""
    *parents, leaf = dotted.split(".")
    section = config
    for i, part in enumerate(parents):
        if part not in section:
            raise ValueError(f"config has no section {'.'.join(parents[: i + 1])!r} (for {dotted})")
        section = section[part]
    if leaf not in section:
        raise ValueError(f"config has no key {dotted!r}")
    section[leaf] = parse_value(text, section[leaf])


def load_stage_config(stage: str, arg: str):
    """Returns configs/<stage>.py's config for `arg` ("paper", "" ...)."""
    spec = importlib.util.spec_from_file_location(f"config_{stage}", REPO / "configs" / f"{stage}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def arm_config(stage: str, arm: str, list_file: pathlib.Path, args: argparse.Namespace):
    """Returns the training config of one stage of one (trained) arm for one fold's training list."""
    config = load_stage_config(stage, "" if args.smoke else "paper")
    config.model.name = args.model
    config.data.layout, config.data.root, config.data.list_file = "list", "", str(list_file)
    config.data.num_val_cases = 0
    config.data.cache_dir = str(args.workdir / "cache")
    config.train.eval_every_epochs = 0
    steps = args.liver_steps if stage == "liver" else args.tumor_steps
    spe = min(steps, 50)
    config.train.steps_per_epoch, config.train.num_epochs = spe, math.ceil(steps / spe)
    config.train.checkpoint_every_epochs = max(1, config.train.num_epochs // 4)
    config.train.keep_checkpoints = 1
    config.optim.learning_rate = args.lr
    config.seed = args.seed
    if arm in ("b", "c"):
        config.preprocess.spacing_mode = "target"
        config.preprocess.target_spacing = tuple(args.target_spacing)
    if arm == "c":
        key, _, value = args.augment_override.partition("=")
        try:
            set_key(config, key, value)
        except ValueError as e:
            raise SystemExit(f"arm c: --augment-override {args.augment_override}: {e}. The device augmentation "
                             "(issue 17 item 2) is not in this checkout yet; run --arms a,b or name an existing "
                             "key") from None
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            set_key(config, key, value)
        except ValueError as e:
            raise SystemExit(f"--set {item}: {e}") from None
    return config


# ---------------------------------------------------------------------------------- one fold


def train_stage(config, workdir: pathlib.Path) -> dict[str, Any]:
    """Returns the training record (seconds, steps, steps/s, final loss) after training (or resuming) one stage."""
    from livseg_jax.training.logging import read_metrics
    from livseg_jax.training.loop import train_and_evaluate

    start = time.perf_counter()
    summary = train_and_evaluate(config, workdir)
    wall = time.perf_counter() - start
    rows = [r for r in read_metrics(workdir) if r["kind"] == "train"]
    rates = [r["steps_per_sec"] for r in rows[1:]]  # the first window holds the compilation
    return {"wall_s": round(wall, 1), "start_step": summary["start_step"], "final_step": summary["final_step"],
            "steps_per_s": float(np.median(rates)) if rates else None,
            "final_loss": rows[-1]["loss"] if rows else None}


def evaluate_case(predictor, image_path, label_path) -> dict[str, Any]:
    """Returns liver and tumour Dice/ASD and lesion counts of one predicted held-out case."""
    from livseg_jax import metrics
    from livseg_jax.data import nifti

    case = nifti.read_case(image_path, label_path)
    start = time.perf_counter()
    result = predictor.predict_array(case.image, case.spacing)
    seconds = time.perf_counter() - start
    row: dict[str, Any] = {"predict_s": round(seconds, 1), "liver_found": result.liver_found}
    for name, pred, truth in (("liver", result.labels >= 1, case.label >= 1),
                              ("tumor", result.labels == 2, case.label == 2)):
        m = metrics.binary_metrics(pred, truth, case.spacing)
        row.update({f"{name}_{k}": m[k] for k in ("dice", "asd", "precision", "recall")})
    lesions = metrics.lesion_detection(result.labels == 2, case.label == 2, case.spacing)
    row.update({k: lesions[k] for k in ("n_true", "n_hit", "n_missed", "n_pred", "n_false_positive")})
    if "postprocess" in result.info:
        row["postprocess"] = result.info["postprocess"]
    # Undefined metrics (e.g. ASD with one empty mask) as JSON null, not NaN.
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}


def run_fold(held: str, cases: dict, arms: list[str], args: argparse.Namespace, log) -> None:
    """Trains what the fold's arms need, predicts the held-out case, and writes one part file per arm."""
    from livseg_jax.data.layouts import CaseFiles
    from livseg_jax.inference.two_stage import Predictor, load_stage_model
    from livseg_jax.postprocess import choose_for_run

    fold_dir = args.workdir / "folds" / held
    train_ids = [c for c in cases if c != held]
    list_file = fold_dir / "train.txt"
    # Absolute paths: a list file's relative paths are read relative to its own folder.
    write_text(list_file, "".join(" ".join(shlex.quote(str(f.resolve())) for f in cases[c]) + "\n"
                                  for c in train_ids))
    trained: dict[str, dict] = {}
    for arm in arms:
        part = part_path(args, arm, held)
        if part.exists():
            log(f"[{held}] arm {arm}: done earlier ({part})")
            continue
        source = TRAINED_ARM[arm]
        runs = {stage: fold_dir / source / stage for stage in STAGES}
        if source not in trained:
            trained[source] = {}
            for stage in STAGES:
                config = arm_config(stage, source, list_file, args)
                log(f"[{held}] arm {source}: training {stage} ({config.train.num_epochs * config.train.steps_per_epoch}"
                    f" steps) in {runs[stage]}")
                trained[source][stage] = train_stage(config, runs[stage])
                log(f"[{held}] arm {source}: {stage} trained: {trained[source][stage]}")
        liver = load_stage_model(runs["liver"], "liver", which="latest")
        tumor = load_stage_model(runs["tumor"], "tumor", which="latest", postprocess=False)
        record: dict[str, Any] = {"arm": arm, "held_out": held, "train_cases": train_ids,
                                  "training": trained.get(source), "trained_arm": source}
        if arm == "d":
            files = [CaseFiles(c, *cases[c]) for c in train_ids]
            settings, chosen = choose_for_run(runs["tumor"], files, runs["liver"], which="latest",
                                              fp_penalty=args.fp_penalty, progress=False)
            record["postprocess_choice"] = {k: v for k, v in chosen.items() if k != "grid"}
            tumor = dataclasses.replace(tumor, postprocess=settings)
            log(f"[{held}] arm d: post-processing {settings.to_dict()}")
        row = evaluate_case(Predictor(liver, tumor), *cases[held])
        record["metrics"] = row
        write_json(part, record)
        log(f"[{held}] arm {arm}: liver Dice {row['liver_dice']:.3f}, tumour Dice {row['tumor_dice']:.3f}, "
            f"lesions hit {row['n_hit']}/{row['n_true']}, false positive {row['n_false_positive']}")
        merge(args)


# --------------------------------------------------------------------------------- results


def part_path(args: argparse.Namespace, arm: str, held: str) -> pathlib.Path:
    """Returns the part file of one (arm, fold)."""
    return args.workdir / "parts" / f"{arm}--{held}.json"


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Returns the settings that make results comparable (a rerun with others is refused)."""
    return {"model": args.model, "liver_steps": args.liver_steps, "tumor_steps": args.tumor_steps, "lr": args.lr,
            "target_spacing": list(args.target_spacing), "augment_override": args.augment_override,
            "set": list(args.set), "seed": args.seed, "fp_penalty": args.fp_penalty, "smoke": args.smoke}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(values)) if values else None


def merge(args: argparse.Namespace) -> pathlib.Path:
    """Returns the output path after merging every part file into one JSON (atomically)."""
    parts = [json.loads(p.read_text()) for p in sorted((args.workdir / "parts").glob("*.json"))]
    summary = {}
    for arm in ARMS:
        rows = [p["metrics"] for p in parts if p["arm"] == arm]
        if rows:
            summary[arm] = {"folds": len(rows), **{k: _mean(r[k] for r in rows) for k in (
                "liver_dice", "liver_asd", "tumor_dice", "tumor_asd", "n_hit", "n_true", "n_false_positive")}}
    payload = {"benchmark": "real_data", "settings": run_settings(args), "arms": ARMS,
               "environment": environment(),
               "complete": {(a, c) for a in ARMS for c in args.all_cases} <= {(p["arm"], p["held_out"]) for p in parts},
               "summary": summary, "parts": parts}
    return write_json(args.output, payload)


def markdown_table(result: dict[str, Any]) -> str:
    """Returns the per-case and per-arm Markdown tables of a real_data JSON."""

    def f(v, digits=3):
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"

    lines = ["| arm | held-out case | liver Dice | liver ASD mm | tumour Dice | tumour ASD mm | lesions hit | "
             "false-positive lesions |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for p in sorted(result["parts"], key=lambda p: (p["arm"], p["held_out"])):
        m = p["metrics"]
        lines.append(f"| {p['arm']} | {p['held_out']} | {f(m['liver_dice'])} | {f(m['liver_asd'], 1)} | "
                     f"{f(m['tumor_dice'])} | {f(m['tumor_asd'], 1)} | {m['n_hit']}/{m['n_true']} | "
                     f"{m['n_false_positive']} |")
    lines += ["", "| arm | recipe | folds | mean liver Dice | mean tumour Dice | mean false-positive lesions |",
              "|---|---|---:|---:|---:|---:|"]
    for arm, s in result["summary"].items():
        lines.append(f"| {arm} | {result['arms'][arm]} | {s['folds']} | {f(s['liver_dice'])} | "
                     f"{f(s['tumor_dice'])} | {f(s['n_false_positive'], 1)} |")
    st = result["settings"]
    lines += ["", f"Settings: {st['model']}, {st['liver_steps']} liver / {st['tumor_steps']} tumour steps, "
              f"learning rate {st['lr']}, target spacing {st['target_spacing']} mm, arm c "
              f"`{st['augment_override']}`{' (SMOKE RUN: not a result)' if st['smoke'] else ''}; "
              f"complete: {result['complete']}."]
    return "\n".join(lines)


def write_table(output: pathlib.Path) -> None:
    """Replaces the table between the markers of docs/real_data.md with the JSON's."""
    result = json.loads(output.read_text())
    text = DOC.read_text()
    if TABLE_BEGIN not in text or TABLE_END not in text:
        raise SystemExit(f"{DOC}: the markers {TABLE_BEGIN} / {TABLE_END} are missing")
    head, rest = text.split(TABLE_BEGIN, 1)
    tail = rest.split(TABLE_END, 1)[1]
    write_text(DOC, f"{head}{TABLE_BEGIN}\n{markdown_table(result)}\n{TABLE_END}{tail}")
    print(f"wrote the table of {output} into {DOC}")


# ---------------------------------------------------------------------------------- driving


def estimate_s(args: argparse.Namespace, folds: list[str]) -> float:
    """Returns a rough wall-clock estimate (s) of the unfinished work, from GUESS_* (H200 figures).

    The steps of parallel folds share the one GPU; their other work (data, compilation,
    checkpoints, prediction) overlaps.
    """
    steps_s = other_s = 0.0
    programs = set()
    for held in folds:
        todo = [a for a in args.arms if not part_path(args, a, held).exists()]
        sources = {TRAINED_ARM[a] for a in todo}
        programs |= {"c" if s == "c" else "ab" for s in sources}  # arms a and b share their train steps
        steps_s += len(sources) * (args.liver_steps * GUESS_STEP_S["liver"] + args.tumor_steps * GUESS_STEP_S["tumor"])
        other_s += len(sources) * 2 * GUESS_OVERHEAD_S + len(todo) * GUESS_PREDICT_S
    jobs = max(1, min(args.jobs, len(folds)))
    # Parallel folds compile the same programs at the same time: the cold compiles count once.
    return steps_s + other_s / jobs + len(programs) * 2 * GUESS_COLD_COMPILE_S


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=pathlib.Path,
                   default=pathlib.Path(os.environ.get("LIVSEG_REAL_DATA", REPO.parent / "shared" / "data")),
                   help="the real-data folder (default: $LIVSEG_REAL_DATA or ../shared/data)")
    p.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("runs/real_data"),
                   help="cases, runs, parts (default: %(default)s)")
    p.add_argument("--output", type=pathlib.Path, default=RESULTS / "real_data.json")
    p.add_argument("--arms", default="a,b,c,d", help="comma-separated subset of a,b,c,d")
    p.add_argument("--folds", default="all", help="held-out case ids, comma-separated, or all")
    p.add_argument("--liver-steps", type=int, default=200)
    p.add_argument("--tumor-steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--model", help="model.name of both stages (default: elanres_msca_unet; --smoke: unet)")
    p.add_argument("--target-spacing", default="1.6,1.5,1.5",
                   help="arms b-d: (z, y, x) mm (default: %(default)s, the paper's grid for a 0.75 mm scan)")
    p.add_argument("--augment-override", default=DEFAULT_AUGMENT_OVERRIDE,
                   help="arm c's config override KEY=VALUE (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE config override for every arm")
    p.add_argument("--fp-penalty", type=float, default=0.01, help="arm d's objective (livseg_jax.postprocess)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=3, help="folds trained at once, in separate processes (default: 3)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny CPU run: demo widths, 16x64x64 patches, 4 steps, 4 mm grid; output under WORKDIR")
    p.add_argument("--prepare-only", action="store_true", help="convert the cases and stop")
    p.add_argument("--table", action="store_true", help="write the JSON's table into docs/real_data.md and stop")
    args = p.parse_args(argv)
    args.arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        p.error(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    args.target_spacing = tuple(float(s) for s in args.target_spacing.split(","))
    args.model = args.model or ("unet" if args.smoke else "elanres_msca_unet")
    if args.smoke:
        args.liver_steps, args.tumor_steps = 4, 4
        args.set = ["data.patch_size=(16,64,64)", "data.batch_size=1", "model.features=(4,8,8,8,8)",
                    "inference.window=(32,64,64)", "preprocess.inplane_factor=4", *args.set]
        args.target_spacing = (4.0, 4.0, 4.0)
        if args.output == RESULTS / "real_data.json":
            args.output = args.workdir / "real_data_smoke.json"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.table:
        write_table(args.output)
        return 0
    cases = prepare_cases(args.data, args.workdir / "cases")
    args.all_cases = list(cases)
    if args.smoke and args.folds == "all":  # one fold keeps the smoke run to minutes
        args.folds = list(cases)[-1]
    args.folds = list(cases) if args.folds == "all" else [f for f in args.folds.split(",") if f]
    missing = [f for f in args.folds if f not in cases]
    if missing:
        raise SystemExit(f"--folds: unknown case(s) {missing}; the cases are {list(cases)}")
    if args.prepare_only:
        print(f"{len(cases)} cases in {args.workdir / 'cases'}: {', '.join(cases)}")
        return 0
    settings_file = args.workdir / "settings.json"
    if settings_file.exists() and json.loads(settings_file.read_text()) != run_settings(args):
        raise SystemExit(f"{settings_file}: {args.workdir} holds a run with other settings "
                         f"({settings_file.read_text().strip()}); use another --workdir")
    for stage in STAGES:  # fail before any training when an arm's config is impossible
        for arm in {TRAINED_ARM[a] for a in args.arms}:
            arm_config(stage, arm, args.workdir / "check.txt", args)
    write_json(settings_file, run_settings(args))
    print(f"{len(args.folds)} fold(s) x arms {','.join(args.arms)}: estimated {estimate_s(args, args.folds) / 60:.1f} "
          f"min on one H200 (rough, before measuring)", flush=True)

    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{(time.perf_counter() - started) / 60:5.1f} min] {message}", flush=True)

    if args.jobs > 1 and len(args.folds) > 1:
        return run_parallel(args, argv if argv is not None else sys.argv[1:], log)
    from livseg_jax.compilation_cache import use_compilation_cache
    from livseg_jax.config import default_cache_root
    from livseg_jax.xla_flags import apply_model_xla_flags

    apply_model_xla_flags([arm_config("liver", "a", args.workdir / "check.txt", args).model])
    # The arms' trainings share their train-step and window programs: compiled once, then read back.
    use_compilation_cache(str(args.workdir / "jax_cache") if args.smoke else "auto", default_cache_root())
    for i, held in enumerate(args.folds):
        run_fold(held, cases, args.arms, args, log)
        left = args.folds[i + 1:]
        if left:
            per_fold = (time.perf_counter() - started) / (i + 1)
            log(f"fold {held} done; about {per_fold * len(left) / 60:.1f} min left for {', '.join(left)}")
    path = merge(args)
    print(f"wrote {path}")
    print(markdown_table(json.loads(path.read_text())))
    return 0


def run_parallel(args: argparse.Namespace, argv: list[str], log) -> int:
    """Runs each fold in its own process, `--jobs` at a time, each with its share of GPU memory."""
    env = {**os.environ, "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{0.9 / args.jobs:.2f}"}
    pending, running, failed = list(args.folds), [], 0
    while pending or running:
        while pending and len(running) < args.jobs:
            held = pending.pop(0)
            logfile = args.workdir / "folds" / f"{held}.log"
            logfile.parent.mkdir(parents=True, exist_ok=True)
            # argparse keeps the last value of an option: these override the parent's
            cmd = [sys.executable, "-m", "experiments.real_data", *argv, "--folds", held, "--jobs", "1"]
            running.append((held, subprocess.Popen(cmd, env=env, stdout=logfile.open("w"), stderr=subprocess.STDOUT)))
            log(f"fold {held}: started, log {logfile}")
        time.sleep(5)
        for held, proc in list(running):
            if proc.poll() is not None:
                running.remove((held, proc))
                failed += proc.returncode != 0
                log(f"fold {held}: {'done' if proc.returncode == 0 else f'FAILED ({proc.returncode})'}")
    path = merge(args)
    print(f"wrote {path}")
    print(markdown_table(json.loads(path.read_text())))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
