"""Model family: shapes, variants, re-parameterisation, up-sampling, MSCA slice trick, bf16."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from livseg_jax.config import MODEL_NAMES, model_config
from livseg_jax.models import VARIANTS, build_model, init_variables, names, reparameterize, variable_shapes
from livseg_jax.models.forms import REFERENCE_FORMS
from livseg_jax.models.layers import Layers, Upsample2x, upsample2x_reference
from livseg_jax.models.msca import MSCABlock

PATCH = (16, 16, 16)
FEATURES = (4, 8, 8, 8, 16)
# Networks whose layout departs from the U-Net family's four heads, up<s> and 1x1x1 units; their
# own test files check those parts (tests/test_<name>.py).
OWN_LAYOUT = {"unet3plus": "five heads (bottleneck too), parameter-free up-sampling, no 1x1x1 convs"}


def tiny_config(name, **overrides):
    cfg = model_config(name)
    cfg.features = FEATURES
    cfg.cat_channels = 4  # UNet 3+'s per-scale decoder width (the paper's 64); ignored by the others
    cfg.update(REFERENCE_FORMS)  # pinned: the forms these tests compare against, on any backend
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def randomize_batch_stats(variables, seed=0):
    """Returns variables with non-trivial BN scales, biases and running statistics."""
    rng = np.random.default_rng(seed)

    def perturb(path, leaf):
        keys = [getattr(p, "key", "") for p in path]
        shape = leaf.shape
        if keys[0] == "batch_stats":
            if keys[-1] == "mean":
                return jnp.asarray(rng.normal(0, 0.5, shape), jnp.float32)
            return jnp.asarray(rng.uniform(0.5, 2.0, shape), jnp.float32)
        if any(k in names.NORM_MODULES for k in keys):
            if keys[-1] == "scale":
                return jnp.asarray(rng.uniform(0.5, 1.5, shape), jnp.float32)
            return jnp.asarray(rng.normal(0, 0.2, shape), jnp.float32)
        if keys[-1] == "bias" or keys[-1].startswith("layer_scale"):
            return jnp.asarray(rng.normal(0, 0.2, shape), jnp.float32)
        return leaf

    return jax.tree_util.tree_map_with_path(perturb, variables)


@functools.cache
def reference_init(model: nn.Module, seed: int = 0, patch: tuple = PATCH) -> dict:
    """`init_variables(model, key(seed), patch)`, once per equal model in this module: the variants'
    fixture and the shape tests share it, and every initialisation of these networks compiles for
    10-30 s on the 2-core machine."""
    return init_variables(model, jax.random.key(seed), patch)


@pytest.fixture(scope="module")
def inputs():
    return jax.random.normal(jax.random.key(1), (2, *PATCH, 1), jnp.float32)


# The paper's family (SPEC 1.2); the comparison networks (SPEC 1.5) run the same checks, with
# max-normalised tolerances for their depth, in tests/test_networks.py (set-up: tests/network_checks.py).
@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    cfg = tiny_config(request.param)
    model = build_model(cfg)
    variables = randomize_batch_stats(reference_init(model))
    return request.param, cfg, model, variables


def param_names(variables):
    return {"/".join(str(getattr(p, "key", p)) for p in path)
            for path, _ in jax.tree_util.tree_leaves_with_path(variables["params"])}


@pytest.fixture(scope="module")
def eval_outputs(variant, inputs):
    _, _, model, variables = variant
    return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, inputs)


def test_training_heads_coarse_to_fine_with_finite_gradients(variant, inputs):
    name, _, model, variables = variant
    if name in OWN_LAYOUT:
        pytest.skip(OWN_LAYOUT[name])
    labels = (inputs[..., 0] > 0).astype(jnp.int32)

    def loss_fn(params):
        outs, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                    inputs, train=True, mutable=["batch_stats"])
        loss = sum(jnp.mean(-jnp.take_along_axis(nn.log_softmax(o), labels[..., None], -1))
                   for o in outs)
        return loss, (outs, updates)

    grads, (outs, updates) = jax.jit(jax.grad(loss_fn, has_aux=True))(variables["params"])
    assert len(outs) == 4
    for o in outs:
        assert o.shape == (2, *PATCH, 2) and o.dtype == jnp.float32
    # Head i reads decoder stage 3 - i: the coarse head sees the widest (deepest) decoder output.
    widths = [variables["params"][f"head{i}"]["kernel"].shape[-2] for i in range(4)]
    assert widths == [FEATURES[3], FEATURES[2], FEATURES[1], FEATURES[0]]
    # Training mode updates the running statistics.
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"],
                           updates["batch_stats"])
    assert all(jax.tree.leaves(changed))
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves), name
    assert all(float(jnp.abs(grads[f"head{i}"]["kernel"]).sum()) > 0 for i in range(4))


def test_evaluation_returns_only_the_finest_map(variant, eval_outputs):
    _, _, _, variables = variant
    assert eval_outputs.shape == (2, *PATCH, 2)
    assert {"head0", "head3"} <= set(variables["params"])


@pytest.mark.parametrize("shape,axis", [((16, 24, 16), "height"), ((20, 16, 16), "depth"),
                                        ((16, 16, 8), "width")])
def test_patch_not_divisible_by_16_names_the_axis(shape, axis):
    model = build_model(tiny_config("unet"))
    with pytest.raises(ValueError, match=rf"{axis} = \d+ is not divisible by 16"):
        init_variables(model, jax.random.key(0), shape)


def test_reparameterized_model_reproduces_evaluation_model(variant, inputs, eval_outputs):
    name, cfg, model, variables = variant
    expected = eval_outputs
    deploy_vars = reparameterize(variables)
    deploy = build_model(cfg, deploy=True)
    got = jax.jit(lambda v, x: deploy.apply(v, x, train=False))(deploy_vars, inputs)
    rel = float(jnp.max(jnp.abs(got - expected)) / jnp.max(jnp.abs(expected)))
    assert rel <= 1e-5, f"{name}: relative error {rel:.2e}"
    assert set(deploy_vars) == {"params"}
    assert not any(re.search(r"(^|/)(bn|identity|dense|point)(/|$)", n)
                   for n in param_names(deploy_vars))
    reference = variable_shapes(deploy, PATCH)
    assert jax.tree.structure(reference) == jax.tree.structure(
        jax.tree.map(jnp.asarray, deploy_vars))


def test_every_batch_norm_is_named_as_the_name_table_expects(variant):
    # The PyTorch name table and re-parameterisation tell BatchNorms from convolutions by these
    # names (models/names.py): a BatchNorm under another name would be converted as a conv.
    _, _, _, variables = variant
    norms = {tuple(getattr(p, "key", p) for p in path[:-1])
             for path, _ in jax.tree_util.tree_leaves_with_path(variables["batch_stats"])}
    assert norms and all(path[-1] in names.NORM_MODULES for path in norms)
    if variant[0] in OWN_LAYOUT:
        return
    ups = {k for k in variables["params"] if k.startswith(names.UP)}
    assert ups == {f"{names.UP}{s}" for s in range(len(FEATURES) - 1)}


def test_upsample_equals_conv_transpose_and_float64_reference():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 4, 5, 6)).astype(np.float32)
    module = Upsample2x(7)
    variables = module.init(jax.random.key(0), x)
    kernel = np.asarray(variables["params"]["kernel"])
    bias = rng.normal(size=7).astype(np.float32)
    variables = {"params": {"kernel": kernel, "bias": bias}}
    got = np.asarray(jax.jit(module.apply)(variables, x))
    # float64 reference of ConvTranspose3d(k=2, s=2): out[2d+i, 2h+j, 2w+k] = x[d,h,w] @ K[i,j,k].
    ref = np.zeros((2, 6, 8, 10, 7))
    for i in range(2):
        for j in range(2):
            for k in range(2):
                ref[:, i::2, j::2, k::2] = x.astype(np.float64) @ kernel[i, j, k].astype(np.float64)
    ref += bias
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # lax.conv_transpose(transpose_kernel=True) flips the kernel and swaps I/O back itself.
    lax_out = jax.lax.conv_transpose(
        x, jnp.asarray(kernel.swapaxes(-1, -2)), (2, 2, 2), "VALID",
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), transpose_kernel=True) + bias
    np.testing.assert_allclose(got, np.asarray(lax_out), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(upsample2x_reference(x, kernel, bias)), got, rtol=1e-6)


def test_msca_slice_trick_equals_2d_block_on_each_axial_slice():
    x = jax.random.normal(jax.random.key(2), (2, 5, 16, 16, 4))
    block = MSCABlock("2d")
    init = jax.jit(block.init, static_argnames="train")
    variables = randomize_batch_stats(init(jax.random.key(3), x, train=False))
    apply = jax.jit(lambda v, x: block.apply(v, x, train=False))
    whole = apply(variables, x)
    per_slice = jnp.concatenate([apply(variables, x[:, d:d + 1]) for d in range(5)], axis=1)
    np.testing.assert_allclose(np.asarray(whole), np.asarray(per_slice), rtol=1e-5, atol=1e-6)
    # Kernels are 2D in the slice trick; the "3d" ablation mixes slices and has 3D kernels.
    assert variables["params"]["attention"]["dw5"]["kernel"].shape == (5, 5, 1, 4)
    block3d = MSCABlock("3d")
    v3 = jax.jit(block3d.init, static_argnames="train")(jax.random.key(3), x, train=False)
    assert v3["params"]["attention"]["dw5"]["kernel"].shape == (5, 5, 5, 1, 4)
    assert v3["params"]["attention"]["strip21_0"]["kernel"].shape[:3] == (1, 1, 21)
    y3 = jax.jit(lambda v, x: block3d.apply(v, x, train=False))(v3, x.at[:, 0].add(10.0))
    y3_ref = jax.jit(lambda v, x: block3d.apply(v, x, train=False))(v3, x)
    assert float(jnp.abs(y3[:, 1] - y3_ref[:, 1]).max()) > 0, "3d mode must mix neighbouring slices"


def test_variants_have_the_specified_blocks():
    names = {}
    for name in MODEL_NAMES:
        model = build_model(tiny_config(name))
        variables = variable_shapes(model, PATCH)
        names[name] = param_names(variables)
    has = lambda name, pattern: any(re.search(pattern, n) for n in names[name])  # noqa: E731
    assert not has("unet", "msca") and not has("unet", "rep")
    assert has("msca_unet", "msca") and not has("msca_unet", "rep")
    assert has("elanres_unet", "rep1") and not has("elanres_unet", "msca")
    assert has("elanres_msca_unet", "rep1") and has("elanres_msca_unet", "msca")
    # MSCA sits after encoder stages 1-3 and the bottleneck, not stage 0.
    stages = {int(m.group(1)) for n in names["elanres_msca_unet"] if (m := re.match(r"msca(\d)/", n))}
    assert stages == {1, 2, 3, 4}
    model = build_model(tiny_config("elanres_msca_unet", msca_stages=(4,), n_rep=3))
    v = variable_shapes(model, PATCH)
    assert {n.split("/")[0] for n in param_names(v) if n.startswith("msca")} == {"msca4"}
    assert any("rep2" in n for n in param_names(v))


def test_bfloat16_forward_agrees_with_float32(variant, inputs, eval_outputs):
    name, cfg, _, variables = variant
    model16 = build_model(tiny_config(name, dtype="bfloat16"))
    out32 = eval_outputs
    out16 = jax.jit(lambda v, x: model16.apply(v, x, train=False))(variables, inputs)
    assert out16.dtype == jnp.float32  # logits come back in float32 for the loss
    assert jax.tree.leaves(variables["params"])[0].dtype == jnp.float32
    rel = float(jnp.max(jnp.abs(out16 - out32)) / jnp.max(jnp.abs(out32)))
    assert rel < 5e-2, f"{name}: bf16 relative error {rel:.3f}"


# The computation forms replace units, not networks: `unet` holds the double-conv blocks and
# `elanres_msca_unet` every other unit (RepConv3d, ELAN, MSCA), so the two cover every form; the
# two variants in between are combinations of the same units (and cost CI two minutes).
FORM_VARIANTS = ("unet", "elanres_msca_unet")


@pytest.mark.parametrize("name", FORM_VARIANTS)
def test_every_form_initialises_the_reference_parameters(name):
    # Same parameter tree and the same initial values in every computation form: checkpoints and the
    # PyTorch mapping carry over. All forms at once (each replaces other units, so a form that renamed
    # or re-initialised a parameter shows here), on three levels: an initialisation of five compiles
    # for about 30 s on the 2-core machine, and the forms' tests below then compare outputs only.
    forms = {"depthwise_impl": "shift", "pointwise_impl": "einsum", "dense_pack_channels": 32,
             "batch_norm_impl": "two_stage"}
    reference_cfg, forms_cfg = tiny_config(name, features=(4, 8, 16)), tiny_config(name, features=(4, 8, 16), **forms)
    reference = init_variables(build_model(reference_cfg), jax.random.key(0), PATCH)
    fresh = init_variables(build_model(forms_cfg), jax.random.key(0), PATCH)
    assert jax.tree.structure(fresh) == jax.tree.structure(reference)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(reference), strict=True))
    # Each form's option reached the built model (the packed one is checked in its own test).
    assert build_model(forms_cfg) != build_model(reference_cfg)


def test_einsum_pointwise_convs_match_convolutions_in_every_form(variant, inputs, eval_outputs):
    name, cfg, model, variables = variant
    if name not in FORM_VARIANTS:
        pytest.skip(f"{name}'s units are covered by {FORM_VARIANTS}")
    conv_cfg, einsum_cfg = cfg.copy_and_resolve_references(), cfg.copy_and_resolve_references()
    einsum_cfg.pointwise_impl = "einsum"
    conv_model, einsum_model = build_model(conv_cfg), build_model(einsum_cfg)
    expected = eval_outputs  # the same parameters: test_every_form_initialises_the_reference_parameters
    got = jax.jit(lambda v, x: einsum_model.apply(v, x, train=False))(variables, inputs)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    # Jitted: op by op, the form's many small kernels compile one by one (twice the time here).
    train_einsum = jax.jit(lambda v, x: einsum_model.apply(v, x, train=True, mutable=["batch_stats"]))
    train_got, _ = train_einsum(variables, inputs)
    train_expected, _ = conv_model.apply(variables, inputs, train=True, mutable=["batch_stats"])
    # Looser in training mode: the bottleneck's BatchNorm normalises over 2 voxels (1 per sample at
    # this patch), which amplifies float32 rounding differences between GEMM and convolution.
    for a, b in zip(train_got, train_expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-3)
    deployed = build_model(einsum_cfg, deploy=True)
    folded = jax.jit(lambda v, x: deployed.apply(v, x, train=False))(reparameterize(variables), inputs)
    np.testing.assert_allclose(folded, expected, rtol=1e-4, atol=1e-4)
    # The option reaches every 1x1 unit: fewer convolutions, more matrix products in the program.
    def count(m, primitive):
        return str(jax.make_jaxpr(lambda v, x: m.apply(v, x, train=False))(variables, inputs)).count(primitive)

    if name in OWN_LAYOUT:
        return
    assert count(einsum_model, "conv_general_dilated") < count(conv_model, "conv_general_dilated")
    assert count(einsum_model, "dot_general") > count(conv_model, "dot_general")


def test_width_packed_dense_convs_match_convolutions_in_every_form(variant, inputs, eval_outputs):
    name, cfg, model, variables = variant
    if name not in FORM_VARIANTS:
        pytest.skip(f"{name}'s units are covered by {FORM_VARIANTS}")
    packed_cfg = cfg.copy_and_resolve_references()
    packed_cfg.dense_pack_channels = 32  # packs by 8, 4 and 2 at this tiny network's widths
    packed = build_model(packed_cfg)
    got = jax.jit(lambda v, x: packed.apply(v, x, train=False))(variables, inputs)
    np.testing.assert_allclose(got, eval_outputs, rtol=1e-4, atol=1e-5)

    train_got, _ = jax.jit(lambda v, x: packed.apply(v, x, train=True, mutable=["batch_stats"]))(variables, inputs)
    train_expected, _ = model.apply(variables, inputs, train=True, mutable=["batch_stats"])
    for a, b in zip(train_got, train_expected, strict=True):  # atol: see the einsum test
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-3)

    # Gradients through the evaluation form, where no 2-voxel batch statistic amplifies rounding.
    def loss(m):
        return lambda params, x: jnp.sum(jnp.sin(m.apply({**variables, "params": params}, x, train=False)))

    got_grads = jax.jit(jax.grad(loss(packed)))(variables["params"], inputs)
    want_grads = jax.jit(jax.grad(loss(model)))(variables["params"], inputs)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-4 * max(1.0, float(jnp.max(jnp.abs(w)))))
    deployed = build_model(packed_cfg, deploy=True)
    folded = jax.jit(lambda v, x: deployed.apply(v, x, train=False))(reparameterize(variables), inputs)
    np.testing.assert_allclose(folded, eval_outputs, rtol=1e-4, atol=1e-4)
    # The option reaches the 3x3x3 convolutions: the 4-channel full-resolution layers (4 channels
    # and a width of 16: packed by 8) run with a 32-channel kernel that the reference never has.
    def program(m):
        return str(jax.make_jaxpr(lambda v, x: m.apply(v, x, train=False))(variables, inputs))

    assert "f32[3,3,3,32,32]" in program(packed) and "f32[3,3,3,32,32]" not in program(model)


def test_flop_counts_are_the_models_not_the_packed_forms_zeros():
    from livseg_jax.models.summary import forward_flops

    reference = tiny_config("elanres_unet")
    packed = tiny_config("elanres_unet", dense_pack_channels=32)
    model = build_model(packed)
    x = jax.ShapeDtypeStruct((1, *PATCH, 1), jnp.float32)
    variables = variable_shapes(model, PATCH)
    program = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).cost_analysis()
    program = program[0] if isinstance(program, list | tuple) else program
    assert forward_flops(packed, PATCH) == forward_flops(reference, PATCH) > 0
    assert program["flops"] > 1.5 * forward_flops(reference, PATCH)  # the packed program multiplies zeros
    assert packed.dense_pack_channels == 32  # the caller's config is left as it was


def test_the_gpu_forms_together_match_the_reference_forms(variant, inputs, eval_outputs):
    # On GPUs "auto" combines shift depthwise, einsum 1x1 and packed 3x3x3 convs and the two-stage
    # BatchNorm (models/forms.py); each is tested alone above (BatchNorm in tests/test_batch_norm.py).
    name, cfg, _, variables = variant
    fast_cfg = cfg.copy_and_resolve_references()
    fast_cfg.update(depthwise_impl="shift", pointwise_impl="einsum", dense_pack_channels=32,
                    batch_norm_impl="two_stage")
    fast = build_model(fast_cfg)
    got = jax.jit(lambda v, x: fast.apply(v, x, train=False))(variables, inputs)
    np.testing.assert_allclose(got, eval_outputs, rtol=1e-4, atol=1e-5)
    auto_cfg = cfg.copy_and_resolve_references()
    auto_cfg.update(depthwise_impl="auto", pointwise_impl="auto", dense_pack_channels=None, batch_norm_impl="auto")
    fast_bf16 = fast_cfg.copy_and_resolve_references()
    fast_bf16.dtype = "bfloat16"  # "auto" dtype is bfloat16 on a GPU
    assert build_model(auto_cfg, backend="gpu") == build_model(fast_bf16)  # what "auto" means on a GPU


@pytest.mark.parametrize("value", [-32, True])  # a float is refused by the ConfigDict itself
def test_a_packing_width_that_is_not_a_count_is_refused(value):
    with pytest.raises(ValueError, match="dense_pack_channels must be an integer >= 0"):
        build_model(tiny_config("elanres_unet", dense_pack_channels=value))


def test_unknown_pointwise_impl_is_refused():
    with pytest.raises(ValueError, match="pointwise_impl"):
        build_model(tiny_config("elanres_unet", pointwise_impl="gemm"))


def test_unknown_depthwise_impl_is_refused():
    with pytest.raises(ValueError, match="depthwise_impl"):
        build_model(tiny_config("msca_unet", depthwise_impl="fft"))


def test_equal_configs_build_equal_hashable_models():
    # Blocks hold the model's `Layers` as an attribute: it must be a hashable value, so that two
    # builds of one config are the same module (jit caches, Flax's module comparison).
    a, b = build_model(tiny_config("elanres_msca_unet")), build_model(tiny_config("elanres_msca_unet"))
    assert a == b and hash(a) == hash(b) and a.layers == Layers()
    assert build_model(tiny_config("elanres_msca_unet", dtype="bfloat16")) != a
    assert build_model(tiny_config("elanres_msca_unet"), deploy=True).deploy


@pytest.mark.parametrize("deploy", [False, True])
def test_variable_shapes_are_those_of_init_at_any_patch(deploy):
    model = build_model(tiny_config("elanres_msca_unet"), deploy=deploy)
    variables = reference_init(model)
    shapes = jax.tree.map(lambda a: (a.shape, a.dtype), variables)
    for patch, batch in ((None, 1), (PATCH, 1), ((32, 16, 16), 3)):
        got = variable_shapes(model, patch, batch)
        assert jax.tree.map(lambda s: (s.shape, s.dtype), got) == shapes
    assert ("batch_stats" in shapes) == (not deploy)
    # The deploy form is initialised in evaluation mode: only the finest head exists.
    assert {k for k in shapes["params"] if k.startswith("head")} == ({"head3"} if deploy else
                                                                     {"head0", "head1", "head2", "head3"})


@pytest.mark.parametrize("name", ["elanres_msca_unet", "unet3plus"])
def test_variables_do_not_depend_on_the_patch_they_are_initialised_on(name):
    # create_train_state initialises on the smallest patch (a full-size one compiles the whole
    # forward pass); that is only right while no variable's shape or value depends on the patch.
    # Three levels: the smallest patch still leaves one voxel at the bottleneck, and each of the two
    # initialisations compiles in half the time of five levels'.
    model = build_model(tiny_config(name, features=(4, 8, 16)))
    smallest = init_variables(model, jax.random.key(3))
    larger = init_variables(model, jax.random.key(3), (32, 48, 32))
    assert jax.tree.structure(smallest) == jax.tree.structure(larger)
    for a, b in zip(jax.tree.leaves(smallest), jax.tree.leaves(larger), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
