"""The axial form (`model.spatial_dims = 2`, issue 16 item 2): every network as a 2D network on
axial slices, checked against a plain per-slice 2D U-Net written here, and end to end through
training and prediction with depth-1 patches."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from helpers import random_unet_variables

from livseg_jax import predict
from livseg_jax.config import model_config
from livseg_jax.models import NETWORKS, build_model, reparameterize
from livseg_jax.models.layers import BN_EPSILON
from livseg_jax.run_dir import load_config
from livseg_jax.training.loop import dataset_cases

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = (4, 8, 8)  # three levels: every mechanism, few operations
SLICE = 8  # in-plane size of the test inputs: the 2 down-samplings need a multiple of 4


def axial_config(name, **overrides):
    cfg = model_config(name)
    # ResUNet++ down-samples one level less than it has widths: one more width for two heads.
    cfg.features, cfg.spatial_dims = (*TINY, 8) if name == "resunet_pp" else TINY, 2
    if name == "unet3plus":
        cfg.cat_channels = 4
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def axial_model(name, **overrides):
    return build_model(axial_config(name, **overrides), backend="cpu")


def slices(depth=3, batch=2, seed=0):
    return jax.random.normal(jax.random.key(seed), (batch, depth, SLICE, SLICE, 1), jnp.float32)


# ------------------------------------------------------------- every network, axial form


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_axial_network(name):
    """One axial network: 2D kernels only; heads coarse to fine at the input size in training and
    the finest map in evaluation, for a depth (3) no down-sampling would accept; each slice's output
    depends on that slice only (the volume's output equals its slices run as a batch of depth-1
    inputs); finite gradients; bfloat16 close to float32."""
    model = axial_model(name)
    variables = random_unet_variables(model, (1, SLICE, SLICE))
    kernels = [leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"])
               if getattr(path[-1], "key", "") == "kernel"]
    assert kernels and all(len(shape) == 4 for shape in kernels), kernels

    x = slices(depth=3)
    # The training form and the gradients jitted: eagerly, each of their many small operations
    # compiles on its own (the gradients: 9-12 s eagerly, 2-5 s jitted on the 2-core machine).
    heads, _ = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    assert len(heads) == sum(key.startswith("head") for key in variables["params"]) >= 2
    assert all(h.shape == (2, 3, SLICE, SLICE, 2) and h.dtype == jnp.float32 for h in heads)

    whole = model.apply(variables, x, train=False)
    assert whole.shape == (2, 3, SLICE, SLICE, 2)
    one_by_one = model.apply(variables, x.reshape(6, 1, SLICE, SLICE, 1), train=False)
    np.testing.assert_allclose(whole, one_by_one.reshape(whole.shape), rtol=1e-5, atol=1e-5)

    def loss(params):
        out, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return sum(jnp.mean(h ** 2) for h in out)

    grads = jax.jit(jax.grad(loss))(variables["params"])
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    bf16_model = axial_model(name, dtype="bfloat16")
    bf16 = jax.jit(lambda v, x: bf16_model.apply(v, x, train=False))(variables, x)
    assert bf16.dtype == jnp.float32  # heads are cast back to float32
    assert float(jnp.max(jnp.abs(bf16 - whole))) <= 0.1 * float(jnp.max(jnp.abs(whole))) + 1e-3


def test_axial_patch_errors_name_the_in_plane_axis():
    model = axial_model("unet")
    variables = random_unet_variables(model, (1, SLICE, SLICE))
    with pytest.raises(ValueError, match=r"patch width = 10 is not divisible by 4"):
        model.apply(variables, jnp.zeros((1, 1, SLICE, 10, 1)), train=False)
    with pytest.raises(ValueError, match=r"patch height = 6 is not divisible by 4"):
        model.apply(variables, jnp.zeros((1, 1, 6, SLICE, 1)), train=False)


def test_msca_3d_mode_is_refused_in_the_axial_form():
    model = axial_model("elanres_msca_unet", msca_mode="3d")
    with pytest.raises(ValueError, match="msca_mode='3d' needs a volumetric network"):
        model.init(jax.random.key(0), jnp.zeros((1, 1, SLICE, SLICE, 1)), train=False)


def test_axial_deploy_form_equals_the_training_form():
    """Re-parameterisation folds the 2D RepConv and BatchNorm kernels like the 3D ones."""
    model = axial_model("elanres_msca_unet")
    variables = random_unet_variables(model, (1, SLICE, SLICE), seed=3)
    x = slices(depth=2, seed=2)
    reference = model.apply(variables, x, train=False)
    deployed = axial_model("elanres_msca_unet", deploy=True).apply(reparameterize(variables), x, train=False)
    np.testing.assert_allclose(deployed, reference, rtol=1e-4, atol=1e-4)


# ---------------------------------------------- the axial U-Net equals a plain 2D U-Net on slices


def conv2d(x, kernel, stride=1, padding="SAME"):
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=jax.lax.Precision.HIGHEST)


def conv_bn_relu(x, params, stats, stride=1, padding="SAME"):
    y = conv2d(x, params["conv"]["kernel"], stride, padding)
    bn, st = params["bn"], stats["bn"]
    y = (y - st["mean"]) / np.sqrt(st["var"] + BN_EPSILON) * bn["scale"] + bn["bias"]
    return np.maximum(y, 0.0)


def transposed_conv2x(x, kernel, bias):
    """ConvTranspose2d(kernel 2, stride 2) written out: output pixel (2h+i, 2w+j) = x[h, w] @ kernel[i, j]."""
    n, h, w, _ = x.shape
    y = np.zeros((n, 2 * h, 2 * w, kernel.shape[-1]), np.float32)
    for i in range(2):
        for j in range(2):
            y[:, i::2, j::2] = np.asarray(x) @ np.asarray(kernel[i, j])
    return y + bias


def reference_unet_2d(image, params, stats):
    """The plain 2D U-Net (double 3x3 conv blocks, 2x2 strided-conv down-sampling, transposed-conv
    up-sampling, 1x1 head) on one batch of slices (N, H, W, 1): finest logits (N, H, W, K)."""

    def double(x, name):
        for i in range(2):
            x = conv_bn_relu(x, params[name][f"conv{i}"], stats[name][f"conv{i}"])
        return x

    levels = len(TINY)
    x, skips = image, []
    for s in range(levels - 1):
        x = double(x, f"enc{s}")
        skips.append(x)
        x = conv_bn_relu(x, params[f"down{s}"], stats[f"down{s}"], stride=2, padding="VALID")
    x = double(x, "bottleneck")
    for s in reversed(range(levels - 1)):
        x = transposed_conv2x(x, params[f"up{s}"]["kernel"], params[f"up{s}"]["bias"])
        x = double(np.concatenate([x, skips[s]], axis=-1), f"dec{s}")
    head = params[f"head{levels - 2}"]
    return conv2d(x, head["kernel"]) + head["bias"]


def test_axial_unet_equals_a_2d_unet_applied_to_each_slice():
    model = axial_model("unet", activation="relu")
    variables = random_unet_variables(model, (1, SLICE, SLICE), seed=4)
    x = slices(depth=3, batch=1, seed=5)
    ours = np.asarray(model.apply(variables, x, train=False))
    params = jax.tree.map(np.asarray, variables["params"])
    stats = jax.tree.map(np.asarray, variables["batch_stats"])
    for d in range(3):
        expected = reference_unet_2d(np.asarray(x[:, d]), params, stats)
        np.testing.assert_allclose(ours[:, d], expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))


# ------------------------------------------------ end to end: depth-1 patches, slice-wise prediction


def run_train_cli(*args, cwd):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "livseg_jax.train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env)


def test_axial_training_on_slices_and_slice_wise_prediction(tmp_path):
    """`train` with depth-1 patches, then `predict` slides a depth-1 window over every slice."""
    done = run_train_cli(
        f"--config={REPO / 'configs' / 'liver.py'}", f"--workdir={tmp_path / 'run'}",
        f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.data.synthetic.num_cases=3",
        "--config.data.synthetic.shape=(64,64,16)", "--config.data.synthetic.spacing=(2.0,2.0,4.0)",
        "--config.data.num_val_cases=1", "--config.data.patch_size=(1,32,32)", "--config.data.batch_size=4",
        "--config.train.num_epochs=1", "--config.train.steps_per_epoch=3", "--config.train.eval_every_epochs=1",
        "--config.model.spatial_dims=2", "--config.model.name=unet", f"--config.model.features={TINY}",
        cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    config = load_config(run)
    assert config.model.spatial_dims == 2 and tuple(config.data.patch_size) == (1, 32, 32)
    ct = dataset_cases(config)[-1].image
    out = tmp_path / "out"
    assert predict.main(["--liver", str(run), "-i", str(ct), "-o", str(out), "--no-progress"]) == 0
    (seg,) = out.glob("*.nii.gz")
    written, source = nib.load(seg), nib.load(ct)
    assert written.shape == source.shape
    np.testing.assert_array_equal(written.affine, source.affine)
    assert set(np.unique(np.asarray(written.dataobj)).tolist()) <= {0, 1}
    record = json.loads(seg.with_name(seg.name.replace(".nii.gz", "_timings.json")).read_text())
    assert record["run"]["settings"]["liver"]["window"] == [1, 32, 32]
