"""The PyTorch twin of `livseg_jax.losses` (SPEC 2): HybridLoss1 and friends on NCDHW logits.

The PyTorch side of the parity checks (`tools/parity_report.py`, `tests/test_interop.py`) and of
the train-step benchmark's PyTorch baseline (`experiments/bench_train_step.py`). Imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections
import torch
import torch.nn.functional as F


def _probs_onehot(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k = logits.shape[1]
    probs = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(labels.long(), k).movedim(-1, 1).float()
    return probs, onehot


def dice_loss_torch(logits: torch.Tensor, labels: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Returns 1 - mean_{b,k} 2Σpt / (Σp² + Σt² + smooth) for logits (B, K, D, H, W)."""
    p, t = _probs_onehot(logits, labels)
    axes = tuple(range(2, p.ndim))
    inter = (p * t).sum(axes)
    denom = (p * p).sum(axes) + (t * t).sum(axes) + smooth
    return 1.0 - (2.0 * inter / denom).mean()


def tversky_loss_torch(logits: torch.Tensor, labels: torch.Tensor, alpha: float = 0.3,
                       beta: float = 0.7, smooth: float = 1.0) -> torch.Tensor:
    """Returns 1 - mean_{b,k} (TP + s) / (TP + αFP + βFN + s) for logits (B, K, D, H, W)."""
    p, t = _probs_onehot(logits, labels)
    axes = tuple(range(2, p.ndim))
    tp = (p * t).sum(axes)
    fp = (p * (1 - t)).sum(axes)
    fn = ((1 - p) * t).sum(axes)
    return 1.0 - ((tp + smooth) / (tp + alpha * fp + beta * fn + smooth)).mean()


def bce_loss_torch(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Returns the mean over batch, voxels and classes of the per-class BCE on softmax probs."""
    z = logits.float()
    _, t = _probs_onehot(z, labels)
    log_norm = torch.logsumexp(z, dim=1, keepdim=True)
    # log(1 - p_k) = logsumexp_{j != k} z_j - logsumexp_j z_j: never forms 1 - p.
    rest = [torch.logsumexp(torch.cat([z[:, :k], z[:, k + 1:]], 1), 1, keepdim=True)
            for k in range(z.shape[1])]
    log_p, log_not_p = z - log_norm, torch.cat(rest, 1) - log_norm
    return -(t * log_p + (1 - t) * log_not_p).mean()


def segmentation_loss_torch(logits: torch.Tensor, labels: torch.Tensor,
                            loss_config: ml_collections.ConfigDict) -> torch.Tensor:
    """Returns the loss named by `loss_config.name` (hybrid1 = Dice + λ·BCE, ...) as a scalar."""
    name, smooth = loss_config.name, float(loss_config.smooth)
    if name == "bce":
        return bce_loss_torch(logits, labels)
    if name in ("dice", "hybrid1"):
        region = dice_loss_torch(logits, labels, smooth)
    elif name in ("tversky", "hybrid2"):
        region = tversky_loss_torch(logits, labels, float(loss_config.tversky_alpha),
                                    float(loss_config.tversky_beta), smooth)
    else:
        raise ValueError(f"unknown loss name {name!r}")
    if name in ("dice", "tversky"):
        return region
    return region + float(loss_config.bce_weight) * bce_loss_torch(logits, labels)


def deep_supervision_loss_torch(logits_list: Sequence[torch.Tensor], labels: torch.Tensor,
                                loss_config: ml_collections.ConfigDict,
                                ds_alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (total, per_head): total = loss_last + ds_alpha · Σ loss_others."""
    per_head = torch.stack([segmentation_loss_torch(lg, labels, loss_config) for lg in logits_list])
    total = per_head[-1]
    if per_head.shape[0] > 1:
        total = total + ds_alpha * per_head[:-1].sum()
    return total, per_head
