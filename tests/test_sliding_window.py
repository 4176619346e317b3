"""Sliding-window inference: window placement, padding, Gaussian blending, batching, mirror TTA."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_unet_variables
from sliding_window_oracle import make_window_predictor, sliding_window_probs

from livseg_jax.config import model_config
from livseg_jax.inference.sliding_window import (
    HostWindowFn,
    gaussian_importance,
    num_windows,
    sliding_window,
    window_predict_fn,
    window_starts,
)
from livseg_jax.models import build_model

WINDOW = (16, 16, 16)


def device_probs(image, predict, window, overlap=0.5, batch_size=2, sigma_scale=0.125, pad_value=-1.0,
                 progress=None):
    """The product's `sliding_window` with the oracle's signature (a host `predict` per batch)."""
    window_fn = lambda variables, x: jnp.asarray(predict(np.asarray(x)))  # noqa: E731
    return sliding_window(image, window_fn, None, window, overlap, batch_size, sigma_scale, pad_value, progress,
                          output="probs", num_classes=2)


# The blending properties below must hold for the product and for the oracle it is compared with.
@pytest.fixture(params=["device", "oracle"])
def blend(request):
    return device_probs if request.param == "device" else sliding_window_probs


def pointwise_predict(x):
    """A translation-equivariant 'model': class-1 probability = sigmoid(intensity), per voxel."""
    p1 = 1.0 / (1.0 + np.exp(-x))
    return np.concatenate([1.0 - p1, p1], axis=-1).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_unet():
    cfg = model_config("unet")
    cfg.features = (2, 4, 4, 4, 4)
    model = build_model(cfg, deploy=False)
    variables = random_unet_variables(model, WINDOW)
    return model, variables


def test_window_starts_cover_the_axis_evenly_and_end_at_the_border():
    for size, window, overlap in [(100, 16, 0.5), (37, 16, 0.25), (16, 16, 0.5), (17, 16, 0.0), (9, 16, 0.5)]:
        starts = window_starts(size, window, overlap)
        assert starts[0] == 0
        assert starts[-1] == max(size - window, 0)
        assert all(b > a for a, b in itertools.pairwise(starts))
        assert all(b - a <= int(window * (1 - overlap)) for a, b in itertools.pairwise(starts))
    with pytest.raises(ValueError, match="overlap"):
        window_starts(100, 16, 1.0)


def test_one_window_volume_equals_a_direct_forward_pass(tiny_unet, blend):
    model, variables = tiny_unet
    apply_fn = lambda v, x: model.apply(v, x, train=False)
    predict = make_window_predictor(apply_fn, variables)
    image = np.random.default_rng(1).normal(size=WINDOW).astype(np.float32)
    probs = blend(image, predict, WINDOW, overlap=0.5, batch_size=2)
    direct = jax.nn.softmax(apply_fn(variables, jnp.asarray(image)[None, ..., None]), axis=-1)[0]
    assert probs.shape == (*WINDOW, 2)
    np.testing.assert_allclose(probs, np.asarray(direct), rtol=1e-5, atol=1e-6)
    # Sanity: the network output is not trivially constant, so the comparison means something.
    assert np.ptp(probs[..., 1]) > 1e-3


def test_blending_of_a_constant_output_model_returns_the_constant(blend):
    constant = np.array([0.3, 0.7], np.float32)
    predict = lambda x: np.broadcast_to(constant, x.shape[:-1] + (2,)).copy()
    shape = (40, 23, 51)  # several overlapping windows on every axis, uneven steps
    assert num_windows(shape, WINDOW, 0.5) > 20
    probs = blend(np.zeros(shape, np.float32), predict, WINDOW, overlap=0.5, batch_size=3)
    assert probs.shape == (*shape, 2)
    np.testing.assert_allclose(probs, np.broadcast_to(constant, probs.shape), rtol=1e-6)


@pytest.mark.parametrize("shape", [(40, 23, 51), (9, 30, 12), (16, 16, 16), (5, 7, 3)])
def test_pointwise_model_is_recovered_exactly_wherever_windows_overlap_or_pad(shape, blend):
    # A per-voxel model gives the same answer in every window that covers a voxel, so any
    # misplaced window, wrong weight normalisation or off-by-one in the padding shows up here.
    image = np.random.default_rng(2).normal(size=shape).astype(np.float32)
    probs = blend(image, pointwise_predict, WINDOW, overlap=0.5, batch_size=2)
    np.testing.assert_allclose(probs, pointwise_predict(image[..., None]), rtol=1e-5, atol=1e-6)


def test_small_volume_is_padded_with_the_pad_value(blend):
    seen = []

    def spy(x):
        seen.append(x.copy())
        return pointwise_predict(x)

    image = np.full((6, 20, 10), 5.0, np.float32)
    blend(image, spy, WINDOW, overlap=0.5, batch_size=1, pad_value=-7.0)
    windows = np.concatenate(seen)[..., 0]
    assert set(np.unique(windows).tolist()) == {5.0, -7.0}
    assert (windows == 5.0).sum() == len(windows) * 6 * 16 * 10  # every window holds the padded depth


def test_every_batch_has_the_compiled_shape_and_progress_counts_each_window_once(blend):
    shapes, reported = [], []

    def spy(x):
        shapes.append(x.shape)
        return pointwise_predict(x)

    shape, batch = (40, 23, 51), 4
    blend(np.zeros(shape, np.float32), spy, WINDOW, 0.5, batch, progress=reported.append)
    expected = num_windows(shape, WINDOW, 0.5)
    assert sum(reported) == expected
    assert len(shapes) == -(-expected // batch)
    assert set(shapes) == {(batch, *WINDOW, 1)}


def test_gaussian_importance_peaks_in_the_centre_and_stays_positive():
    w = gaussian_importance((9, 16, 5), 0.125)
    assert w.shape == (9, 16, 5)
    assert w.max() == pytest.approx(1.0)
    assert w.min() > 0
    assert w[4, 7, 2] > w[0, 0, 0] and w[4, 7, 2] > w[4, 7, 0]
    np.testing.assert_allclose(w, w[::-1, ::-1, ::-1], rtol=1e-6)  # symmetric about the centre


def test_mirror_tta_averages_the_eight_flipped_predictions(tiny_unet):
    model, variables = tiny_unet
    apply_fn = lambda v, x: model.apply(v, x, train=False)
    x = np.random.default_rng(3).normal(size=(1, *WINDOW, 1)).astype(np.float32)
    mirrored = make_window_predictor(apply_fn, variables, mirror=True)(x)
    plain = make_window_predictor(apply_fn, variables, mirror=False)
    expected = np.zeros_like(mirrored)
    for r in range(4):
        for axes in itertools.combinations((1, 2, 3), r):
            expected += np.flip(plain(np.flip(x, axes)), axes) if axes else plain(x)
    expected /= 8
    np.testing.assert_allclose(mirrored, expected, rtol=1e-5, atol=1e-6)
    assert np.abs(mirrored - plain(x)).max() > 1e-4  # the random network is not flip-invariant


def position_dependent_window_fn(variables, x):
    """A jittable 'model' whose output depends on the voxel's place in the window (so blending matters)."""
    d, h, w = x.shape[1:4]
    ramp = (jnp.arange(d)[:, None, None] / d + jnp.arange(h)[None, :, None] / h - jnp.arange(w)[None, None, :] / w)
    logits = jnp.stack([jnp.zeros_like(x[..., 0]), variables["scale"] * x[..., 0] + ramp - 0.3], axis=-1)
    return jax.nn.softmax(logits, axis=-1)


