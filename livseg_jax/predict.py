"""Liver / tumour prediction for NIfTI CT volumes: two-stage, or one-stage with a joint model.

    python -m livseg_jax.predict --liver RUN_DIR --tumor RUN_DIR -i CT.nii.gz|DIR -o OUT
    python -m livseg_jax.predict --joint RUN_DIR -i CT.nii.gz|DIR -o OUT
    python -m livseg_jax.predict --backend onnxruntime --liver liver.onnx --tumor tumor.onnx -i ... -o OUT

RUN_DIR is a run directory: trained (`--which best|latest`) or written by
`python -m livseg_jax.convert --from-torch`. Without
`--tumor` only the liver is predicted (labels 0/1). `--joint` takes a one-stage run
(`configs/joint.py`, 3 classes) instead of `--liver`/`--tumor`; the outputs are the same.
Ensembles: `--liver RUN RUN ...` (likewise `--tumor`, `--joint`) averages the runs' softmax inside
each sliding window on the device (folds, or different networks); the runs of one stage must agree
on window, classes, sliding-window, preprocessing and post-processing settings.

`--backend onnxruntime` runs the networks in ONNX Runtime (CUDA where available, else CPU): the
models are then `.onnx` files written by `python -m livseg_jax.convert --to-onnx`, which carry
their settings (no run directory is read); the window blending and the rest are unchanged.

Inputs: one `.nii`/`.nii.gz` file, or a folder: LiTS layout (`volume-N.nii[.gz]`, searched
recursively; `segmentation-N` files are ignored), an nnU-Net dataset (its `imagesTs/`) or a folder
of nnU-Net `<case>_0000` images (case ids without `_0000`), or else every `.nii`/`.nii.gz` file directly in
it. Outputs, per case, next to each other in OUT (a folder; for a single input OUT may also be a
`.nii.gz` file name): the label map `segmentation-N.nii.gz` for `volume-N`, else `<name>_seg.nii.gz`
(uint8 0/1/2, the input's affine and header); `<label map name>_timings.json` with the seconds
spent in each phase; with `--png`, `<label map name>.png` overlays; with `--statistics`,
`<label map name>_statistics.json` and `_statistics.csv`: liver volume, tumour burden and per-lesion
volume, diameters, centroid and mean HU (`livseg_jax.inference.statistics`; the PNG then numbers
the lesions alike). Files are written atomically:
a failed or interrupted case leaves nothing behind. Exit status 1 when any case failed.

Several cases go through a pipeline (`livseg_jax.inference.folder`): the next CTs are read while
one is predicted and the previous one written, on every visible GPU (one case per device at a
time). The timings JSON records the case's device and its peak host and device memory.

Errors: a bad input, flag or run directory ends in one `error: <file>: <problem>` line
(`livseg_jax.cli_errors`; `--debug` keeps the traceback); the output location is checked before
the models load. The timings JSON's `warnings` holds the warnings of reading the input (HU range,
header anomalies such as a qform/sform disagreement), each naming the file.

DICOM: `-i` may also be a DICOM series folder or a zip of one (`livseg_jax.data.dicom`, the reader
the 3D-IRCADb importer uses); a folder or zip with several series needs `--series UID` (the error
lists them). `--output-type nifti,dicom_seg,rtstruct` (comma-separated or repeated; default nifti)
adds `<label map name>.dcm` (DICOM-SEG, highdicom) and `<label map name>_rtstruct.dcm` (RTSTRUCT,
rt-utils) referencing the input series (`livseg_jax.inference.dicom_export`); without `nifti` no
NIfTI label map is written. DICOM outputs need a DICOM input.

Post-processing: a tumour (or joint) run holding `postprocess.json` (written by
`python -m livseg_jax.postprocess`) has its tumour threshold and minimum lesion volume applied; the
run's settings and the timings JSON say so (`--no-postprocess` turns it off).

On a CPU: the stages compute depthwise convolutions as shifted sums (same outputs; faster there)
and take one window per network call unless `--batch-size` says otherwise. Every compiled program
goes into the persistent compilation cache, so a later run on a CT of the same shape compiles
nothing (docs/benchmarks.md, "Prediction on a CPU").

XLA flags: those the stages' computation forms need (`livseg_jax.xla_flags`; on GPUs
`--xla_gpu_force_conv_nhwc=true`) are added to `XLA_FLAGS` before JAX starts; a flag already set
in the environment wins.
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import sys
import time
from collections.abc import Sequence

import jax
import tqdm

from livseg_jax import atomic_write
from livseg_jax.cli_errors import CliError, check_output_dir, check_output_file, expected_errors, report, run_main
from livseg_jax.compilation_cache import use_compilation_cache
from livseg_jax.config import default_cache_root
from livseg_jax.data import dicom, nifti
from livseg_jax.data.cases import NIFTI_ENDINGS, sidecar_path
from livseg_jax.data.layouts import CaseFiles, find_inputs, plan_outputs
from livseg_jax.inference import dicom_export, onnx_cache
from livseg_jax.inference.backends import BACKENDS, onnx_predictor
from livseg_jax.inference.folder import Job, Outcome, device_predictors, predict_cases
from livseg_jax.inference.statistics import case_statistics, lesion_components, write_statistics
from livseg_jax.inference.two_stage import Predictor
from livseg_jax.run_dir import load_config
from livseg_jax.xla_flags import apply_model_xla_flags


class CaseProgress:
    """One tqdm bar per case, counting the sliding windows of all its stages (created at the first)."""

    def __init__(self, case_id: str, enabled: bool):
        self.case_id = case_id
        self.enabled = enabled
        self.bar: tqdm.tqdm | None = None

    def __call__(self, phase: str, total: int):
        desc = f"{self.case_id} [{phase}]"
        if self.bar is None:  # made with its first stage's windows: made empty, it would draw a bare "0win"
            self.bar = tqdm.tqdm(total=total, desc=desc, unit="win", disable=not self.enabled, dynamic_ncols=True)
        else:
            self.bar.total += total
            self.bar.set_description(desc)  # redraws the bar with its new total
        return self.bar.update

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def stage_model_configs(paths: Sequence[str | os.PathLike | None]) -> list:
    """Returns the `model` sections of the stages' config.json files. A missing or unreadable
    config adds nothing: loading the stage reports it."""
    models = []
    for path in paths:
        if path is None:
            continue
        try:
            model = load_config(path).get("model")
        except (OSError, ValueError, TypeError):
            continue
        if model is not None:
            models.append(model)
    return models


def use_stage_xla_flags(paths: Sequence[str | os.PathLike | None]) -> None:
    """Applies the XLA flags the stages' computation forms need; warns (results do not depend on
    them) when JAX already started."""
    try:
        apply_model_xla_flags(stage_model_configs(paths))
    except RuntimeError as e:  # called in a process that already used JAX
        print(f"warning: the XLA flags of the models' computation forms are not applied: {e}", file=sys.stderr)


class DicomReader:
    """Reads a DICOM series for `Predictor.predict_file`; keeps the series and grid for the DICOM outputs."""

    def __init__(self, series_uid: str | None, output_types: Sequence[str]):
        self.series_uid, self.output_types = series_uid, output_types
        self.series: dicom.Series | None = None
        self.geometry = None

    def __call__(self, path):
        """Returns the series' (D, H, W) HU volume and geometry, refusing one the outputs cannot refer to."""
        series = dicom.read_dicom_series(path, self.series_uid)
        dicom_export.check_exportable(series, self.output_types)  # before the models run
        image, self.geometry = dicom.image_and_geometry(series)
        self.series = series.without_pixels()  # the outputs need the headers; the voxels are `image`
        return image, self.geometry

    def write(self, labels_dhw, paths: dict[str, pathlib.Path]) -> None:
        """Writes the DICOM outputs of a (D, H, W) label map on the series read last."""
        labels = dicom.slice_order(labels_dhw, self.geometry)
        dicom_export.write_dicom_outputs(labels, self.series, paths)


