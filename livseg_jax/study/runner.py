"""Running a study: train every run (skipping finished ones), predict the test split, evaluate, tabulate.

Layout of a study directory (`--workdir`):

    study.json                 the study config as run
    split.json                 the train / validation / test split (`study.splits`), reused on rerun
    median_spacing.json        with runs of `preprocess.spacing_mode` "median": nnU-Net's median
                               spacing of the split's training cases, read from their headers once
    runs/<run>/<stage>/        each stage's run directory (`livseg_jax.run_dir`); `study_done.json`
                               in it, written atomically when its training finished, marks it complete.
                               Its config names the study's dataset (root, layout, label_map) and the
                               split's cases (`data.train_cases`, `data.val_cases`): training reads
                               the data as `livseg_jax.train` does, saving the split as `splits.json`
    runs/<run>/predictions/    the test split's label maps and `_timings.json` (as `predict` writes)
    runs/<run>/predictions.json  written when every test case is predicted
    runs/<run>/evaluation/     `evaluate`'s evaluation.csv / .json on the test split
    runs/<run>/result.json     the run's table metrics
    tables.md, tables.csv, tables.json, dice.png (per-case Dice), qualitative.png (one test slice)

    runs/<run>/train.log, runs/<run>/worker.json  with runs in worker processes: the worker's output and
                               its devices, command, times and exit status (`study.scheduler`)

With `split.folds` >= 2 the runs, tables, figure and median_spacing.json of fold k go to `fold-k/`
(split.json stays at the top). A run's "median" spacing is resolved once per study, in the process
that prepares it, and given to each stage as spacing_mode "target" with that spacing (the same grid
training would compute): neither the runs nor the worker processes read every case's header again.
`run_study` runs the runs one after another in this process, each data parallel over `study.devices`
devices; `run_study_in_workers` runs several at once, one worker process per device group
(`study.scheduler`). An interrupted study resumes at its first unfinished stage (`train_and_evaluate`
resumes from the stage's checkpoints).
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from livseg_jax import atomic_write, evaluate
from livseg_jax.data import spacing as spacing_rule
from livseg_jax.data.cases import case_id_of, output_name, sidecar_path
from livseg_jax.inference.two_stage import Predictor
from livseg_jax.models.summary import count_params
from livseg_jax.study import figures, scheduler, spec, splits, tables
from livseg_jax.training.loop import cache_stage_cases, dataset_cases, split_cases, train_and_evaluate

DONE_FILE = "study_done.json"
SPACING_FILE = "median_spacing.json"
PREDICTIONS_DONE = "predictions.json"
RESULT_FILE = "result.json"
# train_fn(config, run directory, devices) -> summary, as `train_and_evaluate`.
TrainFn = Callable[[ml_collections.ConfigDict, pathlib.Path, Sequence[Any]], Mapping[str, Any]]


def _canonical(config: ml_collections.ConfigDict) -> Any:
    return json.loads(config.to_json_best_effort())


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def study_cases(study: ml_collections.ConfigDict) -> dict[str, Any]:
    """Returns {case id: CaseFiles} of the study's data (its root, or the built-in synthetic set)."""
    cases = dataset_cases(ml_collections.ConfigDict({"data": study.data.to_dict()}))
    unlabelled = [c.case_id for c in cases if c.label is None]
    if unlabelled:
        raise ValueError(f"study data: case(s) without labels: {', '.join(unlabelled[:5])}; a study needs "
                         "ground truth for every case")
    return {c.case_id: c for c in cases}


def stage_configs(study: ml_collections.ConfigDict, entry: Mapping[str, Any], split: Mapping[str, Any],
                  median: Sequence[float] | None = None) -> dict[str, ml_collections.ConfigDict]:
    """Returns {stage: training config} of one run on the split's cases.

    A stage of `preprocess.spacing_mode` "median" gets spacing_mode "target" with `median`, the
    study's median spacing (`median_spacing`): training would compute the same from the same
    training cases, reading all their headers in every stage of every run.
    """
    configs = {stage: spec.stage_run_config(study, entry, stage, split) for stage in spec.run_stages(entry)}
    for stage, config in configs.items():
        if config.preprocess.spacing_mode != "median":
            continue
        where = f"study {study.name!r}, run {entry['name']!r}, stage {stage!r}"
        if median is None:
            raise ValueError(f"{where}: preprocess.spacing_mode 'median' needs the study's median spacing")
        given = tuple(float(t) for t in config.preprocess.target_spacing)
        if any(given) and not np.allclose(given, median, rtol=1e-6, atol=0.0):
            raise ValueError(f"{where}: preprocess.spacing_mode 'median': preprocess.target_spacing {given} differs "
                             f"from {tuple(median)}, the median rule over the split's training cases; leave it "
                             "(0, 0, 0), or use spacing_mode 'target' to fix a spacing")
        config.preprocess.spacing_mode, config.preprocess.target_spacing = "target", tuple(float(t) for t in median)
    return configs