@pytest.mark.parametrize("shape,overlap,batch",
                         [((40, 23, 51), 0.5, 3), ((9, 30, 12), 0.25, 2), ((16, 16, 16), 0.0, 1)])
def test_device_blending_equals_the_numpy_reference(shape, overlap, batch):
    variables = {"scale": jnp.float32(1.7)}
    window_fn = jax.jit(position_dependent_window_fn)
    reference_predict = lambda x: np.asarray(window_fn(variables, jnp.asarray(x)))  # noqa: E731
    image = np.random.default_rng(5).normal(size=shape).astype(np.float32)
    expected = sliding_window_probs(image, reference_predict, WINDOW, overlap, batch, pad_value=-2.0)
    probs = sliding_window(image, window_fn, variables, WINDOW, overlap, batch, pad_value=-2.0,
                                  output="probs")
    assert probs.shape == expected.shape
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
    labels = sliding_window(image, window_fn, variables, WINDOW, overlap, batch, pad_value=-2.0,
                                   num_classes=2)
    assert labels.dtype == np.uint8 and labels.shape == shape
    clear = np.abs(expected[..., 1] - expected[..., 0]) > 1e-4  # ties may break either way
    np.testing.assert_array_equal(labels[clear], expected.argmax(-1)[clear])
    assert 0 < labels.mean() < 1  # both classes occur, so the comparison means something


