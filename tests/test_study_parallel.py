"""Studies on several devices: device groups, worker environments, the worker scheduler, and a study
whose runs go two at a time in worker processes (two virtual CPU devices), one of them failing."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from livseg_jax.study import runner, scheduler, spec

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_device_groups_split_the_visible_devices_into_disjoint_groups():
    assert scheduler.device_groups(8, 1) == [(i,) for i in range(8)]
    assert scheduler.device_groups(8, 3) == [(0, 1, 2), (3, 4, 5)]  # 6 and 7 stay idle
    assert scheduler.device_groups(8, 2, parallel_runs=2) == [(0, 1), (2, 3)]
    assert scheduler.device_groups(4, 0) == [(0, 1, 2, 3)]  # 0: every device, one run at a time
    with pytest.raises(ValueError, match="study.devices = 3: only 2"):
        scheduler.device_groups(2, 3)


def test_worker_env_restricts_each_platform_to_its_devices():
    base = {"PATH": "/bin", "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_cpu_foo=1"}
    cpu = scheduler.worker_env("cpu", (2, 3), base)
    assert cpu["JAX_NUM_CPU_DEVICES"] == "2" and cpu["XLA_FLAGS"] == "--xla_cpu_foo=1" and cpu["PATH"] == "/bin"
    assert scheduler.worker_env("cuda", (2, 3), base)["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert scheduler.worker_env("rocm", (1,), base)["HIP_VISIBLE_DEVICES"] == "1"
    # Indices are among the devices the parent sees: mapped through its own restriction.
    assert scheduler.worker_env("cuda", (1,), {"CUDA_VISIBLE_DEVICES": "4,5"})["CUDA_VISIBLE_DEVICES"] == "5"
    with pytest.raises(ValueError, match="only 2 visible"):
        scheduler.worker_env("cuda", (2,), {"CUDA_VISIBLE_DEVICES": "4,5"})
    with pytest.raises(ValueError, match="study.parallel_runs = 1"):
        scheduler.worker_env("tpu", (0,), base)
    assert base["XLA_FLAGS"].startswith("--xla_force")  # the parent's environment is left alone


def test_run_workers_places_runs_on_free_groups_and_a_failure_stops_no_other(tmp_path):
    scripts = {"ok": "import os, time; time.sleep(0.5); print('group', os.environ['GROUP'])",
               "bad": "import sys; print('broken', file=sys.stderr); sys.exit(3)",
               "late": "import os; print('group', os.environ['GROUP'])"}
    lines = []
    status = scheduler.run_workers(
        ["ok", "bad", "late"], [(0,), (1,)], lambda name: [sys.executable, "-c", scripts[name]],
        lambda group: {**os.environ, "GROUP": ",".join(map(str, group))}, lambda name: tmp_path / name,
        report=lines.append, poll_s=0.05)
    assert status == {"ok": 0, "bad": 3, "late": 0}
    assert lines[0].startswith("run ok: started on device(s) 0") and lines[1].startswith("run bad: started on "
                                                                                         "device(s) 1")
    # "late" waited for a free group: the one "bad" gave back when it failed.
    assert lines[2].startswith("run bad: FAILED (exit 3) on device(s) 1")
    assert lines[3].startswith("run late: started on device(s) 1")
    assert (tmp_path / "late" / scheduler.LOG_FILE).read_text() == "group 1\n"
    assert "broken" in (tmp_path / "bad" / scheduler.LOG_FILE).read_text()
    records = {n: json.loads((tmp_path / n / scheduler.WORKER_FILE).read_text()) for n in scripts}
    assert {n: (r["devices"], r["returncode"]) for n, r in records.items()} == {
        "ok": ([0], 0), "bad": ([1], 3), "late": ([1], 0)}


STUDY = """
from livseg_jax.study import spec

# Tiny one-stage runs: a two-level plain U-Net, one training step (compilation dominates).
TINY = {"model.name": "unet", "model.features": (4, 8), "data.patch_size": (16, 16, 16),
        "train.steps_per_epoch": 1}


def get_config(arg=""):
    c = spec.study_config("pair", arg, "pair.py", "two runs at once, a third that fails")
    c.runs = (spec.run("A", "one_stage", TINY), spec.run("B", "one_stage", {**TINY, "seed": 1}),
              spec.run("Broken", "one_stage", {**TINY, "data.patch_size": (15, 16, 16)}))
    c.tables = (spec.table("t", "T", ("A", "B", "Broken"), (spec.column("liver Dice", "liver.dice"),)),)
    return c
"""


@pytest.mark.slow
def test_study_runs_two_runs_at_once_on_their_own_devices_and_reports_a_failed_one(tmp_path):
    config = tmp_path / "pair.py"
    config.write_text(textwrap.dedent(STUDY))
    workdir, cache = tmp_path / "study", tmp_path / "cache"
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "2"}  # the study sees two devices; each worker one
    proc = subprocess.run([sys.executable, "-m", "livseg_jax.study", f"--config={config}",
                           f"--config.data.cache_dir={cache}", f"--workdir={workdir}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"error: --runs: run(s) failed: Broken (exit 1, log {workdir}/runs/Broken/train.log)" in proc.stderr
    events = [line.split(": ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("study pair: run ")]
    starts = [i for i, e in enumerate(events) if "started" in e]
    ends = [i for i, e in enumerate(events) if "finished" in e or "FAILED" in e]
    assert starts[:2] == [0, 1] and ends[0] == 2  # A and B ran at the same time; Broken waited for a device
    records = {n: json.loads((workdir / "runs" / n / scheduler.WORKER_FILE).read_text()) for n in ("A", "B")}
    assert sorted(r["devices"] for r in records.values()) == [[0], [1]]
    for name in ("A", "B"):
        log = (workdir / "runs" / name / scheduler.LOG_FILE).read_text()
        assert "on 1 x cpu (cpu), ids 0 of 1 visible to this worker" in log  # restricted to its one device
    assert "patch" in (workdir / "runs" / "Broken" / scheduler.LOG_FILE).read_text()
    tables_md = (workdir / "tables.md").read_text()
    assert "per run of 2 visible; up to 2 runs at once" in tables_md and "| Broken (not run) |" in tables_md
    parallel = json.loads((workdir / "tables.json").read_text())

    # Finished runs stay finished: the same study run one after another in this process trains
    # nothing and tabulates the same cells from the workers' results.
    study = spec.load_config_file(config)
    study.data.cache_dir = str(cache)
    trained = []
    out = runner.run_study(study, workdir, ("A", "B"), train_fn=lambda *args: trained.append(args))
    assert trained == []
    sequential = json.loads(out["tables"]["json"].read_text())
    assert sequential["tables"] == parallel["tables"] and set(sequential["results"]) == {"A", "B"}