def dicom_case_id(path: str | os.PathLike) -> str:
    """Returns the case id of a DICOM input: its folder or zip name without `.zip`."""
    name = pathlib.Path(path).resolve().name
    return name[: -len(".zip")] if name.lower().endswith(".zip") else name


def _save_overlay(path, image, spacing, labels, title, number_lesions=False, lesion_maps=None):
    from livseg_jax.visualize import save_overlay  # matplotlib only when asked for

    lesions = lesion_maps.pop(pathlib.Path(path), None) if lesion_maps is not None else None
    return save_overlay(path, image, spacing, labels, title=title, number_lesions=number_lesions, lesions=lesions)


def write_other_outputs(job: Job, labels, image, geometry, *, reader: DicomReader | None,
                        dicom_paths: dict[str, pathlib.Path], statistics: bool,
                        lesion_maps: dict | None = None) -> dict:
    """Returns the timings-record entries of a case's DICOM and statistics files after writing them
    (`folder.Job.extra_outputs`: called by the writer after the label map, before the timings JSON).

    `lesion_maps`: {PNG path: lesion map}, shared with `_save_overlay`, which the writer calls
    next for the case's PNG: the statistics' lesions are numbered on it without labelling again.
    """
    extra: dict = {}
    if reader is not None and dicom_paths:
        reader.write(labels, dicom_paths)
        extra["dicom_outputs"] = {k: str(v) for k, v in dicom_paths.items()}
    if statistics:
        lesions = lesion_components(labels == 2)
        stats = case_statistics(labels, image, geometry.affine_dhw, lesions=lesions)
        files = write_statistics(sidecar_path(job.output, "_statistics.json"),
                                 sidecar_path(job.output, "_statistics.csv"), job.case_id, stats)
        extra["statistics"] = [str(f) for f in files]
        if job.png is not None and lesion_maps is not None:
            lesion_maps[pathlib.Path(job.png)] = lesions[0]
    return extra


