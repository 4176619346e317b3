"""nnU-Net's default training augmentation, on the accelerator, inside the jitted train step.

`augment_batch(key, image, label, settings)` takes the batch the host delivered, a region larger
than the patch by `settings.margin` voxels per axis, and returns augmented patches: one sampling
grid composes mirroring, elastic deformation, rotation and scaling and is applied once (image:
linear interpolation, labels: nearest neighbour, so label values are never mixed), centred in the
region so that rotated patches take real voxels instead of padding; then the intensity transforms
(Gaussian noise, Gaussian blur, multiplicative brightness, contrast, simulated low resolution,
gamma on the inverted and on the plain image) in nnU-Net's order. Every transform has a
probability and a range (`data.augment.transforms`); the step draws them from a key derived from
(state.rng, state.step), so a resumed run sees the same batches.

Reference for the defaults (probabilities and ranges): nnU-Net v2,
`nnunetv2/training/nnUNetTrainer/nnUNetTrainer.py` (`get_training_transforms` and
`configure_rotation_dummyDA_mirroring_and_inital_patch_size`), and batchgeneratorsv2
(`transforms/spatial/spatial.py` SpatialTransform, `transforms/intensity/{gaussian_noise,
brightness,contrast,gamma}.py`, `transforms/noise/gaussian_blur.py`,
`transforms/spatial/low_resolution.py`, `transforms/spatial/mirroring.py`; BGContrast sampling).
Where nnU-Net applies a transform with probability p to a batch element and then to each channel
with p_per_channel, the probability here is their product (the images have one channel).

Written by hand: `jax.scipy.ndimage.map_coordinates` does the sampling; what is around it (the
composed grid, the elastic field, the separable blur and the down-then-up sampling with a random
factor under `jit`'s static shapes, BGContrast-style draws) exists in no maintained JAX library.
`dm-pix` (0.4.5, checked) was considered: its `affine_transform` and `elastic_deformation` each
resample on their own (no single composed grid), `elastic_deformation` and `gaussian_blur` are
2-D (HWC) with one sigma, and its gamma/contrast/brightness are one-line formulas without
nnU-Net's range and statistics handling, so it would add a dependency for nothing used.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.scipy.ndimage import map_coordinates

BLUR_TRUNCATE = 3.0  # Gaussian kernels end at 3 sigma (as scipy's gaussian_filter at truncate=3)


def _pair(config, key: str, low: float | None = None) -> tuple[float, float]:
    value = tuple(float(v) for v in config[key])
    if len(value) != 2 or value[0] > value[1] or (low is not None and value[0] < low):
        bound = f" with low >= {low}" if low is not None else ""
        raise ValueError(f"data.augment.transforms.{key} must be (low, high), low <= high{bound}; got {value}")
    return value


def _probability(config, key: str) -> float:
    p = float(config[key])
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"data.augment.transforms.{key} must be a probability in [0, 1], got {p}")
    return p


def _axes(config, key: str) -> tuple[bool, bool, bool]:
    value = tuple(bool(v) for v in config[key])
    if len(value) != 3:
        raise ValueError(f"data.augment.transforms.{key} needs one flag per axis (D, H, W), got {value}")
    return value


@dataclasses.dataclass(frozen=True)
class DeviceAugment:
    """The device augmentation of a run: probabilities, ranges, the patch and the host's margin."""

    patch: tuple[int, int, int]
    margin: tuple[int, int, int]  # region = patch + margin voxels per axis (even: centred crop)
    p_mirror: float
    mirror_axes: tuple[bool, bool, bool]
    p_rotation: float
    rotation_deg: tuple[float, float, float]  # max |angle| about the D (in-plane), H and W axes
    p_scaling: float
    scaling: tuple[float, float]
    scaling_axes: tuple[bool, bool, bool]
    p_elastic: float
    elastic_scale: tuple[float, float]
    elastic_magnitude: tuple[float, float]
    p_noise: float
    noise_std: tuple[float, float]
    p_blur: float
    blur_sigma: tuple[float, float]
    p_brightness: float
    brightness: tuple[float, float]
    p_contrast: float
    contrast: tuple[float, float]
    p_low_res: float
    low_res_scale: tuple[float, float]
    low_res_axes: tuple[bool, bool, bool]
    p_gamma_inverted: float
    p_gamma: float
    gamma: tuple[float, float]

    @property
    def region(self) -> tuple[int, int, int]:
        """Returns the (D, H, W) shape the host delivers: patch + margin."""
        return tuple(p + m for p, m in zip(self.patch, self.margin, strict=True))

    @classmethod
    def from_config(cls, data_config: ml_collections.ConfigDict) -> DeviceAugment:
        """Returns the settings of `data.augment.transforms` for `data.patch_size` (checked)."""
        t = data_config.augment.transforms
        patch = tuple(int(p) for p in data_config.patch_size)
        rotation = tuple(float(a) for a in t.rotation_deg)
        if len(rotation) != 3 or min(rotation) < 0:
            raise ValueError(f"data.augment.transforms.rotation_deg needs 3 angles >= 0 (D, H, W), got {rotation}")
        settings = cls(
            patch=patch, margin=(0, 0, 0),
            p_mirror=_probability(t, "p_mirror"), mirror_axes=_axes(t, "mirror_axes"),
            p_rotation=_probability(t, "p_rotation"), rotation_deg=rotation,
            p_scaling=_probability(t, "p_scaling"), scaling=_pair(t, "scaling", low=1e-3),
            scaling_axes=_axes(t, "scaling_axes"),
            p_elastic=_probability(t, "p_elastic"), elastic_scale=_pair(t, "elastic_scale", low=0.0),
            elastic_magnitude=_pair(t, "elastic_magnitude", low=0.0),
            p_noise=_probability(t, "p_noise"), noise_std=_pair(t, "noise_std", low=0.0),
            p_blur=_probability(t, "p_blur"), blur_sigma=_pair(t, "blur_sigma", low=1e-3),
            p_brightness=_probability(t, "p_brightness"), brightness=_pair(t, "brightness", low=0.0),
            p_contrast=_probability(t, "p_contrast"), contrast=_pair(t, "contrast", low=0.0),
            p_low_res=_probability(t, "p_low_res"), low_res_scale=_pair(t, "low_res_scale", low=1e-3),
            low_res_axes=_axes(t, "low_res_axes"),
            p_gamma_inverted=_probability(t, "p_gamma_inverted"), p_gamma=_probability(t, "p_gamma"),
            gamma=_pair(t, "gamma", low=1e-3),
        )
        margin = tuple(int(m) for m in t.margin) if len(t.margin) else derived_margin(settings)
        if len(margin) != 3 or any(m < 0 or m % 2 for m in margin):
            raise ValueError(f"data.augment.transforms.margin must be 3 even voxel counts >= 0 (or () to "
                             f"derive it), got {margin}")
        return dataclasses.replace(settings, margin=margin)