def uses_median_spacing(study: ml_collections.ConfigDict, only: Sequence[str] = ()) -> bool:
    """Returns whether a stage of the study's (selected) runs declares `preprocess.spacing_mode` "median"."""
    empty = {"train": (), "val": ()}
    return any(spec.stage_run_config(study, entry, stage, empty).preprocess.spacing_mode == "median"
               for entry in study.runs if not only or entry["name"] in only for stage in spec.run_stages(entry))


def median_spacing(out: pathlib.Path, split: Mapping[str, Any], cases: Mapping[str, Any],
                   compute: bool = True) -> tuple[float, float, float]:
    """Returns nnU-Net's median spacing (z, y, x) mm of the split's training cases (`data.spacing`).

    Read from `out/median_spacing.json` when that was made from the same training cases, else
    computed from their headers and saved there. `compute` False (a worker process) refuses to
    compute it: its parent did, once for every run.
    """
    path = out / SPACING_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("train") == list(split["train"]):
            return tuple(float(t) for t in saved["target_spacing"])
    if not compute:
        raise ValueError(f"{path}: missing or made from other training cases; a study worker runs in a "
                         "directory its parent prepared")
    grids = [spacing_rule.header_grid(cases[cid].image) for cid in split["train"]]
    target = spacing_rule.median_target_spacing([g[0] for g in grids], [g[1] for g in grids])
    atomic_write.write_json(path, {"train": list(split["train"]), "target_spacing": list(target),
                                   "rule": "nnU-Net's median spacing (livseg_jax.data.spacing)"})
    print(f"median spacing of the {len(grids)} training cases: {target} mm (z, y, x), {path}")
    return target


# The data keys that say where a stage's cases are read from: what changed when runs stopped reading a
# linked training list (`train_list.txt`) and got the split's case ids instead.
CASE_SOURCE_KEYS = ("root", "layout", "list_file", "label_map", "train_cases", "val_cases", "num_val_cases",
                    "num_folds", "fold")
LEGACY_LIST = "train_list.txt"


def _listed_split(path: pathlib.Path) -> dict[str, list[str]]:
    """Returns {"train", "val"} case ids of a study's former training list (`t-<id>` / `v-<id>` links;
    any other name under a key of its own)."""
    listed: dict[str, list[str]] = {"t": [], "v": []}
    for line in path.read_text().splitlines():
        if line.strip():
            prefix, _, case_id = case_id_of(pathlib.PurePosixPath(line.split()[0]).name).partition("-")
            listed.setdefault(prefix, []).append(case_id)
    return {"train": listed.pop("t"), "val": listed.pop("v"), **listed}


def adopt_listed_stage(stage_dir: pathlib.Path, config: ml_collections.ConfigDict, split: Mapping[str, Any],
                       cases: Mapping[str, Any]) -> bool:
    """Returns whether a stage finished by an earlier study (reading its cases through the linked
    training list `train_list.txt`) was taken as finished with `config`, its `study_done.json` rewritten.

    Taken only when the configs differ in where the cases are read from alone (`CASE_SOURCE_KEYS`),
    the list names exactly the split's training and validation cases in order, and no case's labels
    need remapping (the list read the same labels then). Anything else is left to `train_stage`,
    which refuses a stage finished with another config.
    """
    marker = stage_dir / DONE_FILE
    if not marker.exists():
        return False
    done = json.loads(marker.read_text())
    old, new = done["config"], _canonical(config)
    listed = pathlib.Path(str(old.get("data", {}).get("list_file", "")))
    if old == new or old["data"].get("layout") != "list" or listed.name != LEGACY_LIST or not listed.is_file():
        return False
    if any(c.label_map is not None for c in cases.values()):
        return False

    def without_source(c: Mapping[str, Any]) -> dict[str, Any]:
        return {**c, "data": {k: v for k, v in c["data"].items() if k not in CASE_SOURCE_KEYS}}

    if without_source(old) != without_source(new):
        return False
    if _listed_split(listed) != {"train": list(split["train"]), "val": list(split["val"])}:
        return False
    atomic_write.write_json(marker, {**done, "config": new, "adopted": {"list_file": str(listed), "at": _now()}})
    print(f"{stage_dir}: finished by an earlier study version on the same cases ({listed}); kept as finished")
    return True


