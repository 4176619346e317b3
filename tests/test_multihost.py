"""Multi-host training on one machine: 2 JAX processes x 2 CPU devices on 127.0.0.1, started through
the documented environment variables, against the same run in 1 process x 4 devices; a restart
with the compilation cache on; its checkpoint predicted on 1 device (issue 20)."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from livseg_jax.training.distributed import cluster_arguments

REPO = pathlib.Path(__file__).resolve().parents[1]

# A tiny liver run on small synthetic volumes: 2 epochs x 2 steps, no validation.
TRAIN_ARGS = [
    f"--config={REPO / 'configs' / 'liver.py'}", "--config.model.name=unet", "--config.model.features=(4,8,8)",
    "--config.data.synthetic.num_cases=3", "--config.data.synthetic.shape=(48,48,16)",
    "--config.data.synthetic.spacing=(2.0,2.0,4.0)", "--config.data.num_val_cases=1",
    "--config.data.patch_size=(8,16,16)", "--config.data.batch_size=4", "--config.train.steps_per_epoch=2",
    "--config.train.log_every_steps=1", "--config.train.eval_every_epochs=0",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(devices: int, cache: pathlib.Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "OMPI_", "LIVSEG_"))}
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices), PYTHONPATH=str(REPO),
               LIVSEG_CACHE=str(cache), XLA_FLAGS=os.environ.get("XLA_FLAGS", ""))
    return env


def train(workdir, cache, epochs, processes=1, devices=4, timeout=300):
    """Runs `python -m livseg_jax.train` in `processes` processes; returns their (returncode, output)."""
    args = [sys.executable, "-m", "livseg_jax.train", *TRAIN_ARGS, f"--config.train.num_epochs={epochs}",
            f"--workdir={workdir}"]
    port = free_port()
    procs = []
    for i in range(processes):
        env = base_env(devices, cache)
        if processes > 1:
            env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
                       JAX_PROCESS_ID=str(i))
        procs.append(subprocess.Popen(args, env=env, cwd=workdir.parent, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    results = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        results.append((p.returncode, out))
    return results


def losses(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def latest_params(workdir):
    from livseg_jax.run_dir import load_variables

    variables, _ = load_variables(workdir, "latest")
    return variables["params"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same run in 1 process x 4 devices and in 2 processes x 2 devices (a shared cache folder)."""
    root = tmp_path_factory.mktemp("multihost")
    cache = root / "cache"
    started = time.perf_counter()
    ((code, out),) = train(root / "single", cache, epochs=2)
    assert code == 0, out[-3000:]
    single_s = time.perf_counter() - started
    started = time.perf_counter()
    results = train(root / "multi", cache, epochs=2, processes=2, devices=2)
    for code, out in results:
        assert code == 0, out[-3000:]
    multi_s = time.perf_counter() - started
    return root, results, {"single_s": single_s, "multi_s": multi_s}


def test_two_processes_train_like_one_process_with_as_many_devices(runs):
    root, results, timings = runs
    single, multi = losses(root / "single"), losses(root / "multi")
    assert sorted(single) == sorted(multi) == [1, 2, 3, 4]
    np.testing.assert_allclose([multi[s] for s in sorted(multi)], [single[s] for s in sorted(single)],
                               rtol=1e-4)
    flat = [np.concatenate([np.ravel(v) for v in jax.tree.leaves(latest_params(root / run))])
            for run in ("single", "multi")]
    np.testing.assert_allclose(flat[1], flat[0], atol=1e-4)
    # Every process says which it is; only process 0 wrote the shared files.
    assert "[process 0/2] done: step 4" in results[0][1] and "[process 1/2] done: step 4" in results[1][1]
    print(f"timings: {timings}")


