"""Sliding-window inference over a whole volume with Gaussian blending.

The network is compiled for one window shape and one batch of windows: volumes smaller than the
window are padded, and the last batch of windows is filled up with repeats. Softmax probabilities
of overlapping windows are blended with a Gaussian importance map (centre voxels, which see the
most context, weigh most), as in nnU-Net.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

WindowFn = Callable[[np.ndarray], np.ndarray]  # (N, *window, 1) -> (N, *window, K) probabilities


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


def window_predict_fn(apply_fn: Callable, mirror: bool = False) -> Callable:
    """Returns a jitted `(variables, windows (N, D, H, W, 1)) -> softmax probabilities (N, D, H, W, K)`.

    `apply_fn(variables, x)` returns logits. With `mirror`, probabilities are averaged over the
    8 flips of the three spatial axes (test-time augmentation). Build it once and pass new
    variables to reuse the compiled program.
    """

    @jax.jit
    def predict(variables, x):
        if not mirror:
            return jax.nn.softmax(apply_fn(variables, x).astype(jnp.float32), axis=-1)
        total = 0.0
        flip_sets = [axes for r in range(4) for axes in itertools.combinations((1, 2, 3), r)]
        for axes in flip_sets:
            xf = jnp.flip(x, axes) if axes else x
            p = jax.nn.softmax(apply_fn(variables, xf).astype(jnp.float32), axis=-1)
            total = total + (jnp.flip(p, axes) if axes else p)
        return total / len(flip_sets)

    return predict


def make_window_predictor(apply_fn: Callable, variables, mirror: bool = False) -> WindowFn:
    """Returns `windows (N, D, H, W, 1) -> probabilities (N, D, H, W, K)` as numpy, variables bound."""
    predict = window_predict_fn(apply_fn, mirror)
    return lambda x: np.asarray(predict(variables, jnp.asarray(x)))


def sliding_window_probs(
    image: np.ndarray,
    predict: WindowFn,
    window: Sequence[int],
    overlap: float = 0.5,
    batch_size: int = 2,
    sigma_scale: float = 0.125,
    pad_value: float = -1.0,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Returns blended softmax probabilities (D, H, W, K) float32 of a (D, H, W) image."""
    image = np.asarray(image, np.float32)
    if image.ndim != 3:
        raise ValueError(f"expected a (D, H, W) image, got shape {image.shape}")
    window = tuple(int(w) for w in window)
    shape = image.shape
    padded_shape = tuple(max(n, w) for n, w in zip(shape, window, strict=True))
    # Pad symmetrically so a small volume sits in the window centre, where the weights are high.
    before = [(p - n) // 2 for p, n in zip(padded_shape, shape, strict=True)]
    pads = [(b, p - n - b) for b, p, n in zip(before, padded_shape, shape, strict=True)]
    volume = np.pad(image, pads, constant_values=pad_value) if any(map(any, pads)) else image

    starts = list(itertools.product(*[window_starts(n, w, overlap)
                                      for n, w in zip(padded_shape, window, strict=True)]))
    weights = gaussian_importance(window, sigma_scale)
    accum = None
    norm = np.zeros(padded_shape, np.float32)
    for first in range(0, len(starts), batch_size):
        chunk = starts[first:first + batch_size]
        boxes = [tuple(slice(s, s + w) for s, w in zip(st, window, strict=True)) for st in chunk]
        batch = np.stack([volume[box] for box in boxes])
        if len(chunk) < batch_size:  # keep one compiled batch shape
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - len(chunk), 0)])
        probs = predict(batch[..., None])
        if accum is None:
            accum = np.zeros((*padded_shape, probs.shape[-1]), np.float32)
        for box, p in zip(boxes, probs, strict=False):
            accum[box] += p * weights[..., None]
            norm[box] += weights
        if progress is not None:
            progress(len(chunk))
    accum /= norm[..., None]
    inner = tuple(slice(b, b + n) for b, n in zip(before, shape, strict=True))
    return accum[inner]


def num_windows(shape: Sequence[int], window: Sequence[int], overlap: float) -> int:
    """Returns how many windows `sliding_window_probs` evaluates for a (D, H, W) shape."""
    return math.prod(len(window_starts(max(n, w), w, overlap)) for n, w in zip(shape, window, strict=True))
