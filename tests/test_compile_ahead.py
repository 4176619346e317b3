"""Compiling a program on a background thread (training/compile_ahead.py)."""

import contextlib
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from livseg_jax.training.compile_ahead import BackgroundCompile, compile_ahead


def test_the_program_compiled_ahead_from_shapes_computes_what_jit_computes():
    f = jax.jit(lambda x, y: {"sum": jnp.sin(x) @ y, "max": jnp.max(y)})
    x, y = np.arange(12.0, dtype=np.float32).reshape(3, 4), np.ones((4, 2), np.float32)
    job = BackgroundCompile(f, jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(y.shape, y.dtype))
    compiled = job.result()
    job.wait()
    assert not job.running() and job.seconds > 0
    jax.tree.map(np.testing.assert_array_equal, compiled(x, y), f(x, y))
    with pytest.raises(TypeError):  # compiled for those shapes only
        compiled(x[:2], y)


def test_compiler_options_reach_xla_for_this_compile_only():
    # train.switch_compile_threads hands the one program's background compile an XLA option; a name
    # XLA does not know is refused by XLA itself, so the options are really passed on.
    f = jax.jit(lambda x: x * 3)
    spec = jax.ShapeDtypeStruct((2,), jnp.float32)
    job = BackgroundCompile(f, spec, compiler_options={"xla_gpu_force_compilation_parallelism": 2})
    np.testing.assert_array_equal(job.result()(np.ones(2, np.float32)), np.full(2, 3.0))
    job.wait()
    refused = BackgroundCompile(f, spec, compiler_options={"xla_no_such_option": 1})
    with pytest.raises(Exception, match="xla_no_such_option"):
        refused.result()
    refused.wait()


def test_a_traced_program_is_lowered_and_compiled_and_lowered_says_when_tracing_is_over():
    # train traces the initialisation once (its output types are the step's arguments) and hands
    # the trace over; `lowered` lets it start that compile only after the step's tracing.
    tracing, release = threading.Event(), threading.Event()

    def slow(x):
        tracing.set()
        release.wait(timeout=30)
        return x * 2

    job = BackgroundCompile(jax.jit(slow), jax.ShapeDtypeStruct((2,), jnp.float32))
    assert tracing.wait(timeout=30)
    assert not job.lowered.is_set()  # still tracing
    release.set()
    assert job.lowered.wait(timeout=60)
    np.testing.assert_array_equal(job.result()(np.ones(2, np.float32)), [2.0, 2.0])

    traced = jax.jit(lambda x: x + 1).trace(jax.ShapeDtypeStruct((3,), jnp.float32))
    handed = BackgroundCompile(traced)
    np.testing.assert_array_equal(handed.result()(np.zeros(3, np.float32)), [1.0, 1.0, 1.0])
    assert handed.lowered.is_set()


def test_a_deferred_store_waits_for_its_release_and_wait_releases_it(tmp_path, monkeypatch):
    # Serialising a program holds Python's lock for about a second: train defers the step's store
    # until its first step is done, so the result is handed over before any of it starts.
    from livseg_jax.training import compile_ahead as module

    stored = []
    monkeypatch.setattr(module.executable_cache, "store", lambda path, compiled: stored.append(path))
    spec = jax.ShapeDtypeStruct((2,), jnp.float32)
    job = BackgroundCompile(jax.jit(lambda x: x - 1), spec, cache_file=tmp_path / "a.pkl", defer_store=True)
    np.testing.assert_array_equal(job.result()(np.ones(2, np.float32)), [0.0, 0.0])
    job._thread.join(timeout=0.5)
    assert job.running() and stored == []  # held back
    job.release_store()
    job._thread.join(timeout=60)
    assert stored == [tmp_path / "a.pkl"] and not job.running()

    # Never released (a run that stops at its first step): waiting for the job stores it all the same.
    held = BackgroundCompile(jax.jit(lambda x: x * 3), spec, cache_file=tmp_path / "b.pkl", defer_store=True)
    held.result()
    held.wait()
    assert stored[-1] == tmp_path / "b.pkl"
    # Not deferred (the default): stored as soon as the result is there.
    eager = BackgroundCompile(jax.jit(lambda x: x / 2), spec, cache_file=tmp_path / "c.pkl")
    eager.result()
    eager._thread.join(timeout=60)
    assert stored[-1] == tmp_path / "c.pkl"


