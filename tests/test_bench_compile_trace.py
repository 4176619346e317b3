"""experiments/bench_compile.py: the compile-trace summary (self time per event name from nested
events) and the packaged_autotune variant's settings."""

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
