"""Config-chosen XLA flags: merged with the user's, and applied before a backend starts."""

import os
import subprocess
import sys
import textwrap

import jax
import pytest

from livseg_jax.training.xla_flags import apply_xla_flags, merge_xla_flags


def test_the_users_flags_win_and_new_ones_are_appended():
    merged = merge_xla_flags("--xla_gpu_force_conv_nhwc=false --xla_b=1",
                             "--xla_gpu_force_conv_nhwc=true --xla_c=2")
    assert merged.split() == ["--xla_gpu_force_conv_nhwc=false", "--xla_b=1", "--xla_c=2"]
    assert merge_xla_flags("", "") == ""


def test_malformed_flags_are_refused():
    with pytest.raises(ValueError, match="--xla_name=value"):
        apply_xla_flags("xla_gpu_force_conv_nhwc=true", environ={})
    with pytest.raises(ValueError, match="--xla_name=value"):
        apply_xla_flags("--xla_gpu_force_conv_nhwc", environ={})


def test_applying_after_a_backend_started_is_refused_and_changes_nothing():
    jax.devices()  # this process's backend is running
    environ = {"XLA_FLAGS": "--xla_b=1"}
    with pytest.raises(RuntimeError, match="before JAX starts a backend"):
        apply_xla_flags("--xla_c=2", environ=environ)
    assert environ == {"XLA_FLAGS": "--xla_b=1"}
    assert apply_xla_flags("--xla_b=5", environ=environ) == "--xla_b=1"  # nothing to add: no error
    spaced = {"XLA_FLAGS": "  --xla_b=1 "}
    assert apply_xla_flags("", environ=spaced) == "  --xla_b=1 "  # untouched, whatever its spacing


def test_flags_applied_at_start_reach_xla(tmp_path):
    # XLA dumps compiled programs only if it saw the flag when its backend started.
    script = textwrap.dedent(f"""
        import jax, jax.numpy as jnp
        from livseg_jax.training.xla_flags import apply_xla_flags
        apply_xla_flags("--xla_dump_to={tmp_path / 'dump'}")
        jax.jit(lambda x: x * 2 + 1)(jnp.ones(4)).block_until_ready()
    """)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    subprocess.run([sys.executable, "-c", script], check=True, env={**env, "JAX_PLATFORMS": "cpu"})
    assert list((tmp_path / "dump").glob("*.txt"))
