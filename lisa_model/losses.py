"""Mask losses of LISA: per-pixel BCE and Dice, with the original's normalisation and weighting.

The formulas, the order of the operations and the epsilons are those of the original
``model/LISA.py`` (``dice_loss``, ``sigmoid_ce_loss`` and the aggregation in ``model_forward``), so
that training with them reproduces the published recipe. Masks are compared at the original image
resolution; there is no ignore label (ignored pixels are 0 in the targets).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class MaskLosses:
    """Weighted mask losses of one batch (0-dim tensors that carry gradients).

    Attributes:
        bce: ``bce_weight * sum_i(n_i * sigmoid_ce_loss_i) / (N + 1e-8)``.
        dice: ``dice_weight * sum_i(n_i * dice_loss_i) / (N + 1e-8)``.
        total: ``bce + dice`` (the language-model CE is added by the caller).
        num_masks: ``N``, the number of ground-truth masks in the batch.
    """

    bce: torch.Tensor
    dice: torch.Tensor
    total: torch.Tensor
    num_masks: int


def _check_masks(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.ndim != 3:
        raise ValueError(f"logits: expected shape (N, H, W), got {tuple(logits.shape)}")
    if targets.shape != logits.shape:
        raise ValueError(
            f"targets: expected the shape of logits {tuple(logits.shape)}, "
            f"got {tuple(targets.shape)}"
        )


def dice_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    num_masks: float,
    scale: float = 1000,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Soft Dice loss summed over masks and divided by ``num_masks + 1e-8``.

    Per mask: ``1 - (2 * sum(p/scale * t) + eps) / (sum(p/scale) + sum(t/scale) + eps)`` with
    ``p = sigmoid(logits)``; ``scale`` keeps the sums small for half precision.

    Args:
        logits: ``(N, H, W)`` float mask logits.
        targets: ``(N, H, W)`` float, 0/1 (soft values allowed), same dtype as ``logits``.
        num_masks: normaliser (the original passes ``N``).

    Returns:
        0-dim tensor; 0 when ``N == 0``.
    """
    _check_masks(logits, targets)
    probs = logits.sigmoid().flatten(1, 2)
    targets = targets.flatten(1, 2)
    numerator = 2 * (probs / scale * targets).sum(-1)
    denominator = (probs / scale).sum(-1) + (targets / scale).sum(-1)
    loss = 1 - (numerator + eps) / (denominator + eps)
    return loss.sum() / (num_masks + 1e-8)


def sigmoid_ce_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Per-pixel BCE with logits, averaged per mask, summed, divided by ``num_masks + 1e-8``.

    Args:
        logits: ``(N, H, W)`` float mask logits.
        targets: ``(N, H, W)`` float, 0/1 (soft values allowed), same dtype as ``logits``.
        num_masks: normaliser (the original passes ``N``).

    Returns:
        0-dim tensor; 0 when ``N == 0``.
    """
    _check_masks(logits, targets)
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return loss.flatten(1, 2).mean(1).sum() / (num_masks + 1e-8)


def mask_losses(
    pred_masks: Sequence[torch.Tensor],
    gt_masks: Sequence[torch.Tensor],
    bce_weight: float = 2.0,
    dice_weight: float = 0.5,
) -> MaskLosses:
    """Batch mask losses, aggregated over images exactly as the original ``model_forward``.

    Each image's mean losses are weighted by its mask count ``n_i``, summed, and divided by the
    batch's mask count ``N`` (so every mask counts once); images without masks add nothing.

    Args:
        pred_masks: per image, ``(n_i, H_i, W_i)`` float mask logits in the original frame.
        gt_masks: per image, ``(n_i, H_i, W_i)`` ground truth, 0/1 (bool, integer or float; cast
            to the logits' dtype).
        bce_weight: weight of the BCE term (the original's ``bce_loss_weight``).
        dice_weight: weight of the Dice term (the original's ``dice_loss_weight``).

    Raises:
        ValueError: when the lists differ in length, or an image's mask count or size differs.
    """
    if len(pred_masks) != len(gt_masks):
        raise ValueError(
            f"pred_masks has {len(pred_masks)} images but gt_masks has {len(gt_masks)}"
        )
    bce_sum: torch.Tensor | float = 0.0
    dice_sum: torch.Tensor | float = 0.0
    num_masks = 0
    for index, (pred, gt) in enumerate(zip(pred_masks, gt_masks)):
        if pred.ndim != 3 or gt.ndim != 3:
            raise ValueError(
                f"image {index}: expected (n, H, W) masks, got pred {tuple(pred.shape)} "
                f"and gt {tuple(gt.shape)}"
            )
        if pred.shape[0] != gt.shape[0]:
            raise ValueError(
                f"image {index}: {pred.shape[0]} predicted masks but {gt.shape[0]} "
                "ground-truth masks"
            )
        if pred.shape != gt.shape:
            raise ValueError(
                f"image {index}: predicted masks {tuple(pred.shape)} and ground truth "
                f"{tuple(gt.shape)} differ in size"
            )
        gt = gt.to(dtype=pred.dtype)
        n = int(gt.shape[0])
        bce_sum = bce_sum + sigmoid_ce_loss(pred, gt, num_masks=n) * n
        dice_sum = dice_sum + dice_loss(pred, gt, num_masks=n) * n
        num_masks += n
    if not isinstance(bce_sum, torch.Tensor):  # no images at all
        bce_sum = torch.zeros(())
    if not isinstance(dice_sum, torch.Tensor):
        dice_sum = torch.zeros(())
    bce = bce_weight * bce_sum / (num_masks + 1e-8)
    dice = dice_weight * dice_sum / (num_masks + 1e-8)
    return MaskLosses(bce=bce, dice=dice, total=bce + dice, num_masks=num_masks)
