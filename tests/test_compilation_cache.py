"""The entry points' persistent compilation cache: where it goes, and that XLA programs land in it."""

import os
import pathlib
import subprocess
import sys
import textwrap

import nibabel as nib
import numpy as np
import pytest

from livseg_jax.compilation_cache import enable_compilation_cache, resolve_cache_dir


def test_settings_resolve_to_a_directory_or_none(tmp_path):
    assert resolve_cache_dir("auto", tmp_path) == tmp_path / "jax_compilation"
    assert resolve_cache_dir("off", tmp_path) is None
    assert resolve_cache_dir("", tmp_path) is None
    assert resolve_cache_dir(str(tmp_path / "x"), pathlib.Path("/elsewhere")) == tmp_path / "x"


def test_an_unusable_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match=f"compilation cache {blocker}/sub: cannot create it"):
        enable_compilation_cache(blocker / "sub")


def test_a_second_process_loads_the_first_ones_program(tmp_path):
    script = f"""
        import pathlib, jax, jax.numpy as jnp
        from livseg_jax.compilation_cache import enable_compilation_cache
        hits = []
        jax.monitoring.register_event_listener(
            lambda name, **kw: hits.append(name) if name.endswith("/cache_hits") else None)
        enable_compilation_cache(pathlib.Path({str(tmp_path / 'cache')!r}), min_compile_secs=0)
        jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()
        print("HITS", len(hits))
    """
    env = {k: v for k, v in os.environ.items() if k not in ("LIVSEG_COMPILATION_CACHE", "XLA_FLAGS")}

    def run() -> str:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], check=True, text=True,
                              capture_output=True, env={**env, "JAX_PLATFORMS": "cpu"}).stdout

    assert "HITS 0" in run()
    assert any((tmp_path / "cache").iterdir()), "the first process stored nothing"
    assert "HITS 0" not in run()  # the second one loaded the program instead of compiling it


def test_predict_cli_uses_the_cache_unless_told_off(tmp_path):
    # The set-up fails (no such checkpoint) after the input and output are checked and the cache
    # is configured: no GPU, no model needed.
    ct = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), np.eye(4)), ct)
    script = f"""
        import jax
        from livseg_jax import predict
        assert predict.main(["--liver", "/nonexistent", "-i", "{ct}", "-o", "{tmp_path / 'out'}"]) == 1
        print("CACHE", jax.config.jax_compilation_cache_dir)
    """
    for setting, expected in (("auto", str(tmp_path / "jax_compilation")), ("off", "None")):
        out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                             env={**os.environ, "JAX_PLATFORMS": "cpu", "LIVSEG_CACHE": str(tmp_path),
                                  "LIVSEG_COMPILATION_CACHE": setting}, check=True).stdout
        assert f"CACHE {expected}" in out
