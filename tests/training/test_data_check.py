"""The data of a run checked before it trains (lisa-train --check-data, and every run), and bad
samples skipped during training up to data.max_bad_samples."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from tests.training.train_helpers import config_dict, make_shapes_data, make_test_checkpoint
from training import engine
from training.data.bad_samples import BadSampleLimitError, SkipBadSamples, worker_message
from training.data.check import check_training_data
from training.data.mixture import DataConfig
from training.data.types import DataFormatError
from training.train import main

REPO = Path(__file__).resolve().parents[2]
#: Set in this process by an earlier in-process run (a world of one); a new process picks its own.
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
TRAIN = Path("reason_seg") / "ReasonSeg" / "train"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """A ReasonSeg-layout shapes dataset: 4 train, 2 val images."""
    return make_shapes_data(tmp_path_factory.mktemp("data") / "data")


@pytest.fixture
def data(shapes, tmp_path) -> Path:
    """A copy to break."""
    shutil.copytree(shapes, tmp_path / "data")
    return tmp_path / "data"


def write_config(tmp_path: Path, data: Path, source: str = "no-model-needed", **data_keys) -> Path:
    cfg = config_dict(Path(source), data, tmp_path / "run")
    cfg["data"].update(data_keys)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def no_start(monkeypatch):
    """Fails the test if the process group (the first step of DeepSpeed's start) is reached."""

    def boom():
        raise AssertionError("training started although the data check failed")

    monkeypatch.setattr(engine, "init_distributed", boom)


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_check_data_summary(data, tmp_path, capsys):
    code, out, err = run(["--config", write_config(tmp_path, data), "--check-data"], capsys)
    assert code == 0, err
    last = out.strip().splitlines()[-1]
    assert last.startswith("data check: 2 datasets, 6 entries checked") and last.endswith("OK")
    assert f"{data / TRAIN}: 4 entries" in out and "val: 2 entries" in out


def _last_json(data: Path) -> Path:
    return sorted((data / TRAIN).glob("*.json"))[-1]


@pytest.mark.parametrize("check_only", [True, False], ids=["--check-data", "training run"])
def test_corrupt_annotation_stops_before_training(data, tmp_path, capsys, no_start, check_only):
    """The last annotation of the split, which a short run might never draw."""
    broken = _last_json(data)
    broken.write_text('{"text": ["the red one"], "is_sentence": false, "shapes": [')
    argv = ["--config", write_config(tmp_path, data)] + (["--check-data"] if check_only else [])
    code, _, err = run(argv, capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("lisa-train: error: ") and str(broken) in err and "not valid JSON" in err


@pytest.mark.parametrize(
    "breakage,expect",
    [
        ("image-missing", "no image for ReasonSeg annotation"),
        ("image-unreadable", "cannot read ReasonSeg image"),
        ("bad-points", "shapes[0].points"),
        ("val-annotation", "not valid JSON"),
    ],
)
def test_broken_entries_are_named(data, tmp_path, capsys, no_start, breakage, expect):
    json_path = _last_json(data)
    image = json_path.with_suffix(".jpg")
    culprit = json_path
    if breakage == "image-missing":
        image.unlink()
    elif breakage == "image-unreadable":
        image.write_bytes(b"not an image")
        culprit = image
    elif breakage == "bad-points":
        anno = json.loads(json_path.read_text())
        anno["shapes"][0]["points"] = [[1, 2, 3]]
        json_path.write_text(json.dumps(anno))
    else:
        culprit = sorted((data / "reason_seg" / "ReasonSeg" / "val").glob("*.json"))[0]
        culprit.write_text("{")
    code, _, err = run(["--config", write_config(tmp_path, data), "--check-data"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert str(culprit) in err and expect in err


def test_label_map_that_does_not_match_its_image(tmp_path):
    root = tmp_path / "data"
    images, labels = root / "ade20k/images/training", root / "ade20k/annotations/training"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for name, (h, w) in {"a": (20, 30), "b": (20, 30)}.items():
        cv2.imwrite(str(images / f"{name}.jpg"), np.full((h, w, 3), 90, np.uint8))
        cv2.imwrite(str(labels / f"{name}.png"), np.ones((h, w), np.uint8))
    cfg = DataConfig(str(root), datasets="sem_seg", sample_rates="1", sem_seg_data="ade20k")
    assert check_training_data(cfg).entries == 2
    cv2.imwrite(str(labels / "b.png"), np.ones((21, 30), np.uint8))
    with pytest.raises(DataFormatError, match=rf"label image {labels / 'b.png'} is 30x21 .*"
                       rf"{images / 'b.jpg'} is 30x20"):  # fmt: skip
        check_training_data(cfg)


def test_refer_and_vqa_entries(tmp_path):
    from tests.training.test_data_refer_seg import _coco_name, _ref, _write_refer

    root = tmp_path / "data"
    refer = root / "refer_seg"
    images = [{"id": i, "file_name": _coco_name(i), "height": 16, "width": 20} for i in (1, 2)]
    anns = [
        {"id": 10, "image_id": 1, "category_id": 1, "segmentation": [[1, 1, 5, 1, 5, 5]]},
        {"id": 11, "image_id": 2, "category_id": 1,
         "segmentation": {"size": [16, 20], "counts": "PP5"}},
    ]  # fmt: skip
    refs = [_ref(1, 10, 1, "train", ["a box"]), _ref(2, 11, 2, "train", ["crowd"])]
    _write_refer(
        refer, "refcoco", "unc", images, anns, refs, refer / "images/mscoco/images/train2014"
    )
    (root / "llava_dataset").mkdir(parents=True)
    (root / "coco" / "train2017").mkdir(parents=True)
    cv2.imwrite(str(root / "coco/train2017/x.jpg"), np.full((8, 8, 3), 50, np.uint8))
    turns = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A box."}]
    records = [{"image": "x.jpg", "conversations": turns}] * 2
    (root / "llava_dataset/llava_instruct_150k.json").write_text(json.dumps(records))
    cfg = DataConfig(str(root), datasets="refer_seg||vqa", sample_rates="1,1",
                     refer_seg_data="refcoco")  # fmt: skip
    report = check_training_data(cfg)
    assert [d.entries for d in report.datasets] == [2, 2]

    records[1] = {"image": "gone.jpg", "conversations": turns}
    (root / "llava_dataset/llava_instruct_150k.json").write_text(json.dumps(records))
    with pytest.raises(DataFormatError, match=r"image of .*llava_instruct_150k.json record 1 not"):
        check_training_data(cfg)
    records[1] = records[0]
    (root / "llava_dataset/llava_instruct_150k.json").write_text(json.dumps(records))

    anns[1]["segmentation"]["size"] = [16, 21]  # an RLE of another size than its image
    instances = refer / "refcoco" / "instances.json"
    instances.write_text(json.dumps({"images": images, "annotations": anns, "categories": []}))
    with pytest.raises(DataFormatError, match=r"instances.json annotation 11: the mask is 21x16"):
        check_training_data(cfg)
    anns[1]["segmentation"]["size"] = [16, 20]
    instances.write_text(json.dumps({"images": images, "annotations": anns, "categories": []}))
    refs.append(_ref(3, 99, 2, "train", ["nothing there"]))
    (refer / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs))
    with pytest.raises(DataFormatError, match=r"annotation id 99 \(image 2\) is not in"):
        check_training_data(cfg)


# --------------------------------------------------------------------------- during training
class _Flaky:
    """Items 1 and 2 cannot be read."""

    def __len__(self) -> int:
        return 5

    def __getitem__(self, idx: int):
        if idx in (1, 2):
            raise DataFormatError(f"cannot decode image /data/img{idx}.jpg: expected a JPEG")
        from training.data.types import Sample

        z = np.zeros((4, 4), np.uint8)
        return Sample(f"img{idx}", np.zeros((4, 4, 3), np.uint8), [[("<image>\nq", "a")]],
                      np.zeros((0, 4, 4), np.uint8), z, ["q"], False, "test")  # fmt: skip


def test_skip_bad_samples_replaces_and_reports():
    ds = SkipBadSamples(_Flaky(), max_bad=2)
    sample = ds[1]
    assert sample.image_path == "img3"
    assert sample.skipped == (
        "cannot decode image /data/img1.jpg: expected a JPEG",
        "cannot decode image /data/img2.jpg: expected a JPEG",
    )
    assert ds[0].skipped == () and len(ds) == 5
    with pytest.raises(BadSampleLimitError, match=r"2 bad samples, more than data.max_bad_sam"
                       r"ples = 1; the last: cannot decode image /data/img2.jpg"):  # fmt: skip
        SkipBadSamples(_Flaky(), max_bad=1)[1]


def test_worker_message_drops_the_workers_traceback():
    exc = BadSampleLimitError(
        "Caught BadSampleLimitError in DataLoader worker process 0.\nOriginal Traceback (most "
        'recent call last):\n  File "x.py", line 1, in f\n'
        "training.data.bad_samples.BadSampleLimitError: 3 bad samples, more than ...\n"
    )
    assert worker_message(exc) == "3 bad samples, more than ..."
    assert worker_message(DataFormatError("one line")) == "one line"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_test_checkpoint(tmp_path_factory.mktemp("model") / "ckpt")


def _unreadable_image(data: Path) -> Path:
    """The first training image replaced by a truncated PNG: its header (the size) reads, its
    pixels do not."""
    image = sorted((data / TRAIN).glob("*.jpg"))[0]
    h, w = cv2.imread(str(image)).shape[:2]
    ok, png = cv2.imencode(".png", np.random.default_rng(0).integers(0, 255, (h, w, 3), np.uint8))
    image.write_bytes(png.tobytes()[: png.size // 2])
    return image


def test_unreadable_images_are_skipped_and_counted(model, data, tmp_path, capsys):
    image = _unreadable_image(data)
    config = write_config(tmp_path, data, str(model), max_bad_samples=100)
    code, out, err = run(["--config", config], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    count = [r for r in records if r["kind"] == "train"][-1]["bad_samples"]
    assert count >= 1  # 8 draws from 4 images with this seed reach it
    assert f"; {count} bad samples skipped (the last: cannot decode image {image}" in out


def test_too_many_bad_samples_stop_the_run_naming_the_file(model, data, tmp_path):
    """In its own process (lisa-train's main starts the process group once per process)."""
    image = _unreadable_image(data)
    config = write_config(tmp_path, data, str(model), max_bad_samples=0)
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    proc = subprocess.run(
        [sys.executable, "-m", "training.train", "--config", str(config)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    # (OpenCV's libpng also reports the broken file on stderr: "libpng error: Read Error".)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lisa-train:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1 and errors[0].startswith("lisa-train: error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "more than data.max_bad_samples = 0" in errors[0]
    assert f"cannot decode image {image}" in errors[0]


def test_broken_checkpoint_is_one_error_line(model, data, tmp_path, capsys):
    """lisa-train with a truncated weights file: after the data check, one line naming it."""
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    weights = broken / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:5000])
    code, _, err = run(["--config", write_config(tmp_path, data, str(broken))], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"lisa-train: error: {weights}: truncated or corrupt")
