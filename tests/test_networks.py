"""The checks every comparison network (SPEC 1.5, issue 16) passes, one parametrised test each.

Output shapes, heads coarse to fine, finite gradients, bf16 close to float32, a patch error naming
the axis and the divisor, the GPU computation forms, the deploy form, PyTorch parity of every head
(1e-4 relative, float32) and the converter's round trip and key report. Each network's own
mechanism is tested in tests/test_<network>.py; what differs between networks is
`network_checks.SPECS`.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from network_checks import (
    BATCH,
    PATCH,
    SPECS,
    TOL,
    eval_output,
    inputs,
    rel_error,
    tiny,
    torch_models,
    variables,
)

from livseg_jax import losses
from livseg_jax.config import base_config
from livseg_jax.interop import mapping
from livseg_jax.models import VARIANTS, build_model, names, reparameterize, variable_shapes
from livseg_jax.models.build import NETWORKS
from livseg_jax.models.unet import AXIS_NAMES
from tools import parity

NAMES = tuple(SPECS)
by_network = pytest.mark.parametrize("name", NAMES)


def test_every_comparison_network_is_checked():
    assert set(NAMES) == set(NETWORKS) - set(VARIANTS)


@by_network
def test_training_heads_coarse_to_fine_with_finite_gradients(name):
    spec, model = SPECS[name], build_model(tiny(name))
    initial = variables(name)
    x = jnp.asarray(inputs())
    labels = (x[..., 0] > 0).astype(jnp.int32)
    loss_config = base_config().loss

    def loss_fn(params):
        heads, _ = model.apply({**initial, "params": params}, x, train=True, mutable=["batch_stats"])
        return losses.deep_supervision_loss(heads, labels, loss_config, loss_config.ds_alpha)[0], heads

    (value, heads), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(initial["params"])
    assert isinstance(heads, tuple) and len(heads) == spec.n_heads
    assert all(h.shape == (BATCH, *PATCH, 2) and h.dtype == jnp.float32 for h in heads)
    head_names = [f"{names.HEAD}{i}" for i in range(spec.n_heads)]
    assert sorted(k for k in initial["params"] if k.startswith(names.HEAD)) == head_names
    # Coarse to fine: each head reads the width of its level.
    assert tuple(initial["params"][h]["kernel"].shape[-2] for h in head_names) == spec.head_widths
    assert np.isfinite(float(value))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert all(float(jnp.abs(grads[h]["kernel"]).sum()) > 0 for h in head_names)
    probe = functools.reduce(operator.getitem, spec.grad_probe.split("/"), grads)
    assert float(jnp.abs(probe).sum()) > 0  # the gradient reaches the first level
    single = build_model(tiny(name, deep_supervision=False))
    heads1, _ = jax.jit(lambda v, x: single.apply(v, x, train=True, mutable=["batch_stats"]))(initial, x)
    assert len(heads1) == 1 and heads1[0].shape == (BATCH, *PATCH, 2)
    # The finest head alone. Two programs in training mode: BatchNorm over this tiny batch amplifies
    # their float32 rounding (UNet 3+ differed by 2e-5 under XLA:CPU's loop emitters); another head
    # would differ by tenths.
    np.testing.assert_allclose(heads1[0], heads[-1], rtol=1e-4, atol=1e-4)
    # Evaluation returns the finest head: the training graph's, BatchNorm on running statistics.
    assert eval_output(name).shape == (BATCH, *PATCH, 2)
    np.testing.assert_allclose(eval_output(name), parity.flax_eval_all_heads(model)(variables(name), inputs())[-1],
                               rtol=1e-5, atol=1e-5)


@by_network
def test_bfloat16_close_to_float32(name):
    model16 = build_model(tiny(name, dtype="bfloat16"))
    out16 = jax.jit(lambda v, x: model16.apply(v, x, train=False))(variables(name), inputs())
    assert out16.dtype == jnp.float32
    assert rel_error(eval_output(name), out16) < 5e-2


@by_network
@pytest.mark.parametrize("axis", AXIS_NAMES)
def test_patch_not_divisible_names_the_axis_and_divisor(name, axis):
    divisor = SPECS[name].divisor
    bad = {"depth": divisor + divisor // 2, "height": divisor // 2, "width": divisor + divisor // 4}[axis]
    shape = tuple(bad if a == axis else divisor for a in AXIS_NAMES)
    model = build_model(tiny(name))
    message = rf"patch {axis} = {bad} is not divisible by {divisor} "
    with pytest.raises(ValueError, match=message):
        variable_shapes(model, shape)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, *shape, 1)), train=False), variables(name))


@by_network
def test_gpu_computation_forms_match_the_reference_forms(name):
    """The GPU forms (einsum 1x1, packed 3x3x3, shift depthwise) keep the parameter tree and match
    the reference forms, evaluation and deploy (max-normalised: deep networks accumulate float32
    rounding elementwise)."""
    fast_cfg = tiny(name, depthwise_impl="shift", pointwise_impl="einsum", dense_pack_channels=32)
    fast = build_model(fast_cfg)
    reference = variable_shapes(build_model(tiny(name)), PATCH)
    assert jax.tree.structure(variable_shapes(fast, PATCH)) == jax.tree.structure(reference)
    got = jax.jit(lambda v, x: fast.apply(v, x, train=False))(variables(name), inputs())
    assert rel_error(eval_output(name), got) <= TOL
    deployed = build_model(fast_cfg, deploy=True)
    folded = jax.jit(lambda v, x: deployed.apply(v, x, train=False))(reparameterize(variables(name)), inputs())
    assert rel_error(eval_output(name), folded) <= TOL


@by_network
def test_deploy_form_reproduces_evaluation_and_folds_every_norm(name):
    v = variables(name)
    stats_paths = {tuple(getattr(p, "key", p) for p in path[:-1])
                   for path, _ in jax.tree_util.tree_leaves_with_path(v["batch_stats"])}
    assert stats_paths and all(p[-1] in names.NORM_MODULES for p in stats_paths)
    folded = reparameterize(v)
    assert set(folded) == {"params"}
    assert not any(f"/{names.BN}/" in p for p in mapping.flatten(folded))  # every conv + BN pair folded
    finest = f"{names.HEAD}{SPECS[name].n_heads - 1}"
    assert sorted(k for k in folded["params"] if k.startswith(names.HEAD)) == [finest]
    deploy = build_model(tiny(name), deploy=True)
    got = jax.jit(lambda v, x: deploy.apply(v, x, train=False))(folded, inputs())
    assert rel_error(eval_output(name), got) <= 1e-5
    reference = mapping.flax_variable_shapes(tiny(name), deploy=True)
    assert jax.tree.structure(reference) == jax.tree.structure(jax.tree.map(jnp.asarray, folded))
    assert jax.tree.map(lambda s: s.shape, reference) == jax.tree.map(np.shape, folded)


def _assert_heads_close(torch_heads, flax_heads, n_heads):
    assert len(torch_heads) == len(flax_heads) == n_heads
    for i, (t, f) in enumerate(zip(torch_heads, flax_heads, strict=True)):
        assert t.shape == (BATCH, *PATCH, 2)
        max_abs, rel = parity.errors(t, np.asarray(f))
        assert rel <= TOL, f"head {i}: max |diff| {max_abs:.3g}, relative {rel:.3g}"


@by_network
def test_torch_twin_agrees_in_evaluation_and_deploy_forms(name):
    """Evaluation mode, every head, weights imported both ways; the torch and Flax deploy folds."""
    tm = torch_models()
    cfg, x, n_heads = tiny(name), inputs(), SPECS[name].n_heads
    all_heads = parity.flax_eval_all_heads(build_model(cfg))
    torch_model = parity.randomize_torch_(tm.torch_model_from_config(cfg), seed=1).eval()
    imported = mapping.state_dict_to_variables(parity.torch_state_numpy(torch_model), cfg)
    torch_heads = parity.torch_forward(torch_model, x)
    _assert_heads_close(torch_heads, all_heads(imported, x), n_heads)
    exported = parity.load_torch_state_numpy(tm.torch_model_from_config(cfg),
                                             mapping.variables_to_state_dict(variables(name), cfg)).eval()
    _assert_heads_close(parity.torch_forward(exported, x), all_heads(variables(name), x), n_heads)
    # The twin's own evaluation output (finest head alone) is Flax's.
    assert rel_error(eval_output(name), parity.torch_forward(exported, x, all_heads=False)[0]) <= TOL
    # Deploy: both folds give the same weights and the same outputs, those of the evaluation model.
    torch_deploy = tm.reparameterize_torch(torch_model).eval()
    flax_deploy = reparameterize(imported)
    folded = parity.torch_state_numpy(torch_deploy)
    from_flax = mapping.variables_to_state_dict(flax_deploy, cfg)
    assert folded.keys() == from_flax.keys()
    for key in folded:
        np.testing.assert_allclose(from_flax[key], folded[key], rtol=1e-6, atol=1e-7, err_msg=key)
    deploy_t = parity.torch_forward(torch_deploy, x)
    deploy_f = parity.flax_eval_all_heads(build_model(cfg, deploy=True))(flax_deploy, x)
    _assert_heads_close(deploy_t, deploy_f, 1)
    assert rel_error(torch_heads[-1], deploy_t[0]) <= TOL
    assert rel_error(torch_heads[-1], deploy_f[0]) <= TOL


@by_network
@pytest.mark.parametrize("deploy", [False, True])
def test_converter_round_trip_torch_flax_torch_is_exact(name, deploy):
    tm = torch_models()
    cfg = tiny(name)
    torch_model = parity.randomize_torch_(tm.torch_model_from_config(cfg, deploy=deploy), seed=8)
    state_dict = parity.torch_state_numpy(torch_model)
    v = mapping.state_dict_to_variables(state_dict, cfg)
    assert ("batch_stats" in v) == (not deploy)
    back = mapping.variables_to_state_dict(v, cfg)
    assert list(back) == list(state_dict)
    for key, value in state_dict.items():
        assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key


@by_network
def test_converter_reports_missing_unexpected_and_mismatched_keys(name):
    tm = torch_models()
    spec, cfg = SPECS[name], tiny(name)
    finest = f"{names.HEAD}{spec.n_heads - 1}"
    state_dict = parity.torch_state_numpy(tm.torch_model_from_config(cfg))
    drop_key, drop_path = spec.missing
    del state_dict[drop_key]
    state_dict["stray9.conv.weight"] = np.ones((1, 1, 1, 1, 1), np.float32)
    state_dict["dec9.fuse.bn.weight"] = np.ones(3, np.float32)
    state_dict["head0.bias"] = np.zeros(5, np.float32)
    state_dict[f"{finest}.bias"] = np.zeros(5, np.float32)
    with pytest.raises(mapping.ConversionError) as err:
        mapping.state_dict_to_variables(state_dict, cfg)
    e = err.value
    assert e.missing == [drop_path]
    assert sorted(e.unexpected) == ["dec9.fuse.bn.weight -> params/dec9/fuse/bn/scale",
                                    "stray9.conv.weight -> params/stray9/conv/kernel"]
    assert len(e.mismatched) == 2
    assert {m.split(" ")[0] for m in e.mismatched} == {"head0.bias", f"{finest}.bias"}
    assert all(m.startswith(f"{key} (5,) -> params/{key.replace('.', '/')}") for m, key in
               zip(sorted(e.mismatched), sorted(["head0.bias", f"{finest}.bias"]), strict=True))
    assert "missing (1)" in str(e) and "stray9" in str(e)
    # Other widths: shape mismatches, nothing missing.
    for wider in spec.wider:
        with pytest.raises(mapping.ConversionError) as err:
            mapping.state_dict_to_variables(parity.torch_state_numpy(tm.torch_model_from_config(tiny(name, **wider))),
                                            cfg)
        assert err.value.mismatched and not err.value.missing, wider
    # Flax -> torch: a missing statistic and an extra leaf are named.
    v = jax.tree.map(np.asarray, variables(name))
    v["params"]["extra"] = {"kernel": np.zeros(2, np.float32)}
    stats_key = sorted(v["batch_stats"])[0]
    del v["batch_stats"][stats_key]
    with pytest.raises(mapping.ConversionError) as err:
        mapping.variables_to_state_dict(v, cfg, deploy=False)
    assert err.value.unexpected == ["params/extra/kernel"]
    assert err.value.missing and all(m.startswith(f"batch_stats/{stats_key}/") for m in err.value.missing)


def test_summary_lists_every_network():
    from livseg_jax.models.summary import summary_table

    config = base_config()
    config.model = tiny("unet")
    table = summary_table(config, PATCH)
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == list(NETWORKS)
    assert all(int(row.split("|")[2].replace(",", "")) > 0 for row in rows)


def test_parity_report_covers_a_comparison_network_head_by_head(capsys):
    """R2U-Net: three heads' rows per mode, its shared (thrice applied) BatchNorms' statistics within
    1e-4 after the variance rule, and an empty key report in both forms and directions."""
    torch_models()
    from tools import parity_report

    parity_report.main(["--networks", "r2unet", "--features", "4,8,8,8,8", "--patch", "16,16,16", "--no-step"])
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split(" | ") for line in lines if line.startswith("| r2unet | ")]
    for mode in ("eval torch->flax", "eval flax->torch", "train torch->flax"):
        assert [r[2] for r in rows if r[1] == mode] == [f"head{i}" for i in range(SPECS["r2unet"].n_heads)]
        assert all(float(r[-1].rstrip(" |")) <= TOL for r in rows if r[1] == mode)
    (stats,) = [r for r in rows if r[1] == "train: running mean / var"]
    assert all(float(v) <= TOL for v in stats[-1].rstrip(" |").split(" / "))
    (deploy,) = [r for r in rows if r[1] == "deploy (each re-parameterised)"]
    assert deploy[2] == f"head{SPECS['r2unet'].n_heads - 1}" and float(deploy[-1].rstrip(" |")) <= TOL
    forms = [r for r in rows if r[1] in ("training", "deploy")]
    assert [r[1] for r in forms] == ["training", "deploy"]
    assert all(r[-2] == "0 / 0 / 0" and r[-1].rstrip(" |") == "0 / 0 / 0" for r in forms)
