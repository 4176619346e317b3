"""experiments/bench_first_step.py reads the train command's console: its patterns must match it."""

from experiments.bench_first_step import NUMBERS, train_run


def test_every_timing_is_read_from_a_real_train_run(tmp_path, monkeypatch):
    monkeypatch.setenv("LIVSEG_TINY", "1")  # the README's tiny run: seconds
    first = train_run("configs/liver.py", tmp_path, "cold", tmp_path / "cache", "off")
    assert first["rc"] == 0, first.get("error")
    for key in (*NUMBERS, "first_step_since_command_s"):
        assert first[key] is not None and first[key] >= 0, key
    assert first["first_step_since_command_s"] >= first["first_step_s"] >= first["first_batch_s"]
    assert not first["loaded"]
    again = train_run("configs/liver.py", tmp_path, "warm", tmp_path / "cache", "off")
    assert again["loaded"]  # the compiled-program cache beside the compilation cache
    # The step and the initialisation were kept; JAX's own entries beside them.
    assert first["cache_contents"]["livseg_executables"] >= 2 and first["cache_contents"]["(entries)"] >= 1
