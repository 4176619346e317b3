"""Device augmentation (livseg_jax/data/augment_device.py): exact identity, rot90, labels kept,
determinism, parameter distributions, elastic field, blur and low resolution against references,
host regions and the train step."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from livseg_jax.config import base_config
from livseg_jax.data import augment_device as aug

PATCH = (8, 16, 16)


def settings(patch=PATCH, **overrides) -> aug.DeviceAugment:
    config = base_config().data
    config.patch_size = patch
    s = dataclasses.replace(aug.DeviceAugment.from_config(config), **overrides)
    return dataclasses.replace(s, margin=aug.derived_margin(s))  # the margin of these ranges


def all_off(s: aug.DeviceAugment, **overrides) -> aug.DeviceAugment:
    probabilities = {f.name: 0.0 for f in dataclasses.fields(s) if f.name.startswith("p_")}
    return dataclasses.replace(s, **{**probabilities, **overrides})


def regions(s: aug.DeviceAugment, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(batch, *s.region, 1)).astype(np.float32)
    label = rng.integers(0, 3, size=(batch, *s.region)).astype(np.int32)
    return image, label


def centre(s: aug.DeviceAugment):
    return tuple(slice(m // 2, m // 2 + p) for p, m in zip(s.patch, s.margin, strict=True))


@functools.cache
def compiled(s: aug.DeviceAugment):
    return jax.jit(lambda k, x, y: aug.augment_batch(k, x, y, s))


def run(s, key, image, label):
    return compiled(s)(key, image, label)


# Every transform on, on a non-cubic patch (each compile costs seconds on a CPU: tests share it).
FULL = settings(patch=(8, 16, 24), p_rotation=1.0, p_scaling=1.0, p_elastic=1.0)


def test_identity_parameters_give_the_centred_patch_back_exactly():
    s = settings()
    assert s.margin[0] == 0 and s.margin[1] > 0, "in-plane rotation and scaling need an in-plane margin"
    # Intensity transforms off; rotation, scaling and elastic deformation on with ranges that leave
    # the grid as it is (the sampling still runs).
    identity = all_off(s, p_rotation=1.0, rotation_deg=(0.0, 0.0, 0.0), p_scaling=1.0, scaling=(1.0, 1.0),
                       p_elastic=1.0, elastic_magnitude=(0.0, 0.0))
    image, label = regions(s)
    out_image, out_label = run(identity, jax.random.key(3), image, label)
    box = (slice(None), *centre(s))
    assert out_image.shape == (2, *PATCH, 1) and out_label.shape == (2, *PATCH)
    np.testing.assert_array_equal(out_image, image[box])
    np.testing.assert_array_equal(out_label, label[box])


def test_crop_after_transform_returns_the_patch_shape_for_a_non_cubic_patch():
    s = FULL
    assert all(r >= p for r, p in zip(s.region, s.patch, strict=True)) and all(m % 2 == 0 for m in s.margin)
    image, label = regions(s)
    out_image, out_label = run(s, jax.random.key(0), image, label)
    assert out_image.shape == (2, 8, 16, 24, 1) and out_label.shape == (2, 8, 16, 24)
    with pytest.raises(ValueError, match="expects regions of shape"):
        aug.augment_batch(jax.random.key(0), image[:, :, 1:], label[:, :, 1:], s)


@pytest.mark.parametrize("degrees, axes", [(90.0, (2, 1)), (-90.0, (1, 2))])
def test_in_plane_quarter_rotation_equals_rot90(degrees, axes):
    s = all_off(settings())
    image, label = regions(s, batch=1)
    params = aug.sample_params(jax.random.key(0), s)._replace(angles=jnp.deg2rad(jnp.array([degrees, 0.0, 0.0])))
    out_image, out_label = jax.jit(lambda x, y, p: aug.spatial_transform(x, y, p, s))(image[0], label[0], params)
    box = centre(s)
    np.testing.assert_array_equal(out_label, np.rot90(label[0][box], 1, axes=axes))
    # cos(pi / 2) is not exactly 0 in float32: coordinates are integers to ~1e-5.
    np.testing.assert_allclose(out_image, np.rot90(image[0][box], 1, axes=axes), atol=1e-4)


def test_labels_keep_their_values_under_every_transform():
    s = FULL
    image, label = regions(s)
    for seed in range(3):
        out_image, out_label = run(s, jax.random.key(seed), image, label)
        assert set(np.unique(out_label)) <= {0, 1, 2} and out_label.dtype == label.dtype
        assert np.isfinite(out_image).all()


def test_same_key_same_batch_other_key_other_batch():
    s = FULL
    image, label = regions(s)
    a = run(s, jax.random.key(7), image, label)
    b = run(s, jax.random.key(7), image, label)
    c = run(s, jax.random.key(8), image, label)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    # Example b depends on (key, b) and its own region only.
    other_image, other_label = regions(s, seed=1)
    image[1], label[1] = other_image[1], other_label[1]
    d = run(s, jax.random.key(7), image, label)
    np.testing.assert_array_equal(d[0][0], a[0][0])
    np.testing.assert_array_equal(d[1][0], a[1][0])


def _within(fraction, p, n):
    return abs(fraction - p) <= 5 * np.sqrt(max(p * (1 - p), 1e-9) / n) + 1e-9


def test_parameters_follow_their_configured_distributions():
    s = settings(p_elastic=0.3, rotation_deg=(180.0, 20.0, 0.0))
    n = 4000
    draws = jax.jit(jax.vmap(lambda k: aug.sample_params(k, s)))(jax.random.split(jax.random.key(0), n))
    draws = jax.tree.map(np.asarray, draws)
    for name in ("elastic", "noise", "blur", "brightness", "contrast", "low_res", "gamma_inverted", "gamma"):
        p = getattr(s, f"p_{name}")
        assert _within(draws.__getattribute__(name).mean(), p, n), (name, draws.__getattribute__(name).mean(), p)
    # Mirroring: each allowed axis independently with p_mirror.
    for axis in range(3):
        assert _within(draws.mirror[:, axis].mean(), s.p_mirror, n)
    # Rotation: applied with p_rotation; angle uniform in +-limit on each axis.
    rotated = np.any(draws.angles != 0, axis=1)
    assert _within(rotated.mean(), s.p_rotation, n)
    limits = np.deg2rad(s.rotation_deg)
    angles = draws.angles[rotated]
    assert np.all(np.abs(angles) <= limits + 1e-6) and np.all(angles[:, 2] == 0)
    for axis in (0, 1):
        assert abs(angles[:, axis].mean()) < 0.15 * limits[axis]
        assert abs(angles[:, axis].var() / (limits[axis] ** 2 / 3) - 1) < 0.15  # uniform's variance
    # Scaling: p_scaling, one factor on the in-plane axes, the slice axis untouched.
    scaled = draws.scale[:, 1] != 1
    assert _within(scaled.mean(), s.p_scaling, n)
    assert np.all(draws.scale[:, 0] == 1) and np.array_equal(draws.scale[:, 1], draws.scale[:, 2])
    factors = draws.scale[scaled, 1]
    assert s.scaling[0] <= factors.min() and factors.max() <= s.scaling[1]
    assert abs(factors.mean() - np.mean(s.scaling)) < 0.03
    # Uniform ranges.
    for name, bounds in (("noise_std", s.noise_std), ("low_res_scale", s.low_res_scale),
                         ("blur_sigma", s.blur_sigma), ("elastic_magnitude", s.elastic_magnitude),
                         ("elastic_sigma", s.elastic_scale)):
        values = getattr(draws, name)
        assert bounds[0] <= values.min() and values.max() <= bounds[1], name
        assert abs(values.mean() - np.mean(bounds)) < 0.03 * (bounds[1] - bounds[0]) + 1e-6, name
    # BGContrast draws: half below 1 (uniform on [low, 1]), half above (uniform on [1, high]).
    for name, bounds in (("brightness_factor", s.brightness), ("contrast_factor", s.contrast),
                         ("gamma_value", s.gamma), ("gamma_inverted_value", s.gamma)):
        values = getattr(draws, name)
        assert bounds[0] <= values.min() and values.max() <= bounds[1], name
        below = values < 1
        assert _within(below.mean(), 0.5, n), name
        assert abs(values[below].mean() - (bounds[0] + 1) / 2) < 0.02, name
        assert abs(values[~below].mean() - (bounds[1] + 1) / 2) < 0.02, name


def test_config_errors_name_the_setting():
    config = base_config().data
    config.augment.transforms.p_noise = 1.5
    with pytest.raises(ValueError, match="p_noise"):
        aug.DeviceAugment.from_config(config)
    config = base_config().data
    config.augment.transforms.margin = (0, 3, 4)
    with pytest.raises(ValueError, match="margin"):
        aug.DeviceAugment.from_config(config)
    config = base_config().data
    config.augment.transforms.gamma = (1.5, 0.7)
    with pytest.raises(ValueError, match="gamma"):
        aug.DeviceAugment.from_config(config)
    assert aug.device_augment_settings(base_config().data) is None  # off by default


def test_elastic_field_is_smooth_bounded_and_zero_at_zero_magnitude():
    key = jax.random.key(0)
    zero = aug.elastic_displacement(key, PATCH, jnp.full(3, 0.1), jnp.zeros(3))
    assert np.array_equal(zero, np.zeros((3, *PATCH)))
    magnitude = jnp.array([0.1, 0.2, 0.05])
    field = np.asarray(aug.elastic_displacement(key, PATCH, jnp.full(3, 0.2), magnitude))
    peaks = np.abs(field).max(axis=(1, 2, 3))
    np.testing.assert_allclose(peaks, np.asarray(magnitude) * (np.array(PATCH) - 1) / 2, rtol=1e-5)
    # Smooth: neighbouring voxels differ far less than the peak.
    assert np.abs(np.diff(field[1], axis=1)).max() < 0.5 * peaks[1]


def test_derived_margin_keeps_the_extreme_rotation_and_scaling_inside_the_region():
    s = settings(patch=(8, 16, 24), rotation_deg=(180.0, 15.0, 15.0), scaling_axes=(True, True, True))
    params = aug.sample_params(jax.random.key(0), s)
    for angles in ([45.0, 15.0, 15.0], [135.0, -15.0, 15.0], [90.0, 15.0, -15.0], [30.0, 0.0, 0.0]):
        p = params._replace(angles=jnp.deg2rad(jnp.array(angles)), scale=jnp.full(3, s.scaling[1]),
                            mirror=jnp.array([True, False, True]))
        coords = np.asarray(aug.sampling_grid(p, s, None))
        for axis in range(3):
            assert coords[axis].min() >= -1e-4 and coords[axis].max() <= s.region[axis] - 1 + 1e-4


def test_blur_matches_scipy_gaussian_filter():
    rng = np.random.default_rng(1)
    volume = rng.normal(size=(6, 10, 12)).astype(np.float32)
    sigma = np.array([0.5, 0.8, 1.0], np.float32)
    radius = 3
    ours = np.asarray(aug.gaussian_blur(jnp.asarray(volume), jnp.asarray(sigma), radius))
    ref = volume
    for axis in range(3):
        ref = scipy.ndimage.gaussian_filter1d(ref, sigma[axis], axis=axis, mode="reflect", radius=radius)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("scale", [0.5, 0.63, 0.8, 1.0])
def test_low_resolution_matches_torch_nearest_exact_then_trilinear(scale):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    volume = rng.normal(size=(6, 10, 12)).astype(np.float32)
    ours = np.asarray(aug.simulate_low_resolution(jnp.asarray(volume), jnp.float32(scale), (False, True, True)))
    x = torch.from_numpy(volume)[None, None]
    small = [volume.shape[0], round(10 * scale), round(12 * scale)]
    down = torch.nn.functional.interpolate(x, small, mode="nearest-exact")
    ref = torch.nn.functional.interpolate(down, volume.shape, mode="trilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    if scale == 1.0:
        np.testing.assert_array_equal(ours, volume)


def test_gamma_and_contrast_keep_statistics_and_range():
    rng = np.random.default_rng(3)
    volume = jnp.asarray(rng.normal(size=(6, 10, 12)).astype(np.float32))
    for invert in (False, True):
        out = aug.adjust_gamma(volume, jnp.float32(1.4), invert)
        assert not np.allclose(out, volume)
        np.testing.assert_allclose([out.mean(), out.std()], [volume.mean(), volume.std()], atol=1e-4)
    out = aug.adjust_contrast(volume, jnp.float32(1.25))
    assert float(out.min()) >= float(volume.min()) and float(out.max()) <= float(volume.max())
    assert float(out.std()) > float(volume.std())
    # A gamma of 1 changes nothing but rounding.
    np.testing.assert_allclose(aug.adjust_gamma(volume, jnp.float32(1.0), False), volume, atol=1e-5)


def test_patch_sampler_delivers_regions_centred_on_the_host_patch(tmp_path):
    from livseg_jax.data import pipeline
    from livseg_jax.data.cache import build_cache
    from livseg_jax.data.synthetic import write_synthetic_dataset

    cases = write_synthetic_dataset(tmp_path / "syn", 1, (64, 64, 24), (2.0, 2.0, 4.0), seed=3)
    cached = build_cache(cases, base_config().preprocess, tmp_path / "cache", progress=False)
    staged = [pipeline.index_case(c, "liver", 10.0) for c in cached]
    config = base_config().data
    config.patch_size = PATCH
    config.augment.update(flips=False, rot90=False, intensity_scale=0.0, intensity_shift=0.0)
    host = pipeline.PatchSampler(staged, "liver", config, 0, -1.0)
    config.augment.device = True
    device = pipeline.PatchSampler(staged, "liver", config, 0, -1.0)
    s = aug.DeviceAugment.from_config(config)
    for i in range(3):
        patch, region = host(i), device(i)
        assert region["image"].shape == (*s.region, 1) and region["label"].shape == s.region
        np.testing.assert_array_equal(region["image"][centre(s)], patch["image"])
        np.testing.assert_array_equal(region["label"][centre(s)], patch["label"])


def test_train_step_augments_with_the_step_key():
    from livseg_jax.models import build_model
    from livseg_jax.training.schedules import make_optimizer
    from livseg_jax.training.state import create_train_state
    from livseg_jax.training.step import make_train_step

    config = base_config()
    config.model.name, config.model.features = "unet", (2, 4, 4, 4, 4)
    config.data.patch_size = (16, 16, 16)
    config.data.augment.device = True
    s = aug.device_augment_settings(config.data)
    model = build_model(config.model)
    optimizer = make_optimizer(config.optim, 10)
    state = create_train_state(model, optimizer, 0)
    image, label = regions(s, batch=2)
    label = (label > 0).astype(np.int32)
    step = jax.jit(make_train_step(model, optimizer, config.loss, 10, s))
    batch = {"image": jnp.asarray(image), "label": jnp.asarray(label)}
    _, first = step(state, batch)
    _, again = step(state, batch)
    _, later = step(state.replace(step=state.step + 1), batch)
    assert float(first["loss"]) == float(again["loss"])  # same (rng, step): same augmentation
    assert float(first["loss"]) != float(later["loss"])  # another step: another augmentation


@pytest.mark.parametrize("bounds", [(0.5, 0.8), (1.2, 1.5)])
def test_bg_contrast_draws_from_a_one_sided_range_stay_in_it(bounds):
    draws = jax.vmap(lambda k: aug._bg_contrast(k, bounds))(jax.random.split(jax.random.key(0), 2000))
    assert bounds[0] <= float(draws.min()) and float(draws.max()) <= bounds[1]
    assert abs(float(draws.mean()) - np.mean(bounds)) < 0.02
