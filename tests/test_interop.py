"""PyTorch <-> Flax interchange: the twins agree with the Flax models (evaluation, training, one
Adam step, deploy form), the converter is exact and strict, and weight files load safely."""

from __future__ import annotations

import functools
import os
import pathlib
import pickle
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")

from livseg_jax import losses, run_dir  # noqa: E402
from livseg_jax.config import base_config, model_config  # noqa: E402
from livseg_jax.convert import convert_from_torch, convert_to_torch  # noqa: E402
from livseg_jax.interop import io, mapping  # noqa: E402
from livseg_jax.interop import torch_models as tm  # noqa: E402
from livseg_jax.models import VARIANTS, build_model, reparameterize  # noqa: E402
from livseg_jax.models.msca import MSCABlock  # noqa: E402
from tools import parity  # noqa: E402
from tools.torch_losses import deep_supervision_loss_torch  # noqa: E402

torch.set_num_threads(2)
REPO = pathlib.Path(__file__).resolve().parents[1]
FEATURES = (4, 8, 8, 8, 8)
PATCH = (16, 16, 16)
# 16^3 leaves the bottleneck BatchNorms n = B*1*1*1 = 2 values per channel, where PyTorch's
# unbiased running variance differs from Flax's by a factor n/(n-1) = 2 in the batch term.
TRAIN_PATCH = PATCH
BATCH = 2
TOL = 1e-4  # max |difference| / max |reference|


def tiny(name: str = "elanres_msca_unet") -> ml_collections.ConfigDict:
    cfg = model_config(name)
    cfg.features = FEATURES
    return cfg


def _input(seed: int = 0, patch=PATCH) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(BATCH, *patch, 1)).astype(np.float32)


@functools.cache
def _eval_fn(name: str, deploy: bool = False):
    return parity.flax_eval_all_heads(build_model(tiny(name), deploy=deploy))


def _assert_heads_close(torch_heads, flax_heads, n_heads: int, patch=PATCH) -> None:
    assert len(torch_heads) == len(flax_heads) == n_heads
    for i, (t, f) in enumerate(zip(torch_heads, flax_heads, strict=True)):
        assert t.shape == (BATCH, *patch, 2)
        max_abs, rel = parity.errors(t, np.asarray(f))
        assert rel <= TOL, f"head {i}: max |diff| {max_abs:.3g}, relative {rel:.3g}"


# ------------------------------------------------------------------------------------------------
# Evaluation mode, both directions, all variants and heads.


@pytest.mark.parametrize("name", list(VARIANTS))
def test_eval_heads_agree_when_torch_weights_are_imported(name):
    torch_model = parity.randomize_torch_(tm.torch_model_from_config(tiny(name)), seed=1).eval()
    variables = mapping.state_dict_to_variables(parity.torch_state_numpy(torch_model), tiny(name))
    x = _input()
    _assert_heads_close(parity.torch_forward(torch_model, x), _eval_fn(name)(variables, x), 4)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_eval_heads_agree_when_flax_weights_are_exported(name):
    variables = parity.random_flax_variables(mapping.flax_variable_shapes(tiny(name)), seed=2)
    state_dict = mapping.variables_to_state_dict(variables, tiny(name))
    torch_model = parity.load_torch_state_numpy(tm.torch_model_from_config(tiny(name)), state_dict)
    x = _input(1)
    _assert_heads_close(parity.torch_forward(torch_model.eval(), x), _eval_fn(name)(variables, x), 4)


def test_all_heads_helper_matches_flax_evaluation_mode():
    # The parity helper evaluates BatchNorm itself; its finest head must be Flax's own eval output.
    variables = parity.random_flax_variables(mapping.flax_variable_shapes(tiny("unet")), seed=3)
    x = _input(2)
    own = build_model(tiny("unet")).apply(variables, x, train=False)
    np.testing.assert_allclose(_eval_fn("unet")(variables, x)[-1], own, rtol=1e-6, atol=1e-6)


def test_msca_block_3d_mode_agrees():
    channels, shape = 4, (2, 6, 8, 8, 4)
    block = MSCABlock(mode="3d")
    shapes = jax.eval_shape(lambda x: block.init(jax.random.key(0), x, train=False),
                            jax.ShapeDtypeStruct(shape, jnp.float32))
    variables = parity.random_flax_variables(shapes, seed=4)
    torch_block = tm.MSCABlock(channels, mode="3d")
    torch_shapes = tm.state_shapes(torch_block)
    parity.load_torch_state_numpy(torch_block, mapping.flax_to_torch(variables, torch_shapes)).eval()
    x = np.random.default_rng(5).normal(size=shape).astype(np.float32)
    want = block.apply(variables, x, train=False)
    with torch.no_grad():
        got = torch_block(torch.from_numpy(np.moveaxis(x, -1, 1))).numpy()
    assert parity.errors(want, np.moveaxis(got, 1, -1))[1] <= TOL
    assert torch_block.attention.strip21_2.weight.shape == (4, 1, 21, 1, 1)  # strips on all 3 axes


