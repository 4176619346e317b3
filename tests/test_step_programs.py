"""The train step as two programs (training/step_programs.py) against the one-program step."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from livseg_jax.config import base_config
from livseg_jax.models import build_model
from livseg_jax.training import executable_cache
from livseg_jax.training.schedules import make_optimizer
from livseg_jax.training.state import create_train_state
from livseg_jax.training.step import jit_train_step, make_mesh, make_train_step, replicated
from livseg_jax.training.step_programs import TwoProgramCompiled, TwoProgramStep, check_step_programs


def _setup(devices: int = 1, batch_norm_stats: str = "global"):
    c = base_config()
    c.model.name, c.model.features = "unet", (2, 4, 4, 4, 4)
    model, optimizer = build_model(c.model), make_optimizer(c.optim, 10)
    mesh = make_mesh(jax.devices()[:devices])
    init = jax.jit(lambda: create_train_state(model, optimizer, 0), out_shardings=replicated(mesh))
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.normal(size=(2 * devices, 16, 16, 16, 1)), jnp.float32),
             "label": jnp.asarray(rng.random((2 * devices, 16, 16, 16)) < 0.3, jnp.int32)}
    step = make_train_step(model, optimizer, c.loss, 10, batch_norm_stats=batch_norm_stats, mesh=mesh)
    return step, mesh, init, batch


def _run(step_fn, state, batch, steps=2):
    for _ in range(steps):
        state, metrics = step_fn(state, batch)
    return state, metrics


def _assert_close(a, b, rtol):
    def check(x, y):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert np.max(np.abs(x - y)) <= rtol * (np.max(np.abs(y)) + 1e-12)

    jax.tree.map(check, a, b)


@pytest.mark.parametrize("devices,batch_norm_stats", [(1, "global"), (2, "global"), (2, "per_device")])
def test_two_programs_train_as_one_program_does(devices, batch_norm_stats):
    step, mesh, init, batch = _setup(devices, batch_norm_stats)
    one_state, one_metrics = _run(jit_train_step(step, mesh), init(), batch)
    two = jit_train_step(step, mesh, programs=2)
    kept = init()
    two_state, two_metrics = _run(two, kept, batch)
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(kept))  # the update does not donate
    assert int(two_state.step) == int(one_state.step) == 2
    # The same arithmetic; XLA may fuse it differently across the programs' boundary.
    _assert_close(two_state.params, one_state.params, 1e-5)
    _assert_close(two_state.opt_state, one_state.opt_state, 1e-5)
    _assert_close(two_state.batch_stats, one_state.batch_stats, 1e-5)
    _assert_close(two_metrics, one_metrics, 1e-5)
    assert max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(two_state.params), jax.tree.leaves(init().params), strict=True)) > 0


def test_ahead_of_time_compile_of_two_programs_runs_as_the_jitted_step(tmp_path):
    step, mesh, init, batch = _setup()
    two = jit_train_step(step, mesh, programs=2)
    state = init()
    specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), (state, batch))
    lowered = two.trace(*specs).lower()
    text = lowered.as_text()
    assert text.count("func.func public @main") == 2  # two modules
    # The two programs' traced FLOPs add up to the one program's (bench_train_step's roofline reads them).
    one_flops = jit_train_step(step, mesh).trace(*specs).lower().cost_analysis()["flops"]
    assert lowered.cost_analysis()["flops"] == pytest.approx(one_flops, rel=1e-3)
    compiled = lowered.compile()
    assert isinstance(compiled, TwoProgramCompiled) and len(compiled.parts) == 2
    assert compiled.cost_analysis()["flops"] > 0
    expected, _ = _run(two, state, batch, steps=1)
    got, _ = _run(compiled, state, batch, steps=1)
    jax.tree.map(np.testing.assert_array_equal, got, expected)
    # Kept whole by the compiled-program cache and loaded back as two programs.
    path = tmp_path / "train_step-key.pkl"
    executable_cache.store(path, compiled)
    loaded = executable_cache.load(path)
    assert isinstance(loaded, TwoProgramCompiled)
    again, _ = _run(loaded, state, batch, steps=1)
    jax.tree.map(np.testing.assert_array_equal, again, expected)


def test_the_update_compiles_while_the_gradient_program_compiles():
    """The point of two programs: neither compile waits for the other (session 12 found the update's
    compile starting only after the gradient program's had ended)."""
    import threading

    from livseg_jax.training.step_programs import TwoProgramLowered

    update_compiling = threading.Event()

    class Gradients:  # stands for the lowered gradient program: its compile needs the update's to start
        def compile(self):
            assert update_compiling.wait(timeout=10), "the update's compile waited for the gradient program's"
            return "gradients"

    class Update:  # stands for the jitted update: trace -> lower -> compile
        def trace(self, *args):
            return self

        def lower(self):
            return self

        def compile(self):
            update_compiling.set()
            return "update"

    compiled = TwoProgramLowered(Gradients(), Update(), ()).compile()
    assert compiled.parts == ("gradients", "update")


def test_a_cache_entry_of_an_older_format_is_refused(tmp_path):
    import pickle

    path = tmp_path / "train_step-old.pkl"
    path.write_bytes(pickle.dumps((("payload", "in", "out"), [0])))  # the format before session 11
    with pytest.raises(ValueError, match="format"):
        executable_cache.load(path)


@pytest.mark.parametrize("bad", [0, 3, True, "two", 1.5, "2", "auto"])
def test_step_programs_other_than_one_two_or_auto_are_refused(bad):
    with pytest.raises(ValueError, match="train.step_programs"):
        check_step_programs(bad)


@pytest.mark.parametrize("bad", [3, 0])
def test_a_bad_step_programs_value_is_refused_at_start_up_naming_the_key(bad):
    from livseg_jax.config_checks import validate_config

    config = base_config()
    config.train.step_programs = bad
    with pytest.raises(ValueError, match="train.step_programs"):
        validate_config(config)
    for good in (1, 2):
        config.train.step_programs = good
        validate_config(config)


def test_step_programs_left_to_the_backend_are_one_program_everywhere():
    # Two programs compile faster on GPUs but their steps were host-bound on H200 hosts (session 13).
    assert check_step_programs(None, "gpu") == check_step_programs(None, "cpu") == check_step_programs(None, "tpu") == 1
    assert check_step_programs(2) == 2 and check_step_programs(1) == 1
    assert base_config().train.step_programs is None
    step, mesh, _, _ = _setup()  # the mesh's platform decides: one program on these CPU devices
    assert not isinstance(jit_train_step(step, mesh, programs=None), TwoProgramStep)
    assert isinstance(jit_train_step(step, mesh, programs=2), TwoProgramStep)


def test_a_two_program_run_switches_to_the_one_program_and_a_second_run_loads_it(tmp_path, monkeypatch):
    # train.step_programs=2: the first steps run as two programs while the one program compiles in
    # the background, then the steps switch to it (the two programs' steps can be host-bound); both are
    # kept, and a later run loads the one program and skips the two. The step-level equality of the
    # forms is test_two_programs_train_as_one_program_does.
    import contextlib

    from livseg_jax.training import loop

    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).parent))
    from test_training import tiny_config

    executables = tmp_path / "executables"
    monkeypatch.setattr(loop, "executable_cache_dir", lambda: executables)
    jobs, real_compile_ahead = [], loop.compile_ahead

    @contextlib.contextmanager
    def recording(*args, **kwargs):
        with real_compile_ahead(*args, **kwargs) as job:
            jobs.append(kwargs["name"])
            if kwargs["name"] == "train step (one program)":  # ready at the next step: a deterministic switch
                job.ready = lambda: job.result() is not None
            yield job

    monkeypatch.setattr(loop, "compile_ahead", recording)
    config = lambda programs: tiny_config(tmp_path / "cache", num_epochs=1, step_programs=programs)  # noqa: E731
    two = loop.train_and_evaluate(config(2), tmp_path / "two", devices=jax.devices()[:1])
    assert jobs == ["train step (two programs)", "initialisation", "train step (one program)"]
    assert two["one_program_from_step"] == 1 and not two["train_step_loaded"]
    assert isinstance(executable_cache.load(next(executables.glob("train_step_(two_programs)-*.pkl"))),
                      TwoProgramCompiled)
    assert not isinstance(executable_cache.load(next(executables.glob("train_step-*.pkl"))), TwoProgramCompiled)

    jobs.clear()
    again = loop.train_and_evaluate(config(2), tmp_path / "again", devices=jax.devices()[:1])
    assert jobs[0] == "train step" and "train step (one program)" not in jobs
    assert again["train_step_loaded"] and "one_program_from_step" not in again
    one = loop.train_and_evaluate(config(1), tmp_path / "one", devices=jax.devices()[:1])
    # Every step of `again` ran the one program: as a one-program run; `two`'s first step did not.
    jax.tree.map(np.testing.assert_array_equal, again["state"].params, one["state"].params)
    _assert_close(two["state"].params, one["state"].params, 1e-5)