# A CPU takes as long per window whatever the batch (docs/benchmarks.md, "Prediction on a CPU"):
# one window per call needs half the memory of two and never fills a batch with repeats.
CPU_BATCH_SIZE = 1


def choose_backend(args: argparse.Namespace) -> str:
    """Returns "jax" or "onnxruntime" for `--backend`; "auto" says on one line what it chose and why.

    "auto" is ONNX Runtime where it is measured faster, run directories on a CPU-only machine (about
    2x end to end on 2 cores, docs/benchmarks.md), and JAX everywhere else; whatever keeps it from
    ONNX Runtime on a CPU is named.
    """
    if args.backend != "auto":
        return args.backend
    stages = [path for runs in (args.liver, args.tumor, args.joint) for path in runs or ()]
    if stages and all(str(path).endswith(".onnx") for path in stages):
        return "onnxruntime"  # exported models run where they were made to run, on any machine
    if jax.default_backend() != "cpu" or any(not pathlib.Path(path).is_dir() for path in stages):
        return "jax"  # a missing or mixed input: the JAX loader's checks name the problem
    reasons = []
    if missing := onnx_cache.missing_onnx_modules():
        reasons.append(f"{', '.join(missing)} not installed (pip install -e \".[onnx,torch]\")")
    if any(len(runs or ()) > 1 for runs in (args.liver, args.tumor, args.joint)):
        reasons.append("ensembles run in JAX")
    if args.deploy is False:
        reasons.append("--no-deploy runs the training form")
    if any(int(load_config(path).model.get("spatial_dims", 3)) != 3 for path in stages):
        reasons.append("the axial 2D forms have no ONNX export")
    backend = "jax" if reasons else "onnxruntime"
    print(f"prediction backend on this CPU: {backend}"
          + (f" (ONNX Runtime is faster here, but {'; '.join(reasons)})" if reasons else
             " (about 2x faster than XLA:CPU here; --backend jax to compare)"), flush=True)
    return backend