def test_a_restarted_two_process_run_resumes_with_the_compilation_cache_setting_on(runs):
    """Restart with the default compilation cache ("auto") after the first run warmed it: the run
    resumes at step 4 and finishes (the multi-process path turns the cache off, with a note)."""
    root, _, _ = runs
    results = train(root / "multi", root / "cache", epochs=3, processes=2, devices=2, timeout=240)
    for code, out in results:
        assert code == 0, out[-3000:]
        assert "resuming from step 4" in out and "done: step 6" in out
        assert "compilation cache is off in multi-process runs" in out
    assert sorted(losses(root / "multi")) == [1, 2, 3, 4, 5, 6]


def test_a_checkpoint_of_two_processes_predicts_on_one_device(runs, tmp_path):
    root, _, _ = runs
    env = base_env(1, root / "cache")
    ct = sorted((root / "cache").glob("synthetic-*/volume-*.nii.gz"))
    done = subprocess.run([sys.executable, "-m", "livseg_jax.predict", "--liver", str(root / "multi"),
                           "--which", "latest", "-i", str(ct[0]), "-o", str(tmp_path / "out"), "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((tmp_path / "out").glob("*.nii.gz"))) == 1


# ------------------------------------------------------------- start-up from the environment


def test_explicit_variables_become_initialize_arguments():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3",
           "JAX_LOCAL_DEVICE_IDS": "0,1"}
    args = cluster_arguments(env)
    assert args["coordinator_address"] == "10.0.0.1:1234" and args["num_processes"] == 4
    assert args["process_id"] == 3 and args["local_device_ids"] == [0, 1]
    assert args["heartbeat_timeout_seconds"] <= 10


@pytest.mark.parametrize("env, message", [
    ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "JAX_NUM_PROCESSES, JAX_PROCESS_ID missing"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "must be below"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "not an integer"),
    ({"LIVSEG_DISTRIBUTED": "1"}, "no cluster is described"),
    ({"LIVSEG_DISTRIBUTED": "yes"}, "use 1"),
])
def test_incomplete_cluster_descriptions_are_refused_naming_the_variables(env, message):
    with pytest.raises(ValueError, match=message):
        cluster_arguments(env)


def test_launchers_jax_detects_and_single_process():
    assert cluster_arguments({}) is None
    assert cluster_arguments({"SLURM_NTASKS": "1"}) is None
    assert cluster_arguments({"LIVSEG_DISTRIBUTED": "0", "SLURM_NTASKS": "8"}) is None
    for env in ({"SLURM_NTASKS": "8"}, {"OMPI_COMM_WORLD_SIZE": "2"}, {"TPU_WORKER_HOSTNAMES": "a,b"}):
        assert set(cluster_arguments(env)) == {"heartbeat_timeout_seconds", "initialization_timeout"}


def test_a_dead_worker_stops_the_others_within_seconds(tmp_path):
    """SIGKILL process 1 mid-training: process 0 stops with an error within the heartbeat timeout
    (10 s, livseg_jax.training.distributed) plus its reaction time, not JAX's default 100 s."""
    workdir, cache = tmp_path / "run", tmp_path / "cache"
    args = [sys.executable, "-m", "livseg_jax.train", *TRAIN_ARGS, "--config.train.num_epochs=100",
            f"--workdir={workdir}"]
    port = free_port()
    procs = []
    for i in range(2):
        env = base_env(2, cache)
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
        procs.append(subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    try:
        deadline = time.monotonic() + 240
        metrics = workdir / "metrics.jsonl"
        while not (metrics.exists() and '"train"' in metrics.read_text()):  # training has started
            assert time.monotonic() < deadline and procs[0].poll() is None, "training did not start"
            time.sleep(0.5)
        procs[1].kill()
        killed = time.monotonic()
        out, _ = procs[0].communicate(timeout=90)
        stopped_after = time.monotonic() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode != 0, out[-2000:]
    assert stopped_after < 30, f"process 0 took {stopped_after:.1f} s to stop"
    print(f"process 0 stopped {stopped_after:.1f} s after process 1 was killed")