def derived_margin(settings: DeviceAugment) -> tuple[int, int, int]:
    """Returns the even per-axis margin that lets the largest rotation, scaling and elastic
    displacement read only voxels of the region (the patch's corners, transformed, stay inside)."""
    half = (np.asarray(settings.patch, float) - 1) / 2
    if settings.p_elastic > 0:  # displacements up to magnitude x half the patch on each axis
        half = half * (1 + settings.elastic_magnitude[1])
    corners = np.array(list(itertools.product(*[(-h, h) for h in half])))  # (8, 3)
    scale = max(settings.scaling[1], 1.0) if settings.p_scaling > 0 else 1.0
    scales = np.where(settings.scaling_axes, scale, 1.0)
    grids = []
    for limit in settings.rotation_deg if settings.p_rotation > 0 else (0.0, 0.0, 0.0):
        steps = max(int(math.ceil(min(limit, 180.0) / 5.0)), 0)  # extents are smooth: 5-degree steps
        grids.append(np.deg2rad(np.linspace(-limit, limit, 2 * steps + 1)) if steps else np.zeros(1))
    extent = np.zeros(3)
    for angles in itertools.product(*grids):
        points = (corners * scales) @ rotation_matrix(np.asarray(angles), np).T
        extent = np.maximum(extent, np.abs(points).max(axis=0))
    # Between samples 5 degrees apart, a coordinate (a cos + b sin) exceeds them by at most
    # 1 / cos(2.5 degrees); a rotation about one axis moves the other two.
    turned = [any(len(g) > 1 for a, g in enumerate(grids) if a != d) for d in range(3)]
    extent = np.where(turned, extent / math.cos(math.radians(2.5)), extent)
    # Reads clamp to the edge voxel (mode "nearest"), so a coordinate within [0, region - 1] needs
    # no room for the upper neighbour of linear interpolation. 1e-6: float noise of exact extents.
    extent = extent - 1e-6
    margin = []
    for p, e in zip(settings.patch, extent, strict=True):
        need = int(math.ceil(2 * e + 1)) - p  # region - 1 >= 2 * extent around the centre
        margin.append(max(need + need % 2, 0))
    return tuple(margin)


