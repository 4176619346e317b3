"""Time to the first train step of `python -m livseg_jax.train`, cold and warm, with and without
shipped XLA autotuning results (issue 21 target 2), and the dumps to ship.

    python -m experiments.bench_first_step --config configs/liver.py:paper --tag h200 \\
        [--dump-configs configs/tumor.py] [--ship-to DIR]

Every run is the real command, on the built-in synthetic data, for 3 steps of 1 epoch with one
validation, in a fresh process. The train loop compiles the step on a background thread while it
makes the state and starts the input pipeline (livseg_jax/training/compile_ahead.py) and reports
`first_step_s`: from the start of that work to the first step's result (with `state_ready_s` and
`first_batch_s` on the way); this script adds `first_step_since_command_s`, from the command's start
(imports, backend, data checks included) to that console line. Runs, in order:

0. with `--sequential`, `cold_sequential`: as `cold`, but the step compiled at the first step
   (`train.compile_ahead=False`), after the state and the first batch: the order before session 8;
1. `cold`: an empty compilation cache and no autotuning results loaded, XLA's results dumped;
   each `--dump-configs` config, and `--config` with each `--dump-sets` override, the same way
   (dumps only);
2. the dumps merged by `tools/ship_autotune_results.py` into `--ship-to` (default: a scratch
   directory seeded with the package's shipped results; with `--only-dumps`, the results for these
   versions are replaced, not merged into: `tools/ship_autotune_results.py --replace`);
3. `cold_shipped`: an empty compilation cache, the merged results loaded;
4. `warm_shipped`: the caches `cold_shipped` filled (JAX's and the compiled-program cache,
   livseg_jax/training/executable_cache.py: the step loaded without tracing);
5. `warm_traced`: the same with the compiled-program cache deleted (traced, lowered, then loaded
   from JAX's cache, as before session 8).

Every row also holds `compile_log`: each program's trace, lowering and XLA compile as JAX timed
them (`JAX_LOG_COMPILES=1`), the critical path of its first step; `train_rates`, the steps per
second of each logged window after the first step (`--steps 300 --log-every 50` gives the steady
rate); and `one_program_from_step`, where a run that started as parts (`train.step_programs` 2 or 3,
the GPU default 2) switched to the one program.

Writes experiments/results/bench_first_step[_TAG].json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from experiments.bench_common import environment, write_result
from livseg_jax.run_dir import METRICS_FILE
from livseg_jax.training.executable_cache import SUBDIR
from livseg_jax.training.logging import read_metrics
from livseg_jax.xla_flags import AUTOTUNE_MANIFEST, SHIPPED_AUTOTUNE_DIR


def short_run(steps: int = 3, log_every: int = 1) -> list[str]:
    """The train command's options for a run of `steps` steps in one epoch, one validation at its end."""
    return ["--config.train.num_epochs=1", f"--config.train.steps_per_epoch={steps}",
            "--config.train.eval_every_epochs=1", f"--config.train.log_every_steps={log_every}",
            "--config.data.num_val_cases=1"]


SHORT_RUN = short_run()
NUMBERS = {"first_step_s": r"first step done ([\d.]+) s",
           "compile_s": r"train step ready in ([\d.]+) s",
           "wait_s": r"the first step waited ([\d.]+) s",
           "state_ready_s": r"state ready at ([\d.]+) s",
           "first_batch_s": r"first batch at ([\d.]+) s"}


# JAX's own timing of each program's phases, logged with JAX_LOG_COMPILES=1 (set for every run): the
# first step's critical path, program by program (docs/benchmarks.md, session 12).
COMPILE_LOG = {"trace": re.compile(r"Finished tracing (?:\+ transforming )?(\S+) for p?jit in ([\d.]+) sec"),
               "lower": re.compile(r"Finished jaxpr to MLIR module conversion jit\((\S+)\) in ([\d.]+) sec"),
               "compile": re.compile(r"Finished XLA compilation of jit\((\S+)\) in ([\d.]+) sec")}


def compile_log(lines: Sequence[str], at_least: float = 0.05) -> list[dict]:
    """Returns [{"program", "phase", "s"}], in the console's order, of the phases JAX logged that
    took at least `at_least` seconds (the many small programs of evaluation left out)."""
    phases = []
    for line in lines:
        for phase, pattern in COMPILE_LOG.items():
            match = pattern.search(line)
            if match and float(match.group(2)) >= at_least:
                phases.append({"program": match.group(1), "phase": phase, "s": round(float(match.group(2)), 3)})
    return phases


def cache_contents(cache: pathlib.Path) -> dict[str, int]:
    """Returns {folder: files in it} for the folders of a compilation cache, and its own files under
    "(entries)": JAX's entries, the compiled-program cache and XLA's caches JAX points into it (the
    per-fusion autotuning results, `jax_persistent_cache_enable_xla_caches`)."""
    if not cache.is_dir():
        return {}
    contents = {"(entries)": sum(1 for p in cache.iterdir() if p.is_file())}
    for folder in sorted(p for p in cache.iterdir() if p.is_dir()):
        contents[folder.name] = sum(1 for p in folder.rglob("*") if p.is_file())
    return contents


