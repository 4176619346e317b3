"""Folder prediction throughput: cases per minute for N synthetic CTs on 1, 2, ... devices.

    python -m experiments.bench_folder [--cases 20] [--shape 512,512,400] [--devices 1,2]

Writes N LiTS-sized synthetic CTs (`--distinct` different phantoms, copied to N names: reading
costs the same), random-weight liver and tumour stages as `bench_inference` makes them (the liver
head biased to foreground, so stage 2 runs on the whole body: the slowest case), then times:
- "one at a time": `Predictor.predict_file` case after case on one device (no overlap), and
- "pipeline, k devices": `inference.folder.predict_cases` with one worker per device on the first
  k visible devices (reading, device work and writing of different cases overlap).
A device count larger than the visible devices gives a row saying it was not run. Compilation is
excluded (each device's predictor is warmed up first). Each row has the per-case timings' means
and the peak host RSS / device memory from the timings records.

Smoke check on a CPU (seconds): --cases 3 --shape 64,64,24 --features 4,8 --liver-window 16,32,32
--tumor-window 16,32,32 --devices 1,2
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import tempfile
import time

import numpy as np

from experiments.bench_common import enable_compilation_cache, environment, int_tuple, write_result
from experiments.bench_inference import make_stage_dirs


def summarise(records: list[dict], wall_s: float) -> dict:
    """Returns cases per minute, mean per-phase seconds and the memory peaks of a run's records."""
    phases = sorted({k for r in records for k in r["timings_s"]})
    mean = {k: round(float(np.mean([r["timings_s"].get(k, 0.0) for r in records])), 4) for k in phases}
    peaks = [r.get("memory", {}) for r in records]

    def largest(key):
        values = [p[key] for p in peaks if p.get(key) is not None]
        return max(values) if values else None

    return {"cases": len(records), "wall_s": round(wall_s, 3), "cases_per_minute": round(60 * len(records) / wall_s, 2),
            "mean_timings_s": mean, "host_peak_rss_gib": largest("host_peak_rss_gib"),
            "device_peak_gib": largest("device_peak_gib")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--distinct", type=int, default=2, help="different phantoms among the cases")
    parser.add_argument("--shape", default="512,512,400", help="raw CT size x,y,z")
    parser.add_argument("--devices", default="1,2", help="device counts to run the pipeline on")
    parser.add_argument("--variant", default="elanres_msca_unet")
    parser.add_argument("--features", default="16,32,64,128,256")
    parser.add_argument("--liver-window", default="48,256,256")
    parser.add_argument("--tumor-window", default="48,128,128")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--no-sequential", action="store_true", help="skip the one-at-a-time row")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    enable_compilation_cache()
    import jax

    from livseg_jax.data.synthetic import make_phantom, write_phantom
    from livseg_jax.inference.folder import Job, device_predictors, predict_cases
    from livseg_jax.inference.two_stage import Predictor

    shape = int_tuple(args.shape)
    features = int_tuple(args.features)
    liver_window = int_tuple(args.liver_window)
    tumor_window = int_tuple(args.tumor_window)
    spacing = (0.75, 0.75, 1.0)
    tmp = pathlib.Path(tempfile.mkdtemp())
    inputs = tmp / "inputs"
    inputs.mkdir()
    t0 = time.perf_counter()
    for seed in range(min(args.distinct, args.cases)):
        hu, labels = make_phantom(shape, spacing, seed=seed)
        write_phantom(hu, labels, spacing, inputs / f"volume-{seed}.nii.gz", tmp / f"segmentation-{seed}.nii.gz")
    for i in range(args.distinct, args.cases):
        shutil.copyfile(inputs / f"volume-{i % args.distinct}.nii.gz", inputs / f"volume-{i}.nii.gz")
    print(f"{args.cases} phantoms {shape} written in {time.perf_counter() - t0:.1f} s", flush=True)
    models = tmp / "models"
    liver_dir, tumor_dir = make_stage_dirs(models, args.variant, liver_window, tumor_window, features, args.dtype, {})
    cases = [inputs / f"volume-{i}.nii.gz" for i in range(args.cases)]
    visible = jax.devices()

    rows = []
    if not args.no_sequential:
        sequential = Predictor.from_checkpoints(liver_dir, tumor_dir, deploy=True)  # its own compiled stages
        sequential.warmup()
        out = tmp / "sequential"
        out.mkdir()
        start = time.perf_counter()
        records = [sequential.predict_file(path, out / f"seg-{path.name}")[1] for path in cases]
        rows.append({"mode": "one at a time", "devices": 1, **summarise(records, time.perf_counter() - start)})
        print(rows[-1], flush=True)
    for count in (int(v) for v in args.devices.split(",")):
        if count > len(visible):
            rows.append({"mode": "pipeline", "devices": count,
                         "not_run": f"only {len(visible)} device(s) visible"})
            print(rows[-1], flush=True)
            continue
        # A fresh predictor per row: device_predictors refuses one whose stages an earlier row compiled.
        predictors = device_predictors(Predictor.from_checkpoints(liver_dir, tumor_dir, deploy=True), visible[:count])
        compile_s = [p.warmup() for p in predictors]
        out = tmp / f"pipeline-{count}"
        out.mkdir()
        jobs = [Job(path.name, path, out / f"seg-{path.name}") for path in cases]
        start = time.perf_counter()
        outcomes = predict_cases(predictors, jobs, lambda outcome: None)
        wall = time.perf_counter() - start
        errors = [f"{o.job.case_id}: {o.error!r}" for o in outcomes if o.error is not None]
        if errors:
            raise SystemExit("pipeline failed: " + "; ".join(errors))
        per_device = {}
        for o in outcomes:
            per_device[o.record["device"]] = per_device.get(o.record["device"], 0) + 1
        rows.append({"mode": "pipeline", "devices": count, "compile_s": compile_s, "cases_per_device": per_device,
                     **summarise([o.record for o in outcomes], wall)})
        print(rows[-1], flush=True)

    payload = {"benchmark": "folder", "cases": args.cases, "distinct_phantoms": args.distinct, "raw_shape": shape,
               "spacing_mm": spacing, "variant": args.variant, "features": features, "dtype": args.dtype,
               "liver_window": liver_window, "tumor_window": tumor_window, "visible_devices": len(visible),
               "environment": environment(), "rows": rows}
    print(f"wrote {write_result('bench_folder' + (f'_{args.tag}' if args.tag else ''), payload)}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