def rotation_matrix(angles, xp=jnp):
    """Returns R0 @ R1 @ R2: rotations (radians) about the D, H and W axes of (D, H, W) vectors."""
    c, s = xp.cos(angles), xp.sin(angles)
    one, zero = xp.ones_like(c[0]), xp.zeros_like(c[0])
    r0 = xp.stack([xp.stack([one, zero, zero]), xp.stack([zero, c[0], -s[0]]), xp.stack([zero, s[0], c[0]])])
    r1 = xp.stack([xp.stack([c[1], zero, s[1]]), xp.stack([zero, one, zero]), xp.stack([-s[1], zero, c[1]])])
    r2 = xp.stack([xp.stack([c[2], -s[2], zero]), xp.stack([s[2], c[2], zero]), xp.stack([zero, zero, one])])
    return r0 @ r1 @ r2


class AugmentParams(NamedTuple):
    """One example's draws; flags say whether a transform applies, values are its parameters."""

    mirror: jax.Array  # (3,) bool
    angles: jax.Array  # (3,) radians (0 where rotation does not apply)
    scale: jax.Array  # (3,) grid scale factors (1 where scaling does not apply)
    elastic: jax.Array  # () bool
    elastic_sigma: jax.Array  # (3,) fraction of the patch edge
    elastic_magnitude: jax.Array  # (3,) fraction of the half patch edge
    noise: jax.Array  # () bool
    noise_std: jax.Array
    blur: jax.Array  # () bool
    blur_sigma: jax.Array  # (3,) voxels
    brightness: jax.Array  # () bool
    brightness_factor: jax.Array
    contrast: jax.Array  # () bool
    contrast_factor: jax.Array
    low_res: jax.Array  # () bool
    low_res_scale: jax.Array
    gamma_inverted: jax.Array  # () bool
    gamma_inverted_value: jax.Array
    gamma: jax.Array  # () bool
    gamma_value: jax.Array


def _bg_contrast(key, bounds: tuple[float, float]) -> jax.Array:
    """Returns batchgeneratorsv2's BGContrast draw: half the time U(low, 1), else U(max(low, 1), high)
    (a range on one side of 1 is drawn from uniformly)."""
    low, high = bounds
    k_side, k_value = jax.random.split(key)
    below = jax.random.uniform(k_side) < 0.5
    if low >= 1 or high <= 1:  # the range lies on one side of 1
        below = jnp.array(high <= 1)
    lo = jnp.where(below, low, max(low, 1.0))
    hi = jnp.where(below, min(1.0, high), high)
    return lo + (hi - lo) * jax.random.uniform(k_value)


