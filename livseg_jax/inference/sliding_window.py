"""Sliding-window inference over a whole volume with Gaussian blending, on the device.

The network is compiled for one window shape and one batch of windows: volumes smaller than the
window are padded, and the last batch of windows is filled up with repeats (weighted 0). Softmax
probabilities of overlapping windows are blended with a Gaussian importance map (centre voxels,
which see the most context, weigh most), as in nnU-Net. The volume goes to the device once and
only the argmax (or the probabilities) come back; the window corners of every batch and the
importance map are put on the device once per volume (the map once per device), so the loop over
batches only dispatches programs and, with a progress callback, waits for the batch before the
one just queued. `tests/sliding_window_oracle.py` holds the plain NumPy version this is tested
against.

A forward function that works on host arrays (ONNX Runtime's, `inference.backends`) comes wrapped
in `HostWindowFn`: its windows are then cut and blended in NumPy on the host, the same arithmetic
in the same order, so no window batch travels to a device and back.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from livseg_jax.data.slabs import parallel_slabs


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Returns window start offsets along one axis, evenly spaced, covering [0, size)."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if size <= window:
        return [0]
    step = max(1, int(window * (1 - overlap)))
    n = math.ceil((size - window) / step) + 1
    return [round(i * (size - window) / (n - 1)) for i in range(n)]


def gaussian_importance(window: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """Returns a (D, H, W) float32 Gaussian weight map peaking at 1 in the window centre."""
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in window], indexing="ij")
    exponent = sum(((g - (n - 1) / 2) / (n * sigma_scale)) ** 2 for g, n in zip(grids, window, strict=True))
    weights = np.exp(-0.5 * exponent)
    weights /= weights.max()
    # No exact zeros at the border: every voxel must keep a positive total weight.
    return np.maximum(weights, 1e-3).astype(np.float32)


@functools.lru_cache(maxsize=8)
def importance_map(window: tuple[int, ...], sigma_scale: float) -> np.ndarray:
    """Returns `gaussian_importance`, read-only and computed once per window (~3 M exponentials)."""
    weights = gaussian_importance(window, sigma_scale)
    weights.flags.writeable = False
    return weights


# Test-time mirroring: every subset of the three spatial axes of (N, D, H, W, C) windows, none first.
MIRROR_AXES = tuple(axes for r in range(4) for axes in itertools.combinations((1, 2, 3), r))


def mirror_averaged(probabilities: Callable, x, flip: Callable):
    """Returns the mean over MIRROR_AXES of `probabilities(flip(x, axes))` flipped back.

    `flip` is `jnp.flip` inside a jitted program or a NumPy flip on the host (ONNX Runtime)."""
    total = 0.0
    for axes in MIRROR_AXES:
        p = probabilities(flip(x, axes) if axes else x)
        total = total + (flip(p, axes) if axes else p)
    return total / len(MIRROR_AXES)


def window_predict_fn(apply_fn: Callable, mirror: bool = False) -> Callable:
    """Returns a jitted `(variables, windows (N, D, H, W, 1)) -> softmax probabilities (N, D, H, W, K)`.

    `apply_fn(variables, x)` returns logits. With `mirror`, probabilities are averaged over the
    8 flips of the three spatial axes (test-time augmentation). Build it once and pass new
    variables to reuse the compiled program.
    """

    @jax.jit
    def predict(variables, x):
        def probabilities(xf):
            return jax.nn.softmax(apply_fn(variables, xf).astype(jnp.float32), axis=-1)

        return mirror_averaged(probabilities, x, jnp.flip) if mirror else probabilities(x)

    return predict


def ensemble_window_fn(window_fns: Sequence[Callable]) -> Callable:
    """Returns a jitted `(variables tuple, windows) -> mean of the members' probabilities (N, D, H, W, K)`.

    Member i is `window_fns[i](variables[i], windows)` (e.g. `window_predict_fn`s of folds or of
    different networks): all members run inside one compiled program on the device, and only
    their average is blended by `sliding_window`.
    """
    fns = tuple(window_fns)
    if not fns:
        raise ValueError("an ensemble needs at least one member")

    @jax.jit
    def predict(variables, x):
        if len(variables) != len(fns):
            raise ValueError(f"the ensemble has {len(fns)} members but got {len(variables)} variable trees")
        total = fns[0](variables[0], x)
        for fn, v in zip(fns[1:], variables[1:], strict=True):
            total = total + fn(v, x)
        return total / len(fns)

    return predict


@dataclasses.dataclass(frozen=True)
class HostWindowFn:
    """A forward function `(variables, windows (N, D, H, W, 1) NumPy) -> probabilities (N, D, H, W, K)
    NumPy` that runs on the host (ONNX Runtime): `sliding_window` then blends on the host too."""

    fn: Callable

    def __call__(self, variables, windows):
        return self.fn(variables, windows)


def window_corners(padded_shape: Sequence[int], window: Sequence[int], overlap: float) -> list[tuple[int, ...]]:
    """Returns the (d, h, w) start corner of every window over a volume at least as large as the window."""
    return list(itertools.product(*[window_starts(n, w, overlap) for n, w in zip(padded_shape, window, strict=True)]))


def blending_layout(shape: Sequence[int], window: Sequence[int], output: str):
    """Checks a device-blending call; returns (window as ints, padded shape, symmetric pads)."""
    if output not in ("labels", "probs"):
        raise ValueError(f"output must be 'labels' or 'probs', got {output!r}")
    if len(shape) != 3:
        raise ValueError(f"expected a (D, H, W) image, got shape {tuple(shape)}")
    window = tuple(int(w) for w in window)
    return (window, *_padding(shape, window))


def _padding(shape: Sequence[int], window: Sequence[int]) -> tuple[tuple[int, ...], list[tuple[int, int]]]:
    """Returns (padded shape, symmetric pads): a volume smaller than the window sits in its centre."""
    padded = tuple(max(n, w) for n, w in zip(shape, window, strict=True))
    before = [(p - n) // 2 for p, n in zip(padded, shape, strict=True)]
    return padded, [(b, p - n - b) for b, p, n in zip(before, padded, shape, strict=True)]


@functools.partial(jax.jit, static_argnames="window")
def _cut_windows(volume, starts, window):
    """Returns the (N, *window, 1) windows of `volume` at the (N, 3) corners `starts`."""
    return jax.vmap(lambda s: lax.dynamic_slice(volume, s, window))(starts)[..., None]


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _add_windows(accum, norm, probs, starts, valid, weights):
    """Adds each window's weighted probabilities into `accum` / its weights into `norm`, in place.

    Kept apart from the network so that a new volume shape recompiles only this small program.
    """
    window = weights.shape

    def add_one(i, carry):
        acc, nrm = carry
        w = weights * valid[i]
        corner = (*starts[i], jnp.int32(0))
        patch = lax.dynamic_slice(acc, corner, (*window, acc.shape[-1]))
        acc = lax.dynamic_update_slice(acc, patch + probs[i].astype(jnp.float32) * w[..., None], corner)
        nrm = lax.dynamic_update_slice(nrm, lax.dynamic_slice(nrm, starts[i], window) + w, starts[i])
        return acc, nrm

    return lax.fori_loop(0, probs.shape[0], add_one, (accum, norm))


@functools.partial(jax.jit, static_argnames=("inner", "labels"))
def _finish(accum, norm, inner, labels):
    box = tuple(slice(b, b + n) for b, n in inner)
    if labels:  # norm > 0 everywhere, so dividing by it does not change the argmax
        return jnp.argmax(accum[box], axis=-1).astype(jnp.uint8)
    return accum[box] / norm[box][..., None]


def batched_corners(starts: np.ndarray, batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Returns (corners (batch_size, 3) int32, valid (batch_size,) float32) per batch of window corners:
    the last batch is filled up with repeats of its last corner, valid 0 (one compiled batch shape)."""
    batches = []
    for first in range(0, len(starts), batch_size):
        chunk = starts[first:first + batch_size]
        valid = np.zeros(batch_size, np.float32)
        valid[:len(chunk)] = 1.0
        if len(chunk) < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), 0)])
        batches.append((np.ascontiguousarray(chunk, np.int32), valid))
    return batches