# ------------------------------------------------------------------------------------------------
# Training mode and one Adam step (HybridLoss1 with deep supervision), default variant.


@pytest.fixture(scope="module")
def one_step():
    """Runs the same training step in both frameworks; returns everything to compare."""
    cfg, loss_cfg, optim = tiny(), base_config().loss, base_config().optim
    ds_alpha = float(loss_cfg.ds_alpha)
    torch_model = parity.randomize_torch_(tm.torch_model_from_config(cfg), seed=6).train()
    before = parity.torch_state_numpy(torch_model)
    variables = mapping.state_dict_to_variables(before, cfg)
    x = _input(3, TRAIN_PATCH)
    labels = (np.random.default_rng(7).random((BATCH, *TRAIN_PATCH)) < 0.3).astype(np.int32)

    # n = B*D*H*W values per channel seen by each BatchNorm, for the running-variance rule.
    counts: dict[str, int] = {}
    for name, module in torch_model.named_modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.register_forward_hook(
                lambda m, args, out, name=name: counts.__setitem__(name, args[0].numel() // args[0].shape[1]))
    opt = torch.optim.Adam(torch_model.parameters(), lr=optim.learning_rate, betas=(optim.b1, optim.b2),
                           eps=optim.eps)
    heads_t = torch_model(torch.from_numpy(np.moveaxis(x, -1, 1)))
    loss_t, per_head_t = deep_supervision_loss_torch(heads_t, torch.from_numpy(labels), loss_cfg, ds_alpha)
    opt.zero_grad()
    loss_t.backward()
    grads_t = {k: p.grad.numpy().copy() for k, p in torch_model.named_parameters()}
    opt.step()
    after = parity.torch_state_numpy(torch_model)

    model = build_model(cfg)

    def loss_fn(params, batch_stats):
        heads, upd = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                 mutable=["batch_stats"])
        total, per_head = losses.deep_supervision_loss(heads, labels, loss_cfg, ds_alpha)
        return total, (heads, upd["batch_stats"], per_head)

    tx = optax.adam(optim.learning_rate, b1=optim.b1, b2=optim.b2, eps=optim.eps)
    params = variables["params"]
    (loss_f, (heads_f, stats_f, per_head_f)), grads_f = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        params, variables["batch_stats"])
    updates_f, _ = tx.update(grads_f, tx.init(params), params)
    return dict(cfg=cfg, before=before, after=after, variables=variables, counts=counts,
                heads_t=[np.moveaxis(h.detach().numpy(), 1, -1) for h in heads_t], heads_f=heads_f,
                stats_f=stats_f, loss=(loss_t.item(), float(loss_f)),
                per_head=(per_head_t.detach().numpy(), np.asarray(per_head_f)),
                grads_t=grads_t, grads_f=grads_f, updates_f=updates_f, tx=tx)


def _torch_as_flax_tree(arrays: dict[str, np.ndarray], collection: str) -> dict[str, np.ndarray]:
    """Maps torch-named arrays (weights or their gradients) to flat flax paths of one collection."""
    out = {}
    for row in mapping.mapping_table(arrays):
        if row.flax_path and row.flax_path.startswith(collection + "/"):
            to_flax = mapping.TRANSFORMS[row.transform][0]
            out[row.flax_path[len(collection) + 1:]] = to_flax(arrays[row.torch_name])
    return out


def test_training_forward_heads_agree(one_step):
    _assert_heads_close(one_step["heads_t"], one_step["heads_f"], 4, TRAIN_PATCH)


def test_training_running_means_agree(one_step):
    flax_stats = mapping.flatten(one_step["stats_f"])
    torch_stats = {k: v for k, v in one_step["after"].items() if k.endswith("running_mean")}
    assert len(torch_stats) == sum(p.endswith("/mean") for p in flax_stats) > 0
    for key, value in torch_stats.items():
        path = mapping.map_name(key).flax_path.removeprefix("batch_stats/")
        moved = np.abs(value - one_step["before"][key]).max()
        assert moved > 1e-3, f"{key} did not move: the test would not see a wrong update"
        max_abs, rel = parity.errors(value, np.asarray(flax_stats[path]))
        assert rel <= TOL, f"{key}: max |diff| {max_abs:.3g}, relative {rel:.3g}"