def sample_params(key: jax.Array, settings: DeviceAugment) -> AugmentParams:
    """Returns one example's transform draws (flags and parameters) from `key`."""
    keys = iter(jax.random.split(key, 24))

    def flag(p: float) -> jax.Array:
        return jax.random.uniform(next(keys)) < p

    def uniform(bounds, shape=()) -> jax.Array:
        return jax.random.uniform(next(keys), shape, minval=bounds[0], maxval=bounds[1])

    limits = jnp.deg2rad(jnp.asarray(settings.rotation_deg, jnp.float32))
    rotate = flag(settings.p_rotation)
    angles = jnp.where(rotate, uniform((-1.0, 1.0), (3,)) * limits, 0.0)
    scale_on = flag(settings.p_scaling)
    factor = uniform(settings.scaling)  # one factor for all scaled axes (nnU-Net synchronises them)
    scale = jnp.where(scale_on & jnp.asarray(settings.scaling_axes), factor, 1.0)
    mirror = (jax.random.uniform(next(keys), (3,)) < settings.p_mirror) & jnp.asarray(settings.mirror_axes)
    return AugmentParams(
        mirror=mirror, angles=angles, scale=scale,
        elastic=flag(settings.p_elastic), elastic_sigma=uniform(settings.elastic_scale, (3,)),
        elastic_magnitude=uniform(settings.elastic_magnitude, (3,)),
        noise=flag(settings.p_noise), noise_std=uniform(settings.noise_std),
        blur=flag(settings.p_blur), blur_sigma=uniform(settings.blur_sigma, (3,)),
        brightness=flag(settings.p_brightness), brightness_factor=_bg_contrast(next(keys), settings.brightness),
        contrast=flag(settings.p_contrast), contrast_factor=_bg_contrast(next(keys), settings.contrast),
        low_res=flag(settings.p_low_res), low_res_scale=uniform(settings.low_res_scale),
        gamma_inverted=flag(settings.p_gamma_inverted), gamma_inverted_value=_bg_contrast(next(keys), settings.gamma),
        gamma=flag(settings.p_gamma), gamma_value=_bg_contrast(next(keys), settings.gamma),
    )


def elastic_displacement(key: jax.Array, patch, sigma_fraction: jax.Array, magnitude: jax.Array) -> jax.Array:
    """Returns a (3, D, H, W) smooth displacement field in voxels: white noise smoothed with a
    Gaussian of sigma = sigma_fraction * patch (in Fourier space, periodic, as batchgeneratorsv2),
    each component scaled so its largest |value| is magnitude * patch / 2 voxels (0 gives 0)."""
    noise = jax.random.normal(key, (3, *patch))
    freqs = jnp.meshgrid(*[jnp.fft.fftfreq(n) for n in patch], indexing="ij")
    sigma = sigma_fraction * jnp.asarray(patch, jnp.float32)
    transfer = jnp.exp(-2 * jnp.pi**2 * sum((s * f) ** 2 for s, f in zip(sigma, freqs, strict=True)))
    smooth = jnp.fft.ifftn(jnp.fft.fftn(noise, axes=(1, 2, 3)) * transfer, axes=(1, 2, 3)).real
    peak = jnp.max(jnp.abs(smooth), axis=(1, 2, 3))
    target = magnitude * (jnp.asarray(patch, jnp.float32) - 1) / 2
    return smooth * (target / jnp.maximum(peak, 1e-12))[:, None, None, None]


