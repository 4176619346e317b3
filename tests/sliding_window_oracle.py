"""The plain NumPy sliding window: the reference `livseg_jax.inference.sliding_window` is tested
against (same windows, Gaussian weights and padding, blended on the host one window at a time)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from livseg_jax.inference.sliding_window import blending_layout, importance_map, window_corners, window_predict_fn

WindowFn = Callable[[np.ndarray], np.ndarray]  # (N, *window, 1) -> (N, *window, K) probabilities


def make_window_predictor(apply_fn: Callable, variables, mirror: bool = False) -> WindowFn:
    """Returns `windows (N, D, H, W, 1) -> probabilities (N, D, H, W, K)` as numpy, variables bound."""
    window_fn = window_predict_fn(apply_fn, mirror)
    return lambda x: np.asarray(window_fn(variables, jnp.asarray(x)))


def sliding_window_probs(image: np.ndarray, predict: WindowFn, window: Sequence[int], overlap: float = 0.5,
                         batch_size: int = 2, sigma_scale: float = 0.125, pad_value: float = -1.0,
                         progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Returns blended softmax probabilities (D, H, W, K) float32 of a (D, H, W) image."""
    image = np.asarray(image, np.float32)
    window, padded_shape, pads = blending_layout(image.shape, window, "probs")
    volume = np.pad(image, pads, constant_values=pad_value) if any(map(any, pads)) else image
    starts = window_corners(padded_shape, window, overlap)
    weights = importance_map(window, sigma_scale)
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
    inner = tuple(slice(b, b + n) for (b, _), n in zip(pads, image.shape, strict=True))
    return accum[inner]
