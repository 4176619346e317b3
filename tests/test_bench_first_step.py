"""experiments/bench_first_step.py reads the train command's console (its patterns must match it) and
counts the fusions a run autotuned."""

from experiments.bench_first_step import (
    AUTOTUNE_CACHE,
    NUMBERS,
    autotune_cache_files,
    autotuned_entries,
    autotuned_fusions,
    cache_contents,
    cold_runs,
    compile_log,
    train_run,
)


def test_every_timing_is_read_from_a_real_train_run(tmp_path, monkeypatch):
    monkeypatch.setenv("LIVSEG_TINY", "1")  # the README's tiny run: seconds
    first = train_run("configs/liver.py", tmp_path, "cold", tmp_path / "cache", "off")
    assert first["rc"] == 0, first.get("error")
    for key in (*NUMBERS, "first_step_since_command_s"):
        assert first[key] is not None and first[key] >= 0, key
    assert first["first_step_since_command_s"] >= first["first_step_s"] >= first["first_batch_s"]
    assert not first["loaded"]
    # Each logged window's steps per second, from the run's metrics.jsonl (three steps, each logged).
    assert [step for step, _ in first["train_rates"]] == [1, 2, 3] and all(r > 0 for _, r in first["train_rates"])
    assert first["one_program_from_step"] is None  # one program from the start
    # JAX's timing of each phase of the step's program (one program on a CPU): traced, lowered, compiled.
    step_phases = {e["phase"] for e in first["compile_log"] if e["program"] == "train_step"}
    assert step_phases == {"trace", "lower", "compile"}, first["compile_log"]
    again = train_run("configs/liver.py", tmp_path, "warm", tmp_path / "cache", "off")
    assert again["loaded"]  # the compiled-program cache beside the compilation cache
    assert not any(e["program"] == "train_step" for e in again["compile_log"])  # loaded, not traced
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
    seen = autotune_cache_files(tmp_path)
    (folder / "fusion_3.textproto").write_text("key: 'fusion 3'")
    assert autotuned_fusions(middle, cache_contents(tmp_path)) == 1
    # Which fusion it was: the added file's name and text, so a stale shipped result can be traced.
    assert autotuned_entries(autotune_cache_files(tmp_path) - seen) == [
        {"file": "fusion_3.textproto", "text": "key: 'fusion 3'"}]


def test_the_compile_log_is_read_program_by_program():
    lines = ["W1201 21:25:54.88 dispatch.py:204] Finished tracing compute_gradients for jit in 3.790982723 sec\n",
             "W1201 21:25:56.07 dispatch.py:204] Finished jaxpr to MLIR module conversion jit(compute_gradients) "
             "in 1.064974308 sec\n",
             "W1201 21:26:21.02 dispatch.py:204] Finished XLA compilation of jit(compute_gradients) in 24.76 sec\n",
             "W1201 21:26:22.00 dispatch.py:204] Finished XLA compilation of jit(_pad) in 0.0136 sec\n",
             "train step ready in 30.0 s\n"]
    assert compile_log(lines) == [{"program": "compute_gradients", "phase": "trace", "s": 3.791},
                                  {"program": "compute_gradients", "phase": "lower", "s": 1.065},
                                  {"program": "compute_gradients", "phase": "compile", "s": 24.76}]


def test_every_dump_set_is_a_cold_run_of_the_config_named_in_the_manifest():
    # Each train.step_programs form compiles programs of its own: every form's results are dumped and
    # shipped together (session 15), each named by its settings.
    runs = cold_runs("configs/liver.py:paper", ["configs/tumor.py"], ["train.step_programs=1",
                     "train.step_programs=2,train.compile_ahead=False"], ["train.step_programs=3"])
    assert runs == [
        ("configs/liver.py:paper", ["train.step_programs=3"], "configs/liver.py:paper train (train.step_programs=3)"),
        ("configs/tumor.py", ["train.step_programs=3"], "configs/tumor.py train (train.step_programs=3)"),
        ("configs/liver.py:paper", ["train.step_programs=3", "train.step_programs=1"],
         "configs/liver.py:paper train (train.step_programs=3, train.step_programs=1)"),
        ("configs/liver.py:paper", ["train.step_programs=3", "train.step_programs=2", "train.compile_ahead=False"],
         "configs/liver.py:paper train (train.step_programs=3, train.step_programs=2, train.compile_ahead=False)")]
    assert cold_runs("c.py", [], [], []) == [("c.py", [], "c.py train")]
