"""Segmentation losses of SPEC §2: Dice, Tversky, BCE, the two hybrids and deep supervision.

Every loss takes logits `(B, D, H, W, K)` (softmax over the last axis, K >= 2) and integer labels
`(B, D, H, W)` with values in `[0, K)` (a value outside that range gets an all-zero target row:
it cannot be checked inside jit), and returns a float32 scalar. Logits of any float dtype
(bfloat16 included) are cast to float32 first, so every sum over voxels accumulates in float32.
Probabilities come from `jax.nn.softmax`; the cross-entropy terms come from `log_softmax`, never
from `log(p)`, so saturated logits give large but finite losses and finite gradients.

All functions are pure and jit-able; `segmentation_loss` reads the loss config (`config.loss`)
at trace time only (the name and weights are Python values).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections

LOSS_NAMES = ("dice", "tversky", "bce", "hybrid1", "hybrid2")


def _probs_and_onehot(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns float32 softmax probabilities and one-hot targets, both (B, D, H, W, K)."""
    if logits.ndim != labels.ndim + 1:
        raise ValueError(
            f"losses: logits must be labels.shape + (K,); got logits {logits.shape}, labels {labels.shape}"
        )
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"losses: logits {logits.shape} and labels {labels.shape} disagree on the batch/spatial axes"
        )
    num_classes = logits.shape[-1]
    if num_classes < 2:
        raise ValueError(f"losses: need at least 2 classes (softmax), got K={num_classes}")
    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return probs, onehot


def _spatial_sum(x: jax.Array) -> jax.Array:
    """Sums (B, *S, K) over the spatial axes S: (B, K), in float32 as given.

    In two stages, the last spatial axis first: one fused sum of millions of voxels down to B*K
    values runs on a handful of GPU thread blocks (1.4 ms of an H100 train step for the loss's
    sums); the first stage leaves B*K*prod(S[:-1]) independent sums."""
    if x.ndim > 3:
        x = jnp.sum(x, axis=x.ndim - 2)
    return jnp.sum(x, axis=tuple(range(1, x.ndim - 1)))


def dice_loss(logits: jax.Array, labels: jax.Array, smooth: float = 1.0) -> jax.Array:
    """Returns 1 - mean_{b,k} 2 Σp·t / (Σp² + Σt² + smooth): the soft Dice loss (float32 scalar).

    logits: (B, D, H, W, K); labels: (B, D, H, W) integers. Sums run over the spatial axes of each
    batch element; the mean runs over batch elements and classes (background included). `smooth`
    sits in the denominator only (SPEC §2), so a class absent from both prediction and target of
    one batch element contributes a Dice of 0, not 1.
    """
    p, t = _probs_and_onehot(logits, labels)
    intersection = _spatial_sum(p * t)
    denominator = _spatial_sum(p * p) + _spatial_sum(t * t) + smooth
    return 1.0 - jnp.mean(2.0 * intersection / denominator)


def tversky_loss(
    logits: jax.Array,
    labels: jax.Array,
    alpha: float = 0.3,
    beta: float = 0.7,
    smooth: float = 1.0,
) -> jax.Array:
    """Returns 1 - mean_{b,k} (TP + s) / (TP + α·FP + β·FN + s): the soft Tversky loss (scalar).

    logits: (B, D, H, W, K); labels: (B, D, H, W). Soft counts per batch element and class:
    TP = Σp·t, FP = Σp·(1 - t), FN = Σ(1 - p)·t. α weights false positives, β false negatives;
    α = β = 0.5 with s = 0 is the Dice coefficient on hard 0/1 predictions.
    """
    p, t = _probs_and_onehot(logits, labels)
    tp = _spatial_sum(p * t)
    fp = _spatial_sum(p * (1.0 - t))
    fn = _spatial_sum((1.0 - p) * t)
    index = (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)
    return 1.0 - jnp.mean(index)