def default_batch_size(batch_size: int | None, backend: str | None = None) -> int | None:
    """Returns the windows per network call: `batch_size` when given, else CPU_BATCH_SIZE on a CPU,
    else None (the config's `inference.batch_size`)."""
    if batch_size is not None:
        return batch_size
    return CPU_BATCH_SIZE if (backend or jax.default_backend()) == "cpu" else None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m livseg_jax.predict", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--liver", nargs="+", metavar="RUN",
                   help="stage-1 run directory (trained or converted); several: their ensemble")
    p.add_argument("--tumor", nargs="+", metavar="RUN",
                   help="stage-2 run directory (omit: liver only); several: their ensemble")
    p.add_argument("--joint", nargs="+", metavar="RUN",
                   help="one-stage (3-class) run directory, instead of --liver [--tumor]; several: their ensemble")
    p.add_argument("-i", "--input", required=True,
                   help="CT .nii/.nii.gz file or folder, or a DICOM series folder or zip")
    p.add_argument("--series", help="SeriesInstanceUID of the series to predict in a DICOM input holding several")
    p.add_argument("--output-type", action="append", metavar="TYPES",
                   help="nifti, dicom_seg, rtstruct: comma-separated or repeated (default: nifti); "
                        "DICOM types need a DICOM input")
    p.add_argument("-o", "--output", required=True, help="output folder (or .nii.gz file for one input)")
    p.add_argument("--backend", choices=("auto", *BACKENDS), default=os.environ.get("LIVSEG_PREDICT_BACKEND", "auto"),
                   help="what runs the networks: auto (default: onnxruntime for run directories on a CPU-only "
                        "machine where the onnx and torch extras are installed, each run exported once and "
                        "cached; else jax), jax, or onnxruntime (.onnx exports or run directories)")
    p.add_argument("--which", choices=("best", "latest"), default="best",
                   help="checkpoint of a run directory (default: best; the latest when the run has no best)")
    p.add_argument("--overlap", type=float, help="window overlap in [0, 1) (default: from the config)")
    p.add_argument("--batch-size", type=int,
                   help="windows per network call (default: 1 on a CPU, else from the config)")
    p.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=None,
                   help="mirror test-time augmentation, 8 flips (default: inference.mirror_tta)")
    p.add_argument("--deploy", action=argparse.BooleanOptionalAction, default=None,
                   help="re-parameterised model (default: inference.deploy, normally on)")
    p.add_argument("--connectivity", type=int, choices=(1, 2, 3), default=1,
                   help="liver largest-component neighbourhood: 1 faces (default), 2 +edges, 3 +corners")
    p.add_argument("--postprocess", action=argparse.BooleanOptionalAction, default=True,
                   help="apply the tumour/joint run's stored postprocess.json, if any (default: on)")
    p.add_argument("--png", action="store_true", help="also write PNG overlays of the prediction")
    p.add_argument("--statistics", action="store_true",
                   help="also write per-case liver / tumour / lesion statistics (JSON and CSV)")
    p.add_argument("--skip-existing", action="store_true", help="skip cases whose label map exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--compilation-cache", default=os.environ.get("LIVSEG_COMPILATION_CACHE", "auto"),
                   help="JAX persistent compilation cache: auto ($LIVSEG_CACHE or ~/.cache/livseg_jax, "
                        "/jax_compilation), off, or a directory (default: $LIVSEG_COMPILATION_CACHE or auto)")
    return p.parse_args(argv)


def model_flags_error(args: argparse.Namespace) -> str | None:
    """Returns what is wrong with the combination of --liver, --tumor and --joint, or None."""
    if args.joint is not None and args.tumor is not None:
        return "--tumor cannot be used with --joint: a joint model predicts liver and tumour in one stage"
    if args.joint is not None and args.liver is not None:
        return "--liver cannot be used with --joint: give --liver [--tumor] (two-stage) or --joint (one-stage)"
    if args.joint is None and args.liver is None:
        return "give --liver RUN [--tumor RUN] (two-stage) or --joint RUN (one-stage)"
    return None