def train_stage(config: ml_collections.ConfigDict, stage_dir: pathlib.Path, devices: Sequence[Any],
                train_fn: TrainFn = train_and_evaluate) -> dict[str, Any]:
    """Returns the stage's completion record, training it first unless `study_done.json` says it is done.

    A finished stage trained with another config is refused (ValueError): its checkpoints would
    not be the run the study declares.
    """
    marker = stage_dir / DONE_FILE
    requested = _canonical(config)
    if marker.exists():
        done = json.loads(marker.read_text())
        if done["config"] != requested:
            raise ValueError(f"{marker}: this stage finished training with another config than the study now "
                             "declares for it; use a new --workdir, or delete the run's folder to retrain it")
        return done
    start = time.perf_counter()
    summary = train_fn(config, stage_dir, devices)
    record = {"config": requested, "final_step": int(summary["final_step"]),
              "start_step": int(summary["start_step"]), "best_dice": float(summary["best_dice"]),
              "train_s": time.perf_counter() - start, "finished": _now(), "commit": git_commit()}
    atomic_write.write_json(marker, record)  # last: its presence marks the stage complete
    return record


def predict_test_split(run_dir: pathlib.Path, stage_dirs: Mapping[str, pathlib.Path], trained: Mapping[str, str],
                       test: Sequence[Any], study: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """Returns the per-case prediction records of the test split, predicting the cases not yet done."""
    pred_dir = run_dir / "predictions"
    marker = run_dir / PREDICTIONS_DONE
    ids = [c.case_id for c in test]
    if marker.exists():
        done = json.loads(marker.read_text())
        if done["cases"] == ids and done["trained"] == dict(trained):
            return [json.loads(sidecar_path(pred_dir / output_name(cid), "_timings.json").read_text()) for cid in ids]
        marker.unlink()  # other cases or retrained stages: predict again
        for old in pred_dir.glob("*"):
            old.unlink()
    predictor = Predictor.from_checkpoints(
        stage_dirs.get("liver"), stage_dirs.get("tumor"), connectivity=int(study.predict.connectivity),
        joint_path=stage_dirs.get("joint"), which=study.predict.which)
    predictor.warmup()  # compilation is not test time
    records = []
    for case in test:
        out = pred_dir / output_name(case.case_id)
        timings = sidecar_path(out, "_timings.json")
        if out.exists() and timings.exists():  # the timings file is written last (as predict does)
            records.append(json.loads(timings.read_text()))
            continue
        _, record = predictor.predict_file(case.image, out)
        record = {"case_id": case.case_id, **record}
        atomic_write.write_json(timings, record)
        records.append(record)
    atomic_write.write_json(marker, {"cases": ids, "trained": dict(trained), "finished": _now()})
    return records


def evaluate_test_split(run_dir: pathlib.Path, test: Sequence[Any],
                        study: ml_collections.ConfigDict) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Returns (`evaluate_case` records, `summarize_cases` summary) of the run's test predictions.

    The same functions and settings as `python -m livseg_jax.evaluate`; its evaluation.csv / .json
    are written to runs/<run>/evaluation/.
    """
    ev = study.evaluate
    cases = [evaluate.evaluate_case(c.case_id, run_dir / "predictions" / output_name(c.case_id), c.label,
                                    int(ev.connectivity), float(ev.min_overlap), c.label_map) for c in test]
    summary = evaluate.summarize_cases(cases, float(ev.size_threshold))
    evaluate.write_outputs(run_dir / "evaluation", cases, summary)
    return cases, summary


def run_one(study: ml_collections.ConfigDict, entry: Mapping[str, Any], run_dir: pathlib.Path,
            split: Mapping[str, Any], cases: Mapping[str, Any], median: Sequence[float] | None = None,
            train_fn: TrainFn = train_and_evaluate) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Returns (table metrics, per-case evaluation records) of one run after training, predicting, evaluating.

    `median`: the study's median spacing (`median_spacing`), for runs of spacing_mode "median"."""
    configs = stage_configs(study, entry, split, median)
    stage_dirs = {stage: run_dir / stage for stage in configs}
    devices = study_devices(study)
    for stage, config in configs.items():
        adopt_listed_stage(stage_dirs[stage], config, split, cases)
    done = {stage: train_stage(config, stage_dirs[stage], devices, train_fn) for stage, config in configs.items()}
    test = [cases[cid] for cid in split["test"]]
    records = predict_test_split(run_dir, stage_dirs, {s: d["finished"] for s, d in done.items()}, test, study)
    per_case, summary = evaluate_test_split(run_dir, test, study)
    params = sum(count_params(c.model, tuple(c.data.patch_size))["params"] for c in configs.values())
    result = tables.run_metrics(summary, params, sum(d["train_s"] for d in done.values()),
                                float(np.mean([r["timings_s"]["total"] for r in records])))
    result["trained_at_commits"] = sorted({d.get("commit", "unrecorded") for d in done.values()})
    result["devices"] = device_text(devices)
    atomic_write.write_json(run_dir / RESULT_FILE, evaluate.jsonable(result))
    return result, per_case


def study_devices(study: ml_collections.ConfigDict) -> list[Any]:
    """Returns the devices each run trains on: the first `study.devices` (0: all) visible ones."""
    available = jax.devices()
    n = int(study.devices) or len(available)
    if not 1 <= n <= len(available):
        raise ValueError(f"study.devices = {study.devices}: {len(available)} device(s) visible")
    return available[:n]


def device_text(devices: Sequence[Any]) -> str:
    """Returns e.g. "2 x NVIDIA H200 (gpu), ids 0,1": the devices a run trained on, as this process sees them."""
    return (f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform}), ids "
            + ",".join(str(d.id) for d in devices))