def _log_probs_and_log_complements(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns log p_k and log(1 - p_k), both (..., K) float32, computed stably from logits.

    log(1 - p_k) = logsumexp_{j != k} z_j - logsumexp_j z_j, which never forms 1 - p (that
    would round to 0 for a confident voxel and give log 0).
    """
    z = logits.astype(jnp.float32)
    num_classes = z.shape[-1]
    log_norm = jax.nn.logsumexp(z, axis=-1, keepdims=True)
    log_p = z - log_norm
    if num_classes == 2:
        # 1 - p_k is the other class's probability: log(1 - p_k) = log p_{1-k}. The general form
        # below broadcasts (..., K, K) and takes K more exponentials per voxel; at the paper's
        # 48x256x256 patch the loss's fusions of its four full-resolution heads were the largest
        # reductions of the bf16 train step (docs/performance_notes.md).
        return log_p, log_p[..., ::-1]
    # Weight 0 on the diagonal drops class k from its own complement sum without an -inf.
    exclude_self = 1.0 - jnp.eye(num_classes, dtype=jnp.float32)  # (K, K): [k, j]
    log_rest = jax.nn.logsumexp(z[..., None, :], axis=-1, b=exclude_self)  # (..., K)
    return log_p, log_rest - log_norm


def bce_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Returns mean_{b,voxel,k} -[t_k log p_k + (1 - t_k) log(1 - p_k)]: the BCE (scalar).

    logits: (B, D, H, W, K); labels: (B, D, H, W). p = softmax(logits), t = one-hot(labels); each
    class is a binary problem "this class vs the rest" and the mean runs over batch, voxels and
    classes. For K = 2 both classes give the same value, so this equals the usual binary
    cross-entropy of sigmoid(z_1 - z_0) against the foreground mask.
    """
    _, t = _probs_and_onehot(logits, labels)
    log_p, log_not_p = _log_probs_and_log_complements(logits)
    return -jnp.mean(t * log_p + (1.0 - t) * log_not_p)


def segmentation_loss(
    logits: jax.Array, labels: jax.Array, loss_config: ml_collections.ConfigDict
) -> jax.Array:
    """Returns the float32 scalar loss named by `loss_config.name` (one of `LOSS_NAMES`).

    logits: (B, D, H, W, K); labels: (B, D, H, W). Keys read: name, smooth, bce_weight (λ),
    tversky_alpha, tversky_beta. hybrid1 = Dice + λ·BCE, hybrid2 = Tversky + λ·BCE.
    """
    name = loss_config.name
    if name not in LOSS_NAMES:
        raise ValueError(f"losses: unknown loss name {name!r}; expected one of {LOSS_NAMES}")
    smooth = float(loss_config.smooth)
    if name in ("dice", "hybrid1"):
        region = dice_loss(logits, labels, smooth=smooth)
    elif name in ("tversky", "hybrid2"):
        region = tversky_loss(
            logits,
            labels,
            alpha=float(loss_config.tversky_alpha),
            beta=float(loss_config.tversky_beta),
            smooth=smooth,
        )
    else:
        return bce_loss(logits, labels)
    if name in ("dice", "tversky"):
        return region
    return region + float(loss_config.bce_weight) * bce_loss(logits, labels)


def deep_supervision_loss(
    logits_list: Sequence[jax.Array],
    labels: jax.Array,
    loss_config: ml_collections.ConfigDict,
    ds_alpha: float | jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Returns (total, per_head): total = loss_last + ds_alpha·Σ loss_others, per_head (n_heads,).

    logits_list: the model's heads ordered coarse to fine, each (B, D, H, W, K) at the label
    resolution; the last is the prediction. With four heads this is SPEC §2's
    `loss3 + α_ds·(loss0 + loss1 + loss2)`; with one head the total is that head's loss and
    ds_alpha is unused. ds_alpha may be a traced scalar (see `training.schedules`).
    """
    if len(logits_list) == 0:
        raise ValueError("losses: deep_supervision_loss needs at least one logits map")
    per_head = jnp.stack([segmentation_loss(lg, labels, loss_config) for lg in logits_list])
    total = per_head[-1]
    if per_head.shape[0] > 1:
        total = total + jnp.asarray(ds_alpha, jnp.float32) * jnp.sum(per_head[:-1])
    return total, per_head
