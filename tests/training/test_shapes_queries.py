"""The shapes query-sidecar datasets: masks per [SEG], absent answers, mixes, validation items."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lisa_model.prompts import (
    ANSWER_LIST,
    EXPLANATORY_QUESTION_LIST,
    LONG_QUESTION_LIST,
    SEG_TOKEN,
    SHORT_QUESTION_LIST,
)
from training.data.reason_seg import ReasonSegValDataset
from training.data.types import DataFileNotFoundError, DataFormatError
from training.shapes.datasets import ShapesQueryDataset, ShapesQueryMix, ShapesValDataset
from training.shapes.records import ShapesQueriesFile
from training.shapes.writer import SIDECAR_FILE, Example, make_example, write_dataset

SEED = 3
N_TRAIN, N_VAL = 6, 3


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    write_dataset(out, {"train": N_TRAIN, "val": N_VAL}, seed=SEED)
    return out


def _example(split: str, index: int) -> Example:
    return make_example(SEED, split, index)


def _visible(split: str, index: int, object_id: int) -> np.ndarray:
    return _example(split, index).scene.objects[object_id].visible.astype(np.uint8)


def _all_question_forms(text: str, is_sentence: bool) -> set[str]:
    if is_sentence:
        forms = {q.format(sent=text) for q in LONG_QUESTION_LIST}
    else:
        forms = {q.format(class_name=text.lower()) for q in SHORT_QUESTION_LIST}
    return forms | {"<image>\n" + text + " " + e for e in EXPLANATORY_QUESTION_LIST}


def test_samples_have_one_mask_per_seg_from_the_generator(data_dir: Path) -> None:
    ds = ShapesQueryDataset(data_dir, "train", seed=1, num_queries_per_image=4)
    assert len(ds) == N_TRAIN
    for idx in range(len(ds)):
        sample = ds[idx]  # validate() ran: [SEG] count == masks
        ex = _example("train", idx)
        assert sample.image.shape == ex.image.shape
        assert sample.masks.shape[0] == sample.num_seg_tokens
        assert not sample.label.any()
        by_text = {t: q for q in ex.queries for t in q.texts}
        k = 0
        for (question, answer), text in zip(
            (c[0] for c in sample.conversations), sample.texts, strict=True
        ):
            query = by_text[text]
            assert question in _all_question_forms(text, query.is_sentence)
            n_seg = answer.count(SEG_TOKEN)
            if query.kind == "absent":
                assert n_seg == 0
                assert answer.startswith(query.answer)
                continue
            masks = sample.masks[k : k + n_seg]
            k += n_seg
            if n_seg == 1 and len(query.target_ids) > 1:  # plain answer: the union
                union = np.zeros_like(masks[0])
                for t in query.target_ids:
                    union |= _visible("train", idx, t)
                np.testing.assert_array_equal(masks[0], union)
            else:  # the query's own answer: one mask per target, in [SEG] order
                assert n_seg == len(query.target_ids)
                for mask, t in zip(masks, query.target_ids, strict=True):
                    np.testing.assert_array_equal(mask, _visible("train", idx, t))
        assert k == sample.masks.shape[0]


def test_object_masks_are_rasterised_once_per_record(data_dir: Path) -> None:
    file = ShapesQueriesFile(data_dir / "train" / SIDECAR_FILE)
    record = file.record(1)
    for k in range(len(record.objects)):
        mask = record.object_mask(k)
        assert record.object_mask(k) is mask  # kept, not drawn again
        np.testing.assert_array_equal(mask, _visible("train", 1, k))
        with pytest.raises(ValueError, match="read-only"):
            mask[0, 0] = 1  # a caller cannot spoil the kept mask for the next one
        fresh = file.record(1).object_mask(k)
        assert fresh is not mask
        np.testing.assert_array_equal(fresh, mask)


def test_items_are_seeded_and_epochs_draw_afresh(data_dir: Path) -> None:
    a = ShapesQueryDataset(data_dir, "train", seed=5)
    b = ShapesQueryDataset(data_dir, "train", seed=5)
    for idx in range(len(a)):
        assert a[idx].conversations == b[idx].conversations
        np.testing.assert_array_equal(a[idx].masks, b[idx].masks)
    before = [a[i].conversations for i in range(len(a))]
    a.set_epoch(1)
    assert [a[i].conversations for i in range(len(a))] != before
    c = ShapesQueryDataset(data_dir, "train", seed=6)
    assert [c[i].conversations for i in range(len(c))] != before


def test_mix_absent_only(data_dir: Path) -> None:
    mix = ShapesQueryMix(absent=1.0, explain=0.0)
    ds = ShapesQueryDataset(data_dir, "train", num_queries_per_image=1, mix=mix)
    for idx in range(len(ds)):
        sample = ds[idx]
        (question, answer) = sample.conversations[0][0]
        assert SEG_TOKEN not in answer and sample.masks.shape[0] == 0
        absent = {q.answer for q in _example("train", idx).queries if q.kind == "absent"}
        assert answer in absent


def test_mix_plain_answers_and_explanations(data_dir: Path) -> None:
    mix = ShapesQueryMix(absent=0.0, plain_answer=1.0, explain=1.0)
    ds = ShapesQueryDataset(data_dir, "train", num_queries_per_image=3, mix=mix)
    for idx in range(len(ds)):
        sample = ds[idx]
        assert sample.masks.shape[0] == len(sample.conversations)  # one union mask each
        ex = _example("train", idx)
        by_text = {t: q for q in ex.queries for t in q.texts}
        for (question, answer), text in zip(
            (c[0] for c in sample.conversations), sample.texts, strict=True
        ):
            query = by_text[text]
            assert query.kind != "absent"
            assert question.startswith("<image>\n" + text + " ")
            assert question.endswith(EXPLANATORY_QUESTION_LIST)
            plain, _, rest = answer.partition(" " + query.explanation)
            assert plain in ANSWER_LIST and rest == ""


def test_present_weights_pick_the_group(data_dir: Path) -> None:
    mix = ShapesQueryMix(absent=0.0, present_weights=(0.0, 0.0, 1.0), explain=0.0)
    ds = ShapesQueryDataset(data_dir, "train", num_queries_per_image=1, mix=mix)
    for idx in range(len(ds)):
        ex = _example("train", idx)
        query = {t: q for q in ex.queries for t in q.texts}[ds[idx].texts[0]]
        has_sentences = any(q.kind == "reasoning" and q.is_sentence for q in ex.queries)
        assert query.is_sentence == has_sentences


def test_more_queries_than_an_image_has(data_dir: Path) -> None:
    record = ShapesQueriesFile(data_dir / "train" / "queries.jsonl").record(0)
    ds = ShapesQueryDataset(data_dir, "train", num_queries_per_image=10_000)
    sample = ds[0]
    assert len(sample.conversations) == len(record.queries)
    assert len(set(sample.texts)) == len(record.queries)


def test_val_dataset_json_only_equals_reason_seg_val(data_dir: Path) -> None:
    ours = ShapesValDataset(data_dir, "val", json_only=True)
    theirs = ReasonSegValDataset(data_dir, "val")
    assert len(ours) == len(theirs) == N_VAL
    for i in range(N_VAL):
        a, b = ours[i], theirs[i]
        assert a.conversations == b.conversations
        np.testing.assert_array_equal(a.masks, b.masks)
        assert a.is_sentence == b.is_sentence
        assert ours.query(i).kind in ("explicit", "reasoning")


def test_val_dataset_all_queries_and_absent(data_dir: Path) -> None:
    present = ShapesValDataset(data_dir, "val")
    absent = ShapesValDataset(data_dir, "val", kinds=("absent",))
    examples = [_example("val", i) for i in range(N_VAL)]
    assert len(present) == sum(q.kind != "absent" for ex in examples for q in ex.queries)
    assert len(absent) == sum(q.kind == "absent" for ex in examples for q in ex.queries)
    for i in range(len(present)):
        sample, query = present[i], present.query(i)
        assert sample.conversations[0][0][1] == "[SEG]."
        union = np.zeros_like(sample.label)
        for t in query.target_ids:
            union |= _visible("val", present.items[i][0], t)
        np.testing.assert_array_equal(sample.masks, union[None])
    for i in range(len(absent)):
        sample = absent[i]
        assert sample.masks.shape[0] == 0
        assert sample.conversations[0][0][1] == absent.query(i).answer
    with pytest.raises(ValueError, match="kinds"):
        ShapesValDataset(data_dir, "val", kinds=("nonsense",))


def test_val_dataset_selects_images_and_concepts(data_dir: Path) -> None:
    full = ShapesValDataset(data_dir, "val")
    concept = full.query(0).concept
    some = ShapesValDataset(data_dir, "val", max_images=1, concepts={concept})
    expected = [
        (it, full.query(k))
        for k, it in enumerate(full.items)
        if it[0] < 1 and full.query(k).concept == concept
    ]
    assert len(some) == len(expected) >= 1
    for k, (item, query) in enumerate(expected):
        assert some.items[k] == item and some.query(k) == query  # query() follows the selection
        assert some[k].texts == [query.texts[0].strip()]
    assert len(ShapesValDataset(data_dir, "val", max_images=0)) == 0


def test_errors_name_the_file(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataFileNotFoundError, match="split directory"):
        ShapesQueryDataset(tmp_path, "train")
    (tmp_path / "train").mkdir()
    with pytest.raises(DataFileNotFoundError, match="queries.jsonl"):
        ShapesQueryDataset(tmp_path, "train")
    lines = (data_dir / "train" / "queries.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    record["queries"][0]["answer"] = "no seg here"
    (tmp_path / "train" / "queries.jsonl").write_text(json.dumps(record) + "\n{oops\n")
    f = ShapesQueriesFile(tmp_path / "train" / "queries.jsonl")
    assert len(f) == 2
    with pytest.raises(DataFormatError, match=r"queries.jsonl line 1 queries\[0\]: the answer"):
        f.record(0)
    with pytest.raises(DataFormatError, match="line 2: not valid JSON"):
        f.record(1)
    with pytest.raises(IndexError):
        f.record(2)
    with pytest.raises(ValueError, match="absent"):
        ShapesQueryMix(absent=1.5)
    with pytest.raises(ValueError, match="present_weights"):
        ShapesQueryMix(present_weights=(0.0, 0.0, 0.0))


@pytest.mark.parametrize("style", ["segment", "concept", "terse"])
def test_answer_styles_restate_the_query_not_the_scene(data_dir: Path, style: str) -> None:
    from training.shapes.datasets import concept_answer, terse_answer

    mix = ShapesQueryMix(absent=0.0, plain_answer=0.0, explain=0.0, **{f"{style}_answer": 1.0})
    ds = ShapesQueryDataset(data_dir, "train", num_queries_per_image=4, mix=mix)
    record_file = ShapesQueriesFile(data_dir / "train" / "queries.jsonl")
    for idx in range(len(ds)):
        sample, record = ds[idx], record_file.record(idx)
        by_text = {t: q for q in record.queries for t in q.texts}
        for k, (conv, text) in enumerate(zip(sample.conversations, sample.texts, strict=True)):
            query, answer = by_text[text], conv[0][1]
            expected = {
                "segment": "[SEG].",
                "concept": concept_answer(record, query),
                "terse": terse_answer(record, query),
            }[style]
            assert answer == expected
            # One union mask per conversation, whatever the number of targets.
            np.testing.assert_array_equal(sample.masks[k], record.union_mask(query.target_ids))
    # Concepts come from the words: "the colour of grass" is green whatever the scene holds.
    record = record_file.record(0)
    checked = 0
    for query in record.queries:
        if query.concept == "colour_knowledge" and query.target_ids:
            checked += 1
            colour = record.objects[query.target_ids[0]].colour
            assert concept_answer(record, query) in (
                f"It is the {colour} one [SEG].",
                f"They are the {colour} ones [SEG].",
            )
    assert checked


def test_draw_turns_are_the_samples_conversations(data_dir: Path) -> None:
    """The image-free draw (the demo's language warm-up reads it) is what a sample holds."""
    from training.data.types import item_rng

    mix = ShapesQueryMix(absent=0.3, segment_answer=0.3, plain_answer=0.2, terse_answer=0.3)
    ds = ShapesQueryDataset(data_dir, "train", seed=3, num_queries_per_image=3, mix=mix)
    for idx in range(len(ds)):
        sample = ds[idx]
        turns = ds.draw_turns(ds.file.record(idx), item_rng(3, idx, 0))
        assert [[(t.question, t.answer)] for t in turns] == sample.conversations
        assert [t.text for t in turns] == sample.texts
        assert turns[0].is_sentence == sample.is_sentence
        assert sum(len(t.masks) for t in turns) == len(sample.masks)
        for t in turns:
            assert t.answer.count(SEG_TOKEN) == len(t.masks)
