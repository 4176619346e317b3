"""experiments/bench_first_step.py reads the train command's console (its patterns must match it) and
counts the fusions a run autotuned."""

from experiments.bench_first_step import AUTOTUNE_CACHE, NUMBERS, autotuned_fusions, cache_contents, train_run


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
    assert first["autotuned_fusions"] == again["autotuned_fusions"] == 0  # a CPU autotunes nothing


def test_autotuned_fusions_are_the_files_a_run_adds_to_xlas_autotuning_cache(tmp_path):
    folder = tmp_path / AUTOTUNE_CACHE
    before = cache_contents(tmp_path)
    folder.mkdir()
    for i in range(3):
        (folder / f"fusion_{i}.textproto").write_text("x")
    middle = cache_contents(tmp_path)
    assert autotuned_fusions(before, middle) == 3
    (folder / "fusion_3.textproto").write_text("x")
    assert autotuned_fusions(middle, cache_contents(tmp_path)) == 1
