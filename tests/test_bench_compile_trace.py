"""experiments/bench_compile.py: the compile-trace summary (self time per event name from nested
events), the packaged_autotune variant's settings and the gradients_only variant's program."""

import pytest

from experiments.bench_compile import self_times


def event(name: str, start_us: float, dur_us: float, tid: int = 1) -> dict:
    return {"ph": "X", "pid": 1, "tid": tid, "name": name, "ts": start_us, "dur": dur_us}


def test_self_time_subtracts_the_events_nested_in_an_event_on_its_thread():
    events = [
        event("compile", 0, 10e6),          # 10 s, of which 6 s in its children
        event("pass_a", 1e6, 2e6),          # 2 s, with 1.5 s in autotune
        event("autotune", 1.5e6, 1.5e6),
        event("pass_a", 5e6, 4e6),          # the same pass again: 4 s, nothing nested
        event("ptxas", 0, 3e6, tid=2),      # another thread: not nested in "compile"
        {"ph": "M", "pid": 1, "tid": 1, "name": "thread_name", "args": {"name": "x"}},  # metadata: ignored
    ]
    rows = {r["name"]: r for r in self_times(events)}
    assert rows["compile"]["self_s"] == pytest.approx(4.0)
    assert rows["compile"]["total_s"] == pytest.approx(10.0)
    assert rows["pass_a"]["self_s"] == pytest.approx(0.5 + 4.0)
    assert rows["pass_a"]["count"] == 2
    assert rows["autotune"]["self_s"] == pytest.approx(1.5)
    assert rows["ptxas"]["self_s"] == pytest.approx(3.0)
    assert [r["name"] for r in self_times(events, top=2)] == ["pass_a", "compile"]


def test_packaged_autotune_loads_what_train_loads_or_says_why_not(monkeypatch, tmp_path):
    from experiments import bench_compile
    why_not = "no results for these versions"
    monkeypatch.setattr(bench_compile, "autotune_xla_flags", lambda setting: ("", why_not))
    assert bench_compile.variant_settings("packaged_autotune", tmp_path / "a") == ("", {}, why_not)
    flag = f"--xla_gpu_load_autotune_results_from={tmp_path / 'shipped.textproto'}"
    monkeypatch.setattr(bench_compile, "autotune_xla_flags",
                        lambda setting: (flag, "") if setting == "shipped" else ("", ""))
    flags, env, error = bench_compile.variant_settings("packaged_autotune+compile_trace", tmp_path / "a")
    assert (flags, error) == (flag, None) and env == {"BENCH_COMPILE_TRACE": "1"}


def test_gradients_only_compiles_and_times_the_first_of_the_two_programs(monkeypatch, tmp_path):
    # The compile on a cold GPU run's critical path (train.step_programs=2): the gradients program alone.
    import os

    import jax
    from jax.experimental.compilation_cache import compilation_cache as jax_cache

    from experiments import bench_compile
    monkeypatch.setenv("LIVSEG_TINY", "1")  # a two-level U-Net on 16^3 patches: seconds on a CPU
    # first_step adds the flags `train` would for the config's forms; in a process whose backend already
    # runs they must be there already (xla_flags refuses a change XLA would ignore).
    from experiments.bench_common import REPO
    from livseg_jax.study.spec import load_config_file
    from livseg_jax.xla_flags import merge_xla_flags, model_xla_flags
    wanted = model_xla_flags([load_config_file(REPO / "configs/liver.py", "").model])
    monkeypatch.setenv("XLA_FLAGS", merge_xla_flags(os.environ.get("XLA_FLAGS", ""), wanted))
    assert bench_compile.variant_settings("gradients_only", tmp_path / "a")[1] == {"BENCH_COMPILE_PROGRAM": "gradients"}
    min_secs = jax.config.jax_persistent_cache_min_compile_time_secs
    try:  # first_step turns JAX's persistent cache on, as the benchmark's own process does
        monkeypatch.setenv("BENCH_COMPILE_PROGRAM", "gradients")
        row = bench_compile.first_step("configs/liver.py", "16,16,16", 2, str(tmp_path / "cache"))
        assert row["program"] == "gradients" and row["median_step_ms"] > 0
        assert row["loss"] == row["loss"] and row["loss"] > 0  # the gradients program's metrics, finite
        monkeypatch.delenv("BENCH_COMPILE_PROGRAM")
        whole = bench_compile.first_step("configs/liver.py", "16,16,16", 1, str(tmp_path / "c2"))
        assert whole["program"] == "train_step"
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_secs)
        jax_cache.reset_cache()  # JAX reads the setting once: the next test starts without it
