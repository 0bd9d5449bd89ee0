"""gIoU / cIoU against the original LISA's validation numbers (tests/fixtures/lisa_reference)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lisa_model.metrics import IntersectionUnion, SegMetrics, intersection_and_union

REPO_ROOT = Path(__file__).resolve().parents[2]
EXPECTED = REPO_ROOT / "tests" / "fixtures" / "lisa_reference" / "expected"
QUERIES = ("q0_short", "q1_long", "q2_explain")


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads((EXPECTED / "metrics.json").read_text())


@pytest.fixture(scope="module")
def samples(reference) -> list[tuple[np.ndarray, np.ndarray]]:
    """The 20 pairs grouped into validation samples: ``(pred_logits (N,H,W), gt (N,H,W))``."""
    with np.load(EXPECTED / "metrics.npz") as data:
        pairs = [(data[f"pair{i:02d}__pred_logits"], data[f"pair{i:02d}__gt"]) for i in range(20)]
    grouped = []
    start = 0
    for size in reference["groups"]:
        chunk = pairs[start : start + size]
        grouped.append((np.stack([p for p, _ in chunk]), np.stack([g for _, g in chunk])))
        start += size
    assert start == len(pairs)
    return grouped


def _histc_reference(pred: torch.Tensor, target: torch.Tensor, k: int, ignore: int):
    """The original algorithm, step by step with ``torch.histc`` (float counts)."""
    output = pred.reshape(-1).float().clone()
    target = target.reshape(-1).float()
    output[target == ignore] = ignore
    intersection = output[output == target]
    area_i = torch.histc(intersection, bins=k, min=0, max=k - 1)
    area_o = torch.histc(output, bins=k, min=0, max=k - 1)
    area_t = torch.histc(target, bins=k, min=0, max=k - 1)
    return area_i, area_o + area_t - area_i, area_t


# --- against the original's numbers -------------------------------------------------------------


def test_per_mask_counts_match_reference(reference, samples) -> None:
    for (logits, gt), expected in zip(samples, reference["result"]["per_sample"]):
        assert expected["n_masks"] == len(gt)
        for pred_i, gt_i, mask in zip(logits, gt, expected["per_mask"]):
            counts = intersection_and_union(pred_i > 0, gt_i)
            assert isinstance(counts, IntersectionUnion)
            assert counts.intersection.tolist() == mask["intersection"]
            assert counts.union.tolist() == mask["union"]


def test_per_sample_mean_iou_matches_reference(reference, samples) -> None:
    for (logits, gt), expected in zip(samples, reference["result"]["per_sample"]):
        single = SegMetrics()
        single.update(logits, gt)
        mean = (single.acc_iou / single.num_masks).tolist()
        assert mean == pytest.approx(expected["acc_iou_mean"], abs=1e-6)


def test_totals_and_scores_match_reference(reference, samples) -> None:
    result = reference["result"]
    metrics = SegMetrics()
    for logits, gt in samples:
        metrics.update(torch.from_numpy(logits), torch.from_numpy(gt))
    assert metrics.num_masks == result["count"] == 20
    assert metrics.num_samples == len(samples)
    assert metrics.intersection.tolist() == result["intersection_sum"]
    assert metrics.union.tolist() == result["union_sum"]
    assert metrics.acc_iou.tolist() == pytest.approx(result["acc_iou_sum"], abs=1e-6)
    assert metrics.giou_per_class.tolist() == pytest.approx(result["giou_both_classes"], abs=1e-6)
    assert metrics.iou_per_class.tolist() == pytest.approx(result["iou_class"], abs=1e-6)
    assert metrics.giou == pytest.approx(result["giou"], abs=1e-6)
    assert metrics.ciou == pytest.approx(result["ciou"], abs=1e-6)
    summary = metrics.summary()
    assert summary == {
        "giou": metrics.giou,
        "ciou": metrics.ciou,
        "num_masks": 20.0,
        "num_samples": 8.0,
    }


def test_validation_runs_match_reference() -> None:
    """The original's validation of the tiny model: one mask per sample, then 3 per image."""
    single = json.loads((EXPECTED / "val_single.json").read_text())
    batched = json.loads((EXPECTED / "val_batched.json").read_text())
    with np.load(EXPECTED / "val_single.npz") as data:
        arrays = {key: data[key] for key in data.files}
    with np.load(EXPECTED / "val_batched.npz") as data:
        batched_logits = {key: data[key] for key in data.files if key.endswith("pred_mask_logits")}

    metrics = SegMetrics()
    for sample in single["samples"]:
        key = sample["key"]
        metrics.update(arrays[f"{key}__pred_mask_logits"], arrays[f"{key}__gt_mask"])
    expected = single["metrics"]
    assert metrics.intersection.tolist() == expected["intersection_sum"]
    assert metrics.union.tolist() == expected["union_sum"]
    assert metrics.giou == pytest.approx(expected["giou"], abs=1e-6)
    assert metrics.ciou == pytest.approx(expected["ciou"], abs=1e-6)

    metrics = SegMetrics()
    for sample in batched["samples"]:
        image = sample["key"]
        gt = np.concatenate([arrays[f"{image}_{query}__gt_mask"] for query in QUERIES])
        metrics.update(batched_logits[f"{image}__pred_mask_logits"], gt)
    expected = batched["metrics"]
    assert metrics.num_masks == expected["count"] == 9
    assert metrics.intersection.tolist() == expected["intersection_sum"]
    assert metrics.union.tolist() == expected["union_sum"]
    assert metrics.acc_iou.tolist() == pytest.approx(expected["acc_iou_sum"], abs=1e-6)
    assert metrics.giou == pytest.approx(expected["giou"], abs=1e-6)
    assert metrics.ciou == pytest.approx(expected["ciou"], abs=1e-6)