def test_training_running_variances_agree_after_unbiased_correction(one_step):
    flax_stats = mapping.flatten(one_step["stats_f"])
    raw = []
    for module, n in one_step["counts"].items():
        key = f"{module}.running_var"
        torch_var, old = one_step["after"][key], one_step["before"][key]
        flax_var = np.asarray(flax_stats[f"{module.replace('.', '/')}/var"])
        raw.append(parity.errors(torch_var, flax_var)[1])
        predicted = parity.torch_running_var_from_flax(flax_var, old, n)
        max_abs, rel = parity.errors(torch_var, predicted)
        assert rel <= TOL, f"{key} (n={n}): max |diff| {max_abs:.3g}, relative {rel:.3g}"
    # Without the n/(n-1) rule the small-n layers would disagree far beyond float32 rounding.
    assert max(raw) > 100 * TOL
    assert min(one_step["counts"].values()) == BATCH * np.prod(TRAIN_PATCH) // 16**3  # bottleneck


def test_one_step_same_hybrid_loss_and_per_head_losses(one_step):
    loss_t, loss_f = one_step["loss"]
    assert abs(loss_t - loss_f) <= TOL * abs(loss_t)
    np.testing.assert_allclose(*one_step["per_head"], rtol=TOL)


def test_one_step_same_gradients(one_step):
    grads_t = _torch_as_flax_tree(one_step["grads_t"], "params")
    grads_f = {k: np.asarray(v) for k, v in mapping.flatten(one_step["grads_f"]).items()}
    assert grads_t.keys() == grads_f.keys()
    scale = max(np.abs(g).max() for g in grads_f.values())
    for path, g in grads_f.items():
        max_abs, rel = parity.errors(g, grads_t[path])
        # The measure of the outputs: max |difference| over the scale of the whole gradient.
        assert max_abs <= TOL * scale, f"{path}: max |diff| {max_abs:.3g} vs gradient scale {scale:.3g}"
        # Per tensor, relative to its own scale, floored at 1% of the largest gradient: some
        # gradients are zero in exact arithmetic (a bias or a one-input-channel 1x1 kernel before a
        # training-mode BatchNorm) and show only float32 noise.
        leaf_scale = max(np.abs(g).max(), 1e-2 * scale)
        assert max_abs <= 1e-3 * leaf_scale, f"{path}: max |diff| {max_abs:.3g}, relative {rel:.3g}"


def test_one_step_same_adam_update(one_step):
    lr = base_config().optim.learning_rate
    before = _torch_as_flax_tree(one_step["before"], "params")
    updates_t = _torch_as_flax_tree({k: one_step["after"][k] - one_step["before"][k]
                                     for k in one_step["grads_t"]}, "params")
    updates_f = {k: np.asarray(v) for k, v in mapping.flatten(one_step["updates_f"]).items()}
    grads_f = {k: np.asarray(v) for k, v in mapping.flatten(one_step["grads_f"]).items()}
    assert updates_t.keys() == updates_f.keys()
    # The rule: optax.adam on torch's own gradients gives torch.optim.Adam's step, up to the
    # float32 rounding of the parameter the step was added to.
    params = one_step["variables"]["params"]
    tx = one_step["tx"]
    grads_t = mapping.unflatten(_torch_as_flax_tree(one_step["grads_t"], "params"))
    rule = mapping.flatten(tx.update(grads_t, tx.init(params), params)[0])
    for path, u in rule.items():
        rounding = np.spacing(np.abs(before[path]).max())
        np.testing.assert_allclose(updates_t[path], np.asarray(u), rtol=0, atol=rounding, err_msg=path)
    # End to end: each framework's gradients through its own Adam. Adam's first step is
    # -lr * g / (|g| + eps), whose sensitivity lr * eps / (|g| + eps)^2 amplifies float32 gradient
    # noise only where |g| is tiny, so compare where |g| >= 1e-4 (most weights).
    compared = total = 0
    for path, u in updates_f.items():
        assert np.abs(u).max() <= lr * (1 + 1e-6)  # |step| <= lr on the first step
        where = np.abs(grads_f[path]) >= 1e-4
        rounding = np.spacing(np.abs(before[path]).max())
        np.testing.assert_allclose(updates_t[path][where], u[where], rtol=0, atol=TOL * lr + rounding,
                                   err_msg=path)
        compared, total = compared + int(where.sum()), total + u.size
    assert compared >= 0.5 * total


