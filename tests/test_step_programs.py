"""The train step as two or three programs (training/step_programs.py) against the one-program step."""

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
from livseg_jax.training.step_programs import (
    SplitCompiled,
    SplitStep,
    check_step_programs,
    switch_compile_options,
    switches_to_one_program,
)


def _setup(devices: int = 1, batch_norm_stats: str = "global"):
    c = base_config()
    c.model.name, c.model.features = "unet", (2, 4, 4)  # three levels: every part, half the compile of five
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
    """Every leaf of `a` within `rtol` of `b`'s largest magnitude (over the whole tree): leaves that are
    rounding noise in both (the tiny network's deepest gradients are ~1e-10, from cancellations) may
    differ by more than `rtol` of themselves when XLA rounds the same arithmetic in another order."""
    scale = max(float(np.max(np.abs(np.asarray(y, np.float64)))) for y in jax.tree.leaves(b) if np.size(y))

    def check(x, y):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert np.max(np.abs(x - y)) <= rtol * scale

    jax.tree.map(check, a, b)


def _assert_close_per_part(a, b, rtol):
    """`_assert_close` on each part of an optimiser state (the leaves under one path up to the first
    dict key: Adam's count, its first moments, its second moments, ...)."""
    def parts(tree):
        grouped: dict = {}
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            cut = next((i for i, key in enumerate(path) if isinstance(key, jax.tree_util.DictKey)), len(path))
            grouped.setdefault(jax.tree_util.keystr(path[:cut]), []).append(leaf)
        return grouped

    got, expected = parts(a), parts(b)
    assert got.keys() == expected.keys()
    for name in expected:
        _assert_close(got[name], expected[name], rtol)


# Three programs with per-device statistics: their backward program differentiates the forward's
# `shard_map` in a program of its own, a path the two programs do not take (on one device, three
# programs are compiled, run and cached in test_ahead_of_time_compile_of_the_parts_runs_as_the_jitted_step).
@pytest.mark.parametrize("devices,batch_norm_stats,programs",
                         [(1, "global", 2), (2, "global", 2), (2, "per_device", 2), (2, "per_device", 3)])
def test_the_step_as_parts_trains_as_one_program_does(devices, batch_norm_stats, programs):
    step, mesh, init, batch = _setup(devices, batch_norm_stats)
    one_state, one_metrics = _run(jit_train_step(step, mesh), init(), batch)
    two = jit_train_step(step, mesh, programs=programs)
    assert isinstance(two, SplitStep) and len(two.programs) == programs
    kept = init()
    two_state, two_metrics = _run(two, kept, batch)
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(kept))  # the update does not donate
    assert int(two_state.step) == int(one_state.step) == 2
    # The same arithmetic; XLA may fuse and round it differently across the programs' boundaries.
    _assert_close(two_state.params, one_state.params, 1e-5)
    _assert_close_per_part(two_state.opt_state, one_state.opt_state, 1e-5)  # Adam's moments each on its scale
    _assert_close(two_state.batch_stats, one_state.batch_stats, 1e-5)
    for name in one_metrics:
        _assert_close(two_metrics[name], one_metrics[name], 1e-5)
    assert max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(two_state.params), jax.tree.leaves(init().params), strict=True)) > 0


@pytest.mark.parametrize("programs", [2, 3])
def test_ahead_of_time_compile_of_the_parts_runs_as_the_jitted_step(tmp_path, programs):
    step, mesh, init, batch = _setup()
    two = jit_train_step(step, mesh, programs=programs)
    state = init()
    specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), (state, batch))
    lowered = two.trace(*specs).lower()
    text = lowered.as_text()
    assert text.count("func.func public @main") == programs  # one module each
    # The parts' traced FLOPs add up to the one program's (bench_train_step's roofline reads them).
    one_flops = jit_train_step(step, mesh).trace(*specs).lower().cost_analysis()["flops"]
    assert lowered.cost_analysis()["flops"] == pytest.approx(one_flops, rel=1e-3)
    compiled = lowered.compile()
    assert isinstance(compiled, SplitCompiled) and len(compiled.parts) == programs
    assert compiled.cost_analysis()["flops"] > 0
    # Compiler options reach every part, as jax.stages.Lowered.compile's do (XLA refuses an unknown name).
    with pytest.raises(Exception, match="xla_no_such_option"):
        lowered.compile({"xla_no_such_option": 1})
    expected, _ = _run(two, state, batch, steps=1)
    got, _ = _run(compiled, state, batch, steps=1)
    jax.tree.map(np.testing.assert_array_equal, got, expected)
    # Kept whole by the compiled-program cache and loaded back as the same parts.
    path = tmp_path / "train_step-key.pkl"
    executable_cache.store(path, compiled)
    loaded = executable_cache.load(path)
    assert isinstance(loaded, SplitCompiled) and len(loaded.parts) == programs
    again, _ = _run(loaded, state, batch, steps=1)
    jax.tree.map(np.testing.assert_array_equal, again, expected)


