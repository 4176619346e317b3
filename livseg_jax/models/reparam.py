"""Structural re-parameterisation: training variables -> deploy variables (SPEC 1.3).

Pure functions on variable trees. In evaluation mode BatchNorm is the per-channel affine map
`x * g / sqrt(var + eps) + (b - mean * g / sqrt(var + eps))`, so it folds exactly into the
convolution before it; RepConv3d's three branches are linear in the input and sum into one
3x3x3 kernel. The result has no `batch_stats` and matches `build_model(..., deploy=True)`.
Folding runs in float64 so the deploy model reproduces the evaluation model to float32 rounding.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from livseg_jax.models import names
from livseg_jax.models.layers import BN_EPSILON

Tree = Mapping[str, Any]


def _bn_affine(bn_params: Tree, bn_stats: Tree, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Returns (scale, shift) of an evaluation-mode BatchNorm, in float64."""
    gamma = np.asarray(bn_params["scale"], np.float64)
    beta = np.asarray(bn_params["bias"], np.float64)
    mean = np.asarray(bn_stats["mean"], np.float64)
    var = np.asarray(bn_stats["var"], np.float64)
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


def fold_conv_bn(params: Tree, stats: Tree, eps: float = BN_EPSILON) -> tuple[np.ndarray, np.ndarray]:
    """Returns (kernel, bias) in float64 of a ConvBN's conv with its BatchNorm folded in."""
    scale, shift = _bn_affine(params[names.BN], stats[names.BN], eps)
    conv = params[names.CONV]
    kernel = np.asarray(conv["kernel"], np.float64) * scale
    bias = shift
    if "bias" in conv:
        bias = bias + np.asarray(conv["bias"], np.float64) * scale
    return kernel, bias


def fold_repconv(params: Tree, stats: Tree, eps: float = BN_EPSILON) -> tuple[np.ndarray, np.ndarray]:
    """Returns (kernel (3,3,3,C,C), or (3,3,C,C) in the axial form, bias (C,)) of a RepConv3d's
    three branches summed."""
    k3, b3 = fold_conv_bn(params[names.REP_DENSE], stats[names.REP_DENSE], eps)
    k1, b1 = fold_conv_bn(params[names.REP_POINT], stats[names.REP_POINT], eps)
    kernel = k3.copy()
    centre = (1,) * (kernel.ndim - 2)
    kernel[centre] += k1.reshape(k1.shape[-2:])
    bias = b3 + b1
    if names.REP_IDENTITY in params:
        scale, shift = _bn_affine(params[names.REP_IDENTITY], stats[names.REP_IDENTITY], eps)
        channels = np.arange(scale.shape[0])
        kernel[(*centre, channels, channels)] += scale
        bias = bias + shift
    return kernel, bias


def _as_f32(kernel: np.ndarray, bias: np.ndarray) -> dict[str, np.ndarray]:
    return {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}


def _fold_tree(params: Tree, stats: Tree, eps: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        sub_stats = stats.get(key, {}) if stats else {}
        if not isinstance(value, Mapping):
            out[key] = np.asarray(value)
        elif {names.CONV, names.BN} <= value.keys():  # ConvBN
            out[key] = {names.CONV: _as_f32(*fold_conv_bn(value, sub_stats, eps))}
        elif {names.REP_DENSE, names.REP_POINT} <= value.keys():  # RepConv3d
            out[key] = {names.CONV: _as_f32(*fold_repconv(value, sub_stats, eps))}
        elif "mean" in sub_stats:  # a BatchNorm (Flax's variable name) with no conv before it: MSCA's norms
            scale, shift = _bn_affine(value, sub_stats, eps)
            out[key] = {"scale": scale.astype(np.float32), "bias": shift.astype(np.float32)}
        else:
            out[key] = _fold_tree(value, sub_stats, eps)
    return out


def reparameterize(variables: Tree, eps: float = BN_EPSILON) -> dict[str, Any]:
    """Returns deploy variables `{"params": ...}` folded from training `{"params", "batch_stats"}`.

    Deep-supervision heads other than the finest are dropped: the deploy model only predicts.
    """
    params = variables["params"]
    stats = variables.get("batch_stats", {})
    folded = _fold_tree(params, stats, eps)
    heads = sorted(int(m.group(1)) for k in folded if (m := re.fullmatch(rf"{names.HEAD}(\d+)", k)))
    for i in heads[:-1]:
        del folded[f"{names.HEAD}{i}"]
    return {"params": folded}
