"""Mask losses against the original LISA's values (tests/fixtures/lisa_reference/expected)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lisa_model.losses import MaskLosses, dice_loss, mask_losses, sigmoid_ce_loss

EXPECTED = Path(__file__).resolve().parents[1] / "fixtures" / "lisa_reference" / "expected"


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads((EXPECTED / "losses.json").read_text())


@pytest.fixture(scope="module")
def arrays() -> dict[str, torch.Tensor]:
    with np.load(EXPECTED / "losses.npz") as data:
        return {key: torch.from_numpy(data[key]) for key in data.files}


def _case(arrays: dict[str, torch.Tensor], index: int) -> tuple[torch.Tensor, torch.Tensor]:
    return arrays[f"case{index}__logits"], arrays[f"case{index}__targets"]


def test_each_case_matches_reference(reference, arrays) -> None:
    assert len(reference["cases"]) == 7
    for case in reference["cases"]:
        logits, targets = _case(arrays, case["case"])
        assert list(logits.shape) == case["shape"]
        n = case["num_masks"]
        assert n == targets.shape[0]
        dice = dice_loss(logits, targets, n)
        bce = sigmoid_ce_loss(logits, targets, n)
        assert dice.dtype == torch.float32 and dice.ndim == 0
        assert float(dice) == pytest.approx(case["dice_loss"], abs=1e-6), case["case"]
        assert float(bce) == pytest.approx(case["sigmoid_ce_loss"], abs=1e-6), case["case"]


def test_aggregate_matches_reference(reference, arrays) -> None:
    aggregate = reference["aggregate"]
    pairs = [_case(arrays, i) for i in aggregate["images"]]
    losses = mask_losses(
        [logits for logits, _ in pairs],
        [targets for _, targets in pairs],
        bce_weight=aggregate["bce_loss_weight"],
        dice_weight=aggregate["dice_loss_weight"],
    )
    assert isinstance(losses, MaskLosses)
    assert losses.num_masks == sum(int(t.shape[0]) for _, t in pairs) == 6
    assert float(losses.bce) == pytest.approx(aggregate["mask_bce_loss"], abs=1e-6)
    assert float(losses.dice) == pytest.approx(aggregate["mask_dice_loss"], abs=1e-6)
    assert float(losses.total) == pytest.approx(aggregate["mask_loss"], abs=1e-6)


def test_default_weights_are_the_papers(arrays) -> None:
    logits, targets = _case(arrays, 1)
    default = mask_losses([logits], [targets])
    explicit = mask_losses([logits], [targets], bce_weight=2.0, dice_weight=0.5)
    assert float(default.total) == float(explicit.total)


def _dice_by_hand(logits: np.ndarray, targets: np.ndarray, n: int) -> float:
    total = 0.0
    for x, t in zip(logits.astype(np.float64), targets.astype(np.float64)):
        p = 1 / (1 + np.exp(-x))
        num = 2 * np.sum(p / 1000 * t)
        den = np.sum(p / 1000) + np.sum(t / 1000)
        total += 1 - (num + 1e-6) / (den + 1e-6)
    return total / (n + 1e-8)


def _bce_by_hand(logits: np.ndarray, targets: np.ndarray, n: int) -> float:
    x = logits.astype(np.float64)
    t = targets.astype(np.float64)
    per_pixel = np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))
    return float(per_pixel.reshape(len(x), -1).mean(1).sum() / (n + 1e-8))


def test_formulas_written_out() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 4, (3, 9, 7))
    targets = (rng.random((3, 9, 7)) > 0.6).astype(np.float64)
    x, t = torch.from_numpy(logits), torch.from_numpy(targets)
    for n in (3, 5):
        assert float(dice_loss(x, t, n)) == pytest.approx(_dice_by_hand(logits, targets, n), 1e-12)
        assert float(sigmoid_ce_loss(x, t, n)) == pytest.approx(
            _bce_by_hand(logits, targets, n), 1e-12
        )


def test_perfect_and_opposite_predictions() -> None:
    targets = torch.zeros(2, 8, 8)
    targets[:, 2:6, 2:6] = 1
    perfect = (targets * 2 - 1) * 50
    assert float(dice_loss(perfect, targets, 2)) == pytest.approx(0.0, abs=1e-5)
    assert float(sigmoid_ce_loss(perfect, targets, 2)) == pytest.approx(0.0, abs=1e-6)
    # Every pixel wrong: Dice ~1 per mask, BCE ~|logit| = 50 per pixel; both divided by 2.
    assert float(dice_loss(-perfect, targets, 2)) == pytest.approx(1.0, abs=1e-4)
    assert float(sigmoid_ce_loss(-perfect, targets, 2)) == pytest.approx(50.0, rel=1e-6)


def test_zero_mask_images_add_nothing(arrays) -> None:
    logits, targets = _case(arrays, 6)
    assert logits.shape[0] == 0
    assert float(dice_loss(logits, targets, 0)) == 0.0
    assert float(sigmoid_ce_loss(logits, targets, 0)) == 0.0
    only_empty = mask_losses([logits], [targets])
    assert only_empty.num_masks == 0
    assert float(only_empty.total) == 0.0
    with_empty = mask_losses([_case(arrays, 0)[0], logits], [_case(arrays, 0)[1], targets])
    without = mask_losses([_case(arrays, 0)[0]], [_case(arrays, 0)[1]])
    assert float(with_empty.total) == float(without.total)


def test_no_images_gives_zero() -> None:
    losses = mask_losses([], [])
    assert losses.num_masks == 0
    assert float(losses.bce) == float(losses.dice) == float(losses.total) == 0.0


def test_integer_and_bool_targets_are_cast(arrays) -> None:
    logits, targets = _case(arrays, 2)
    as_float = mask_losses([logits], [targets])
    as_bool = mask_losses([logits], [targets.bool()])
    as_uint8 = mask_losses([logits], [targets.to(torch.uint8)])
    assert float(as_bool.total) == float(as_float.total) == float(as_uint8.total)


def test_mask_count_mismatch_names_the_image() -> None:
    good = torch.zeros(1, 4, 4)
    with pytest.raises(ValueError) as info:
        mask_losses([good, torch.zeros(2, 4, 4)], [good, torch.zeros(3, 4, 4)])
    message = str(info.value)
    assert "image 1" in message and "2 predicted" in message and "3 ground-truth" in message


@pytest.mark.parametrize(
    ("pred", "gt", "words"),
    [
        ([torch.zeros(1, 4, 4)], [], ["1 images", "0"]),
        ([torch.zeros(1, 4, 4)], [torch.zeros(1, 4, 5)], ["image 0", "(1, 4, 5)"]),
        ([torch.zeros(4, 4)], [torch.zeros(4, 4)], ["image 0", "(n, H, W)"]),
    ],
)
def test_bad_shapes_raise(pred, gt, words) -> None:
    with pytest.raises(ValueError) as info:
        mask_losses(pred, gt)
    for word in words:
        assert word in str(info.value)


def test_single_loss_shape_checks() -> None:
    with pytest.raises(ValueError, match="targets"):
        dice_loss(torch.zeros(1, 4, 4), torch.zeros(1, 4, 3), 1)
    with pytest.raises(ValueError, match="logits"):
        sigmoid_ce_loss(torch.zeros(16), torch.zeros(16), 1)


def test_gradcheck() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    targets = (torch.rand(2, 5, 6, dtype=torch.float64, generator=generator) > 0.5).double()
    assert torch.autograd.gradcheck(lambda x: dice_loss(x, targets, 2), (logits,))
    assert torch.autograd.gradcheck(lambda x: sigmoid_ce_loss(x, targets, 2), (logits,))
    other = torch.randn(1, 3, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    other_gt = torch.ones(1, 3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, b: mask_losses([a, b], [targets, other_gt]).total, (logits, other)
    )


def test_backward_through_batch(arrays) -> None:
    preds = []
    gts = []
    for index in (0, 1, 6):
        logits, targets = _case(arrays, index)
        preds.append(logits.clone().requires_grad_(True))
        gts.append(targets)
    losses = mask_losses(preds, gts)
    losses.total.backward()
    for pred in preds:
        assert pred.grad is not None and pred.grad.shape == pred.shape
        assert torch.isfinite(pred.grad).all()
    assert preds[0].grad.abs().sum() > 0 and preds[1].grad.abs().sum() > 0
    assert preds[2].grad.numel() == 0
    assert not math.isnan(float(losses.total.detach()))
