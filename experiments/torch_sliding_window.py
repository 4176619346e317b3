"""Sliding-window inference for the PyTorch twins, blended on the torch device.

The comparison partner of `livseg_jax.inference.sliding_window.sliding_window` in
`python -m experiments.bench_inference`: the same windows, Gaussian weights and padding (it reuses their
NumPy definitions), with the volume, the accumulators and the argmax kept on the torch device, as
a PyTorch user would write it. Tested against the NumPy reference in tests/sliding_window_oracle.py. This
module imports torch at import time (the `torch` extra).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from livseg_jax.inference.sliding_window import blending_layout, importance_map, window_corners

TorchWindowFn = Callable[[torch.Tensor], torch.Tensor]  # (N, 1, D, H, W) -> probabilities (N, K, D, H, W)


@torch.no_grad()
def torch_sliding_window(
    image: np.ndarray,
    predict: TorchWindowFn,
    window: Sequence[int],
    overlap: float = 0.5,
    batch_size: int = 2,
    sigma_scale: float = 0.125,
    pad_value: float = -1.0,
    output: str = "labels",
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Returns the (D, H, W) uint8 argmax (`output="labels"`) or (D, H, W, K) float32 probabilities.

    Unlike the JAX path, the last batch is not filled up with repeats: PyTorch has no compiled
    batch shape to keep.
    """
    window, padded_shape, pads = blending_layout(image.shape, window, output)
    volume = torch.from_numpy(np.ascontiguousarray(image, np.float32)).to(device)
    if any(map(any, pads)):
        flat_pads = [p for pair in reversed(pads) for p in pair]  # torch pads the last axis first
        volume = torch.nn.functional.pad(volume, flat_pads, value=pad_value)
    weights = torch.from_numpy(importance_map(window, sigma_scale).copy()).to(device)
    starts = window_corners(padded_shape, window, overlap)
    accum = None
    norm = torch.zeros(padded_shape, dtype=torch.float32, device=device)
    for first in range(0, len(starts), batch_size):
        boxes = [tuple(slice(s, s + w) for s, w in zip(st, window, strict=True))
                 for st in starts[first:first + batch_size]]
        probs = predict(torch.stack([volume[box] for box in boxes])[:, None]).float()
        if accum is None:
            accum = torch.zeros((probs.shape[1], *padded_shape), dtype=torch.float32, device=device)
        for box, p in zip(boxes, probs, strict=True):
            accum[(slice(None), *box)] += p * weights
            norm[box] += weights
    inner = tuple(slice(b, b + n) for (b, _), n in zip(pads, image.shape, strict=True))
    accum = accum[(slice(None), *inner)]
    if output == "labels":  # norm > 0 everywhere, so dividing by it does not change the argmax
        return accum.argmax(0).to(torch.uint8).cpu().numpy()
    return (accum / norm[inner]).permute(1, 2, 3, 0).cpu().numpy()
