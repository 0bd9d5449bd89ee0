"""The shipped demo model: it loads as every tool's default, and it finds the right objects.

The scenes are regenerated in memory from the data seed and scene settings recorded beside the
checkpoint (``demo.json``), so the test needs no data on disk. Test-split images were never seen
in training. Bounds sit below the numbers the README states for the whole test split.
"""

from __future__ import annotations

import json

import pytest

from lisa_model.demo import DEMO_MODEL_DIR, demo_model_dir
from training import demo_model as D
from training import shapes as S

#: Test-split images scored here (a fixed subset; the full split is 200 images).
SUBSET = 24
#: Lower bounds, below what the shipped model scores on this subset (fast path gIoU 0.66 / cIoU
#: 0.60, generation 0.58, present targets found 88%, absent targets "not found" 97%, present
#: targets of the absent queries' kinds found 57%) and on the whole split (README: test gIoU
#: 0.69 / cIoU 0.68 fast path); an untrained model scores about 0.04, "every object in the
#: scene" about 0.3, the previous shipped model (three lisa-train stages, no decoder warm-up)
#: 0.64 / 0.59 here. Issue 4's "not found" target (>= 90% of absent targets) is asserted; its
#: gIoU and cIoU target (>= 0.75) is not reached yet: see the README's demo-model section.
GIOU_BOUND = 0.6
CIOU_BOUND = 0.55
GENERATE_BOUND = 0.52
FOUND_BOUND = 0.8
ABSENT_BOUND = 0.9
MATCHED_FOUND_BOUND = 0.5
SEGMENT_TARGET = 0.75


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory) -> D.DemoReport:
    from lisa_model.checkpoint import load_lisa

    recipe = json.loads((DEMO_MODEL_DIR / "demo.json").read_text())
    config = S.ShapesConfig(**recipe["data"]["config"])
    data = tmp_path_factory.mktemp("shapes")
    S.write_dataset(data, {"test": SUBSET}, seed=recipe["data"]["seed"], config=config)
    model = load_lisa(demo_model_dir())
    return D.evaluate_demo(model, data, "test", max_new_tokens=24)


def test_demo_model_is_the_default_and_small() -> None:
    assert demo_model_dir() == DEMO_MODEL_DIR
    size = sum(p.stat().st_size for p in DEMO_MODEL_DIR.rglob("*") if p.is_file())
    assert size < 32 * 2**20, f"{size / 2**20:.1f} MiB"
    config = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
    assert config["mm_vision_tower"]  # the bundled CLIP tower (224/14) is what it loads
    clip = json.loads((DEMO_MODEL_DIR / "vision_tower" / "config.json").read_text())
    assert (clip["image_size"], clip["patch_size"]) == (224, 14)


def test_demo_model_segments_held_out_scenes(demo_report: D.DemoReport) -> None:
    segment = demo_report.segment["overall"]
    assert segment["giou"] >= GIOU_BOUND and segment["ciou"] >= CIOU_BOUND, demo_report.segment
    assert demo_report.generate["giou"] >= GENERATE_BOUND, demo_report.generate


def test_demo_model_answers_present_targets_with_a_mask(demo_report: D.DemoReport) -> None:
    assert demo_report.present_found >= FOUND_BOUND


def test_demo_model_says_when_nothing_matches(demo_report: D.DemoReport) -> None:
    assert demo_report.absent_not_found["overall"] >= ABSENT_BOUND, demo_report.absent_not_found
    # ... and not by saying it to every question of those kinds (same concepts, objects there)
    matched = demo_report.present_found_matched
    assert matched["overall"] >= MATCHED_FOUND_BOUND, matched
    for answer in demo_report.examples:
        assert answer["answer"].strip(), answer


@pytest.mark.xfail(
    strict=True,
    reason="known gap (issue 4): the shipped demo model's test gIoU / cIoU are 0.69 / 0.68 "
    "(0.66 / 0.60 on this subset); the target is 0.75",
)
def test_demo_model_reaches_the_segmentation_target(demo_report: D.DemoReport) -> None:
    segment = demo_report.segment["overall"]
    assert segment["giou"] >= SEGMENT_TARGET and segment["ciou"] >= SEGMENT_TARGET, segment
