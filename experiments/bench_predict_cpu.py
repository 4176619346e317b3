"""`python -m livseg_jax.predict` on a CPU, as a user runs it: the `:paper` networks on one real
CT (3D-IRCADb 1.17, 512x512x119), first use (empty compilation cache) and later runs (warm cache),
each in its own process; per-phase seconds from the timings JSON predict writes, wall clock and
peak resident memory of the process.

    taskset -c 0,1 python -m experiments.bench_predict_cpu --tag 2core
    python -m experiments.bench_predict_cpu --cpus 0,1 --warm-runs 2 --tag 2core
    python -m experiments.bench_predict_cpu --smoke      # tiny networks on a small CT: checks the script
    python -m experiments.bench_predict_cpu --cpus 0,1 --warm-runs 0 --shape 512,512,1000 --tag 2core_512x512x1000

The stage run directories (written under --workdir, never in the checkout) hold initialised
`configs/{liver,tumor}.py:paper` variables: the weights do not change the time, except through
where stage 1 finds liver. The liver head is biased to foreground everywhere, so stage 1 keeps the
whole body and stage 2 runs over all of it: the slowest case (a trained liver model crops stage 2
to the liver's box). JAX runs on the CPU even where a GPU is visible. `--cpus` pins each predict
process to those cores (what `taskset -c` does); XLA:CPU sizes its thread pool from the cores the
process may run on. Extra predict options per run: `--predict-args "--batch-size 2"`. Writes
experiments/results/bench_predict_cpu[_TAG].json and prints a Markdown table (docs/benchmarks.md,
"Prediction on a CPU").
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np

from experiments.bench_common import REPO, environment, write_result

REAL_DATA = pathlib.Path(os.environ.get("LIVSEG_REAL_DATA", REPO.parent / "shared" / "data"))
IRCADB_PATIENT = "3Dircadb1/3Dircadb1.17"
SMOKE_FEATURES = (4, 8)
SMOKE_SHAPE = (96, 96, 24)  # x, y, z of the synthetic smoke CT


def make_stage_dir(root: pathlib.Path, stage: str, smoke: bool) -> pathlib.Path:
    """Returns the run directory of one stage: initialised `:paper` variables (tiny with `smoke`),
    the liver head biased to foreground."""
    import importlib

    import jax

    from livseg_jax.models import build_model, init_variables
    from livseg_jax.run_dir import write_variables

    config = importlib.import_module(f"configs.{stage}").get_config("paper")
    if smoke:
        config.model.name, config.model.features = "unet", SMOKE_FEATURES
        config.data.patch_size = (16, 32, 32)
    variables = jax.device_get(init_variables(build_model(config.model), jax.random.key(0), (16, 32, 32)))
    if stage == "liver":
        head = max((k for k in variables["params"] if k.startswith("head")), key=lambda k: int(k[4:] or 0))
        bias = np.zeros_like(variables["params"][head]["bias"])
        bias[1:] = 20.0
        variables["params"][head]["bias"] = bias
    return write_variables(root / stage, variables, config, force=True)


def prepare_ct(workdir: pathlib.Path, smoke: bool, shape: tuple[int, ...] | None = None) -> pathlib.Path:
    """Returns the NIfTI CT to predict: 3D-IRCADb 1.17 imported once, or a synthetic one of `shape`
    (x, y, z; the smoke test's small one with `smoke`)."""
    if smoke or shape:
        from livseg_jax.data.synthetic import make_phantom, write_phantom

        shape = shape or SMOKE_SHAPE
        name = "x".join(map(str, shape))
        path = workdir / f"ct_{name}" / "volume-0.nii.gz"
        if not path.exists():
            spacing = (0.75, 0.75, 1.0 if shape[2] > 400 else 1.6)
            hu, labels = make_phantom(shape, spacing, seed=0)
            write_phantom(hu, labels, spacing, path, path.parent / "segmentation-0.nii.gz")
        return path
    path = workdir / "ct" / "volume-17.nii.gz"
    if not path.exists():
        source = REAL_DATA / IRCADB_PATIENT
        if not source.exists():
            raise SystemExit(f"{source}: not found; set LIVSEG_REAL_DATA to the shared data folder")
        subprocess.run([sys.executable, "-m", "livseg_jax.data.ircadb", str(source), str(workdir / "ct")],
                       check=True, cwd=REPO)
    return path


def run_predict(liver: pathlib.Path, tumor: pathlib.Path, ct: pathlib.Path, out: pathlib.Path,
                cache: pathlib.Path, cpus: list[int] | None, extra: list[str]) -> dict:
    """Returns {"wall_s", "peak_rss_mb", "timings_s", "compile_s", ...} of one predict process."""
    cmd = [sys.executable, "-m", "livseg_jax.predict", "--liver", str(liver), "--tumor", str(tumor),
           "-i", str(ct), "-o", str(out), "--no-progress", "--compilation-cache", str(cache), *extra]
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    log = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak memory, not all children's
    proc.returncode = os.waitstatus_to_exitcode(status)
    row = {"wall_s": round(time.perf_counter() - start, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
           "cpu_s": round(usage.ru_utime + usage.ru_stime, 1)}
    timings = sorted(out.glob("*_timings.json"))
    if proc.returncode or not timings:
        return {**row, "error": log[-2000:]}
    record = json.loads(timings[0].read_text())
    shutil.rmtree(out)
    return {**row, "timings_s": record["timings_s"], "compile_s": record["run"]["compile_s"],
            "settings": record["run"]["settings"], "liver_windows": record.get("liver_windows"),
            "tumor_windows": record.get("tumor_windows"), "preprocessed_shape": record.get("preprocessed_shape"),
            "first_window_s": first_window_seconds(log, row["wall_s"], record)}


def first_window_seconds(log: str, wall: float, record: dict) -> float:
    """Returns the seconds from the process start to the first window (all that precedes the
    networks: imports, loading, compiling, reading and preprocessing)."""
    t = record["timings_s"]
    after = sum(v for k, v in t.items() if k not in ("total", "read", "preprocess"))
    return round(wall - after, 2)


def table(rows: list[dict]) -> str:
    """Returns a Markdown table of the runs."""
    phases = ("read", "preprocess", "liver_inference", "tumor_inference", "write")
    head = "| run | wall s | before 1st window s | compile liver / tumor s | " + \
        " | ".join(f"{p} s" for p in phases) + " | CPU s | peak RSS GB |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['run']} | {r['wall_s']} | error | | | | | | | | |")
            continue
        c, t = r["compile_s"], r["timings_s"]
        lines.append(f"| {r['run']} | {r['wall_s']:.1f} | {r['first_window_s']:.1f} | "
                     f"{c.get('liver', 0):.1f} / {c.get('tumor', 0):.1f} | "
                     + " | ".join(f"{t.get(p, 0):.1f}" for p in phases)
                     + f" | {r['cpu_s']:.0f} | {r['peak_rss_mb'] / 1024:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/livseg_bench_predict_cpu",
                        help="run directories, the CT, caches and outputs (outside the checkout)")
    parser.add_argument("--cpus", default="", help="pin predict to these cores, e.g. 0,1 (as taskset -c)")
    parser.add_argument("--warm-runs", type=int, default=1, help="runs after the first (warm cache)")
    parser.add_argument("--predict-args", default="", help="extra predict options, e.g. '--batch-size 2'")
    parser.add_argument("--smoke", action="store_true", help="tiny networks on a small synthetic CT")
    parser.add_argument("--shape", default="", help="a synthetic CT of this size x,y,z instead of 3D-IRCADb "
                        "(e.g. 512,512,1000 for the memory of a long scan)")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    os.environ["JAX_PLATFORMS"] = "cpu"  # a CPU benchmark, also on a GPU machine (children inherit it)
    workdir = pathlib.Path(args.workdir)
    if REPO in workdir.resolve().parents or workdir.resolve() == REPO:
        raise SystemExit(f"--workdir {workdir}: choose a folder outside the checkout")
    workdir.mkdir(parents=True, exist_ok=True)
    cpus = [int(c) for c in args.cpus.split(",") if c] or None
    ct = prepare_ct(workdir, args.smoke, tuple(int(v) for v in args.shape.split(",")) if args.shape else None)
    models = workdir / ("models_smoke" if args.smoke else "models")
    if not (models / "tumor" / "config.json").exists():
        for stage in ("liver", "tumor"):
            make_stage_dir(models, stage, args.smoke)
    cache = workdir / "jax_cache"
    shutil.rmtree(cache, ignore_errors=True)  # the first run compiles everything
    # predict's own cache root (`--backend auto` keeps its ONNX exports there): empty too, so the
    # first run exports the stages as a user's first run does.
    os.environ["LIVSEG_CACHE"] = str(workdir / "livseg_cache")
    shutil.rmtree(workdir / "livseg_cache", ignore_errors=True)
    rows = []
    for i in range(1 + args.warm_runs):
        name = "first use (cold cache)" if i == 0 else f"later run {i} (warm cache)"
        row = {"run": name, **run_predict(models / "liver", models / "tumor", ct, workdir / f"out{i}", cache, cpus,
                                          shlex.split(args.predict_args))}
        rows.append(row)
        print(f"{name}: wall {row['wall_s']} s" + (f" ERROR {row['error']}" if "error" in row else
              f", compile {row['compile_s']}, phases {row['timings_s']}"), flush=True)
    payload = {"ct": str(ct), "smoke": args.smoke, "cpus": cpus, "affinity": sorted(os.sched_getaffinity(0)),
               "predict_args": args.predict_args, "runs": rows, "environment": environment()}
    path = write_result("bench_predict_cpu" + (f"_{args.tag}" if args.tag else ""), payload)
    print(table(rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
