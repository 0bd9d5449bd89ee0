"""Segmentation metrics of LISA: gIoU and cIoU, computed exactly as the original ``validate``.

Per mask, the original counts intersection and union per class (background 0, foreground 1) with
pixels whose ground truth is ``ignore_index`` (255) left out, and scores
``iou = I / (U + 1e-5)`` in float32, plus 1 where ``U == 0`` (an empty ground truth predicted
empty is a perfect answer). Per validation sample (one image with its masks) the IoUs are
averaged and the mean is then counted ``n`` times, so the final

* gIoU = ``sum of per-mask foreground IoU / (number of masks + 1e-5)``;
* cIoU = ``sum of foreground I / (sum of foreground U + 1e-10)``.

:class:`SegMetrics` keeps the raw sums so that a distributed evaluator can add them across ranks
(:meth:`SegMetrics.all_reduce`) before reading the scores, as the original did.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

#: Ground-truth value of pixels that count for nothing.
IGNORE_INDEX = 255
#: Class index of the target in the binary masks.
FOREGROUND = 1


class IntersectionUnion(NamedTuple):
    """Pixel counts per class, each ``(num_classes,)`` int64 on the inputs' device."""

    intersection: torch.Tensor
    union: torch.Tensor
    target: torch.Tensor


def _as_tensor(value: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    raise ValueError(f"{name}: expected a torch.Tensor or numpy array, got {type(value).__name__}")


def _class_counts(values: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Histogram of the integer values in ``[0, num_classes - 1]`` (like ``torch.histc``)."""
    in_range = values[(values >= 0) & (values < num_classes)]
    return torch.bincount(in_range, minlength=num_classes)


def intersection_and_union(
    pred: torch.Tensor | np.ndarray,
    target: torch.Tensor | np.ndarray,
    num_classes: int = 2,
    ignore_index: int = IGNORE_INDEX,
) -> IntersectionUnion:
    """Per-class intersection, union and target area of one mask (original
    ``intersectionAndUnionGPU``).

    Pixels whose ``target`` is ``ignore_index`` are left out; so are values outside
    ``[0, num_classes - 1]``. The inputs are not modified.

    Args:
        pred: ``(H, W)`` class map (0/1 for binary masks; bool allowed).
        target: ``(H, W)`` ground truth, values in ``[0, num_classes - 1]`` or ``ignore_index``
            (uint8 0/1/255 for LISA).
        num_classes: number of classes ``K`` (>= 2).
        ignore_index: ground-truth value to ignore.

    Returns:
        :class:`IntersectionUnion` of ``(K,)`` int64 counts; ``union = area_pred + area_target -
        intersection``.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes: expected >= 2, got {num_classes}")
    pred_t = _as_tensor(pred, "pred")
    target_t = _as_tensor(target, "target")
    if pred_t.shape != target_t.shape:
        raise ValueError(
            f"pred {tuple(pred_t.shape)} and target {tuple(target_t.shape)} differ in shape"
        )
    output = pred_t.reshape(-1).to(torch.int64, copy=True)  # the caller's tensor stays intact
    labels = target_t.reshape(-1).to(device=output.device, dtype=torch.int64)
    output[labels == ignore_index] = ignore_index
    area_intersection = _class_counts(output[output == labels], num_classes)
    area_output = _class_counts(output, num_classes)
    area_target = _class_counts(labels, num_classes)
    area_union = area_output + area_target - area_intersection
    return IntersectionUnion(area_intersection, area_union, area_target)


def _binarize(pred: torch.Tensor) -> torch.Tensor:
    """Bool masks from bool masks, 0/1 integer masks, or logits (``logit > 0``)."""
    if pred.dtype == torch.bool:
        return pred
    if pred.is_floating_point():
        return pred > 0
    if bool(((pred != 0) & (pred != 1)).any()):
        raise ValueError("pred_masks: integer masks must hold only 0 and 1 (or pass logits)")
    return pred != 0


class SegMetrics:
    """Accumulates gIoU / cIoU over validation samples, as the original ``validate``.

    Counters are float64 on the CPU (the original summed in float32: the same results up to
    2**24 pixels per counter, and exact integer sums beyond). A sample with no masks adds
    nothing but ``num_samples``.

    Example::

        metrics = SegMetrics()
        for sample in loader:
            metrics.update(pred_logits, gt)  # (N, H, W) each
        metrics.all_reduce()  # no-op unless torch.distributed is initialised
        print(metrics.summary())
    """

    def __init__(self, num_classes: int = 2, ignore_index: int = IGNORE_INDEX) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes: expected >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        """Zero all counters."""
        num_classes = self.num_classes
        self.intersection = torch.zeros(num_classes, dtype=torch.float64)
        self.union = torch.zeros(num_classes, dtype=torch.float64)
        self.acc_iou = torch.zeros(num_classes, dtype=torch.float64)
        self.num_masks = 0
        self.num_samples = 0

    def update(
        self, pred_masks: torch.Tensor | np.ndarray, gt_masks: torch.Tensor | np.ndarray
    ) -> None:
        """Add one validation sample (one image and all its masks).

        Args:
            pred_masks: ``(N, H, W)`` bool masks, 0/1 integer masks, or float logits
                (foreground where ``logit > 0``; exactly 0 is background).
            gt_masks: ``(N, H, W)`` ground truth, 0/1 with ``ignore_index`` (255) to ignore.
        """
        pred = _binarize(_as_tensor(pred_masks, "pred_masks"))
        gt = _as_tensor(gt_masks, "gt_masks")
        if pred.ndim != 3 or pred.shape != gt.shape:
            raise ValueError(
                f"expected pred_masks and gt_masks of one shape (N, H, W), got "
                f"{tuple(pred.shape)} and {tuple(gt.shape)}"
            )
        self.num_samples += 1
        n = int(gt.shape[0])
        if n == 0:
            return
        intersection = torch.zeros(self.num_classes, dtype=torch.float32)
        union = torch.zeros(self.num_classes, dtype=torch.float32)
        acc_iou = torch.zeros(self.num_classes, dtype=torch.float32)
        for pred_i, gt_i in zip(pred, gt):
            counts = intersection_and_union(pred_i, gt_i, self.num_classes, self.ignore_index)
            inter_i = counts.intersection.cpu().to(torch.float32)
            union_i = counts.union.cpu().to(torch.float32)
            intersection += inter_i
            union += union_i
            acc_iou += inter_i / (union_i + 1e-5)
            acc_iou[union_i == 0] += 1.0  # empty target predicted empty
        # The original stores the per-sample mean and weights it by n (float32 both ways).
        acc_mean = acc_iou / n
        self.intersection += intersection.double()
        self.union += union.double()
        self.acc_iou += (acc_mean * n).double()
        self.num_masks += n

    @property
    def giou_per_class(self) -> torch.Tensor:
        """``(K,)`` float64 mean per-mask IoU of each class: ``sum IoU / (masks + 1e-5)``."""
        return self.acc_iou / (self.num_masks + 1e-5)

    @property
    def iou_per_class(self) -> torch.Tensor:
        """``(K,)`` float64 cumulative IoU of each class: ``sum I / (sum U + 1e-10)``."""
        return self.intersection / (self.union + 1e-10)

    @property
    def giou(self) -> float:
        """Mean foreground IoU over masks (gIoU)."""
        return float(self.giou_per_class[FOREGROUND])

    @property
    def ciou(self) -> float:
        """Cumulative foreground IoU (cIoU)."""
        return float(self.iou_per_class[FOREGROUND])

    def state(self) -> torch.Tensor:
        """Raw counters as one float64 vector.

        Layout: ``[intersection (K), union (K), acc_iou (K), num_masks, num_samples]``; adding the
        vectors of several accumulators gives the vector of their union.
        """
        counts = torch.tensor([self.num_masks, self.num_samples], dtype=torch.float64)
        return torch.cat([self.intersection, self.union, self.acc_iou, counts])

    def load_state(self, state: torch.Tensor) -> None:
        """Replace the counters by a vector laid out as :meth:`state`."""
        k = self.num_classes
        state = state.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        if state.numel() != 3 * k + 2:
            raise ValueError(
                f"state: expected {3 * k + 2} values for {k} classes, got {state.numel()}"
            )
        self.intersection = state[:k].clone()
        self.union = state[k : 2 * k].clone()
        self.acc_iou = state[2 * k : 3 * k].clone()
        self.num_masks = round(float(state[3 * k]))
        self.num_samples = round(float(state[3 * k + 1]))

    def merge(self, other: SegMetrics) -> None:
        """Add another accumulator's counters to this one."""
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError("cannot merge SegMetrics with different num_classes/ignore_index")
        self.load_state(self.state() + other.state())

    def all_reduce(self, group: dist.ProcessGroup | None = None) -> None:
        """Sum the counters over all ranks of ``group`` (in place).

        A no-op when ``torch.distributed`` is not available or not initialised. With the NCCL
        backend the vector travels on the current CUDA device.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        device = torch.device("cpu")
        if dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        total = self.state().to(device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        self.load_state(total)

    def summary(self) -> dict[str, float]:
        """``{"giou", "ciou", "num_masks", "num_samples"}`` as floats (for logging)."""
        return {
            "giou": self.giou,
            "ciou": self.ciou,
            "num_masks": float(self.num_masks),
            "num_samples": float(self.num_samples),
        }