# --- hand-made cases ----------------------------------------------------------------------------


def test_empty_target_predicted_empty_scores_one() -> None:
    metrics = SegMetrics()
    metrics.update(np.zeros((1, 6, 5), dtype=bool), np.zeros((1, 6, 5), dtype=np.uint8))
    counts = intersection_and_union(np.zeros((6, 5), bool), np.zeros((6, 5), np.uint8))
    assert counts.intersection.tolist() == [30, 0] and counts.union.tolist() == [30, 0]
    assert metrics.giou == pytest.approx(1 / (1 + 1e-5), abs=1e-12)
    assert metrics.ciou == 0.0  # 0 / (0 + 1e-10)


def test_empty_target_with_a_prediction_scores_zero() -> None:
    pred = np.zeros((1, 4, 4), dtype=bool)
    pred[0, 1, 1] = True
    metrics = SegMetrics()
    metrics.update(pred, np.zeros((1, 4, 4), dtype=np.uint8))
    assert metrics.giou == 0.0
    assert metrics.union.tolist() == [16.0, 1.0]


def test_ignored_pixels_count_for_nothing() -> None:
    gt = np.zeros((4, 4), dtype=np.uint8)
    gt[0, :2] = 1
    gt[3, :] = 255
    pred = np.zeros((4, 4), dtype=bool)
    pred[0, :2] = True
    pred[3, :] = True  # wrong only where ignored
    counts = intersection_and_union(pred, gt)
    assert counts.intersection.tolist() == [10, 2]
    assert counts.union.tolist() == [10, 2]
    assert counts.target.tolist() == [10, 2]
    metrics = SegMetrics()
    metrics.update(pred[None], gt[None])
    iou = np.float32(2) / (np.float32(2) + np.float32(1e-5))
    assert metrics.giou == pytest.approx(float(iou) / (1 + 1e-5), abs=1e-12)


def test_all_ignored_counts_as_perfect() -> None:
    gt = np.full((1, 5, 5), 255, dtype=np.uint8)
    pred = np.ones((1, 5, 5), dtype=bool)
    metrics = SegMetrics()
    metrics.update(pred, gt)
    assert metrics.union.tolist() == [0.0, 0.0]
    assert metrics.acc_iou.tolist() == [1.0, 1.0]


def test_logits_exactly_zero_are_background() -> None:
    logits = torch.zeros(1, 3, 3)
    logits[0, 0, 0] = 1e-7
    gt = torch.zeros(1, 3, 3, dtype=torch.uint8)
    gt[0, 0, :2] = 1
    metrics = SegMetrics()
    metrics.update(logits, gt)
    assert metrics.intersection.tolist() == [7.0, 1.0]
    assert metrics.union.tolist() == [8.0, 2.0]


def test_giou_weights_each_mask_once() -> None:
    """A sample's mean IoU is counted n times: gIoU is the mean over masks, not samples."""
    full = np.ones((1, 2, 2), dtype=np.uint8)
    half = np.array([[[1, 1], [0, 0]]], dtype=bool)
    metrics = SegMetrics()
    metrics.update(np.concatenate([full, full, full]).astype(bool), np.concatenate([full] * 3))
    metrics.update(half, full)
    one = float(np.float32(4) / np.float32(4 + 1e-5))
    half_iou = float(np.float32(2) / np.float32(4 + 1e-5))
    assert metrics.num_masks == 4
    assert metrics.giou == pytest.approx((3 * one + half_iou) / (4 + 1e-5), abs=1e-7)
    assert metrics.ciou == pytest.approx(14 / (16 + 1e-10), abs=1e-15)


def test_intersection_and_union_equals_histc_algorithm() -> None:
    generator = torch.Generator().manual_seed(5)
    for k in (2, 3, 5):
        pred = torch.randint(0, k, (37, 29), generator=generator)
        target = torch.randint(0, k, (37, 29), generator=generator)
        target[torch.rand(37, 29, generator=generator) < 0.2] = 255
        counts = intersection_and_union(pred, target, num_classes=k)
        expected = _histc_reference(pred, target, k, 255)
        for got, want in zip(counts, expected):
            assert got.dtype == torch.int64
            assert got.tolist() == want.long().tolist()