def sampling_grid(params: AugmentParams, settings: DeviceAugment, displacement: jax.Array | None) -> jax.Array:
    """Returns (3, D, H, W) region coordinates of each patch voxel: mirror, then elastic
    displacement, then rotation and scaling about the patch centre, placed at the region centre."""
    patch = settings.patch
    centre = (jnp.asarray(patch, jnp.float32) - 1) / 2
    grid = jnp.stack(jnp.meshgrid(*[jnp.arange(n, dtype=jnp.float32) for n in patch], indexing="ij"))
    x = (grid - centre[:, None, None, None]) * jnp.where(params.mirror, -1.0, 1.0)[:, None, None, None]
    if displacement is not None:
        x = x + displacement
    affine = rotation_matrix(params.angles) * params.scale[None, :]  # R @ diag(scale)
    x = jnp.einsum("ij,j...->i...", affine, x)
    region_centre = (jnp.asarray(settings.region, jnp.float32) - 1) / 2
    return x + region_centre[:, None, None, None]


def gaussian_blur(volume: jax.Array, sigma: jax.Array, radius: int) -> jax.Array:
    """Returns `volume` (D, H, W) smoothed along each axis with its own sigma (voxels) by a
    normalised kernel of 2 * radius + 1 taps, edges mirrored (scipy.ndimage's 'reflect')."""
    offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    for axis in range(3):
        weights = jnp.exp(-0.5 * (offsets / sigma[axis]) ** 2)
        weights = weights / weights.sum()
        pad = [(0, 0)] * 3
        pad[axis] = (radius, radius)
        padded = jnp.pad(volume, pad, mode="symmetric")
        n = volume.shape[axis]
        volume = sum(weights[i] * jax.lax.slice_in_dim(padded, i, i + n, axis=axis) for i in range(2 * radius + 1))
    return volume


def simulate_low_resolution(volume: jax.Array, scale: jax.Array, axes: tuple[bool, bool, bool]) -> jax.Array:
    """Returns `volume` (D, H, W) down-sampled by `scale` on `axes` (nearest, round(n * scale)
    voxels) and up-sampled back (linear): PyTorch's 'nearest-exact' then 'linear' interpolation
    with align_corners=False, as batchgeneratorsv2, with static shapes for any traced scale."""
    for axis, on in enumerate(axes):
        if not on:
            continue
        n = volume.shape[axis]
        small = jnp.maximum(jnp.round(n * scale), 1.0)
        # Up-sampling: output voxel i reads small-grid position u between small voxels j0, j1.
        u = jnp.maximum((jnp.arange(n, dtype=jnp.float32) + 0.5) * (small / n) - 0.5, 0.0)
        j0 = jnp.floor(u)
        j1 = jnp.minimum(j0 + 1, small - 1)
        w = u - j0
        # Down-sampling ('nearest-exact'): small voxel j is source voxel floor((j + 0.5) * n / small).
        i0, i1 = (jnp.minimum(jnp.floor((j + 0.5) * (n / small)), n - 1).astype(jnp.int32) for j in (j0, j1))
        shape = [1, 1, 1]
        shape[axis] = n
        lo = jnp.take(volume, i0, axis=axis)
        hi = jnp.take(volume, i1, axis=axis)
        volume = lo + w.reshape(shape) * (hi - lo)
    return volume


def adjust_contrast(volume: jax.Array, factor: jax.Array) -> jax.Array:
    """Returns (volume - mean) * factor + mean, clipped to the input's range (preserve_range)."""
    mean = volume.mean()
    return jnp.clip((volume - mean) * factor + mean, volume.min(), volume.max())


def adjust_gamma(volume: jax.Array, gamma: jax.Array, invert: bool) -> jax.Array:
    """Returns batchgeneratorsv2's gamma: ((x - min) / range) ** gamma rescaled to the range, mean
    and standard deviation kept; on the negated image when `invert`."""
    x = -volume if invert else volume
    mean, std = x.mean(), x.std()
    low = x.min()
    span = jnp.maximum(x.max() - low, 1e-7)
    y = ((x - low) / span) ** gamma * span + low
    y = (y - y.mean()) * (std / jnp.maximum(y.std(), 1e-7)) + mean
    return -y if invert else y