def git_commit() -> str:
    """Returns the checkout's commit (+ "uncommitted changes" when tracked files differ), or why it is unknown."""
    here = pathlib.Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        given = os.environ.get("LIVSEG_STUDY_COMMIT")  # a copy of the tree without .git (a remote machine)
        return f"{given} (given by LIVSEG_STUDY_COMMIT)" if given else "unknown (not a git checkout)"
    return head + (" + uncommitted changes" if dirty else "")


def describe(study: ml_collections.ConfigDict, split: Mapping[str, Any],
             results: Mapping[str, Mapping[str, Any]], device: str | None = None) -> dict[str, Any]:
    """Returns the tables' header: study, data, split, scale settings, device, commit(s), time.

    `device`: how the runs were placed; None: this process's `study_devices`, one run after another.
    """
    d = study.data
    if d.root or d.list_file:
        data = f"{d.root or d.list_file} (layout {d.layout}), {len(split['cases'])} labelled cases"
        if d.get("label_map"):
            data += f", labels remapped by data.label_map {d.label_map!r}"
    else:
        s = d.synthetic
        data = (f"built-in synthetic phantoms: {s.num_cases} cases of {tuple(s.shape)} voxels (x, y, z) at "
                f"{tuple(s.spacing)} mm, seed {s.seed}")
    st = split["settings"]
    fold = f", fold {st['fold']} of {st['folds']}" if st["folds"] else ""
    split_text = (f"{len(split['train'])} training, {len(split['val'])} validation, {len(split['test'])} test "
                  f"cases (split.json, seed {st['seed']}{fold})")
    overrides = ", ".join(f"{k}={v}" for k, v in study.scale_overrides)
    arg = f":{study.stage_arg}" if study.stage_arg else ""
    scale = f"{study.scale}: stage configs{arg}" + (f" with {overrides}" if overrides else "")
    if device is None:
        dev = study_devices(study)
        device = (f"{len(dev)} x {dev[0].device_kind} ({dev[0].platform}) of {jax.device_count()} visible; runs "
                  "one after another, each data parallel over these")
    commit = git_commit()
    other = [(n, c) for n, r in results.items() for c in r.get("trained_at_commits", ()) if c != commit]
    if any(c != "unrecorded" for _, c in other):  # runs trained by other code than the one writing the tables
        commit += "; runs trained at other commits: " + ", ".join(f"{n} {c}" for n, c in other if c != "unrecorded")
    if any(c == "unrecorded" for _, c in other):
        commit += "; trained before stages recorded their commit: " + ", ".join(
            dict.fromkeys(n for n, c in other if c == "unrecorded"))
    return {"study": study.name, "scale": study.scale, "description": study.description, "data": data,
            "split": split_text, "scale_settings": scale, "device": device, "commit": commit,
            "written": _now()}