def test_inputs_are_not_modified() -> None:
    for dtype in (torch.int64, torch.uint8, torch.bool):
        pred = torch.ones(3, 3, dtype=dtype)
        target = torch.full((3, 3), 255, dtype=torch.uint8)
        intersection_and_union(pred, target)
        assert bool((pred == 1).all())
        assert bool((target == 255).all())


def test_numpy_and_torch_inputs_agree(samples) -> None:
    from_numpy, from_torch, from_bool = SegMetrics(), SegMetrics(), SegMetrics()
    for logits, gt in samples:
        from_numpy.update(logits, gt)
        from_torch.update(torch.from_numpy(logits), torch.from_numpy(gt))
        from_bool.update(torch.from_numpy(logits > 0), torch.from_numpy(gt))
    assert torch.equal(from_numpy.state(), from_torch.state())
    assert torch.equal(from_numpy.state(), from_bool.state())


def test_bad_inputs_raise() -> None:
    metrics = SegMetrics()
    with pytest.raises(ValueError, match="0 and 1"):
        metrics.update(torch.full((1, 2, 2), 2), torch.zeros(1, 2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(1, 2, 2\) and \(1, 2, 3\)"):
        metrics.update(torch.zeros(1, 2, 2), torch.zeros(1, 2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="differ in shape"):
        intersection_and_union(torch.zeros(2, 2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="num_classes"):
        SegMetrics(num_classes=1)
    assert metrics.num_samples == 0


def test_sample_without_masks_counts_only_the_sample() -> None:
    metrics = SegMetrics()
    metrics.update(torch.zeros(0, 4, 4), torch.zeros(0, 4, 4, dtype=torch.uint8))
    assert metrics.num_samples == 1 and metrics.num_masks == 0
    assert metrics.giou == 0.0 and metrics.ciou == 0.0


# --- combining accumulators ---------------------------------------------------------------------


def test_state_merge_and_reset(samples) -> None:
    whole = SegMetrics()
    first, second = SegMetrics(), SegMetrics()
    for index, (logits, gt) in enumerate(samples):
        whole.update(logits, gt)
        (first if index % 2 == 0 else second).update(logits, gt)
    state = whole.state()
    assert state.shape == (3 * 2 + 2,) and state.dtype == torch.float64
    first.merge(second)
    torch.testing.assert_close(first.state(), state, rtol=0, atol=1e-12)
    assert first.giou == pytest.approx(whole.giou, abs=1e-12)

    restored = SegMetrics()
    restored.load_state(state)
    assert torch.equal(restored.state(), state)
    assert restored.num_masks == 20 and restored.num_samples == 8

    whole.reset()
    assert not whole.state().any()
    with pytest.raises(ValueError, match="8 values"):
        restored.load_state(torch.zeros(5))
    with pytest.raises(ValueError, match="merge"):
        restored.merge(SegMetrics(num_classes=3))


def test_all_reduce_without_process_group_is_a_no_op(samples) -> None:
    assert not torch.distributed.is_initialized()
    metrics = SegMetrics()
    metrics.update(*samples[0])
    before = metrics.state()
    metrics.all_reduce()
    assert torch.equal(metrics.state(), before)


_RANK_SCRIPT = """
import json, sys
import numpy as np
import torch.distributed as dist
from lisa_model.metrics import SegMetrics

rank, world, store, npz, groups = int(sys.argv[1]), 2, sys.argv[2], sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world)
data = np.load(npz)
pairs = [(data[f"pair{i:02d}__pred_logits"], data[f"pair{i:02d}__gt"]) for i in range(20)]
metrics, start = SegMetrics(), 0
for index, size in enumerate(json.loads(groups)):
    chunk = pairs[start:start + size]
    start += size
    if index % world == rank:
        metrics.update(np.stack([p for p, _ in chunk]), np.stack([g for _, g in chunk]))
metrics.all_reduce()
print(json.dumps({"state": metrics.state().tolist(), "giou": metrics.giou, "ciou": metrics.ciou}))
dist.destroy_process_group()
"""


def test_all_reduce_over_two_gloo_ranks(tmp_path, reference, samples) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    args = [
        str(tmp_path / "store"),
        str(EXPECTED / "metrics.npz"),
        json.dumps(reference["groups"]),
    ]
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", _RANK_SCRIPT, str(rank), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = []
    for process in ranks:
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
        outputs.append(json.loads(stdout.strip().splitlines()[-1]))

    whole = SegMetrics()
    for logits, gt in samples:
        whole.update(logits, gt)
    for output in outputs:
        np.testing.assert_allclose(output["state"], whole.state().numpy(), rtol=0, atol=1e-12)
        assert output["giou"] == pytest.approx(reference["result"]["giou"], abs=1e-6)
        assert output["ciou"] == pytest.approx(reference["result"]["ciou"], abs=1e-6)