# The folder JAX points XLA's per-fusion autotuning cache to inside the compilation cache: XLA writes
# one file there for every fusion it autotunes (docs/benchmarks.md, session 10).
AUTOTUNE_CACHE = "xla_gpu_per_fusion_autotune_cache_dir"


def autotuned_fusions(before: dict[str, int], after: dict[str, int]) -> int:
    """Returns how many fusions a run autotuned: the files it added to XLA's per-fusion cache."""
    return after.get(AUTOTUNE_CACHE, 0) - before.get(AUTOTUNE_CACHE, 0)


def autotune_cache_files(cache: pathlib.Path) -> set[pathlib.Path]:
    """The files of XLA's per-fusion autotuning cache inside `cache` (one per autotuned fusion)."""
    folder = cache / AUTOTUNE_CACHE
    return {p for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else set()


def autotuned_entries(new: set[pathlib.Path], limit: int = 5, chars: int = 6000) -> list[dict]:
    """The first `limit` of the cache files a run added, each with the start of its text (the
    fusion's key and the chosen kernel): which fusions loaded results miss, so why they do."""
    return [{"file": p.name, "text": p.read_text(errors="replace")[:chars]} for p in sorted(new)[:limit]]


def train_run(config: str, work: pathlib.Path, name: str, cache: pathlib.Path, autotune: str,
              dump: pathlib.Path | None = None, ahead: bool = True, overrides: Sequence[str] = (),
              run_options: Sequence[str] = SHORT_RUN) -> dict:
    """Runs the train command once; returns its timings parsed from the console and its wall time,
    and the steps per second of each logged window (`train_rates`: [step, steps/s], from the run's
    metrics.jsonl; the first step's compile is not in them)."""
    env = dict(os.environ, LIVSEG_CACHE=str(work / "data"), JAX_LOG_COMPILES="1")
    if dump is not None:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_gpu_dump_autotune_results_to={dump}".strip()
    run_dir = work / "runs" / name
    cmd = [sys.executable, "-m", "livseg_jax.train", f"--config={config}", f"--workdir={run_dir}",
           f"--config.train.compilation_cache={cache}", f"--config.train.autotune_results={autotune}",
           f"--config.train.compile_ahead={ahead}", *run_options, *overrides]
    before, before_files = cache_contents(cache), autotune_cache_files(cache)
    start = time.perf_counter()
    # Lines are timed as they arrive, so the row also says when the first step was done counted from
    # the command's start (imports, backend, data checks included), as a user waits for it.
    proc = subprocess.Popen(cmd, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines, since_start = [], None
    for line in proc.stdout:
        lines.append(line)
        if since_start is None and "first step done" in line:
            since_start = round(time.perf_counter() - start, 1)
    proc.wait()
    row = {"run": name, "config": config, "autotune_results": autotune, "compile_ahead": ahead,
           "rc": proc.returncode, "wall_s": round(time.perf_counter() - start, 1),
           "first_step_since_command_s": since_start}
    out = "".join(lines)
    for key, pattern in NUMBERS.items():
        match = re.search(pattern, out)
        row[key] = float(match.group(1)) if match else None
    row["loaded"] = "(loaded from the compiled-program cache)" in out
    switched = re.search(r"step (\d+): switched to the train step compiled as one program", out)
    row["one_program_from_step"] = int(switched.group(1)) if switched else None  # a start as parts
    row["train_rates"] = ([[r["step"], round(r["steps_per_sec"], 3)] for r in read_metrics(run_dir)
                           if r["kind"] == "train"] if (run_dir / METRICS_FILE).exists() else [])
    row["compile_log"] = compile_log(lines)
    row["cache_contents"] = cache_contents(cache)  # after the run: what a later run can read
    # With loaded results, anything autotuned is a fusion they miss: results stale for this program.
    row["autotuned_fusions"] = autotuned_fusions(before, row["cache_contents"])
    if autotune != "off":  # with results loaded, say which fusions they missed
        row["autotuned_entries"] = autotuned_entries(autotune_cache_files(cache) - before_files)
    if proc.returncode:
        row["error"] = out[-3000:]
    print(f"{name:14s} {config:24s} first step {row['first_step_s']} s (compile {row['compile_s']} s, "
          f"waited {row['wait_s']} s; {since_start} s after the command started), wall {row['wall_s']} s, "
          f"rc {proc.returncode}", flush=True)
    return row


def cold_runs(config: str, dump_configs: Sequence[str], dump_sets: Sequence[str],
              settings: Sequence[str]) -> list[tuple[str, list[str], str]]:
    """Returns the cold runs that dump autotuning results, as (config, its KEY=VALUE settings, the
    program's name in the shipped manifest): `config`, each of `dump_configs`, then `config` with
    each of `dump_sets` ("KEY=VALUE[,KEY=VALUE]") added to `settings` (--set, applied to every run)."""
    runs = [(c, list(settings)) for c in (config, *dump_configs)]
    runs += [(config, [*settings, *extra.split(",")]) for extra in dump_sets]
    return [(c, s, f"{c} train" + (f" ({', '.join(s)})" if s else "")) for c, s in runs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/liver.py:paper")
    parser.add_argument("--dump-configs", nargs="*", default=[], help="more configs to dump autotuning results for")
    parser.add_argument("--dump-sets", nargs="*", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="more cold runs of --config with these overrides (after --set's), dumps only, e.g. "
                             "train.step_programs=1 train.step_programs=2: every form's results shipped together")
    parser.add_argument("--ship-to", type=pathlib.Path, default=None, help="where the merged results go")
    parser.add_argument("--only-dumps", action="store_true",
                        help="ship this run's dumps in place of the package's results for these versions, not merged "
                             "into them (after a program change: results of fusions that no longer exist go)")
    parser.add_argument("--sequential", action="store_true",
                        help="first a cold run compiling the step at the first step (train.compile_ahead=False)")
    parser.add_argument("--shipped-only", action="store_true",
                        help="skip the cold runs and the dumps: the package's shipped results, runs 3-5 only")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run, e.g. train.step_programs=1 (repeatable)")
    parser.add_argument("--no-traced", action="store_true", help="skip the warm_traced run")
    parser.add_argument("--cold-only", action="store_true", help="skip the warm runs (warm_shipped, warm_traced)")
    parser.add_argument("--steps", type=int, default=3,
                        help="steps per run; with --log-every, each row's train_rates give the steady steps/s")
    parser.add_argument("--log-every", type=int, default=1, help="train.log_every_steps (each log waits for the step)")
    parser.add_argument("--tag", default="local")
    args = parser.parse_args()
    overrides = [f"--config.{item}" for item in args.set]
    options = short_run(args.steps, args.log_every)
    run = functools.partial(train_run, overrides=overrides, run_options=options)
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_first_step_"))
    ship = args.ship_to or work / "autotune"
    if SHIPPED_AUTOTUNE_DIR.is_dir() and ship.resolve() != SHIPPED_AUTOTUNE_DIR.resolve():  # else merged in place
        shutil.copytree(SHIPPED_AUTOTUNE_DIR, ship, dirs_exist_ok=True)
    rows, dumps, programs = [], [], []
    shipped = ""

    def record(row: dict) -> None:  # written after every run: a run past the time limit keeps the others
        rows.append(row)
        write_result(f"bench_first_step_{args.tag}", {
            "benchmark": "first_step", "config": args.config, "environment": environment(),
            "shipped_file": shipped, "shipped_bytes": os.path.getsize(shipped) if os.path.isfile(shipped) else None,
            "steps": [*options, *overrides], "rows": rows})

    if args.sequential:
        record(run(args.config, work, "cold_sequential", work / "cache_sequential", "off", ahead=False))
    for i, (config, settings, program) in enumerate(
            [] if args.shipped_only else cold_runs(args.config, args.dump_configs, args.dump_sets, args.set)):
        dumps.append(work / f"dump_{i}.textproto")
        programs.append(program)
        record(run(config, work, f"cold_{i}" if i else "cold", work / f"cache_cold_{i}", "off", dumps[-1],
                   overrides=[f"--config.{item}" for item in settings]))
    present = [d for d in dumps if d.exists()]
    if args.shipped_only:
        shipped = "shipped"
    elif present:
        replace = ["--replace"] if args.only_dumps else []
        subprocess.run([sys.executable, "-m", "tools.ship_autotune_results", *map(str, present), "--programs",
                        *[p for p, d in zip(programs, dumps, strict=True) if d.exists()], "--out-dir", str(ship),
                        *replace], check=True)
        manifest = json.loads((ship / AUTOTUNE_MANIFEST).read_text())
        shipped = str(ship / manifest["files"][-1]["file"])
    if shipped:
        record(run(args.config, work, "cold_shipped", work / "cache_shipped", shipped))
        if rows[-1]["rc"] == 0 and rows[-1]["autotuned_fusions"]:
            # The shipped results come from runs of 3 steps: a run of another epoch length has other schedule
            # constants in its programs, one small fusion without a result (docs/benchmarks.md, session 16).
            length = "" if not args.shipped_only or args.steps == 3 else (
                f"; a run of {args.steps} steps, not the shipped dumps' 3, autotunes one schedule fusion more")
            print(f"note: XLA autotuned {rows[-1]['autotuned_fusions']} kernels the loaded results do not cover: "
                  "they are stale for this program (or none were shipped for these versions); dump them again "
                  f"(--only-dumps){length}", flush=True)
        if not args.cold_only:
            record(run(args.config, work, "warm_shipped", work / "cache_shipped", shipped))
        # warm_traced: the same without the compiled-program cache (traced, then JAX's cache)
        if not (args.no_traced or args.cold_only):
            shutil.rmtree(work / "cache_shipped" / SUBDIR)
            record(run(args.config, work, "warm_traced", work / "cache_shipped", shipped))
    print("| run | config | first step (s) | step compile (s) | first step waited (s) | first step since the "
          "command started (s) | wall (s) |\n|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        cells = [r[k] for k in ("run", "config", "first_step_s", "compile_s", "wait_s", "first_step_since_command_s",
                                "wall_s")]
        print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