# ------------------------------------------------------------------------------------------------
# Converter: exact round trip, deploy form, strictness.


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("deploy", [False, True])
def test_round_trip_torch_flax_torch_is_exact(name, deploy):
    torch_model = parity.randomize_torch_(tm.torch_model_from_config(tiny(name), deploy=deploy), seed=8)
    state_dict = parity.torch_state_numpy(torch_model)
    variables = mapping.state_dict_to_variables(state_dict, tiny(name))
    assert ("batch_stats" in variables) == (not deploy)
    back = mapping.variables_to_state_dict(variables, tiny(name))
    assert list(back) == list(state_dict)
    for key, value in state_dict.items():
        assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key


@pytest.mark.parametrize("name", ["unet", "elanres_msca_unet"])
def test_deploy_models_agree_across_frameworks(name):
    torch_model = parity.randomize_torch_(tm.torch_model_from_config(tiny(name)), seed=9).eval()
    variables = mapping.state_dict_to_variables(parity.torch_state_numpy(torch_model), tiny(name))
    torch_deploy = tm.reparameterize_torch(torch_model).eval()
    flax_deploy = reparameterize(variables)
    # Both folds, exported the same way, give the same deploy weights.
    exported = mapping.variables_to_state_dict(flax_deploy, tiny(name))
    folded = parity.torch_state_numpy(torch_deploy)
    assert exported.keys() == folded.keys()
    for key in folded:
        np.testing.assert_allclose(exported[key], folded[key], rtol=1e-6, atol=1e-7, err_msg=key)
    x = _input(4)
    eval_out = parity.torch_forward(torch_model, x)[-1]
    deploy_t = parity.torch_forward(torch_deploy, x)
    deploy_f = _eval_fn(name, deploy=True)(flax_deploy, x)
    _assert_heads_close(deploy_t, deploy_f, 1)
    assert parity.errors(eval_out, deploy_t[-1])[1] <= TOL  # the torch fold is exact too


def test_mapping_table_uses_every_rule_and_covers_every_tensor():
    keys = list(tm.torch_model_from_config(tiny()).state_dict())
    rows = mapping.mapping_table(keys)
    assert [r.torch_name for r in rows] == keys
    first_rule = lambda k: next(i for i, r in enumerate(mapping.RULES) if re.fullmatch(r.torch_pattern, k))
    assert {first_rule(k) for k in keys} == set(range(len(mapping.RULES)))  # no dead rule
    kinds = {r.flax_path.rsplit("/", 1)[-1]: r.transform for r in rows if r.flax_path}
    assert kinds["scale"] == "copy" and kinds["mean"] == "copy"
    assert mapping.map_name("up2.weight").transform == "conv_transpose"
    assert mapping.map_name("enc1.rep0.identity.weight").flax_path == "params/enc1/rep0/identity/scale"
    assert mapping.map_name("msca1.attention.strip7_0.weight").flax_path == \
        "params/msca1/attention/strip7_0/kernel"


def test_conversion_lists_missing_unexpected_and_mismatched_keys():
    cfg = tiny()
    state_dict = parity.torch_state_numpy(tm.torch_model_from_config(cfg))
    del state_dict["enc0.reduce_a.conv.weight"]
    state_dict["enc9.fuse.bn.weight"] = np.ones(3, np.float32)
    state_dict["head3.bias"] = np.zeros(5, np.float32)
    with pytest.raises(mapping.ConversionError) as err:
        mapping.state_dict_to_variables(state_dict, cfg)
    e = err.value
    assert e.missing == ["params/enc0/reduce_a/conv/kernel"]
    assert e.unexpected == ["enc9.fuse.bn.weight -> params/enc9/fuse/bn/scale"]
    assert len(e.mismatched) == 1 and e.mismatched[0].startswith("head3.bias (5,)")
    assert "enc9.fuse.bn.weight" in str(e) and "missing (1)" in str(e)

    with pytest.raises(mapping.ConversionError, match="no rule matches"):
        mapping.mapping_table(["enc0.reduce_a.conv.weight", "stray"])

    variables = parity.random_flax_variables(mapping.flax_variable_shapes(cfg))
    variables["params"]["extra"] = {"kernel": np.zeros(2, np.float32)}
    del variables["batch_stats"]["down0"]
    with pytest.raises(mapping.ConversionError) as err:
        mapping.variables_to_state_dict(variables, cfg, deploy=False)
    assert err.value.unexpected == ["params/extra/kernel"]
    assert sorted(err.value.missing) == ["batch_stats/down0/bn/mean (for down0.bn.running_mean)",
                                         "batch_stats/down0/bn/var (for down0.bn.running_var)"]


