"""The run directory contract: one format for trained and converted runs, one config reader, and
the commands that take a run directory (`convert --to-torch`, `predict`)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from livseg_jax import run_dir
from livseg_jax.config import base_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(stage="liver"):
    config = base_config()
    config.stage = stage
    config.model.name = "unet"
    config.model.features = (2, 4, 4, 4, 4)
    config.data.patch_size = (16, 32, 32)
    return config


def tiny_variables(config, seed=0):
    from helpers import random_unet_variables

    from livseg_jax.models import build_model

    return random_unet_variables(build_model(config.model, deploy=False), tuple(config.data.patch_size), seed)


def flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def assert_same_tree(a, b):
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        np.testing.assert_array_equal(fa[key], fb[key], err_msg=key)


def write_trained_run(workdir, config, periodic, best=None):
    """A run directory as training leaves it: TrainState-like checkpoints with optimiser state."""
    run_dir.save_config(workdir, config)
    ckpt = run_dir.RunCheckpoints(workdir, keep=2)
    opt = jax.tree.map(lambda x: np.zeros_like(x), periodic["params"])
    ckpt.save(4, {"step": np.int32(4), "opt_state": opt, **periodic})
    if best is not None:
        ckpt.save_best(2, {"step": np.int32(2), "opt_state": opt, **best}, dice=0.7)
    ckpt.close()
    return workdir


def test_written_variables_round_trip_exactly_and_refuse_to_overwrite(tmp_path):
    config = tiny_config()
    variables = tiny_variables(config)
    out = run_dir.write_variables(tmp_path / "run", variables, config)
    loaded, loaded_config = run_dir.load_variables(out)
    assert_same_tree(loaded, variables)
    assert loaded_config.model.name == "unet" and tuple(loaded_config.model.features) == (2, 4, 4, 4, 4)
    assert (out / run_dir.CONFIG_FILE).is_file() and (out / run_dir.PERIODIC).is_dir()
    with pytest.raises(FileExistsError, match="not empty"):
        run_dir.write_variables(out, variables, config)
    deploy_only = {"params": {"a": np.ones(1, np.float32)}}
    run_dir.write_variables(out, deploy_only, config, force=True)
    replaced, _ = run_dir.load_variables(out)
    assert list(flat(replaced)) == ["['params']['a']"]
    assert sorted(os.listdir(tmp_path)) == ["run"]  # no temporary folders left behind
    with pytest.raises(ValueError, match="'params'"):
        run_dir.write_variables(tmp_path / "bad", {"opt_state": {}}, config)
    assert not (tmp_path / "bad").exists()


def test_best_and_latest_of_a_trained_run(tmp_path):
    config = tiny_config()
    periodic, best = tiny_variables(config, 1), tiny_variables(config, 2)
    workdir = write_trained_run(tmp_path / "run", config, periodic, best)
    assert_same_tree(run_dir.load_variables(workdir, "best")[0], best)
    assert_same_tree(run_dir.load_variables(workdir, "latest")[0], periodic)
    assert run_dir.checkpoint_step(workdir, "best") == (run_dir.BEST, 2)
    # No validation yet: "best" falls back to the newest periodic checkpoint.
    only_periodic = write_trained_run(tmp_path / "run2", config, periodic)
    assert_same_tree(run_dir.load_variables(only_periodic, "best")[0], periodic)
    with pytest.raises(ValueError, match="which must be one of"):
        run_dir.load_variables(workdir, "newest")


def test_config_reader_names_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_dir.load_config(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json: missing"):
        run_dir.load_config(tmp_path)
    (tmp_path / "variables.msgpack").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="older livseg_jax"):
        run_dir.load_config(tmp_path)
    (tmp_path / run_dir.CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        run_dir.load_config(tmp_path)
    run_dir.save_config(tmp_path / "empty_run", tiny_config())
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        run_dir.load_variables(tmp_path / "empty_run")


def _cli(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "LIVSEG_COMPILATION_CACHE": "off"}
    return subprocess.run([sys.executable, "-m", *args], env=env, cwd=REPO, capture_output=True, text=True)


def test_convert_to_torch_takes_a_training_run_and_from_torch_output_predicts(tmp_path):
    pytest.importorskip("torch")
    from livseg_jax.interop import io, mapping

    config = tiny_config()
    best = tiny_variables(config, 3)
    workdir = write_trained_run(tmp_path / "trained", config, tiny_variables(config, 4), best)
    result = _cli("livseg_jax.convert", "--to-torch", str(workdir), "--out", str(tmp_path / "w.safetensors"))
    assert result.returncode == 0, result.stderr[-2000:]
    state_dict = io.load_state_dict(tmp_path / "w.safetensors")
    want = mapping.variables_to_state_dict(best, config.model)
    assert state_dict.keys() == want.keys()
    assert all(np.array_equal(state_dict[k], want[k]) for k in want)

    # Back in through --from-torch: a run directory that predict reads like a trained one.
    result = _cli("livseg_jax.convert", "--config=configs/liver.py:unet", "--config.model.features=(2,4,4,4,4)",
                  "--config.data.patch_size=(16,32,32)", "--from-torch", str(tmp_path / "w.safetensors"),
                  "--out", str(tmp_path / "converted"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_tree(run_dir.load_variables(tmp_path / "converted")[0], best)

    from livseg_jax.data.synthetic import write_synthetic_dataset

    case = write_synthetic_dataset(tmp_path / "data", 1, (48, 48, 16), (3.0, 3.0, 3.0), seed=0)[0]
    outputs = {}
    for name, run in (("trained", workdir), ("converted", tmp_path / "converted")):
        result = _cli("livseg_jax.predict", "--liver", str(run), "-i", str(case.image),
                      "-o", str(tmp_path / f"pred_{name}.nii.gz"), "--no-progress")
        assert result.returncode == 0, result.stderr[-2000:]
        import nibabel as nib

        outputs[name] = np.asarray(nib.load(tmp_path / f"pred_{name}.nii.gz").dataobj)
        record = json.loads((tmp_path / f"pred_{name}_timings.json").read_text())
        assert record["run"]["settings"]["liver"]["source"] == str(run)
    np.testing.assert_array_equal(outputs["trained"], outputs["converted"])