def check_outputs(jobs: Sequence[tuple[object, pathlib.Path]], output: str | os.PathLike) -> None:
    """Raises CliError naming the output when a label map's folder cannot be written (nothing is created)."""
    output = pathlib.Path(output)
    if output.name.endswith(NIFTI_ENDINGS):
        check_output_file(output)
    for folder in sorted({out.parent for _, out in jobs}):
        check_output_dir(folder)


def _run(argv: list[str]) -> int:
    """Runs the CLI; returns the exit status (0 ok, 1 when any case failed)."""
    args = parse_args(argv)
    atomic_write.exit_on_sigterm()  # SIGTERM unwinds like Ctrl-C: no temporary files left
    if args.overlap is not None and not 0 <= args.overlap < 1:
        raise CliError("--overlap", f"must be in [0, 1), got {args.overlap}")
    problem = model_flags_error(args)
    if problem:
        raise CliError(None, problem)
    output_types = dicom_export.parse_output_types(args.output_type or ["nifti"])
    dicom_input = dicom.is_dicom_input(args.input)
    dicom_types = [t for t in output_types if t in dicom_export.DICOM_OUTPUT_TYPES]
    if not dicom_input and (dicom_types or args.series is not None):
        raise CliError(args.input, f"{' and '.join(dicom_types) or '--series'} needs a DICOM input "
                       "(a series folder or zip); this input is not one", "use --output-type nifti")
    if dicom_input:
        dicom.require_pydicom()  # missing optional dependencies are reported before the models load
        dicom_export.require_libraries(dicom_types)
    cases = ([CaseFiles(dicom_case_id(args.input), pathlib.Path(args.input))] if dicom_input
             else find_inputs(args.input))
    jobs = plan_outputs(cases, args.output)
    check_outputs(jobs, args.output)  # before the models are loaded and compiled
    for folder in sorted({out.parent for _, out in jobs}):
        atomic_write.sweep_stale_temps(folder)
    use_stage_xla_flags([run for runs in (args.liver, args.tumor, args.joint) for run in runs or ()])
    # Every program, however quick to compile: the sliding window's small ones compile again for each
    # new CT shape, each taking 0.1-1 s on a busy 2-core CPU, and a second run on the same shape loads them.
    use_compilation_cache(args.compilation_cache, default_cache_root(), min_compile_secs=0.0)
    batch_size = default_batch_size(args.batch_size)
    args.backend = choose_backend(args)
    if args.backend == "onnxruntime":
        if args.deploy is False:
            raise CliError("--no-deploy", "an ONNX export is always the deploy (re-parameterised) network")
        several = [f"--{stage}" for stage in ("liver", "tumor", "joint") if len(getattr(args, stage) or ()) > 1]
        if several:
            raise CliError(several[0], "ensembles need --backend jax: give one .onnx file per stage")
        one = {stage: (getattr(args, stage) or [None])[0] for stage in ("liver", "tumor", "joint")}
        if any(path is not None and pathlib.Path(path).is_dir() for path in one.values()):
            one = {stage: None if path is None else onnx_cache.cached_onnx(path, args.which, default_cache_root())
                   for stage, path in one.items()}
        elif args.which != "best":
            raise CliError("--which", "an ONNX export holds one checkpoint: choose it at export (convert --which)")
        predictor = onnx_predictor(one["liver"], one["tumor"], connectivity=args.connectivity, joint=one["joint"],
                                   mirror=args.mirror, overlap=args.overlap, batch_size=batch_size,
                                   postprocess=args.postprocess)
    else:
        predictor = Predictor.from_checkpoints(
            args.liver, args.tumor, connectivity=args.connectivity, joint_path=args.joint, which=args.which,
            deploy=args.deploy, mirror=args.mirror, overlap=args.overlap, batch_size=batch_size,
            postprocess=args.postprocess)
    print("compiling the prediction stages (first run only with the compilation cache; this can take "
          "minutes on a CPU)", flush=True)
    # One per visible device, cases shared out; ONNX Runtime places its sessions itself.
    predictors = [predictor] if args.backend == "onnxruntime" else device_predictors(predictor)
    compile_s = {}
    for copy in predictors:
        for stage, seconds in copy.warmup().items():
            compile_s[stage] = compile_s.get(stage, 0.0) + seconds
    run = {"compile_s": {k: round(v, 3) for k, v in compile_s.items()}, "settings": predictor.settings(),
           "platform": jax.devices()[0].platform, "devices": len(predictors),
           "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    print(f"{len(jobs)} case(s) on {len(predictors)} device(s); compiled in "
          + ", ".join(f"{k} {v:.1f} s" for k, v in compile_s.items()))
    for model in (predictor.tumor, predictor.joint):
        if model is not None and model.postprocess is not None:
            print(f"post-processing from {model.description['source']}/postprocess.json: {model.postprocess.to_dict()}")
    todo, printed = [], {}
    lesion_maps: dict = {}  # the statistics' lesion map of a case, until its PNG numbers them
    for case, out in jobs:
        dicom_paths = dicom_export.output_paths(out, output_types)
        outputs = ([out] if "nifti" in output_types else []) + list(dicom_paths.values())
        stats_files = (sidecar_path(out, "_statistics.json"), sidecar_path(out, "_statistics.csv"))
        wanted = [*outputs, *([sidecar_path(out, ".png")] if args.png else []),
                  *(stats_files if args.statistics else ()), sidecar_path(out, "_timings.json")]
        # The timings file is written last: its presence marks a complete case.
        if args.skip_existing and all(p.exists() for p in wanted):
            print(f"{case.case_id}: {outputs[0]} exists, skipped")
            continue
        printed[case.case_id] = outputs
        reader = DicomReader(args.series, output_types) if dicom_input else None
        extra = functools.partial(write_other_outputs, reader=reader, dicom_paths=dicom_paths,
                                  statistics=args.statistics, lesion_maps=lesion_maps)
        todo.append(Job(case.case_id, case.image, out, sidecar_path(out, ".png") if args.png else None,
                        read=reader or nifti.read_image_native, write_nifti="nifti" in output_types,
                        extra_outputs=extra if (dicom_paths or args.statistics) else None,
                        extra_paths=(*dicom_paths.values(), *(stats_files if args.statistics else ()))))
    bars: dict[str, CaseProgress] = {}

    def progress_for(case_id: str) -> CaseProgress:
        bars[case_id] = CaseProgress(case_id, not args.no_progress and len(predictors) == 1)
        return bars[case_id]

    failed = 0

    def on_result(outcome: Outcome) -> None:
        nonlocal failed
        job = outcome.job
        if job.case_id in bars:
            bars.pop(job.case_id).close()
        if outcome.error is not None:
            e = outcome.error
            if not isinstance(e, Exception):  # stopped by Ctrl-C / SIGTERM: the caller re-raises
                return
            if isinstance(e, expected_errors()):
                report(e)
            else:  # a bug: its type helps
                print(f"error: {job.case_id}: {type(e).__name__}: {e}", file=sys.stderr)
            failed += 1
            return
        record = outcome.record
        status = "" if record["liver_found"] else " (NO LIVER FOUND)"
        print(f"{job.case_id}: liver {record['label_voxels']['liver']} + tumour "
              f"{record['label_voxels']['tumor']} voxels in {record['timings_s']['total']:.1f} s "
              f"-> {', '.join(map(str, printed[job.case_id]))}{status}")

    predict_cases(predictors, todo, on_result, run,
                  functools.partial(_save_overlay, number_lesions=args.statistics, lesion_maps=lesion_maps),
                  progress_for)
    if failed:
        print(f"{failed} of {len(jobs)} case(s) failed", file=sys.stderr)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (0 ok, 1 when any case or the set-up failed)."""
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