@functools.lru_cache(maxsize=16)
def _device_importance(window: tuple[int, ...], sigma_scale: float, device: jax.Device | None) -> jax.Array:
    """Returns `importance_map` on `device` (None: uncommitted, like the volume), uploaded once per window,
    sigma and device."""
    return jax.device_put(importance_map(window, sigma_scale), device)


def sliding_window(
    image: np.ndarray | jax.Array,
    window_fn: Callable,
    variables,
    window: Sequence[int],
    overlap: float = 0.5,
    batch_size: int = 2,
    sigma_scale: float = 0.125,
    pad_value: float = -1.0,
    progress: Callable[[int], None] | None = None,
    output: str = "labels",
    num_classes: int | None = None,
) -> np.ndarray:
    """Returns the (D, H, W) uint8 argmax (`output="labels"`) or (D, H, W, K) probabilities of a (D, H, W) image.

    `window_fn(variables, windows (N, D, H, W, 1)) -> probabilities (N, D, H, W, K)` is a jittable
    function such as `window_predict_fn(...)`, compiled once per window shape whatever the volume
    shape, or any function returning the probabilities as an array; a `HostWindowFn` (ONNX
    Runtime's, `inference.backends`) is blended on the host (`host_sliding_window`). The volume
    is sent to the device once; windows are cut, evaluated and accumulated there, and only the
    (D, H, W) uint8 argmax (`output="labels"`) or the (D, H, W, K) float32 probabilities
    (`output="probs"`) come back. Pass `num_classes` when known; otherwise it is found by tracing
    `window_fn` once per call.
    """
    if isinstance(window_fn, HostWindowFn):
        return host_sliding_window(image, window_fn, variables, window, overlap, batch_size, sigma_scale,
                                   pad_value, progress, output, num_classes)
    window, padded_shape, pads = blending_layout(image.shape, window, output)
    volume = jnp.pad(jnp.asarray(image, jnp.float32), pads, constant_values=pad_value)
    # A volume committed to a device (the folder pipeline's per-device predictors) keeps the corners and
    # weights there too; an uncommitted one (a NumPy image) leaves them uncommitted, so that variables
    # replicated over several devices (validation during training on a mesh) still combine with them.
    device = next(iter(volume.devices())) if volume.committed else None
    batches = batched_corners(np.array(window_corners(padded_shape, window, overlap), np.int32), batch_size)
    counts = [int(valid.sum()) for _, valid in batches]
    batches = jax.device_put(batches, device)  # every batch's corners in one transfer, none in the loop
    if num_classes is None:
        num_classes = jax.eval_shape(window_fn, variables,
                                     jax.ShapeDtypeStruct((batch_size, *window, 1), jnp.float32)).shape[-1]
    weights = _device_importance(window, float(sigma_scale), device)
    accum = jnp.zeros((*padded_shape, num_classes), jnp.float32)
    norm = jnp.zeros(padded_shape, jnp.float32)
    queued = None  # (probabilities, window count) of the batch before the current one
    for (corners, valid), count in zip(batches, counts, strict=True):
        probs = window_fn(variables, _cut_windows(volume, corners, window))
        accum, norm = _add_windows(accum, norm, probs, corners, valid, weights)
        if progress is not None:
            # Report the previous batch once done: windows done, not queued, with one batch still
            # queued behind it, so the device never waits for the host between batches.
            if queued is not None:
                jax.block_until_ready(queued[0])  # a no-op for a host array
                progress(queued[1])
            queued = (probs, count)
    inner = tuple((b, n) for (b, _), n in zip(pads, image.shape, strict=True))
    result = np.asarray(_finish(accum, norm, inner, output == "labels"))
    if queued is not None:
        progress(queued[1])
    return result


