"""The compiled-program cache (training/executable_cache.py) and its use by BackgroundCompile."""

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from livseg_jax.config import base_config
from livseg_jax.training import executable_cache
from livseg_jax.training.compile_ahead import BackgroundCompile

ARGS = (jax.ShapeDtypeStruct((4, 3), jnp.float32), jax.ShapeDtypeStruct((3,), jnp.float32))


def program(x, y):
    return {"out": jnp.tanh(x) @ y}


def test_the_key_is_stable_and_changes_with_the_config_the_shapes_the_source_and_the_flags(monkeypatch):
    config = base_config()
    key = executable_cache.program_key("step", config, ARGS)
    assert executable_cache.program_key("step", base_config(), ARGS) == key
    other = base_config()
    other.optim.learning_rate = 3e-4
    assert executable_cache.program_key("step", other, ARGS) != key
    assert executable_cache.program_key("step", config, (ARGS[0], jax.ShapeDtypeStruct((3,), jnp.bfloat16))) != key
    assert executable_cache.program_key("init", config, ARGS) != key
    flags = os.environ.get("XLA_FLAGS", "")
    monkeypatch.setenv("XLA_FLAGS", f"{flags} --xla_cpu_enable_fast_math=false")
    assert executable_cache.program_key("step", config, ARGS) != key
    monkeypatch.setenv("XLA_FLAGS", flags)
    assert executable_cache.program_key("step", config, ARGS) == key
    monkeypatch.setattr(executable_cache, "source_digest", lambda: "edited")
    assert executable_cache.program_key("step", config, ARGS) != key
    monkeypatch.undo()
    with jax.default_matmul_precision("highest"):  # a setting the caller scoped
        assert executable_cache.program_key("step", config, ARGS) != key


def test_meshes_over_other_devices_or_another_order_are_other_programs(tmp_path):
    # NamedSharding's repr shows only the mesh's axis sizes: the devices' ids must be in the key.
    devices = jax.devices()
    assert len(devices) >= 4  # conftest: JAX_NUM_CPU_DEVICES
    config = base_config()

    def spec(ids):
        mesh = Mesh(np.array([devices[i] for i in ids]), ("data",))
        return (jax.ShapeDtypeStruct((4, 3), jnp.float32, sharding=NamedSharding(mesh, P("data"))),
                jax.ShapeDtypeStruct((3,), jnp.float32, sharding=NamedSharding(mesh, P())))

    keys = {ids: executable_cache.program_key("step", config, spec(ids)) for ids in ((0, 1), (2, 3), (1, 0))}
    assert len(set(keys.values())) == 3
    # A program kept for devices (2, 3) loads onto them, not onto the first devices.
    path = tmp_path / "step.pkl"
    BackgroundCompile(jax.jit(program), *spec((2, 3)), cache_file=path).wait()
    job = BackgroundCompile(jax.jit(program), *spec((2, 3)), cache_file=path)
    loaded = job.result()
    assert job.loaded and executable_cache.device_ids(loaded) == [devices[2].id, devices[3].id]
    x = jax.device_put(np.ones((4, 3), np.float32), spec((2, 3))[0].sharding)
    y = jax.device_put(np.ones(3, np.float32), spec((2, 3))[1].sharding)
    np.testing.assert_allclose(loaded(x, y)["out"], np.full(4, 3 * np.tanh(1.0)), rtol=1e-6)


def test_a_stored_program_loads_without_tracing_and_computes_the_same(tmp_path):
    traces = []

    def counted(x, y):
        traces.append(1)
        return program(x, y)

    path = tmp_path / "step.pkl"
    first = BackgroundCompile(jax.jit(counted), *ARGS, cache_file=path)
    compiled = first.result()
    first.wait()  # the write follows the result
    assert path.exists() and not first.loaded and len(traces) == 1
    second = BackgroundCompile(jax.jit(counted), *ARGS, cache_file=path)
    loaded = second.result()
    assert second.loaded and len(traces) == 1  # not traced again
    x, y = np.linspace(-2, 2, 12, dtype=np.float32).reshape(4, 3), np.arange(3, dtype=np.float32)
    np.testing.assert_array_equal(loaded(x, y)["out"], compiled(x, y)["out"])
    np.testing.assert_array_equal(loaded(x, y)["out"], jax.jit(program)(x, y)["out"])


def test_an_unreadable_entry_is_said_replaced_and_compiled(tmp_path, capsys):
    path = tmp_path / "step.pkl"
    path.write_bytes(b"not a pickle: a crash of another build")
    job = BackgroundCompile(jax.jit(program), *ARGS, cache_file=path, name="test step")
    compiled = job.result()
    job.wait()
    assert not job.loaded and "compiled-program cache entry unreadable" in capsys.readouterr().err
    replaced = BackgroundCompile(jax.jit(program), *ARGS, cache_file=path)
    replaced.wait()
    assert replaced.loaded  # the entry written after the compile
    x, y = np.ones((4, 3), np.float32), np.ones(3, np.float32)
    np.testing.assert_allclose(compiled(x, y)["out"], np.full(4, 3 * np.tanh(1.0)), rtol=1e-6)


def test_the_cache_sits_beside_jax_persistent_cache_and_only_there(tmp_path):
    assert jax.config.jax_compilation_cache_dir is None  # the tests' default: no persistent cache
    assert executable_cache.executable_cache_dir() is None
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    try:
        assert executable_cache.executable_cache_dir() == tmp_path / executable_cache.SUBDIR
    finally:
        jax.config.update("jax_compilation_cache_dir", None)


def test_a_program_without_inputs_is_kept_too(tmp_path):
    # The initialisation takes no arguments: its devices come from its outputs.
    path = tmp_path / "init.pkl"
    make = jax.jit(lambda: {"w": jnp.arange(6.0).reshape(2, 3)})
    BackgroundCompile(make, cache_file=path).wait()
    job = BackgroundCompile(make, cache_file=path)
    np.testing.assert_array_equal(job.result()()["w"], np.arange(6.0).reshape(2, 3))
    assert job.loaded