def test_other_widths_are_refused_with_shape_mismatches():
    wide = tiny("unet")
    wide.features = (4, 8, 8, 8, 16)
    state_dict = parity.torch_state_numpy(tm.torch_model_from_config(wide))
    with pytest.raises(mapping.ConversionError) as err:
        mapping.state_dict_to_variables(state_dict, tiny("unet"))
    assert err.value.mismatched and not err.value.missing


# ------------------------------------------------------------------------------------------------
# Files: safe loading, atomic saving, the CLI.


class _RunsCode:
    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_loader_refuses_pickle_that_carries_code(tmp_path, writer):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    payload = {"enc0.conv0.conv.weight": torch.zeros(2), "x": _RunsCode(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    assert not marker.exists()
    with pytest.raises(ValueError, match="evil.pt"):
        io.load_state_dict(path)
    assert not marker.exists()


def test_pt_and_safetensors_files_round_trip(tmp_path):
    state_dict = parity.torch_state_numpy(parity.randomize_torch_(tm.torch_model_from_config(tiny()), 10))
    for name in ("w.pt", "w.pth", "w.safetensors"):
        path = io.save_state_dict(tmp_path / name, state_dict)
        loaded = io.load_state_dict(path)
        assert sorted(loaded) == sorted(state_dict)
        assert all(np.array_equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in state_dict.items())
        with pytest.raises(FileExistsError):
            io.save_state_dict(path, state_dict)
    nested = {"state_dict": {f"module.{k}": torch.from_numpy(v) for k, v in state_dict.items()}, "epoch": 3}
    torch.save(nested, tmp_path / "nested.pt")
    assert sorted(io.load_state_dict(tmp_path / "nested.pt")) == sorted(state_dict)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    with pytest.raises(ValueError, match="unknown weight file type"):
        io.load_state_dict(tmp_path / "w.npz")
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="bad.safetensors"):
        io.load_state_dict(tmp_path / "bad.safetensors")


def test_convert_functions_round_trip_training_and_deploy_forms(tmp_path):
    config = base_config()
    config.model = tiny("elanres_unet")
    torch_model = parity.randomize_torch_(tm.torch_model_from_config(config.model), seed=12)
    state_dict = parity.torch_state_numpy(torch_model)
    io.save_state_dict(tmp_path / "in.safetensors", state_dict)
    ckpt = convert_from_torch(tmp_path / "in.safetensors", tmp_path / "ckpt", config)
    back = convert_to_torch(ckpt, tmp_path / "out.pt")
    again = io.load_state_dict(back)
    assert again.keys() == state_dict.keys()
    assert all(np.array_equal(again[k], v) for k, v in state_dict.items())

    deployed = io.load_state_dict(convert_to_torch(ckpt, tmp_path / "deploy.pt", deploy=True))
    want = parity.torch_state_numpy(tm.reparameterize_torch(torch_model))
    assert deployed.keys() == want.keys()
    for key in want:
        np.testing.assert_allclose(deployed[key], want[key], rtol=1e-6, atol=1e-7, err_msg=key)
    # A deploy-form file comes back in as a deploy checkpoint.
    ckpt2 = convert_from_torch(tmp_path / "deploy.pt", tmp_path / "ckpt2", config)
    variables2, config2 = run_dir.load_variables(ckpt2)
    assert config2.model.deploy and "batch_stats" not in variables2

    other = base_config()
    other.model = tiny("unet")
    with pytest.raises(mapping.ConversionError, match="in.safetensors -> model 'unet'"):
        convert_from_torch(tmp_path / "in.safetensors", tmp_path / "ckpt3", other)
    assert not (tmp_path / "ckpt3").exists()


def test_convert_cli_and_torch_free_imports(tmp_path):
    config = base_config()
    config.model = tiny("unet")
    state_dict = parity.torch_state_numpy(tm.torch_model_from_config(config.model))
    io.save_state_dict(tmp_path / "in.pt", state_dict)
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    check = ("import sys, livseg_jax, livseg_jax.models, livseg_jax.interop, tools.parity, "
             "livseg_jax.convert; assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", check], check=True, env=env, cwd=REPO)
    cmd = [sys.executable, "-m", "livseg_jax.convert", "--config=configs/liver.py:unet",
           "--config.model.features=(4,8,8,8,8)", "--from-torch", str(tmp_path / "in.pt"),
           "--out", str(tmp_path / "ckpt")]
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    variables, saved = run_dir.load_variables(tmp_path / "ckpt")
    assert saved.model.name == "unet" and "batch_stats" in variables
    # Refuses to overwrite without --force, and says why.
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0 and "not empty" in result.stderr
