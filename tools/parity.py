"""Helpers that put the two frameworks side by side: random non-trivial weights, forward passes
that return every deep-supervision head, error measures, and the BatchNorm running-variance rule.

Used by tests/test_interop.py, tests/network_checks.py and `python -m tools.parity_report`.
Imports torch lazily.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from livseg_jax.interop.mapping import flatten, unflatten
from livseg_jax.models.layers import BN_MOMENTUM

TORCH_BN_MOMENTUM = round(1.0 - BN_MOMENTUM, 12)  # PyTorch convention of livseg_jax.models' BatchNorm


def random_flax_variables(shapes: Mapping[str, Any], seed: int = 0) -> dict[str, Any]:
    """Returns float32 numpy variables shaped like `shapes`, with non-trivial BN statistics.

    Kernels are N(0, 1/fan_in); BatchNorm scales U(0.5, 1.5), biases and means N(0, 0.2),
    variances U(0.5, 2); MSCA layer scales U(0.5, 1.5) so the attention blocks weigh in (their
    1e-2 initial value would hide a wrong MSCA from a parity test).
    """
    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in flatten(shapes).items():
        shape, name = tuple(leaf.shape), path.rsplit("/", 1)[-1]
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            value = rng.normal(0.0, 1.0 / np.sqrt(fan_in), shape)
        elif name in ("scale", "layer_scale1", "layer_scale2"):
            value = rng.uniform(0.5, 1.5, shape)
        elif name == "var":
            value = rng.uniform(0.5, 2.0, shape)
        else:  # biases, means
            value = rng.normal(0.0, 0.2, shape)
        out[path] = value.astype(np.float32)
    return unflatten(out)


def randomize_torch_(model, seed: int = 0):
    """Gives every tensor of `model` a seeded random value (non-trivial BatchNorm statistics too).

    Kernels N(0, 1/fan_in); BatchNorm weights and MSCA layer scales U(0.5, 1.5); biases and
    running means N(0, 0.2); running variances U(0.5, 2). Returns the model.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            leaf = name.rsplit(".", 1)[-1]
            if not t.is_floating_point():
                continue
            if t.ndim >= 3:  # conv kernels (O, I, *k) and the ConvTranspose3d kernel (I, O, *k)
                t.copy_(torch.randn(t.shape, generator=gen) / float(np.prod(t.shape[1:])) ** 0.5)
            elif leaf == "running_var":
                t.copy_(torch.rand(t.shape, generator=gen) * 1.5 + 0.5)
            elif leaf.startswith("layer_scale") or leaf == "weight":
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            else:  # biases, running means
                t.copy_(torch.randn(t.shape, generator=gen) * 0.2)
    return model


def _bn_running_average(next_fun, args, kwargs, context):
    """Method interceptor: evaluates every BatchNorm with its running statistics."""
    module = context.module
    if not (isinstance(module, nn.BatchNorm) and context.method_name == "__call__"):
        return next_fun(*args, **kwargs)
    # BatchNorm's use_running_average is fixed at construction, so apply its evaluation formula
    # (as flax.linen.normalization._normalize writes it) to its own variables.
    x = args[0]
    mean = module.get_variable("batch_stats", "mean")
    var = module.get_variable("batch_stats", "var")
    mul = jax.lax.rsqrt(var + module.epsilon) * module.get_variable("params", "scale")
    return ((x - mean) * mul + module.get_variable("params", "bias")).astype(x.dtype)


def flax_eval_all_heads(model: nn.Module):
    """Returns a jitted f(variables, x (B,D,H,W,C)) -> every head's logits, BatchNorm on running stats.

    The Flax model returns only the finest head in evaluation mode; this runs its training graph
    (all heads) with every BatchNorm forced to its running averages, i.e. the evaluation network
    with the deep-supervision heads kept. Requires dropout 0.
    """

    def apply(variables, x):
        if model.deploy:
            return (model.apply(variables, x, train=False),)
        with nn.intercept_methods(_bn_running_average):
            return model.apply(variables, x, train=True)

    return jax.jit(apply)


def flax_train_forward(model: nn.Module):
    """Returns a jitted f(variables, x) -> (heads' logits, updated batch_stats) in training mode."""

    def apply(variables, x):
        logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        return logits, updates["batch_stats"]

    return jax.jit(apply)


def torch_forward(model, x_ndhwc: np.ndarray, all_heads: bool = True) -> tuple[np.ndarray, ...]:
    """Returns the torch model's logits, each as NDHWC numpy, for an NDHWC numpy input."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x_ndhwc, -1, 1)))
    with torch.set_grad_enabled(model.training):
        out = model(x, all_heads=all_heads)
    out = out if isinstance(out, tuple) else (out,)
    return tuple(np.moveaxis(o.detach().numpy(), 1, -1) for o in out)


def errors(reference: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """Returns (max absolute difference, that divided by the reference's max |value|)."""
    reference, other = np.asarray(reference, np.float64), np.asarray(other, np.float64)
    if reference.shape != other.shape:
        raise ValueError(f"shapes differ: {reference.shape} vs {other.shape}")
    max_abs = float(np.max(np.abs(reference - other))) if reference.size else 0.0
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    return max_abs, max_abs / scale if scale > 0 else max_abs


def torch_state_numpy(model) -> dict[str, np.ndarray]:
    """Returns the torch model's state dict as {name: numpy array} (copies)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def load_torch_state_numpy(model, state_dict: Mapping[str, np.ndarray]):
    """Loads a {name: numpy array} state dict into `model` (strict); returns the model."""
    import torch

    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, strict=True)
    return model


def torch_running_var_from_flax(flax_var_new: np.ndarray, var_old: np.ndarray, n: int,
                                momentum: float = TORCH_BN_MOMENTUM) -> np.ndarray:
    """Returns the running variance PyTorch holds after the update that gave Flax `flax_var_new`.

    Both start from `var_old` and see a batch with biased variance s² over n = B*D*H*W values per
    channel. Flax stores (1 - m)·var_old + m·s²; PyTorch stores (1 - m)·var_old + m·s²·n/(n-1)
    (the unbiased estimate). So torch = (1 - m)·var_old + (flax - (1 - m)·var_old)·n/(n-1).
    """
    kept = (1.0 - momentum) * np.asarray(var_old, np.float64)
    return kept + (np.asarray(flax_var_new, np.float64) - kept) * n / (n - 1)
