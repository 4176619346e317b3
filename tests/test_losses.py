"""Losses against plain numpy (float64) implementations of SPEC §2, their limits and jit-ability."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from livseg_jax import losses
from livseg_jax.config import base_config


def _np_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _np_onehot(labels: np.ndarray, k: int) -> np.ndarray:
    return (labels[..., None] == np.arange(k)).astype(np.float64)


def np_dice_loss(z, y, smooth=1.0):
    p, t = _np_softmax(z), _np_onehot(y, z.shape[-1])
    ax = (1, 2, 3)
    d = 2 * (p * t).sum(ax) / ((p**2).sum(ax) + (t**2).sum(ax) + smooth)
    return 1 - d.mean()


def np_tversky_loss(z, y, alpha, beta, smooth):
    p, t = _np_softmax(z), _np_onehot(y, z.shape[-1])
    ax = (1, 2, 3)
    tp, fp, fn = (p * t).sum(ax), (p * (1 - t)).sum(ax), ((1 - p) * t).sum(ax)
    return 1 - ((tp + smooth) / (tp + alpha * fp + beta * fn + smooth)).mean()


def np_bce_loss(z, y):
    p, t = _np_softmax(z), _np_onehot(y, z.shape[-1])
    return -(t * np.log(p) + (1 - t) * np.log(1 - p)).mean()


def _random_case(seed, shape=(2, 4, 6, 5), k=2, scale=2.0):
    rng = np.random.default_rng(seed)
    z = (scale * rng.standard_normal(shape + (k,))).astype(np.float32)
    y = rng.integers(0, k, size=shape).astype(np.int32)
    return z, y


@pytest.mark.parametrize("k", [2, 3])
def test_dice_loss_matches_numpy_formula(k):
    z, y = _random_case(0, k=k)
    for smooth in (1.0, 0.1):
        got = float(losses.dice_loss(jnp.asarray(z), jnp.asarray(y), smooth=smooth))
        np.testing.assert_allclose(got, np_dice_loss(z, y, smooth), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [2, 3])
def test_tversky_loss_matches_numpy_formula(k):
    z, y = _random_case(1, k=k)
    got = float(losses.tversky_loss(jnp.asarray(z), jnp.asarray(y), 0.3, 0.7, 1.0))
    np.testing.assert_allclose(got, np_tversky_loss(z, y, 0.3, 0.7, 1.0), rtol=1e-5, atol=1e-6)
    # alpha and beta are not swapped: with FP-only errors the FP weight alone matters.
    got2 = float(losses.tversky_loss(jnp.asarray(z), jnp.asarray(y), 0.9, 0.1, 1.0))
    np.testing.assert_allclose(got2, np_tversky_loss(z, y, 0.9, 0.1, 1.0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [2, 3])
def test_bce_loss_matches_numpy_formula(k):
    z, y = _random_case(2, k=k)
    got = float(losses.bce_loss(jnp.asarray(z), jnp.asarray(y)))
    np.testing.assert_allclose(got, np_bce_loss(z, y), rtol=1e-5, atol=1e-6)


def test_bce_with_two_classes_is_binary_cross_entropy_of_logit_difference():
    z, y = _random_case(3)
    d = (z[..., 1] - z[..., 0]).astype(np.float64)
    # -[y log σ(d) + (1 - y) log σ(-d)] with log σ(x) = -log1p(exp(-x)), independent of softmax.
    ref = np.mean(y * np.log1p(np.exp(-d)) + (1 - y) * np.log1p(np.exp(d)))
    got = float(losses.bce_loss(jnp.asarray(z), jnp.asarray(y)))
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_bce_gradient_with_two_classes_is_the_binary_cross_entropy_gradient():
    # K = 2 takes log(1 - p_k) as the other class's log p (losses._log_probs_and_log_complements);
    # its gradient must be the textbook one: d/dz_1 = (sigmoid(z_1 - z_0) - y) / voxels = -d/dz_0.
    z, y = _random_case(4)
    grad = np.asarray(jax.grad(losses.bce_loss)(jnp.asarray(z), jnp.asarray(y)), np.float64)
    d = (z[..., 1] - z[..., 0]).astype(np.float64)
    want = (1.0 / (1.0 + np.exp(-d)) - y) / y.size
    np.testing.assert_allclose(grad[..., 1], want, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(grad[..., 0], -want, rtol=1e-4, atol=1e-9)


def test_bce_is_finite_with_finite_gradient_for_saturated_wrong_logits():
    y = np.zeros((1, 2, 2, 2), np.int32)
    y[0, 0] = 1
    z = np.stack([-1000.0 * (1 - 2 * y), 1000.0 * (1 - 2 * y)], axis=-1).astype(np.float32)
    # Every voxel is confidently wrong by a margin of 2000 in the logits.
    loss, grad = jax.value_and_grad(losses.bce_loss)(jnp.asarray(z), jnp.asarray(y))
    assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad)))
    np.testing.assert_allclose(float(loss), 2000.0, rtol=1e-5)


def test_perfect_prediction_gives_dice_loss_near_zero():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, size=(2, 8, 8, 8)).astype(np.int32)
    z = 30.0 * (2 * np.eye(2)[y] - 1)
    loss = float(losses.dice_loss(jnp.asarray(z, jnp.float32), jnp.asarray(y), smooth=1.0))
    # Only the smoothing term keeps it above 0: 1 - 2N/(2N + 1) per class, N ~ 256 voxels.
    assert 0.0 < loss < 5e-3
    wrong = float(losses.dice_loss(jnp.asarray(-z, jnp.float32), jnp.asarray(y), smooth=1.0))
    assert wrong > 0.99


def test_tversky_half_half_without_smoothing_equals_dice_on_hard_masks():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, size=(2, 6, 6, 6)).astype(np.int32)
    pred = rng.integers(0, 2, size=y.shape)
    z = jnp.asarray(50.0 * (2 * np.eye(2)[pred] - 1), jnp.float32)  # softmax is exactly 0/1
    tv = float(losses.tversky_loss(z, jnp.asarray(y), alpha=0.5, beta=0.5, smooth=0.0))
    dl = float(losses.dice_loss(z, jnp.asarray(y), smooth=0.0))
    np.testing.assert_allclose(tv, dl, rtol=1e-6)
    # ... and both equal 1 - mean Dice of the hard masks, counted independently.
    dices = []
    for b in range(2):
        for k in range(2):
            a, t = pred[b] == k, y[b] == k
            dices.append(2 * np.sum(a & t) / (a.sum() + t.sum()))
    np.testing.assert_allclose(dl, 1 - np.mean(dices), rtol=1e-6)


def test_bfloat16_logits_are_accumulated_in_float32():
    z, y = _random_case(6, shape=(1, 16, 16, 16))
    z16 = jnp.asarray(z, jnp.bfloat16)
    z32 = z16.astype(jnp.float32)  # the same values, exactly representable in float32
    cfg = base_config().loss
    for name in losses.LOSS_NAMES:
        cfg.name = name
        out16 = losses.segmentation_loss(z16, jnp.asarray(y), cfg)
        out32 = losses.segmentation_loss(z32, jnp.asarray(y), cfg)
        assert out16.dtype == jnp.float32
        np.testing.assert_allclose(float(out16), float(out32), rtol=1e-6)


@pytest.mark.parametrize("name", losses.LOSS_NAMES)
def test_segmentation_loss_dispatches_to_the_named_formula(name):
    z, y = _random_case(7)
    cfg = base_config().loss
    cfg.name = name
    cfg.bce_weight = 0.5  # not 1, so a dropped or doubled weight shows
    cfg.smooth = 0.7
    dice = np_dice_loss(z, y, cfg.smooth)
    tv = np_tversky_loss(z, y, cfg.tversky_alpha, cfg.tversky_beta, cfg.smooth)
    bce = np_bce_loss(z, y)
    expected = {
        "dice": dice,
        "tversky": tv,
        "bce": bce,
        "hybrid1": dice + 0.5 * bce,
        "hybrid2": tv + 0.5 * bce,
    }[name]
    fn = jax.jit(lambda a, b: losses.segmentation_loss(a, b, cfg))
    np.testing.assert_allclose(float(fn(z, y)), expected, rtol=1e-5)


def test_segmentation_loss_rejects_unknown_name_and_bad_shapes():
    z, y = _random_case(8)
    cfg = base_config().loss
    cfg.name = "focal"
    with pytest.raises(ValueError, match="unknown loss name 'focal'"):
        losses.segmentation_loss(jnp.asarray(z), jnp.asarray(y), cfg)
    with pytest.raises(ValueError, match="disagree"):
        losses.dice_loss(jnp.asarray(z), jnp.asarray(y[:, :2]))


def test_deep_supervision_combines_heads_as_last_plus_alpha_times_others():
    cfg = base_config().loss
    heads = [_random_case(10 + i)[0] for i in range(4)]
    _, y = _random_case(10)
    refs = [np_dice_loss(h, y) + np_bce_loss(h, y) for h in heads]  # default: hybrid1, λ = 1
    fn = jax.jit(lambda hs, a: losses.deep_supervision_loss(hs, jnp.asarray(y), cfg, a))
    total, per_head = fn([jnp.asarray(h) for h in heads], jnp.float32(0.32))
    assert per_head.shape == (4,)
    np.testing.assert_allclose(np.asarray(per_head), refs, rtol=1e-5)
    np.testing.assert_allclose(float(total), refs[3] + 0.32 * sum(refs[:3]), rtol=1e-5)


def test_deep_supervision_with_one_head_is_that_heads_loss():
    cfg = base_config().loss
    z, y = _random_case(11)
    total, per_head = losses.deep_supervision_loss([jnp.asarray(z)], jnp.asarray(y), cfg, 0.4)
    assert per_head.shape == (1,)
    np.testing.assert_allclose(float(total), np_dice_loss(z, y) + np_bce_loss(z, y), rtol=1e-5)
    with pytest.raises(ValueError, match="at least one"):
        losses.deep_supervision_loss([], jnp.asarray(y), cfg, 0.4)


def test_deep_supervision_gradients_scale_auxiliary_heads_by_alpha():
    cfg = base_config().loss
    heads = [jnp.asarray(_random_case(20 + i)[0]) for i in range(4)]
    y = jnp.asarray(_random_case(20)[1])
    grads = jax.grad(lambda hs: losses.deep_supervision_loss(hs, y, cfg, 0.4)[0])(heads)
    single = jax.grad(lambda h: losses.segmentation_loss(h, y, cfg))
    for i, g in enumerate(grads):
        scale = 1.0 if i == 3 else 0.4
        assert np.all(np.isfinite(np.asarray(g)))
        np.testing.assert_allclose(np.asarray(g), scale * np.asarray(single(heads[i])), rtol=1e-5, atol=1e-9)