def results_dir(study: ml_collections.ConfigDict, workdir: pathlib.Path) -> pathlib.Path:
    """Returns where the runs and tables go: the study directory, or its fold-k/ with k-fold splits."""
    return workdir / f"fold-{int(study.split.fold)}" if int(study.split.folds) else workdir


def prepare(study: ml_collections.ConfigDict, workdir: str | os.PathLike, only: Sequence[str] = ()
            ) -> tuple[dict[str, Any], dict[str, Any], pathlib.Path, tuple[float, float, float] | None]:
    """Returns (cases, split, results directory, median spacing or None) after writing study.json,
    the split and, when a selected run needs it, median_spacing.json (`median_spacing`)."""
    spec.check_study(study, tables.METRIC_KEYS)
    names = [r["name"] for r in study.runs]
    unknown = [n for n in only if n not in names]
    if unknown:
        raise ValueError(f"--runs: unknown run(s) {unknown}; study {study.name!r} has {names}")
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    atomic_write.write_text(workdir / "study.json", study.to_json_best_effort(indent=1) + "\n")
    cases = study_cases(study)
    split = splits.load_or_create(workdir, list(cases), study.split.to_dict())
    out = results_dir(study, workdir)
    median = median_spacing(out, split, cases) if uses_median_spacing(study, only) else None
    return cases, split, out, median


def prepare_caches(study: ml_collections.ConfigDict, split: Mapping[str, Any],
                   median: Sequence[float] | None = None, only: Sequence[str] = ()) -> int:
    """Returns how many stage configs' preprocessing caches were checked, building what is missing.

    Through `training.loop.cache_stage_cases`, as each run's training would, so that worker
    processes started afterwards only read the caches.
    """
    count = 0
    for entry in study.runs:
        if only and entry["name"] not in only:
            continue
        for config in stage_configs(study, entry, split, median).values():
            cache_stage_cases(config, *split_cases(config, dataset_cases(config)))
            count += 1
    return count