def intensity_transforms(image: jax.Array, params: AugmentParams, key: jax.Array, blur_radius: int,
                         low_res_axes: tuple[bool, bool, bool]) -> jax.Array:
    """Returns one channel (D, H, W) after noise, blur, brightness, contrast, low resolution,
    inverted gamma and gamma (nnU-Net's order), each where its flag is set."""
    noise = params.noise_std * jax.random.normal(key, image.shape)
    image = jnp.where(params.noise, image + noise, image)
    image = jnp.where(params.blur, gaussian_blur(image, params.blur_sigma, blur_radius), image)
    image = jnp.where(params.brightness, image * params.brightness_factor, image)
    image = jnp.where(params.contrast, adjust_contrast(image, params.contrast_factor), image)
    image = jnp.where(params.low_res, simulate_low_resolution(image, params.low_res_scale, low_res_axes), image)
    image = jnp.where(params.gamma_inverted, adjust_gamma(image, params.gamma_inverted_value, True), image)
    return jnp.where(params.gamma, adjust_gamma(image, params.gamma_value, False), image)


def spatial_transform(image: jax.Array, label: jax.Array, params: AugmentParams, settings: DeviceAugment,
                      displacement: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Returns the patch (D, H, W, C) image (linear) and (D, H, W) label (nearest) read from a
    region through the composed grid of `params` (and an elastic `displacement` in voxels)."""
    coords = list(sampling_grid(params, settings, displacement))
    # Coordinates past the region read its edge voxel; the derived margin keeps them inside.
    label = map_coordinates(label, coords, order=0, mode="nearest")
    channels = [map_coordinates(image[..., c], coords, order=1, mode="nearest") for c in range(image.shape[-1])]
    return jnp.stack(channels, axis=-1), label


def augment_example(key: jax.Array, image: jax.Array, label: jax.Array,
                    settings: DeviceAugment) -> tuple[jax.Array, jax.Array]:
    """Returns one augmented (patch image (D, H, W, C), patch label (D, H, W)) from a region."""
    k_params, k_elastic, k_noise = jax.random.split(key, 3)
    params = sample_params(k_params, settings)
    displacement = None
    if settings.p_elastic > 0:  # static: no field is computed when elastic deformation is off
        field = elastic_displacement(k_elastic, settings.patch, params.elastic_sigma, params.elastic_magnitude)
        displacement = jnp.where(params.elastic, field, 0.0)
    image, label = spatial_transform(image, label, params, settings, displacement)
    channels = [image[..., c] for c in range(image.shape[-1])]
    radius = max(int(math.ceil(BLUR_TRUNCATE * settings.blur_sigma[1])), 1)
    channels = [intensity_transforms(x, params, k_noise, radius, settings.low_res_axes) for x in channels]
    return jnp.stack(channels, axis=-1), label


def augment_batch(key: jax.Array, image: jax.Array, label: jax.Array,
                  settings: DeviceAugment) -> tuple[jax.Array, jax.Array]:
    """Returns the augmented batch (B, *patch, C) image and (B, *patch) labels from a batch of
    regions (B, *region, C) / (B, *region); example b uses fold_in(key, b)."""
    if tuple(image.shape[1:4]) != settings.region or tuple(label.shape[1:]) != settings.region:
        raise ValueError(f"device augmentation expects regions of shape {settings.region} (patch "
                         f"{settings.patch} + margin {settings.margin}), got image {image.shape}, label {label.shape}")
    keys = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(image.shape[0]))
    return jax.vmap(lambda k, x, y: augment_example(k, x, y, settings))(keys, image, label)


def device_augment_settings(data_config: ml_collections.ConfigDict) -> DeviceAugment | None:
    """Returns the run's DeviceAugment when `data.augment.device` is on, else None."""
    return DeviceAugment.from_config(data_config) if data_config.augment.get("device", False) else None
