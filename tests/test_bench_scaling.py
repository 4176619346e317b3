"""experiments/bench_scaling.py's step variants and profile summary: collective time, its exposed part."""

import pathlib

import pytest

from experiments.bench_scaling import all_reduce_count, collective_overlap, merge_intervals, step_variants


def kernel(pid: int, tid: int, name: str, start_us: float, dur_us: float) -> dict:
    return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": start_us, "dur": dur_us}


def trace(pid: int) -> list[dict]:
    """One GPU: compute on stream 1 busy 0-100 us and 150-200 us, NCCL on stream 2 from 80 to 180 us."""
    return [
        {"ph": "M", "name": "process_name", "pid": pid, "args": {"name": f"/device:GPU:{pid}"}},
        {"ph": "M", "name": "thread_name", "pid": pid, "tid": 1, "args": {"name": "Stream #14(Compute)"}},
        {"ph": "M", "name": "thread_name", "pid": pid, "tid": 2, "args": {"name": "Stream #22(Nccl)"}},
        {"ph": "M", "name": "thread_name", "pid": pid, "tid": 3, "args": {"name": "XLA Ops"}},
        kernel(pid, 1, "loop_add_fusion_1", 0, 60),
        kernel(pid, 1, "sm90_xmma_fprop_implicit_gemm", 40, 60),  # overlaps the fusion: busy 0-100
        kernel(pid, 1, "input_reduce_fusion_2", 150, 50),
        kernel(pid, 2, "ncclDevKernel_AllReduce_Sum_f32_RING_LL", 80, 100),
        kernel(pid, 3, "all-reduce-start.1", 80, 100),  # an op line, not a kernel: not counted again
    ]


def test_collective_time_and_the_part_no_compute_kernel_hides():
    events = [{"ph": "M", "name": "process_name", "pid": 9, "args": {"name": "/host:CPU"}},
              kernel(9, 1, "ncclDevKernel_AllReduce", 0, 1000)] + trace(0) + trace(1)
    summary = collective_overlap(events, steps=2)
    assert summary["devices_traced"] == 2  # the host's events are left out
    assert summary["collective_ms_per_step"] == pytest.approx(0.1 / 2)
    assert summary["compute_busy_ms_per_step"] == pytest.approx(0.15 / 2)
    # 80-180 us in NCCL; compute covers 80-100 and 150-180: 50 us exposed
    assert summary["exposed_collective_ms_per_step"] == pytest.approx(0.05 / 2)
    assert summary["collective_kernels_per_step"] == 0.5
    assert summary["span_ms_per_step"] == pytest.approx(0.2 / 2)  # first kernel at 0 us, last ends at 200


def test_a_trace_without_device_kernels_gives_zeros():
    assert collective_overlap([], steps=3) == {"devices_traced": 0, "collective_ms_per_step": 0.0,
                                               "compute_busy_ms_per_step": 0.0,
                                               "exposed_collective_ms_per_step": 0.0,
                                               "collective_kernels_per_step": 0.0, "span_ms_per_step": 0.0}


def test_interval_union():
    assert merge_intervals([(5, 6), (0, 2), (1, 3), (3, 4)]) == [(0, 4), (5, 6)]


def test_all_reduces_counted_once_whether_synchronous_or_asynchronous():
    hlo = """  %all-reduce.3 = f32[4]{0} all-reduce(%x), channel_id=1
  %all-reduce-start.1 = f32[8]{0} all-reduce-start(%y), channel_id=2
  %all-reduce-done.1 = f32[8]{0} all-reduce-done(%all-reduce-start.1)
  %fusion.all-reduce = f32[8]{0} fusion(%all-reduce-done.1)"""
    assert all_reduce_count(hlo) == 2


def test_step_variants():
    assert step_variants("global,per_device", True) == [
        ("global", "global", {}), ("per_device", "per_device", {}),
        ("global+lhs", "global", {"xla_gpu_enable_latency_hiding_scheduler": True}),
        ("per_device+lhs", "per_device", {"xla_gpu_enable_latency_hiding_scheduler": True})]
    with pytest.raises(SystemExit, match="--batch-norm"):
        step_variants("sync", False)



def test_processes_children_get_their_own_options_and_a_share_of_the_devices():
    from experiments.scaling_processes import child_argv, device_shares

    argv = ["--devices", "1,2", "--processes=2", "--steps", "3", "--tag", "x", "--rows-to=/tmp/r.json", "--patch=8,8,8"]
    assert child_argv(argv) == ["--steps", "3", "--patch=8,8,8"]
    assert device_shares(4, 2) == [[0, 1], [2, 3]] and device_shares(2, 2) == [[0], [1]]
    with pytest.raises(SystemExit, match="multiple"):
        device_shares(3, 2)


def test_two_processes_beside_one_measure_the_same_step_on_cpu_devices(tmp_path):
    # The whole command on CPU devices standing in for GPUs: one process for 1 and 2 devices, then two
    # processes on 127.0.0.1 with one device each (gloo), merged into one result.
    import json
    import os
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "LIVSEG_"))}
    env.pop("OUT", None)
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2", LIVSEG_RESULTS_DIR=str(tmp_path), PYTHONPATH=str(repo))
    result = subprocess.run([sys.executable, "-m", "experiments.bench_scaling", "--devices", "1,2", "--processes", "2",
                             "--variant", "unet", "--features", "4,8", "--overrides", "", "--patch", "16,16,16",
                             "--steps", "1", "--pipeline-cases", "0", "--tag", "test_processes"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "bench_scaling_test_processes.json").read_text())["rows"]
    assert [(r["devices"], r["processes"]) for r in rows] == [(1, 1), (2, 1), (2, 2)]
    one_process, two_processes = rows[1], rows[2]
    assert two_processes["all_reduce_ops"] == one_process["all_reduce_ops"] > 0  # the same program, sharded alike
    # The same first step from the same state and batch: the same loss whichever process layout ran it.
    assert two_processes["loss"] == pytest.approx(one_process["loss"], rel=1e-3)
    assert all(r["speedup"] > 0 and r["back_to_back_efficiency"] > 0 for r in rows)