def _accumulate(accum: np.ndarray, norm: np.ndarray, box: tuple[slice, ...], probs: np.ndarray,
                weights: np.ndarray) -> None:
    """Adds one window's weighted probabilities into accum[box] and its weights into norm[box], in
    place, over slabs of the window's slices on the shared thread pool (disjoint, so exact)."""
    depth, rows, cols = box

    def add(start: int, stop: int) -> None:
        part = (slice(depth.start + start, depth.start + stop), rows, cols)
        accum[part] += probs[start:stop] * weights[start:stop, ..., None]
        norm[part] += weights[start:stop]

    parallel_slabs(add, probs.shape[0])


def host_sliding_window(
    image: np.ndarray | jax.Array,
    window_fn: Callable,
    variables,
    window: Sequence[int],
    overlap: float = 0.5,
    batch_size: int = 2,
    sigma_scale: float = 0.125,
    pad_value: float = -1.0,
    progress: Callable[[int], None] | None = None,
    output: str = "labels",
    num_classes: int | None = None,
) -> np.ndarray:
    """Returns what `sliding_window` returns, for a forward function on host (NumPy) arrays.

    Windows are cut from the padded volume, evaluated by `window_fn` and blended in NumPy with the
    device version's arithmetic (`accum + probs * weight`, window after window; each window's
    slices split over the shared thread pool, `data.slabs`), so nothing goes to a device and no
    program is compiled; the batches keep the exported shape (repeats filling the last are skipped).
    """
    window, padded_shape, pads = blending_layout(image.shape, window, output)
    volume = np.pad(np.asarray(image, np.float32), pads, constant_values=pad_value)
    weights = importance_map(window, float(sigma_scale))
    accum, norm = None, np.zeros(padded_shape, np.float32)
    for corners, valid in batched_corners(np.array(window_corners(padded_shape, window, overlap), np.int32),
                                          batch_size):
        boxes = [tuple(slice(int(c), int(c) + w) for c, w in zip(corner, window, strict=True)) for corner in corners]
        probs = np.asarray(window_fn(variables, np.stack([volume[box] for box in boxes])[..., None]), np.float32)
        if accum is None:
            accum = np.zeros((*padded_shape, num_classes or probs.shape[-1]), np.float32)
        count = int(valid.sum())
        for box, p in zip(boxes[:count], probs[:count], strict=True):
            _accumulate(accum, norm, box, p, weights)
        if progress is not None:
            progress(count)
    inner = tuple(slice(b, b + n) for (b, _), n in zip(pads, image.shape, strict=True))
    if output == "labels":  # norm > 0 everywhere, so dividing by it does not change the argmax
        return np.argmax(accum[inner], axis=-1).astype(np.uint8)
    return accum[inner] / norm[inner][..., None]


def num_windows(shape: Sequence[int], window: Sequence[int], overlap: float) -> int:
    """Returns how many windows `sliding_window` evaluates for a (D, H, W) shape."""
    return math.prod(len(window_starts(max(n, w), w, overlap)) for n, w in zip(shape, window, strict=True))
