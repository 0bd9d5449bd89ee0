"""lisa-eval: the original's validation numbers on its own checkpoint, breakdowns, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from lisa_model.metrics import SegMetrics
from tests.conftest import REFERENCE_DIR
from training.evaluate import main

CKPT = REFERENCE_DIR / "lisa-tiny"


@pytest.fixture(scope="module")
def reason_seg_dir(tmp_path_factory):
    """The fixture's ReasonSeg-format val jsons, each beside a copy of its image."""
    root = tmp_path_factory.mktemp("reason_seg")
    (root / "val").mkdir()
    for json_path in sorted((REFERENCE_DIR / "inputs" / "reason_seg_val").glob("*.json")):
        shutil.copy(json_path, root / "val" / json_path.name)
        image = REFERENCE_DIR / "inputs" / f"{json_path.stem.split('_')[0]}.png"
        shutil.copy(image, root / "val" / f"{json_path.stem}.png")
    return root


def test_segment_path_reproduces_the_original_validation(reason_seg_dir, tmp_path, capsys):
    out = tmp_path / "report.json"
    code = main(["--model", str(CKPT), "--data", str(reason_seg_dir), "--split", "val",
                 "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    expected = json.loads((REFERENCE_DIR / "expected" / "val_single.json").read_text())["metrics"]
    assert report["overall"]["giou"] == pytest.approx(expected["giou"], abs=1e-6)
    assert report["overall"]["ciou"] == pytest.approx(expected["ciou"], abs=1e-6)
    assert report["path"] == "segment" and len(report["cases"]) == 9
    # short/long are the same computation restricted by is_sentence: recompute gIoU by hand.
    for part, flag in (("short", False), ("long", True)):
        ious = [c["iou"] for c in report["cases"] if c["is_sentence"] == flag]
        assert report[part]["num_masks"] == len(ious)
        assert report[part]["giou"] == pytest.approx(sum(ious) / (len(ious) + 1e-5), abs=1e-6)
    assert (tmp_path / "report_cases.png").is_file()
    printed = capsys.readouterr().out
    assert "overall" in printed and "short" in printed and "long" in printed


def test_generate_path_scores_union_of_generated_masks(reason_seg_dir, tmp_path):
    out = tmp_path / "gen.json"
    code = main(["--model", str(CKPT), "--data", str(reason_seg_dir), "--split", "val",
                 "--generate", "--max-new-tokens", "8", "--limit", "3", "--out", str(out),
                 "--no-progress"])  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    assert report["path"] == "generate" and len(report["cases"]) == 3
    assert all(isinstance(c["found"], bool) for c in report["cases"])


def test_ciou_is_sum_i_over_sum_u():
    """The metric the report uses, on a hand-computed toy case."""
    pred = np.zeros((2, 4, 4), bool)
    gt = np.zeros((2, 4, 4), np.uint8)
    pred[0, :2, :2] = True  # 4 px, gt 4 px overlapping 2 -> I 2, U 6
    gt[0, 1:3, :2] = 1
    gt[1, 0, 0] = 255  # all-empty second mask except one ignored pixel -> IoU 1, I 0, U 0
    m = SegMetrics()
    m.update(pred, gt)
    assert m.ciou == pytest.approx(2 / 6, abs=1e-9)
    assert m.giou == pytest.approx((2 / (6 + 1e-5) + 1.0) / (2 + 1e-5), abs=1e-7)


def test_bad_data_gives_one_clear_line(reason_seg_dir, tmp_path, capsys):
    assert main(["--model", str(CKPT), "--data", str(tmp_path / "none"), "--out",
                 str(tmp_path / "r.json")]) == 2  # fmt: skip
    assert "no such directory" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(reason_seg_dir, broken)
    (broken / "val" / "img0_q0_short.json").write_text("{ not json")
    assert main(["--model", str(CKPT), "--data", str(broken), "--out", str(tmp_path / "r.json"),
                 "--no-progress"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert "img0_q0_short.json" in err and len(err.splitlines()) == 1
    assert main(["--model", str(CKPT), "--data", str(reason_seg_dir), "--split", "test",
                 "--out", str(tmp_path / "r.json")]) == 2  # fmt: skip
    assert "no 'test' folder" in capsys.readouterr().err


def test_not_found_counts_by_hand():
    from training.evaluate import CaseResult, EvalReport, format_summary, not_found_counts

    def case(present: bool, found: bool, sentence: bool = False) -> CaseResult:
        return CaseResult(0, 0, "x.png", "t", sentence, 0.0, found=found, target_present=present)

    cases = [case(True, True), case(True, False), case(True, False, True), case(False, True),
             case(False, False, True)]  # fmt: skip
    counts = not_found_counts(cases)
    assert counts == {"present": 3, "missed": 2, "absent": 2, "false_found": 1}
    summary = {"giou": 0.5, "ciou": 0.25, "num_masks": 5}
    report = EvalReport("m", "d", "val", "generate", summary, summary, summary, 1.0, cases,
                        not_found={"overall": counts,
                                   "short": not_found_counts(c for c in cases[:2] + cases[3:4]),
                                   "long": not_found_counts([cases[2], cases[4]])})  # fmt: skip
    lines = format_summary(report).splitlines()
    assert lines[1].split() == ["gIoU", "cIoU", "queries", "missed", "false", "found"]
    assert lines[2].split() == ["overall", "0.5000", "0.2500", "5", "2/3", "1/2"]
    assert lines[3].split()[-2:] == ["1/2", "1/1"] and lines[4].split()[-2:] == ["1/1", "0/1"]


@pytest.mark.parametrize("generate", [False, True], ids=["segment", "generate"])
def test_eval_counts_not_found_on_present_and_absent_targets(
    reason_seg_dir, tmp_path, capsys, generate
):
    """One more image whose annotation has no target: an absent target. Its 'found' is an empty
    mask on the segment path (IoU 1 exactly when nothing was found) and no [SEG] when
    generating; a missed present target always scores IoU 0."""
    data = tmp_path / "data"
    shutil.copytree(reason_seg_dir, data)
    anno = json.loads((data / "val" / "img1_q0_short.json").read_text())
    (data / "val" / "aa_absent.json").write_text(json.dumps({**anno, "shapes": []}))
    shutil.copy(data / "val" / "img1_q0_short.png", data / "val" / "aa_absent.png")
    out = tmp_path / "report.json"
    argv = ["--model", str(CKPT), "--data", str(data), "--split", "val", "--out", str(out),
            "--limit", "4", "--no-progress"]  # fmt: skip
    if generate:
        argv += ["--generate", "--max-new-tokens", "8"]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    cases = report["cases"]
    absent = [c for c in cases if c["image_path"].endswith("aa_absent.png")]
    assert len(absent) == 1 and not absent[0]["target_present"]
    assert all(c["target_present"] for c in cases if c is not absent[0])
    if not generate:
        assert absent[0]["found"] == (absent[0]["iou"] == 0.0)
    assert all(c["iou"] == 0.0 for c in cases if c["target_present"] and not c["found"])
    counts = report["not_found"]["overall"]
    assert counts["present"] == len(cases) - 1 and counts["absent"] == 1
    assert counts["missed"] == sum(not c["found"] for c in cases if c["target_present"])
    assert counts["false_found"] == int(absent[0]["found"])
    assert set(report["not_found"]) == {"overall", "short", "long"}
    overall = next(
        line for line in capsys.readouterr().out.splitlines() if line.startswith("overall")
    )
    assert overall.split()[-2:] == [f"{counts['missed']}/{counts['present']}",
                                    f"{counts['false_found']}/1"]  # fmt: skip


def test_broken_checkpoint_is_one_error_line(reason_seg_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(CKPT, broken)
    shard = sorted(broken.glob("pytorch_model-*.bin"))[-1]
    shard.write_bytes(shard.read_bytes()[:5000])
    assert main(["--model", str(broken), "--data", str(reason_seg_dir), "--out",
                 str(tmp_path / "r.json"), "--no-progress"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"lisa-eval: error: --model: {shard}: truncated or corrupt")
