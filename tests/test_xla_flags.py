"""XLA flags: those the model's forms need and the user's, merged, applied before a backend starts."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest

from livseg_jax import xla_flags
from livseg_jax.config import model_config
from livseg_jax.models.forms import REFERENCE_FORMS
from livseg_jax.xla_flags import (
    GPU_FORM_FLAGS,
    SHIPPED_AUTOTUNE_DIR,
    apply_model_xla_flags,
    apply_xla_flags,
    autotune_xla_flags,
    has_cuda_plugin,
    merge_xla_flags,
    model_xla_flags,
)


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
        from livseg_jax.xla_flags import apply_xla_flags
        apply_xla_flags("--xla_dump_to={tmp_path / 'dump'}")
        jax.jit(lambda x: x * 2 + 1)(jnp.ones(4)).block_until_ready()
    """)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    subprocess.run([sys.executable, "-c", script], check=True, env={**env, "JAX_PLATFORMS": "cpu"})
    assert list((tmp_path / "dump").glob("*.txt"))


def reference_model():
    config = model_config()
    config.update(REFERENCE_FORMS)
    return config


def test_the_gpu_forms_ask_for_channels_last_convolutions_and_the_reference_forms_for_nothing():
    assert GPU_FORM_FLAGS == "--xla_gpu_force_conv_nhwc=true"
    assert model_xla_flags([model_config()]) == GPU_FORM_FLAGS  # "auto": the GPU forms on a GPU
    assert model_xla_flags([reference_model()]) == ""
    assert model_xla_flags([reference_model(), model_config()]) == GPU_FORM_FLAGS  # either stage
    assert model_xla_flags([]) == ""


def test_the_environment_wins_over_the_users_flags_which_win_over_the_forms(monkeypatch):
    # As at the start of a process (only a dict is written here, not the real environment).
    monkeypatch.setattr(xla_flags.xla_bridge, "backends_are_initialized", lambda: False)
    environ = {}
    assert apply_model_xla_flags([model_config()], environ=environ) == GPU_FORM_FLAGS
    environ = {}
    got = apply_model_xla_flags([model_config()], "--xla_gpu_force_conv_nhwc=false --xla_c=2", environ)
    assert got.split() == ["--xla_gpu_force_conv_nhwc=false", "--xla_c=2"]
    environ = {"XLA_FLAGS": "--xla_c=1"}
    got = apply_model_xla_flags([reference_model()], "--xla_c=2 --xla_d=3", environ)
    assert got.split() == ["--xla_c=1", "--xla_d=3"] == environ["XLA_FLAGS"].split()


def test_the_gpu_forms_flag_changes_nothing_on_a_cpu(tmp_path):
    # "auto" forms ask for the flag before the backend is known: on a CPU it must be harmless.
    script = textwrap.dedent("""
        import hashlib, jax, jax.numpy as jnp, numpy as np
        x = jax.random.normal(jax.random.key(0), (1, 8, 8, 8, 4))
        w = jax.random.normal(jax.random.key(1), (3, 3, 3, 4, 4))
        y = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
            x, w, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")))(x, w)
        print(hashlib.sha256(np.asarray(y).tobytes()).hexdigest())
    """)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    outputs = [subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True,
                              env={**env, "XLA_FLAGS": flags}).stdout for flags in ("", GPU_FORM_FLAGS)]
    assert outputs[0] == outputs[1] and len(outputs[0].strip()) == 64


GPU_VERSIONS = {"jaxlib": "0.11.2", "jax-cuda12-plugin": "0.11.2", "nvidia-cudnn-cu12": "9.10.2.21"}


def shipped_dir(tmp_path, versions=GPU_VERSIONS):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "xla_autotune_0.11.2.textproto").write_text("version: 3\n")
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"files": [{"file": "xla_autotune_0.11.2.textproto", "versions": versions,
                    "devices": ["NVIDIA H200"], "programs": ["configs/liver.py:paper train"]}]}))
    return tmp_path


def test_shipped_autotuning_results_load_only_with_the_versions_that_made_them(tmp_path):
    directory = shipped_dir(tmp_path)
    flag, note = autotune_xla_flags("shipped", GPU_VERSIONS, directory)
    assert flag == f"--xla_gpu_load_autotune_results_from={directory / 'xla_autotune_0.11.2.textproto'}"
    assert note == ""
    # Another cuDNN names other engines: not loaded, and the GPU user is told why.
    flag, note = autotune_xla_flags("shipped", {**GPU_VERSIONS, "nvidia-cudnn-cu12": "9.8.0.87"}, directory)
    assert flag == "" and "nvidia-cudnn-cu12 9.8.0.87" in note and "nvidia-cudnn-cu12 9.10.2.21" in note
    # Without a CUDA plugin there is no GPU to autotune for: no flag and nothing to say.
    assert autotune_xla_flags("shipped", {"jaxlib": "0.11.2"}, directory) == ("", "")
    assert autotune_xla_flags("off", GPU_VERSIONS, directory) == ("", "")


def test_shipped_results_at_a_path_with_spaces_are_skipped_with_a_note(tmp_path):
    directory = shipped_dir(tmp_path / "site packages")
    flag, note = autotune_xla_flags("shipped", GPU_VERSIONS, directory)
    assert flag == "" and "spaces" in note


def test_a_named_autotuning_results_file_must_exist_and_fit_in_xla_flags(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        autotune_xla_flags(str(tmp_path / "missing.textproto"))
    spaced = tmp_path / "my results.textproto"
    spaced.write_text("version: 3\n")
    with pytest.raises(ValueError, match="spaces"):
        autotune_xla_flags(str(spaced))
    plain = tmp_path / "results.textproto"
    plain.write_text("version: 3\n")
    assert autotune_xla_flags(str(plain)) == (f"--xla_gpu_load_autotune_results_from={plain}", "")


def test_the_shipped_manifest_names_files_that_exist_with_versions_and_gpus():
    manifest = SHIPPED_AUTOTUNE_DIR / "manifest.json"
    if not manifest.exists():
        pytest.skip("no autotuning results shipped")
    for entry in json.loads(manifest.read_text())["files"]:
        assert (SHIPPED_AUTOTUNE_DIR / entry["file"]).is_file()
        assert entry["versions"]["jaxlib"] and entry["devices"] and entry["programs"]
        assert has_cuda_plugin(entry["versions"])


def test_the_training_flags_line_names_the_results_file_or_who_overrode_it(tmp_path, monkeypatch):
    results = tmp_path / "results.textproto"
    results.write_text("version: 3\n")
    monkeypatch.setattr(xla_flags.xla_bridge, "backends_are_initialized", lambda: False)
    environ = {}
    line = xla_flags.apply_training_xla_flags([model_config()], "", str(results), environ)
    assert line == f"XLA autotuning results: {results}"
    assert f"--xla_gpu_load_autotune_results_from={results}" in environ["XLA_FLAGS"].split()
    mine = "--xla_gpu_load_autotune_results_from=/elsewhere.textproto"
    environ = {"XLA_FLAGS": mine}  # the environment wins, and the line says so
    line = xla_flags.apply_training_xla_flags([model_config()], "", str(results), environ)
    assert line.startswith("note:") and environ["XLA_FLAGS"].split().count(mine) == 1
    assert xla_flags.apply_training_xla_flags([model_config()], "", "off", {}) == ""
