"""experiments/bench_common.py: command-line model overrides parsed to the type of the value they
replace, and the back-to-back step timing."""

import pytest

from experiments.bench_common import apply_overrides, back_to_back_ms, parse_overrides, parse_value
from livseg_jax.config import model_config


def test_overrides_split_on_commas_that_start_a_new_key_so_tuples_keep_theirs():
    assert parse_overrides("features=(8,16,16,32,32),dtype=bfloat16,dense_pack_channels=32") == {
        "features": "(8,16,16,32,32)", "dtype": "bfloat16", "dense_pack_channels": "32"}
    assert parse_overrides("") == {}
    with pytest.raises(SystemExit, match="not key=value"):
        parse_overrides("dtype")


def test_values_take_the_type_of_the_current_value():
    cfg = apply_overrides(model_config(), parse_overrides(
        "features=(8,16,16,32,32),msca_stages=3,4,dropout=0.25,dense_pack_channels=32,"
        "deep_supervision=False,deploy=true,pointwise_impl=einsum"))
    assert cfg.features == (8, 16, 16, 32, 32)
    assert cfg.msca_stages == (3, 4)  # without parentheses
    assert cfg.dropout == 0.25 and isinstance(cfg.dropout, float)
    assert cfg.dense_pack_channels == 32 and isinstance(cfg.dense_pack_channels, int)
    assert cfg.deep_supervision is False  # bool("False") would have been True
    assert cfg.deploy is True
    assert cfg.pointwise_impl == "einsum"


def test_values_are_parsed_never_evaluated():
    with pytest.raises(ValueError):
        parse_value("__import__('os').getcwd()", (1, 2))
    with pytest.raises(ValueError, match="true or false"):
        parse_value("yes", True)
    with pytest.raises(ValueError):
        parse_value("many", 3)
    with pytest.raises(SystemExit, match="unknown model config key"):
        apply_overrides(model_config(), {"no_such_key": "1"})
    with pytest.raises(SystemExit, match="n_rep=two"):
        apply_overrides(model_config(), {"n_rep": "two"})


def test_back_to_back_waits_once_per_run_and_divides_by_the_steps(monkeypatch):
    calls = []
    clock = iter(range(0, 1000, 1))  # perf_counter advances 1 s per reading
    monkeypatch.setattr("experiments.bench_common.time.perf_counter", lambda: next(clock))
    result = back_to_back_ms(lambda: calls.append("step"), lambda: calls.append("sync"), steps=4, repeats=2)
    # each run: wait for earlier work, 4 steps dispatched with no wait between them, one wait
    assert calls == ["sync", "step", "step", "step", "step", "sync"] * 2
    assert result["back_to_back_runs_ms"] == [1e3 / 4, 1e3 / 4]
    assert result["back_to_back_ms"] == 1e3 / 4