@pytest.mark.parametrize("programs", [2, 3])
def test_every_part_compiles_while_the_others_compile(programs):
    """The point of the parts: no compile waits for another's (session 12 found the update's compile
    starting only after the gradient program's had ended). Each stand-in compile returns only once
    all of them are under way, so a compile that waits for another's end fails the barrier."""
    import threading

    from livseg_jax.training.step_programs import SplitLowered

    all_compiling = threading.Barrier(programs, timeout=10)

    class Program:  # stands for a jitted part: trace -> lower -> compile
        def __init__(self, name):
            self.name, self.out_info = name, ()

        def trace(self, *args):
            return self

        def lower(self):
            return self

        def compile(self, compiler_options=None):
            try:
                all_compiling.wait()
            except threading.BrokenBarrierError:
                raise AssertionError(f"the {self.name}'s compile waited for another part's") from None
            return self.name

    parts = tuple(Program(f"part {i}") for i in range(programs))

    class Step:
        programs = parts

        def arguments(self, index, state, outputs):
            assert len(outputs) == index  # each part's arguments follow from the earlier parts' outputs
            return ()

    first = parts[0]
    compiled = SplitLowered(Step(), None, first, first.lower()).compile()
    assert compiled.parts == tuple(f"part {i}" for i in range(programs))


def test_a_cache_entry_of_an_older_format_is_refused(tmp_path):
    import pickle

    path = tmp_path / "train_step-old.pkl"
    path.write_bytes(pickle.dumps((("payload", "in", "out"), [0])))  # the format before session 11
    with pytest.raises(ValueError, match="format"):
        executable_cache.load(path)


@pytest.mark.parametrize("bad", [0, 4, True, "two", 1.5, "2", "auto"])
def test_step_programs_other_than_one_two_three_or_auto_are_refused(bad):
    with pytest.raises(ValueError, match="train.step_programs"):
        check_step_programs(bad)


@pytest.mark.parametrize("bad", [4, 0])
def test_a_bad_step_programs_value_is_refused_at_start_up_naming_the_key(bad):
    from livseg_jax.config_checks import validate_config

    config = base_config()
    config.train.step_programs = bad
    with pytest.raises(ValueError, match="train.step_programs"):
        validate_config(config)
    for good in (1, 2, 3):
        config.train.step_programs = good
        validate_config(config)


def test_step_programs_left_to_the_backend_are_two_on_gpus_and_one_elsewhere():
    # On GPUs the first steps run as two programs, then switch to the one (session 14); CPUs and TPUs
    # were not measured clean.
    assert check_step_programs(None, "gpu") == 2
    assert check_step_programs(None, "cpu") == check_step_programs(None, "tpu") == 1
    assert check_step_programs(3, "cpu") == 3 and check_step_programs(1, "gpu") == 1
    assert base_config().train.step_programs is None
    step, mesh, _, _ = _setup()  # the mesh's platform decides: one program on these CPU devices
    assert not isinstance(jit_train_step(step, mesh, programs=None), SplitStep)
    assert isinstance(jit_train_step(step, mesh, programs=2), SplitStep)