def test_device_blending_with_a_network_and_mirror_tta_matches_the_reference(tiny_unet):
    model, variables = tiny_unet
    window_fn = window_predict_fn(lambda v, x: model.apply(v, x, train=False), mirror=True)
    image = np.random.default_rng(8).normal(size=(20, 18, 40)).astype(np.float32)
    expected = sliding_window_probs(image, lambda x: np.asarray(window_fn(variables, jnp.asarray(x))),
                                    WINDOW, 0.5, 2)
    probs = sliding_window(image, window_fn, variables, WINDOW, 0.5, 2, output="probs")
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)


def test_device_blending_reports_each_window_once_and_checks_its_arguments():
    reported = []
    window_fn = jax.jit(position_dependent_window_fn)
    variables = {"scale": jnp.float32(1.0)}
    shape = (40, 23, 51)
    sliding_window(np.zeros(shape, np.float32), window_fn, variables, WINDOW, 0.5, 4,
                          progress=reported.append)
    assert sum(reported) == num_windows(shape, WINDOW, 0.5)
    with pytest.raises(ValueError, match="output"):
        sliding_window(np.zeros(shape, np.float32), window_fn, variables, WINDOW, output="logits")
    with pytest.raises(ValueError, match="D, H, W"):
        sliding_window(np.zeros((4, 4), np.float32), window_fn, variables, WINDOW)


@pytest.mark.parametrize("shape,overlap,batch", [((40, 23, 51), 0.5, 3), ((9, 30, 12), 0.25, 2)])
def test_host_blending_of_a_host_forward_function_equals_the_device_blending(shape, overlap, batch):
    variables = {"scale": jnp.float32(1.7)}
    window_fn = jax.jit(position_dependent_window_fn)
    seen = []

    def on_host(v, x):  # as ONNX Runtime: NumPy in, NumPy out, never a device array
        seen.append(type(x))
        return np.asarray(window_fn(v, jnp.asarray(x)))

    image = np.random.default_rng(6).normal(size=shape).astype(np.float32)
    host_fn = HostWindowFn(on_host)
    reported = []
    for output in ("probs", "labels"):
        device = sliding_window(image, window_fn, variables, WINDOW, overlap, batch, pad_value=-2.0, output=output,
                                num_classes=2)
        host = sliding_window(image, host_fn, variables, WINDOW, overlap, batch, pad_value=-2.0, output=output,
                              progress=reported.append)
        assert host.dtype == device.dtype and host.shape == device.shape
        if output == "probs":
            np.testing.assert_allclose(host, device, rtol=1e-6, atol=1e-7)
            clear = np.abs(device[..., 1] - device[..., 0]) > 1e-4
        else:
            np.testing.assert_array_equal(host[clear], device[clear])
            assert 0 < host.mean() < 1
    assert set(seen) == {np.ndarray}
    assert sum(reported) == 2 * num_windows(shape, WINDOW, overlap)


def test_device_blending_reports_progress_one_batch_behind_and_every_window_once():
    window_fn = jax.jit(position_dependent_window_fn)
    reported = []
    shape = (40, 23, 51)
    labels = sliding_window(np.zeros(shape, np.float32), window_fn, {"scale": jnp.float32(1.0)}, WINDOW, 0.5, 3,
                            progress=reported.append)
    total = num_windows(shape, WINDOW, 0.5)
    assert sum(reported) == total and len(reported) == -(-total // 3) and labels.shape == shape