def finished_runs(study: ml_collections.ConfigDict,
                  out: pathlib.Path) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Returns ({run: table metrics}, {run: per-case evaluation records}) of the runs finished in `out`."""
    results, per_case = {}, {}
    for entry in study.runs:
        run_dir = out / "runs" / entry["name"]
        if (run_dir / RESULT_FILE).exists() and (run_dir / "evaluation" / "evaluation.json").exists():
            results[entry["name"]] = json.loads((run_dir / RESULT_FILE).read_text())
            per_case[entry["name"]] = json.loads((run_dir / "evaluation" / "evaluation.json").read_text())["cases"]
    return results, per_case


def write_report(study: ml_collections.ConfigDict, out: pathlib.Path, split: Mapping[str, Any],
                 cases: Mapping[str, Any], results: Mapping[str, Any], per_case: Mapping[str, Any],
                 device: str | None = None) -> dict[str, Any]:
    """Returns {"tables", "figure", "qualitative"} after writing the tables and figures of these runs."""
    paths = tables.write_tables(out, describe(study, split, results, device), study.tables, results)
    figure = panel = None
    if per_case:
        figure = figures.dice_box_plot(out / "dice.png", per_case,
                                       f"{study.name} ({study.scale}): per-case Dice on the test split")
        first = cases[split["test"][0]]
        panel = figures.qualitative_panel(
            out / "qualitative.png", first.image, first.label,
            {name: out / "runs" / name / "predictions" / output_name(first.case_id) for name in per_case},
            f"{study.name} ({study.scale}), {first.case_id}")
    return {"tables": paths, "figure": figure, "qualitative": panel}


def run_worker(study: ml_collections.ConfigDict, workdir: str | os.PathLike, names: Sequence[str],
               train_fn: TrainFn = train_and_evaluate) -> dict[str, Any]:
    """Returns {run: table metrics} of these runs, trained, predicted and evaluated in this process.

    A worker of `run_study_in_workers`: the split (and the median spacing its runs need) must
    exist, the parent wrote them; it writes no tables.
    """
    workdir = pathlib.Path(workdir)
    out = results_dir(study, workdir)
    if not (workdir / splits.SPLIT_FILE).exists():
        raise ValueError(f"{workdir / splits.SPLIT_FILE}: missing; a study worker runs in a directory its parent "
                         "prepared")
    cases = study_cases(study)
    split = splits.load_or_create(workdir, list(cases), study.split.to_dict())
    median = median_spacing(out, split, cases, compute=False) if uses_median_spacing(study, names) else None
    results = {}
    for entry in study.runs:
        if entry["name"] in names:
            print(f"study {study.name}: run {entry['name']} ({entry['pipeline']}) on "
                  f"{device_text(study_devices(study))} of {jax.device_count()} visible to this worker", flush=True)
            results[entry["name"]], _ = run_one(study, entry, out / "runs" / entry["name"], split, cases, median,
                                                train_fn)
    return results


def run_study_in_workers(study: ml_collections.ConfigDict, workdir: str | os.PathLike, only: Sequence[str],
                         worker_command: Callable[[str], list[str]], devices: Mapping[str, Any],
                         groups: Sequence[tuple[int, ...]], report: Callable[[str], None] = print) -> dict[str, Any]:
    """Returns as `run_study`, plus "failed" ({run: exit status}), running each run in a worker process.

    `worker_command(run)` is the command line of one worker (`python -m livseg_jax.study ... --runs=RUN
    --worker`); `devices` is `scheduler.probe_devices()`; each worker gets one of `groups`. This
    process starts no JAX backend: it prepares the split, the data and the preprocessing caches, runs
    the workers (`scheduler.run_workers`), then tabulates the finished runs.
    """
    scheduler.worker_env(devices["platform"], groups[0])  # a platform it cannot restrict: refused before any work
    cases, split, out, median = prepare(study, workdir, only)
    prepare_caches(study, split, median, only)
    names = [r["name"] for r in study.runs if not only or r["name"] in only]
    report(f"study {study.name}: {len(names)} run(s) on {len(groups)} group(s) of {len(groups[0])} x "
           f"{devices['kind']} ({devices['platform']}) of {devices['count']} visible, one worker process per run")
    status = scheduler.run_workers(names, groups, worker_command,
                                   lambda group: scheduler.worker_env(devices["platform"], group),
                                   lambda name: out / "runs" / name, report=lambda line: report(
                                       f"study {study.name}: {line}"))
    results, per_case = finished_runs(study, out)
    device = (f"{len(groups[0])} x {devices['kind']} ({devices['platform']}) per run of {devices['count']} visible; "
              f"up to {len(groups)} runs at once, each in its own worker process on its own device(s), data "
              "parallel over them")
    written = write_report(study, out, split, cases, results, per_case, device)
    return {"results": results, **written, "failed": {n: rc for n, rc in status.items() if rc != 0}}


def run_study(study: ml_collections.ConfigDict, workdir: str | os.PathLike, only: Sequence[str] = (),
              train_fn: TrainFn = train_and_evaluate) -> dict[str, Any]:
    """Returns {"results", "tables", "figure", "qualitative"} after running the study's runs in `workdir`.

    One run after another, in this process. `only`: just these runs; the tables cover every run
    with results in the directory, also the others.
    """
    cases, split, out, median = prepare(study, workdir, only)
    results, per_case = finished_runs(study, out)
    for entry in study.runs:
        if only and entry["name"] not in only:
            continue
        print(f"study {study.name}: run {entry['name']} ({entry['pipeline']}) on "
              f"{device_text(study_devices(study))}", flush=True)
        results[entry["name"]], per_case[entry["name"]] = run_one(study, entry, out / "runs" / entry["name"],
                                                                  split, cases, median, train_fn)
    results = {r["name"]: results[r["name"]] for r in study.runs if r["name"] in results}  # declared order
    per_case = {name: per_case[name] for name in results}
    return {"results": results, **write_report(study, out, split, cases, results, per_case)}