def test_the_switch_compile_threads_cap_xla_on_gpus_only():
    assert switch_compile_options(4, "gpu") == {"xla_gpu_force_compilation_parallelism": 4}
    assert switch_compile_options(0, "gpu") is None  # XLA's own choice: the program's cache key unchanged
    assert switch_compile_options(4, "cpu") is None and switch_compile_options(4, "tpu") is None
    from livseg_jax.config_checks import validate_config

    config = base_config()
    config.train.switch_compile_threads = -1
    with pytest.raises(ValueError, match="switch_compile_threads"):
        validate_config(config)


def test_several_processes_start_as_one_program_or_keep_the_parts_without_a_switch():
    # Each process's background compile is ready at its own step: processes switching at different
    # steps would run different programs, whose collectives would not meet.
    assert check_step_programs(None, "gpu", processes=2) == 1
    assert check_step_programs(2, "gpu", processes=2) == 2  # asked for: kept, for the whole run
    assert switches_to_one_program(2, processes=1) and switches_to_one_program(3, processes=1)
    assert not switches_to_one_program(2, processes=2) and not switches_to_one_program(1, processes=1)


# Two programs only (the GPU default): the loop treats three the same way, and their step is tested
# above and through the compiled-program cache (the suite's time is budgeted).
@pytest.mark.parametrize("programs,name", [(2, "two programs")])
def test_a_run_of_parts_switches_to_the_one_program_and_a_second_run_loads_it(tmp_path, monkeypatch, programs,
                                                                               name):
    # train.step_programs 2 or 3: the first steps run as parts while the one program compiles in the
    # background (traced while the parts compile, compiled after the first step), then the steps switch
    # to it (the parts' steps are slower); only it is kept, and a later run loads it and skips the parts.
    # The step-level equality of the forms is test_the_step_as_parts_trains_as_one_program_does.
    import contextlib

    from livseg_jax.training import loop

    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).parent))
    from test_training import tiny_config

    executables = tmp_path / "executables"
    monkeypatch.setattr(loop, "executable_cache_dir", lambda: executables)
    jobs, options, real_compile_ahead = [], {}, loop.compile_ahead
    # train.switch_compile_threads reaches the one program's compile (a GPU option, which XLA's CPU
    # compiler accepts and ignores; switch_compile_options itself gives it on GPUs only).
    monkeypatch.setattr(loop, "switch_compile_options",
                        lambda threads, backend: {"xla_gpu_force_compilation_parallelism": threads})

    @contextlib.contextmanager
    def recording(*args, **kwargs):
        with real_compile_ahead(*args, **kwargs) as job:
            jobs.append(kwargs["name"])
            options[kwargs["name"]] = kwargs.get("compiler_options")
            if kwargs["name"] == "train step (one program)":  # ready at the next step: a deterministic switch
                job.ready = lambda: job.result() is not None
            yield job

    monkeypatch.setattr(loop, "compile_ahead", recording)
    config = lambda programs: tiny_config(tmp_path / "cache", num_epochs=1, step_programs=programs,  # noqa: E731
                                          switch_compile_threads=3)
    two = loop.train_and_evaluate(config(programs), tmp_path / "two", devices=jax.devices()[:1])
    assert jobs == [f"train step ({name})", "train step (one program)", "initialisation"]
    assert options == {f"train step ({name})": None, "train step (one program)":
                       {"xla_gpu_force_compilation_parallelism": 3}, "initialisation": None}
    assert two["one_program_from_step"] == 1 and not two["train_step_loaded"]
    assert not list(executables.glob("train_step_(*")), "the parts are not kept: the one program follows them"
    assert not isinstance(executable_cache.load(next(executables.glob("train_step-*.pkl"))), SplitCompiled)

    jobs.clear()
    again = loop.train_and_evaluate(config(programs), tmp_path / "again", devices=jax.devices()[:1])
    assert jobs[0] == "train step" and "train step (one program)" not in jobs
    assert again["train_step_loaded"] and "one_program_from_step" not in again
    one = loop.train_and_evaluate(config(1), tmp_path / "one", devices=jax.devices()[:1])
    # Every step of `again` ran the one program: as a one-program run; `two`'s first step did not.
    jax.tree.map(np.testing.assert_array_equal, again["state"].params, one["state"].params)
    _assert_close(two["state"].params, one["state"].params, 1e-5)
