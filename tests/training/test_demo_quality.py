"""The shipped demo model: it loads as every tool's default, and it finds the right objects.

The scenes are regenerated in memory from the data seed and scene settings recorded beside the
checkpoint (``demo.json``), so the test needs no data on disk. Test-split images were never seen
in training. Bounds sit below the numbers the README states for the whole test split.
"""

from __future__ import annotations

import json

import pytest

from lisa_model.demo import DEMO_MODEL_DIR, demo_model_dir
from training.demo_model.evaluation import DemoReport, evaluate_demo
from training.shapes.scene import ShapesConfig
from training.shapes.writer import write_dataset

#: Test-split images scored here (a fixed subset; the full split is 200 images).
SUBSET = 24
#: Lower bounds, below what the shipped model scores on this subset (fast path gIoU 0.80 / cIoU
#: 0.77, generation 0.66, present targets found 88%, absent targets "not found" 93%, present
#: targets of the absent queries' kinds found 60%) and on the whole split (README: test gIoU
#: 0.79 / cIoU 0.76 fast path); an untrained model scores about 0.04, "every object in the
#: scene" about 0.3, the previous shipped model (no sub-patch labels in the encoder warm-up,
#: 400 decoder steps, SAM's decoder trained in the lisa-train stage) 0.66 / 0.60 here. Issue 4's
#: targets are asserted: "not found" on >= 90% of absent targets here, gIoU and cIoU >= 0.75 on
#: the whole test split.
GIOU_BOUND = 0.7
CIOU_BOUND = 0.66
GENERATE_BOUND = 0.6
FOUND_BOUND = 0.8
ABSENT_BOUND = 0.9
MATCHED_FOUND_BOUND = 0.5
SEGMENT_TARGET = 0.75
#: Images of the held-out test split that ``make demo-model`` writes and
#: ``make demo-model-eval`` scores.
TEST_SPLIT = 200


def write_test_scenes(out, count: int) -> None:
    """The first ``count`` test-split images of the shipped model's data set, regenerated from
    the seed and scene settings recorded in its ``demo.json`` (image i of a split depends only
    on the seed, the split and i)."""
    recipe = json.loads((DEMO_MODEL_DIR / "demo.json").read_text())
    config = ShapesConfig(**recipe["data"]["config"])
    write_dataset(out, {"test": count}, seed=recipe["data"]["seed"], config=config)


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory) -> DemoReport:
    from lisa_model.checkpoint import load_lisa

    data = tmp_path_factory.mktemp("shapes")
    write_test_scenes(data, SUBSET)
    model = load_lisa(demo_model_dir())
    return evaluate_demo(model, data, "test", max_new_tokens=24)


def test_demo_model_is_the_default_and_small() -> None:
    assert demo_model_dir() == DEMO_MODEL_DIR
    size = sum(p.stat().st_size for p in DEMO_MODEL_DIR.rglob("*") if p.is_file())
    assert size < 32 * 2**20, f"{size / 2**20:.1f} MiB"
    config = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
    assert config["mm_vision_tower"]  # the bundled CLIP tower (224/14) is what it loads
    clip = json.loads((DEMO_MODEL_DIR / "vision_tower" / "config.json").read_text())
    assert (clip["image_size"], clip["patch_size"]) == (224, 14)


def test_demo_model_segments_held_out_scenes(demo_report: DemoReport) -> None:
    segment = demo_report.segment["overall"]
    assert segment["giou"] >= GIOU_BOUND and segment["ciou"] >= CIOU_BOUND, demo_report.segment
    assert demo_report.generate["giou"] >= GENERATE_BOUND, demo_report.generate


def test_demo_model_answers_present_targets_with_a_mask(demo_report: DemoReport) -> None:
    assert demo_report.present_found >= FOUND_BOUND


def test_demo_model_says_when_nothing_matches(demo_report: DemoReport) -> None:
    assert demo_report.absent_not_found["overall"] >= ABSENT_BOUND, demo_report.absent_not_found
    # ... and not by saying it to every question of those kinds (same concepts, objects there)
    matched = demo_report.present_found_matched
    assert matched["overall"] >= MATCHED_FOUND_BOUND, matched
    for answer in demo_report.examples:
        assert answer["answer"].strip(), answer


@pytest.fixture(scope="module")
def test_split_scores(tmp_path_factory) -> dict:
    """Issue 4's target as the README states it: ``lisa-eval`` on the held-out test split (all
    200 images of ``make demo-model``, regenerated from the recorded seed), fast path (about
    30 s). Returns the report's ``overall`` entry."""
    from training.evaluate import main as lisa_eval

    work = tmp_path_factory.mktemp("test_split")
    data = work / "Shapes"
    write_test_scenes(data, TEST_SPLIT)
    out = work / "eval_test.json"
    argv = ["--data", str(data), "--split", "test", "--out", str(out), "--no-progress"]
    assert lisa_eval(argv) == 0
    overall = json.loads(out.read_text())["overall"]
    assert overall["num_samples"] == TEST_SPLIT
    return overall


def test_demo_model_reaches_the_target_on_the_whole_test_split(test_split_scores: dict) -> None:
    giou, ciou = test_split_scores["giou"], test_split_scores["ciou"]
    assert giou >= SEGMENT_TARGET and ciou >= SEGMENT_TARGET, test_split_scores
