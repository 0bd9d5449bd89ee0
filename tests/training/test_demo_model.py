"""The demo model's starting point: tokenizer on the shapes vocabulary, initial checkpoint,
trainable encoders, and the size budget of the demo spec."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lisa_model.builders import ModelSpec, build_lisa
from lisa_model.checkpoint import load_lisa
from lisa_model.prompts import IMAGE_TOKEN_INDEX, SEG_TOKEN
from lisa_model.sam import SamGeometry
from training.collate import Collator, pad_right
from training.demo_model.cli import main as demo_model_main
from training.demo_model.evaluation import evaluate_demo
from training.demo_model.language import (
    LanguageWarmup,
    center_seg_projector_,
    shared_prefix_lm_loss,
    warm_up_language,
    warmup_conversations,
)
from training.demo_model.recipe import (
    DEMO_SPEC,
    build_initial_demo_checkpoint,
    scale_for_scratch_training_,
)
from training.demo_model.sam_decoder import (
    ConceptPrompts,
    DecoderWarmup,
    concept_key,
    fit_seg_projector_,
    read_decoder_data,
    seg_states,
    warm_up_sam_decoder,
)
from training.demo_model.sam_encoder import (
    RELATIONS,
    EncoderWarmup,
    foreground_coverage,
    object_coverage,
    patch_labels,
    patch_owners,
    relation_flags,
    warm_up_sam_encoder,
)
from training.demo_model.tokenizer import (
    DEMO_VOCAB_SIZE,
    TEMPLATE_REPEATS,
    demo_corpus,
    train_demo_tokenizer,
)
from training.shapes.datasets import ShapesQueryDataset, ShapesQueryMix, ShapesValDataset
from training.shapes.records import ShapesQueriesFile
from training.shapes.scene import ShapesConfig
from training.shapes.vocabulary import COLOURS, SHAPES
from training.shapes.writer import write_dataset

VOCAB = 600  # what a 3-image data set supports (the demo uses DEMO_VOCAB_SIZE)
SMALL_SPEC = ModelSpec(
    clip_patch_size=28,
    sam=SamGeometry(
        img_size=256, embed_dim=32, depth=1, num_heads=2, window_size=8, global_attn_indexes=(0,)
    ),
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    write_dataset(out, {"train": 3, "val": 1}, seed=0)
    return out


@pytest.fixture(scope="module")
def initial_checkpoint(data_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "init"
    warmup = LanguageWarmup(steps=3, batch_size=2, warmup_steps=1, log_every=1)
    encoder_warmup = EncoderWarmup(steps=2, batch_size=2, warmup_steps=1, log_every=1)
    decoder_warmup = DecoderWarmup(
        steps=2, batch_size=2, warmup_steps=1, log_every=1, fit_samples=4
    )
    return build_initial_demo_checkpoint(
        out,
        data_dir,
        spec=SMALL_SPEC,
        vocab_size=VOCAB,
        warmup=warmup,
        encoder_warmup=encoder_warmup,
        decoder_warmup=decoder_warmup,
        progress=False,
    )


def test_tokenizer_is_trained_on_the_data(data_dir: Path) -> None:
    tokenizer = train_demo_tokenizer(data_dir, VOCAB)
    again = train_demo_tokenizer(data_dir, VOCAB)
    assert len(tokenizer) == VOCAB + 4
    assert tokenizer.seg_token_id == VOCAB + 3  # LISA-7B-v1 order: [SEG] is the last token
    sidecar = ShapesQueriesFile(data_dir / "train" / "queries.jsonl")
    for query in sidecar.record(0).queries:
        for text in (*query.texts, query.answer, query.explanation):
            pieces = tokenizer.tokenize(text)
            # Every character of the data is a piece of its own or better: no byte fallback.
            assert not [p for p in pieces if p.startswith("<0x")], (text, pieces)
            assert tokenizer.encode(text) == again.encode(text)
    assert tokenizer.encode("Sure, it is the red circle [SEG].").count(tokenizer.seg_token_id) == 1
    # Template words are whole pieces: the system prompt is short in tokens.
    assert len(tokenizer.tokenize("A chat between a curious human")) <= 6


def test_corpus_starts_with_the_templates(data_dir: Path) -> None:
    corpus = list(demo_corpus(data_dir))
    assert corpus[0].startswith("A chat between a curious human")
    assert sum(c.startswith("Please output segmentation mask") for c in corpus) >= TEMPLATE_REPEATS
    texts = {
        t
        for q in ShapesQueriesFile(data_dir / "train" / "queries.jsonl").record(2).queries
        for t in q.texts
    }
    assert texts <= set(corpus)


def test_initial_checkpoint_loads_and_every_part_trains(
    initial_checkpoint: Path, data_dir: Path
) -> None:
    model = load_lisa(initial_checkpoint)
    assert model.sam_image_size == 256 and model.num_image_tokens == 64
    assert len(model.tokenizer) == VOCAB + 4
    assert model.train_encoders is False  # the paper's default
    mix = ShapesQueryMix(absent=0.3)
    samples = [ShapesQueryDataset(data_dir, "train", mix=mix)[i] for i in range(3)]
    collate = Collator(
        model.tokenizer, num_image_tokens=model.num_image_tokens, sam_image_size=256
    )
    batch = collate(samples)

    def grads(train_encoders: bool) -> dict[str, torch.Tensor | None]:
        model.zero_grad(set_to_none=True)
        model.requires_grad_(True)
        model.train_encoders = train_encoders
        out = model(
            batch.images_clip, batch.images_sam, batch.input_ids, batch.offsets,
            batch.resize_sizes, batch.original_sizes, batch.attention_mask, batch.labels,
            batch.gt_masks,
        )  # fmt: skip
        assert torch.isfinite(out.loss)
        out.loss.backward()
        return {
            "sam_encoder": model.sam.image_encoder.patch_embed.proj.weight.grad,
            "clip": model.vision_tower.embeddings.patch_embedding.weight.grad,
            "mm_projector": model.mm_projector.weight.grad,
            "mask_decoder": model.sam.mask_decoder.iou_token.weight.grad,
            "llm": model.llm.model.layers[0].self_attn.q_proj.weight.grad,
        }

    frozen = grads(False)
    assert frozen["sam_encoder"] is None and frozen["clip"] is None
    assert frozen["mm_projector"] is None
    assert frozen["llm"] is not None and frozen["llm"].abs().sum() > 0
    trained = grads(True)
    for name, grad in trained.items():
        if name != "mask_decoder":  # the IoU token feeds only the unused IoU head
            assert grad is not None and grad.abs().sum() > 0, name


def test_images_without_any_seg_go_through_forward(initial_checkpoint: Path, data_dir) -> None:
    model = load_lisa(initial_checkpoint)
    mix = ShapesQueryMix(absent=1.0)  # every answer says "There is no ..."
    samples = [ShapesQueryDataset(data_dir, "train", mix=mix)[i] for i in range(2)]
    assert all(s.masks.shape[0] == 0 for s in samples)
    collate = Collator(model.tokenizer, num_image_tokens=64, sam_image_size=256)
    batch = collate(samples)
    assert SEG_TOKEN not in " ".join(batch.conversations)
    out = model(
        batch.images_clip, batch.images_sam, batch.input_ids, batch.offsets,
        batch.resize_sizes, batch.original_sizes, batch.attention_mask, batch.labels,
        batch.gt_masks,
    )  # fmt: skip
    assert [tuple(p.shape) for p in out.pred_masks] == [(0, *s.original_size) for s in samples]
    assert torch.isfinite(out.loss) and float(out.mask_bce_loss) == 0.0


def _stored_bytes(model: torch.nn.Module) -> int:
    """Bytes of the published layout: the LLM and mm_projector in bf16, SAM, the [SEG]
    projector and the bundled CLIP tower in float32."""
    total = 0
    for name, p in model.state_dict().items():
        if not p.is_floating_point():
            continue
        fp32 = name.startswith(("sam.", "seg_projector.", "vision_tower."))
        total += p.numel() * (4 if fp32 else 2)
    return total


def test_demo_spec_fits_the_size_budget() -> None:
    class Vocabulary:  # build_lisa needs only the vocabulary size
        def __len__(self) -> int:
            return DEMO_VOCAB_SIZE + 4

    model = build_lisa(DEMO_SPEC, Vocabulary())
    assert _stored_bytes(model) < 30 * 2**20
    assert model.sam_image_size < 1024


def test_cli_reports_a_missing_data_set(tmp_path: Path, capsys) -> None:
    assert (
        demo_model_main(["init", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
        == 2
    )
    assert "queries.jsonl" in capsys.readouterr().err


def test_evaluate_reports_every_number(initial_checkpoint: Path, data_dir: Path) -> None:
    model = load_lisa(initial_checkpoint)
    report = evaluate_demo(model, data_dir, "val", max_new_tokens=4)
    record = ShapesQueriesFile(data_dir / "val" / "queries.jsonl").record(0)
    n_absent = sum(q.kind == "absent" for q in record.queries)
    assert report.counts["segment overall"] == 1 and report.counts["absent overall"] == n_absent
    json_query = record.queries[record.json_query]
    kind = "long" if json_query.is_sentence else "short"
    assert set(report.segment) == {"overall", kind, json_query.group}
    assert 0.0 <= report.segment["overall"]["giou"] <= 1.0
    assert 0.0 <= report.absent_not_found["overall"] <= 1.0
    assert report.present_found in (0.0, 1.0)
    assert set(report.generate) == {"giou", "ciou"}
    absent_concepts = {q.concept for q in record.queries if q.kind == "absent"}
    matched = [q for q in record.queries if q.target_ids and q.concept in absent_concepts]
    assert matched, "the fixture scene should have present queries of an absent-capable kind"
    assert report.counts["present matched overall"] == len(matched)
    assert 0.0 <= report.present_found_matched["overall"] <= 1.0


def test_evaluate_counts_a_model_that_never_finds_anything_as_such(
    initial_checkpoint: Path, data_dir: Path, monkeypatch
) -> None:
    """Answering "not found" to everything scores 1 on absent targets, so the report also
    asks the same kinds of question about objects that are there: 0 found."""
    import dataclasses

    from lisa_model.predictor import LisaPredictor

    real = LisaPredictor.predict

    def never_found(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        return dataclasses.replace(
            result, masks=result.masks[:0], logits=result.logits[:0], text="There is none."
        )

    monkeypatch.setattr(LisaPredictor, "predict", never_found)
    report = evaluate_demo(load_lisa(initial_checkpoint), data_dir, "val", max_new_tokens=4)
    assert report.absent_not_found["overall"] == 1.0
    assert report.present_found == 0.0
    assert report.present_found_matched["overall"] == 0.0


def test_short_training_on_shapes_improves_giou(tmp_path: Path) -> None:
    """lisa-train's engine, the demo recipe's settings (shapes queries, everything trained, no
    LoRA), a few dozen steps: the teacher-forced gIoU on held-out images goes up."""
    from tests.training.train_helpers import train_config
    from training.collate import Collator
    from training.data.mixture import build_val_dataset
    from training.engine import Trainer, validate

    small = ShapesConfig(min_side=64, max_side=96, min_radius_px=6, min_visible_px=30)
    data = tmp_path / "data"
    write_dataset(data / "reason_seg" / "Shapes", {"train": 6, "val": 4}, seed=1, config=small)
    init = build_initial_demo_checkpoint(
        tmp_path / "init",
        data / "reason_seg" / "Shapes",
        spec=SMALL_SPEC,
        vocab_size=VOCAB,
        warmup=LanguageWarmup(steps=0),
        encoder_warmup=EncoderWarmup(steps=0),
        decoder_warmup=DecoderWarmup(steps=0),  # untrained: what lisa-train alone does
    )
    cfg = train_config(
        init,
        data,
        tmp_path / "run",
        data={
            "datasets": "shapes",
            "shapes_data": "Shapes|train",
            "shapes_answers": [0.5, 0.0, 0.25, 0.25],
            "num_classes_per_sample": 2,
        },
        val={"dataset": "Shapes|val"},
        train={
            "lora": False,
            "vision_tower": True,
            "mm_projector": True,
            "sam_encoder": True,
            "sam_prompt_encoder": True,
        },
        optim={"lr": 1e-3, "warmup_steps": 5, "steps_per_epoch": 100},
    )
    model = load_lisa(init)
    val = build_val_dataset(data, "Shapes|val")
    collate = Collator(
        model.tokenizer, num_image_tokens=model.num_image_tokens, inference=True,
        sam_image_size=model.sam_image_size,
    )  # fmt: skip
    before = validate(model, [collate([val[i] for i in range(len(val))])], "cpu").summary()
    trainer = Trainer(cfg)
    result = trainer.fit()
    trainer.close()
    after = result.validations[-1]
    assert after.giou > before["giou"] + 0.1, (before, after)


def test_warmup_conversations_label_only_the_answer(data_dir: Path) -> None:
    tokenizer = train_demo_tokenizer(data_dir, VOCAB)
    model = build_lisa(SMALL_SPEC, tokenizer)
    cfg = LanguageWarmup(absent=0.5, answers=(0.5, 0.0, 0.0, 0.5))
    pairs = warmup_conversations(model, data_dir, cfg)
    for _ in range(20):
        ids, labels = next(pairs)
        assert ids.shape == labels.shape and ids.dtype == torch.long
        assert IMAGE_TOKEN_INDEX not in ids.tolist()  # text only: the image is left out
        text = tokenizer.decode(ids.tolist())
        assert "<im_start><im_end>" in text.replace(" ", "")
        answer = tokenizer.decode(ids[labels != -100].tolist())
        # The labelled tokens are the assistant's answer and its end of turn, nothing else.
        assert text.rstrip().endswith(answer.strip().removesuffix("</s>").strip() + "</s>")
        assert "ASSISTANT" not in answer and "USER" not in answer
    again = warmup_conversations(model, data_dir, cfg)
    assert torch.equal(next(again)[0], next(warmup_conversations(model, data_dir, cfg))[0])


def test_language_warmup_lowers_the_loss_and_changes_only_the_llm(data_dir: Path) -> None:
    tokenizer = train_demo_tokenizer(data_dir, VOCAB)
    model = build_lisa(SMALL_SPEC, tokenizer, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = LanguageWarmup(steps=40, batch_size=8, warmup_steps=5, log_every=10)
    history = warm_up_language(model, data_dir, cfg, progress=False)
    assert len(history) == 4
    assert history[-1] < history[0] - 1.0, history  # from ~6.0 (uniform over the vocabulary)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("llm.") for k in changed), sorted(changed)[:5]
    assert not model.llm.training


def test_shared_prefix_loss_equals_the_padded_batch(data_dir: Path) -> None:
    """The rows' common prefix runs once; the loss and every gradient match the whole padded
    batch's, and no scored prediction falls in the shared part."""
    tokenizer = train_demo_tokenizer(data_dir, VOCAB)
    model = build_lisa(SMALL_SPEC, tokenizer, seed=0)
    llm = model.llm.train()
    pairs = warmup_conversations(model, data_dir, LanguageWarmup(absent=0.5))
    batch = [next(pairs) for _ in range(6)]
    ids, labels = [i for i, _ in batch], [y for _, y in batch]
    assert len({len(i) for i in ids}) > 1  # rows of different lengths: padding is exercised
    pad = tokenizer.pad_token_id

    def loss_and_grads(ids, labels, shared: bool) -> tuple[float, list[torch.Tensor]]:
        llm.zero_grad(set_to_none=True)
        if shared:
            loss = shared_prefix_lm_loss(llm, ids, labels, pad)
        else:
            full = pad_right(ids, pad)
            loss = llm(
                input_ids=full, attention_mask=full.ne(pad), labels=pad_right(labels, -100)
            ).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in llm.parameters()]

    # Identical rows share everything up to the first scored token: the case that would go
    # wrong if the prefix reached into the answer.
    for rows_ids, rows_labels in ((ids, labels), ([ids[0]] * 3, [labels[0]] * 3)):
        plain, plain_grads = loss_and_grads(rows_ids, rows_labels, shared=False)
        shared, shared_grads = loss_and_grads(rows_ids, rows_labels, shared=True)
        assert shared == pytest.approx(plain, rel=1e-5)
        for a, b in zip(shared_grads, plain_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # The prefix really is shared: the system prompt and roles, tens of tokens.
    first = min(int(y.ne(-100).nonzero()[0]) for y in labels)
    common = next(i for i in range(first) if len({int(x[i]) for x in ids}) > 1)
    assert common >= 20


def test_language_warmup_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        LanguageWarmup(batch_size=0)
    with pytest.raises(ValueError, match="steps >= 0"):
        LanguageWarmup(steps=-1)


def test_cli_rejects_negative_warmup_steps(data_dir: Path, tmp_path: Path, capsys) -> None:
    argv = ["init", "--data", str(data_dir), "--out", str(tmp_path / "o"), "--warmup-steps", "-2"]
    assert demo_model_main(argv) == 2
    assert "--warmup-steps" in capsys.readouterr().err


CONV_SPEC = ModelSpec(
    clip_patch_size=28,
    sam=SamGeometry(
        img_size=128, patch_size=8, embed_dim=24, depth=2, encoder="conv", conv_widths=(8, 16, 16)
    ),
)


def test_patch_labels_name_the_object_under_each_patch(data_dir: Path) -> None:
    record = ShapesQueriesFile(data_dir / "train" / "queries.jsonl").record(0)
    h, w = record.object_mask(0).shape
    scale = 128 / max(h, w)
    resized = (int(h * scale + 0.5), int(w * scale + 0.5))
    shape_map, colour_map = patch_labels(record, 16, 128, resized)
    assert shape_map.shape == colour_map.shape == (16, 16)
    background = (len(SHAPES), len(COLOURS))
    masks = [record.object_mask(k) for k in range(len(record.objects))]
    owned = 0
    for i in range(16):
        for j in range(16):
            # The patch's footprint in the original image.
            rows = slice(int(i * 8 / scale), int((i + 1) * 8 / scale))
            cols = slice(int(j * 8 / scale), int((j + 1) * 8 / scale))
            cover = [float(m[rows, cols].mean()) if m[rows, cols].size else 0.0 for m in masks]
            k = int(np.argmax(cover))
            if max(cover) > 0.6:  # clearly one object's patch: labelled with that object
                obj = record.objects[k]
                assert shape_map[i, j] == SHAPES.index(obj.shape), (i, j, cover)
                assert colour_map[i, j] == COLOURS.index(obj.colour), (i, j, cover)
                owned += 1
            elif max(cover) < 0.4:  # clearly background
                assert shape_map[i, j] == background[0] and colour_map[i, j] == background[1]
    assert owned >= len(masks)
    # Padding (below/right of the resized image) is background.
    if resized[0] < 128:
        assert (shape_map[(resized[0] + 7) // 8 :] == background[0]).all()
    if resized[1] < 128:
        assert (colour_map[:, (resized[1] + 7) // 8 :] == background[1]).all()


#: The generator's comparison concepts and the relation that names their target.
CONCEPT_RELATIONS = {
    "closest_to_left": "leftmost",
    "closest_to_right": "rightmost",
    "closest_to_top": "topmost",
    "closest_to_bottom": "bottommost",
    "biggest": "biggest",
    "smallest": "smallest",
    "most_corners": "most_corners",
    "fewest_corners": "fewest_corners",
}


def test_relation_flags_agree_with_the_generators_comparison_queries(tmp_path: Path) -> None:
    write_dataset(tmp_path, {"train": 12}, seed=3)
    sidecar = ShapesQueriesFile(tmp_path / "train" / "queries.jsonl")
    checked = set()
    for i in range(len(sidecar)):
        record = sidecar.record(i)
        flags = relation_flags(record)
        assert flags.shape == (len(record.objects), len(RELATIONS))
        assert set(flags.unique().tolist()) <= {0.0, 1.0}
        assert (flags.sum(0) >= 1).all()  # every relation has a winner
        for query in record.queries:
            if query.concept in CONCEPT_RELATIONS:
                column = RELATIONS.index(CONCEPT_RELATIONS[query.concept])
                # the generator's queries are unambiguous: the target alone has the flag
                expected = torch.zeros(len(record.objects))
                expected[list(query.target_ids)] = 1.0
                assert torch.equal(flags[:, column], expected), (i, query.concept, flags)
                checked.add(query.concept)
            elif query.concept.endswith("_in_half"):
                word = query.concept.split("_")[0]  # the half is not recorded: either may be it
                halves = [f"{word}_in_left_right_half", f"{word}_in_top_bottom_half"]
                columns = [RELATIONS.index(h) for h in halves]
                (target,) = query.target_ids
                assert flags[target, columns].max() == 1.0, (i, query.concept)
                checked.add(query.concept)
    assert len(checked) >= 6, checked


def test_patch_owners_and_labels_agree(data_dir: Path) -> None:
    record = ShapesQueriesFile(data_dir / "train" / "queries.jsonl").record(1)
    owner = patch_owners(record, 16, 128, (96, 128))
    shape_map, colour_map = patch_labels(record, 16, 128, (96, 128))
    assert owner.min() == -1 and owner.max() < len(record.objects)
    assert (owner[12:] == -1).all()  # the padding below the 96 resized rows
    for k, obj in enumerate(record.objects):
        mine = owner == k
        assert (shape_map[mine] == SHAPES.index(obj.shape)).all()
        assert (colour_map[mine] == COLOURS.index(obj.colour)).all()
    assert (shape_map[owner == -1] == len(SHAPES)).all()


def test_encoder_warmup_lowers_the_loss_and_changes_only_sam_encoder(data_dir: Path) -> None:
    tokenizer = train_demo_tokenizer(data_dir, VOCAB)
    model = build_lisa(CONV_SPEC, tokenizer, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = EncoderWarmup(steps=40, batch_size=3, warmup_steps=5, log_every=10, lr=3e-3)
    history = warm_up_sam_encoder(model, data_dir, cfg, progress=False)
    assert len(history) == 4
    # From ~4.4 (two uniform 9-way cross-entropies) on three images it learns by heart.
    assert history[-1] < 0.6 * history[0], history
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("sam.image_encoder.") for k in changed), sorted(changed)
    assert not model.sam.image_encoder.training


def test_foreground_coverage_is_the_union_of_the_objects(data_dir: Path) -> None:
    record = ShapesQueriesFile(data_dir / "train" / "queries.jsonl").record(1)
    cover = object_coverage(record, 64, 128, (96, 128))
    fg = foreground_coverage(record, 64, 128, (96, 128))
    assert fg.shape == (64, 64) and fg.dtype == np.float32
    assert fg.min() >= 0.0 and fg.max() <= 1.0 and fg.max() > 0.99
    np.testing.assert_allclose(fg, np.clip(cover.sum(0), 0, 1))
    assert (fg[48:] == 0).all()  # the padding below the 96 resized rows
    # Soft at the edges: cells partly covered are strictly between 0 and 1.
    assert ((fg > 0.05) & (fg < 0.95)).any()


def test_encoder_warmup_detail_loss_is_added_on_the_same_draws(data_dir: Path) -> None:
    tokenizer = train_demo_tokenizer(data_dir, VOCAB)
    first = {}
    for weight in (0.0, 1.0):
        model = build_lisa(CONV_SPEC, tokenizer, seed=0)
        torch.manual_seed(0)  # the throwaway head's initialisation
        cfg = EncoderWarmup(
            steps=1, batch_size=2, warmup_steps=1, log_every=1, detail_weight=weight
        )
        first[weight] = warm_up_sam_encoder(model, data_dir, cfg, progress=False)[0]
    # Binary cross-entropy of near-zero logits against 0..1 cells: about ln 2 more.
    assert 0.4 < first[1.0] - first[0.0] < 1.2, first


def test_encoder_warmup_settings_are_checked(data_dir: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(ValueError, match="max_images must be >= 1"):
        EncoderWarmup(max_images=0)
    with pytest.raises(ValueError, match="steps >= 0"):
        EncoderWarmup(steps=-1)
    with pytest.raises(ValueError, match="detail_weight must be >= 0"):
        EncoderWarmup(detail_weight=-0.5)
    argv = ["init", "--data", str(data_dir), "--out", str(tmp_path / "o"), "--encoder-steps", "-1"]
    assert demo_model_main(argv) == 2
    assert "--encoder-steps" in capsys.readouterr().err


def test_center_seg_projector_removes_the_mean_state(data_dir: Path) -> None:
    tokenizer = train_demo_tokenizer(data_dir, VOCAB)
    model = build_lisa(SMALL_SPEC, tokenizer, seed=0)
    cfg = LanguageWarmup(steps=0)
    first = model.seg_projector[0]
    bias_before = first.bias.detach().clone()
    states = []
    pairs = warmup_conversations(model, data_dir, cfg)
    with torch.no_grad():
        for _ in range(16):
            ids, labels = next(pairs)
            start = int((labels != -100).nonzero()[0])
            states.append(model.llm.model(input_ids=ids[None, :start]).last_hidden_state[0, -1])
    states = torch.stack(states)
    norm_before = model.project_seg_hidden(states).norm(dim=-1).mean()
    mean = center_seg_projector_(model, data_dir, cfg, samples=16)
    torch.testing.assert_close(mean, states.mean(0), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        # The mean state now meets the first layer as a zero input did before.
        torch.testing.assert_close(first(mean), bias_before, rtol=1e-4, atol=1e-4)
        norm_after = model.project_seg_hidden(states).norm(dim=-1).mean()
    torch.testing.assert_close(norm_after, norm_before, rtol=1e-4, atol=1e-4)


def test_cli_warmup_trains_only_the_llm(
    initial_checkpoint: Path, data_dir: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "warm"
    argv = ["warmup", "--model", str(initial_checkpoint), "--data", str(data_dir)]
    assert demo_model_main([*argv, "--out", str(out), "--steps", "2"]) == 0
    assert "language warm-up loss" in capsys.readouterr().out
    before, after = load_lisa(initial_checkpoint), load_lisa(out)
    a, b = before.state_dict(), after.state_dict()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.startswith("llm.") for k in changed)


def test_concept_keys_and_prompts(data_dir: Path) -> None:
    record = ShapesQueriesFile(data_dir / "train" / "queries.jsonl").record(0)
    keys = {q.concept: concept_key(record, q) for q in record.queries if q.kind != "absent"}
    target = record.objects[0]
    assert f"{target.colour} {target.shape}" in {
        concept_key(record, q)
        for q in record.queries
        if q.concept == "colour_shape" and q.kind != "absent"
    }
    assert keys.get("roll", "round") == "round"
    prompts = ConceptPrompts(["red", "triangle", "biggest", "red"])
    assert prompts.words == ("biggest", "red", "triangle")
    both, red, triangle = prompts(["red triangle", "red", "triangle"])
    torch.testing.assert_close(both, red + triangle)
    assert prompts(["biggest"]).shape == (1, 256)
    with pytest.raises(KeyError, match="'leftmost'"):
        prompts(["leftmost"])


def test_decoder_warmup_lowers_the_loss_and_changes_only_the_mask_decoder(
    data_dir: Path,
) -> None:
    tokenizer = train_demo_tokenizer(data_dir, VOCAB)
    model = build_lisa(CONV_SPEC, tokenizer, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = DecoderWarmup(
        steps=30, batch_size=2, queries_per_image=3, warmup_steps=3, log_every=10, lr=3e-3
    )
    history, prompts = warm_up_sam_decoder(model, data_dir, cfg, progress=False)
    assert len(history) == 3
    assert history[-1] < 0.7 * history[0], history
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    allowed = ("sam.mask_decoder.", "sam.prompt_encoder.no_mask_embed.")
    assert changed and all(k.startswith(allowed) for k in changed), sorted(changed)
    assert any(k.startswith("sam.mask_decoder.") for k in changed)
    assert not model.sam.mask_decoder.training
    # every present query of the training split has a prompt
    sidecar = ShapesQueriesFile(data_dir / "train" / "queries.jsonl")
    for i in range(len(sidecar)):
        record = sidecar.record(i)
        keys = [concept_key(record, q) for q in record.queries if q.kind != "absent"]
        assert prompts(keys).shape == (len(keys), 256)


def test_fit_seg_projector_maps_seg_states_onto_the_concept_prompts(data_dir: Path) -> None:
    tokenizer = train_demo_tokenizer(data_dir, VOCAB)
    model = build_lisa(SMALL_SPEC, tokenizer, seed=0)
    scale_for_scratch_training_(model)  # as init builds it
    center_seg_projector_(model, data_dir, LanguageWarmup(steps=0), samples=16)
    dataset = ShapesValDataset(data_dir, "train")
    samples = [dataset[i] for i in range(3)]
    # one batch or one at a time: padding does not change the states
    torch.testing.assert_close(
        seg_states(model, samples),
        torch.cat([seg_states(model, [s]) for s in samples]),
        rtol=1e-4,
        atol=1e-4,
    )
    words = set()
    for i in range(len(dataset.file)):
        record = dataset.file.record(i)
        for q in record.queries:
            if q.kind != "absent":
                words.update(concept_key(record, q).split())
    prompts = ConceptPrompts(sorted(words))
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = DecoderWarmup(fit_samples=40)
    fit = fit_seg_projector_(model, data_dir, prompts, cfg, progress=False)
    # an untrained LLM's states differ little (24 concepts in 36 fitted queries): measured
    # 0.04 before, 0.87 fitted, 0.48 held out
    assert fit.before < 0.2 and fit.fitted > 0.8 and fit.held_out > fit.before + 0.2, fit
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before_state[k])}
    assert changed and all(k.startswith("seg_projector.") for k in changed), sorted(changed)


def test_read_decoder_data_embeds_every_image(data_dir: Path) -> None:
    tokenizer = train_demo_tokenizer(data_dir, VOCAB)
    model = build_lisa(CONV_SPEC, tokenizer, seed=0)
    data = read_decoder_data(model, data_dir, max_images=10, progress=False)
    assert len(data.embeddings) == len(data.object_masks) == len(data.queries) == 3


def test_bf16_autocast_follows_the_device_by_default() -> None:
    assert DecoderWarmup().bf16 is None


def test_decoder_warmup_settings_are_checked(data_dir: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(ValueError, match="queries_per_image must be >= 1"):
        DecoderWarmup(queries_per_image=0)
    with pytest.raises(ValueError, match="fit_samples must be >= 1"):
        DecoderWarmup(fit_samples=0)
    with pytest.raises(ValueError, match="DecoderWarmup: need steps >= 0"):
        DecoderWarmup(steps=-1)
    flag = "--decoder-steps"
    argv = ["init", "--data", str(data_dir), "--out", str(tmp_path / "o"), flag, "-3"]
    assert demo_model_main(argv) == 2
    assert f"{flag} must be >= 0, got -3" in capsys.readouterr().err