def test_a_held_compile_traces_after_its_gate_compiles_on_release_and_is_skipped_by_wait(monkeypatch):
    # train's one-program step, after a start as parts: traced once the parts are lowered, compiled
    # only after the first step; a run that ends before then does not wait for a compile.
    compiles = []
    real_compile = jax.stages.Lowered.compile
    monkeypatch.setattr(jax.stages.Lowered, "compile",
                        lambda self, *a, **k: compiles.append(1) or real_compile(self, *a, **k))
    spec = jax.ShapeDtypeStruct((2,), jnp.float32)
    gate, traced = threading.Event(), threading.Event()

    def traced_now(x):
        traced.set()
        return x * 3

    job = BackgroundCompile(jax.jit(traced_now), spec, after=gate, hold_compile=True)
    assert not traced.wait(timeout=0.3)  # waits for its gate
    gate.set()
    assert job.lowered.wait(timeout=60) and traced.is_set()
    job._thread.join(timeout=0.3)
    assert not job.ready() and compiles == []  # lowered, held before XLA
    job.release_compile()
    np.testing.assert_array_equal(job.result()(np.ones(2, np.float32)), [3.0, 3.0])
    assert compiles == [1]

    skipped = BackgroundCompile(jax.jit(lambda x: x + 5), spec, hold_compile=True)
    assert skipped.lowered.wait(timeout=60)
    skipped.wait()  # never released: nothing compiled
    assert compiles == [1] and not skipped.running()
    with pytest.raises(RuntimeError, match="skipped"):
        skipped.result()


def test_an_error_while_tracing_reaches_the_caller_of_result():
    def bad(x):
        raise ValueError("shapes do not fit")

    job = BackgroundCompile(jax.jit(bad), jax.ShapeDtypeStruct((2,), jnp.float32))
    with pytest.raises(ValueError, match="shapes do not fit"):
        job.result()


def test_an_error_during_the_compile_waits_for_it_and_says_so(capsys):
    # Exiting while XLA compiles aborts the process, so an error raised meanwhile must wait for it.
    tracing, release = threading.Event(), threading.Event()

    def slow(x):
        tracing.set()
        release.wait(timeout=30)  # a compile still running when the error unwinds
        return x + 1

    timer = threading.Timer(0.5, release.set)
    with pytest.raises(RuntimeError, match="data failed"):
        with compile_ahead(jax.jit(slow), jax.ShapeDtypeStruct((2,), jnp.float32), name="test step") as job:
            assert tracing.wait(timeout=30)
            timer.start()
            raise RuntimeError("data failed")
    assert not job.running() and release.is_set()
    assert "waiting for the test step's compile to finish" in capsys.readouterr().err


def test_the_initialisation_lowering_setting_does_not_reach_a_step_lowered_on_another_thread():
    # train lowers the step on a background thread while the main thread initialises the model
    # inside `init_lowering()` (threefry as a CUDA kernel); JAX's scoped settings are per thread.
    from livseg_jax.training.state import init_lowering

    def step(key):
        return jax.random.bernoulli(key, 0.5, (8,))

    entered, lowered, texts = threading.Event(), threading.Event(), {}

    def lower_elsewhere():
        entered.wait(timeout=30)
        texts["other"] = jax.jit(step).trace(jax.random.PRNGKey(0)).lower(lowering_platforms=("cuda",)).as_text()
        lowered.set()

    thread = threading.Thread(target=lower_elsewhere)
    thread.start()
    with init_lowering():
        texts["here"] = jax.jit(step).trace(jax.random.PRNGKey(0)).lower(lowering_platforms=("cuda",)).as_text()
        entered.set()
        assert lowered.wait(timeout=60)
    thread.join()
    assert "cu_threefry2x32" in texts["here"] and "cu_threefry2x32" not in texts["other"]


def test_the_callers_scoped_settings_and_the_within_context_reach_the_tracing_thread():
    # Tracing on the caller's thread would see its `with jax.default_matmul_precision(...)`; the
    # thread re-enters it. `within` (the initialisation's threefry lowering) is entered there too.
    seen = {}
    marker = threading.local()

    @contextlib.contextmanager
    def within():
        marker.inside = True
        yield

    def traced(x):
        seen["precision"] = jax.config.jax_default_matmul_precision
        seen["within"] = getattr(marker, "inside", False)
        seen["thread"] = threading.current_thread().name
        return x @ x

    with jax.default_matmul_precision("highest"):
        job = BackgroundCompile(jax.jit(traced), jax.ShapeDtypeStruct((2, 2), jnp.float32), name="scoped",
                                within=within)
        job.result()
    assert seen == {"precision": "highest", "within": True, "thread": "compile scoped"}
    assert jax.config.jax_default_matmul_precision is None  # nothing leaked into the global setting
