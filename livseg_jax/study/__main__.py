"""Run a study: `python -m livseg_jax.study --config=configs/studies/NAME.py[:paper] --workdir=DIR`.

Options: `--config.data.root=DIR` (real data; default the built-in synthetic set; with
`--config.data.layout`, `--config.data.label_map` as for training), any other
`--config.<key>=value`, and `--runs=a,b` to run only those runs (the tables still show every run
finished in DIR). Rerunning the same command resumes: finished runs are not trained again.

Placement: each run trains data parallel on `study.devices` devices (0: all visible). When more
devices are visible than one run uses, up to visible // `study.devices` runs (at most
`study.parallel_runs`, 0: no limit) go at once, each in a worker process of this command
(`--worker`, internal) restricted to its own devices; see `livseg_jax.study.scheduler`.
"""

from __future__ import annotations

import pathlib
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from livseg_jax.cli_errors import CliError, run_absl_app
from livseg_jax.compilation_cache import use_compilation_cache
from livseg_jax.config import default_cache_root
from livseg_jax.study import scheduler, spec
from livseg_jax.study.runner import run_study, run_study_in_workers, run_worker
from livseg_jax.xla_flags import apply_training_xla_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "study config file (configs/studies/NAME.py[:paper])")
_WORKDIR = flags.DEFINE_string("workdir", "", "study directory (default: studies/<name>-<scale>)")
_RUNS = flags.DEFINE_list("runs", [], "only these runs (default: all)")
_WORKER = flags.DEFINE_bool("worker", False, "internal: train, predict and evaluate --runs in this process on "
                            "every device it sees, write no tables (the study starts its workers so)")


def placement(study: ml_collections.ConfigDict, selected: int) -> tuple[dict | None, list[tuple[int, ...]]]:
    """Returns (probed devices, device groups) for running runs in workers, or (None, []) for one after another."""
    per_run, parallel = int(study.devices), int(study.parallel_runs)
    if per_run == 0 or parallel == 1 or selected < 2:
        return None, []
    devices = scheduler.probe_devices()
    groups = scheduler.device_groups(devices["count"], per_run, parallel)
    return (devices, groups) if len(groups) >= 2 else (None, [])


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config=configs/studies/NAME.py is required")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    study = _CONFIG.value
    # Before anything starts a backend: the XLA flags every run's network forms need, and the
    # autotuning results to load (one file per process, so one setting for the study's runs).
    no_split = {"train": (), "val": ()}
    configs = [spec.stage_run_config(study, entry, stage, no_split)
               for entry in study.runs for stage in spec.run_stages(entry)]
    settings = sorted({c.train.get("autotune_results", "shipped") for c in configs})
    if len(settings) > 1:
        raise ValueError(f"train.autotune_results differs between the study's runs ({settings}); one process "
                         "loads one autotuning results file")
    autotune_line = apply_training_xla_flags([c.model for c in configs], "", settings[0] if settings else "shipped")
    if autotune_line:
        print(autotune_line, flush=True)
    cache = pathlib.Path(study.data.cache_dir).expanduser() if study.data.cache_dir else default_cache_root()
    use_compilation_cache("auto", cache)
    workdir = pathlib.Path(_WORKDIR.value or pathlib.Path("studies") / f"{study.name}-{study.scale}").absolute()
    if _WORKER.value:
        run_worker(study, workdir, _RUNS.value)
        return
    devices, groups = placement(study, len(_RUNS.value) or len(study.runs))
    if not groups:
        out = run_study(study, workdir, _RUNS.value)
    else:
        # A worker is this command again (same flags and overrides), limited to one run; the last
        # --runs / --workdir on a command line win.
        def command(name: str) -> list[str]:
            return [sys.executable, "-m", "livseg_jax.study", *sys.argv[1:], f"--workdir={workdir}",
                    f"--runs={name}", "--worker"]

        out = run_study_in_workers(study, workdir, _RUNS.value, command, devices, groups)
    print(f"done: {out['tables']['md']}" + (f", figure {out['figure']}" if out["figure"] else ""))
    if out.get("failed"):
        logs = ", ".join(f"{name} (exit {rc}, log {workdir / 'runs' / name / scheduler.LOG_FILE})"
                         for name, rc in out["failed"].items())
        raise CliError("--runs", f"run(s) failed: {logs}; the tables show the finished runs",
                       "read the logs, fix the cause and rerun the same command: finished runs are kept")


if __name__ == "__main__":
    run_absl_app(main)
