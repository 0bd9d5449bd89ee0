"""Collate: token ids, answer labels, padding, offsets and truncation exactly as the original
``collate_fn``, checked against the reference fixture and by hand."""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from lisa_model.modeling import IGNORE_INDEX
from lisa_model.prompts import expand_image_token
from lisa_model.tokenizer import LisaTokenizer
from training.collate import Batch, Collator, conversation_labels, pad_right
from training.data.types import Sample

REFERENCE_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "lisa_reference"
EXPECTED = REFERENCE_DIR / "expected"
H, W = 24, 32  # small synthetic images keep the SAM preprocessing cheap


@cache
def tokenizer() -> LisaTokenizer:
    return LisaTokenizer.from_pretrained(REFERENCE_DIR / "lisa-tiny")


@cache
def llama2_tokenizer() -> LisaTokenizer:
    return LisaTokenizer.from_pretrained(REFERENCE_DIR / "lisa-tiny-llama2-style")


@cache
def reference_image(name: str) -> np.ndarray:
    bgr = cv2.imread(str(REFERENCE_DIR / "inputs" / f"{name}.png"))
    assert bgr is not None, name
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


_ROUND = re.compile(r" USER: (?:<im_start>)?<image>(?:<im_end>)?(.*) ASSISTANT: (.*)</s>$", re.S)


def rounds_of(conversation: str) -> list[tuple[str, str]]:
    """The (question, answer) round of a rendered single-round llava_v1 conversation."""
    match = _ROUND.search(conversation)
    assert match is not None, conversation
    return [("<image>" + match.group(1), match.group(2))]


def make_sample(
    conversations: list[list[tuple[str, str]]],
    image: np.ndarray | None = None,
    path: str = "synthetic.png",
    n_masks: int | None = None,
    source: str = "reason_seg",
) -> Sample:
    image = np.full((H, W, 3), 90, np.uint8) if image is None else image
    h, w = image.shape[:2]
    if n_masks is None:
        n_masks = sum(a.count("[SEG]") for conv in conversations for _, a in conv)
    masks = np.zeros((n_masks, h, w), np.uint8)
    for k in range(n_masks):
        masks[k, k : k + 3, 2:5] = 1
    label = np.zeros((h, w), np.uint8)
    label[0, :] = 255
    return Sample(
        image_path=path,
        image=image,
        conversations=conversations,
        masks=masks,
        label=label,
        texts=["thing"],
        is_sentence=False,
        source=source,
    )


def unmasked_runs(labels: torch.Tensor) -> list[list[int]]:
    """Maximal runs of consecutive label positions that are not IGNORE_INDEX, as id lists."""
    runs: list[list[int]] = []
    previous = False
    for value in labels.tolist():
        keep = value != IGNORE_INDEX
        if keep and not previous:
            runs.append([])
        if keep:
            runs[-1].append(value)
        previous = keep
    return runs


# --------------------------------------------------------------------------- reference fixture


@pytest.fixture(scope="module")
def train_reference() -> dict:
    return json.loads((EXPECTED / "train_forward.json").read_text())


@pytest.fixture(scope="module")
def train_batch(train_reference: dict) -> Batch:
    ref = train_reference
    offsets = ref["offset"]
    samples = []
    for i, name in enumerate(ref["images"]):
        convs = ref["conversations"][offsets[i] : offsets[i + 1]]
        samples.append(
            make_sample(
                [rounds_of(c) for c in convs],
                image=reference_image(name),
                path=str(REFERENCE_DIR / "inputs" / f"{name}.png"),
            )
        )
    return Collator(tokenizer())(samples)


def test_training_batch_equals_original_collate(train_reference: dict, train_batch: Batch):
    ref = train_reference
    assert train_batch.conversations == ref["conversations"]
    assert train_batch.offsets == ref["offset"]
    assert train_batch.input_ids.dtype == torch.long
    assert train_batch.input_ids.tolist() == ref["input_ids"]
    assert train_batch.labels.dtype == torch.long
    assert train_batch.labels.tolist() == ref["labels"]
    assert train_batch.attention_mask.dtype == torch.bool
    assert train_batch.attention_mask.long().tolist() == ref["attention_masks"]
    assert train_batch.inference is False


def test_training_batch_image_fields(train_batch: Batch):
    b = train_batch
    assert (b.num_images, b.num_conversations) == (2, 3)
    assert b.images_clip.shape == (2, 3, 224, 224) and b.images_clip.dtype == torch.float32
    assert b.images_sam.shape == (2, 3, 1024, 1024) and b.images_sam.dtype == torch.float32
    assert b.original_sizes == [(240, 320), (167, 259)]
    assert b.resize_sizes == [(768, 1024), (660, 1024)]
    # SAM input is zero beyond the resized image (padding after normalisation).
    assert b.images_sam[0, :, 768:].abs().sum() == 0
    assert [tuple(m.shape) for m in b.gt_masks] == [(2, 240, 320), (1, 167, 259)]
    assert all(m.dtype == torch.float32 for m in b.gt_masks)
    assert [tuple(m.shape) for m in b.label_maps] == [(240, 320), (167, 259)]
    assert all(m.dtype == torch.uint8 and int(m[0, 0]) == 255 for m in b.label_maps)
    assert b.image_paths[1].endswith("img1.png") and b.sources == ["reason_seg"] * 2


def test_only_answer_tokens_are_unmasked_by_hand(train_batch: Batch):
    tok = tokenizer()
    labels, ids = train_batch.labels, train_batch.input_ids
    expected_answers = [
        ["▁Sure", ",", "[SEG]", "▁", ".", "</s>"],
        ["▁It", "▁is", "[SEG]", "▁", "."] + ["</s>"],
        None,  # long explanatory answer, checked against its own tokenization below
    ]
    for row in range(3):
        runs = unmasked_runs(labels[row])
        assert len(runs) == 1, "one contiguous answer per single-round conversation"
        length = int(train_batch.attention_mask[row].sum())
        start = length - len(runs[0])
        # The answer run ends with the last real token (</s>) and equals the ids there.
        assert ids[row, start:length].tolist() == runs[0]
        assert ids[row, length - 1] == tok.eos_token_id
        # The token just before the answer is the ":" of "ASSISTANT:".
        assert tok.convert_ids_to_tokens(int(ids[row, start - 1])) == ":"
        assert tok.convert_ids_to_tokens(int(ids[row, start - 2])) == "▁ASSISTANT"
        assert (labels[row, :start] == IGNORE_INDEX).all()
        assert (labels[row, length:] == IGNORE_INDEX).all()
        tokens = tok.convert_ids_to_tokens(runs[0])
        if expected_answers[row] is not None:
            assert tokens == expected_answers[row]
    answer = "Sure, it is [SEG]. It is the highest part, so the rain reaches it first."
    assert unmasked_runs(labels[2])[0] == tok.encode(answer, add_special_tokens=False) + [
        tok.eos_token_id
    ]


def test_validation_single_equals_original():
    ref = json.loads((EXPECTED / "val_single.json").read_text())["samples"]
    samples = [
        make_sample(
            [rounds_of(s["conversation"][0])],
            image=reference_image(s["key"].split("_")[0]),
            path=s["key"],
        )
        for s in ref
    ]
    batch = Collator(tokenizer(), inference=True)(samples)
    assert batch.inference is True
    assert batch.offsets == list(range(len(ref) + 1))
    assert batch.input_ids.shape[1] == max(len(s["input_ids"]) for s in ref)
    for row, s in enumerate(ref):
        n = len(s["input_ids"])
        assert batch.conversations[row] == s["conversation"][0]
        assert batch.input_ids[row, :n].tolist() == s["input_ids"]
        assert (batch.input_ids[row, n:] == 0).all()
        assert list(batch.resize_sizes[row]) == s["resize"]
        # The teacher-forced answer "[SEG].</s>" is what stays unmasked.
        assert unmasked_runs(batch.labels[row]) == [[803, 728, 748, 2]]
        assert [int(p) for p in torch.nonzero(batch.input_ids[row] == 803)] == s[
            "seg_token_positions"
        ]


def test_validation_batched_equals_original():
    ref = json.loads((EXPECTED / "val_batched.json").read_text())["samples"]
    arrays = np.load(EXPECTED / "val_batched.npz")
    collate = Collator(tokenizer(), inference=True)
    for s in ref:
        sample = make_sample(
            [rounds_of(c) for c in s["conversations"]],
            image=reference_image(s["key"]),
            path=s["key"],
        )
        batch = collate([sample])
        assert batch.offsets == s["offset"]
        assert batch.conversations == [expand_image_token(c) for c in s["conversations"]]
        assert batch.input_ids.tolist() == s["input_ids_padded"]
        assert np.array_equal(batch.input_ids.numpy(), arrays[f"{s['key']}__input_ids"])
        expected_mask = arrays[f"{s['key']}__attention_masks"]
        assert expected_mask.dtype == np.bool_
        assert np.array_equal(batch.attention_mask.numpy(), expected_mask)
        assert batch.gt_masks[0].shape[0] == 3


# --------------------------------------------------------------------------- label rules


def test_multi_round_llava_v1_unmasks_each_answer():
    tok = tokenizer()
    conv = [
        ("<image>\nWhat colour is the ball?", "It is red."),
        ("Where is it?", "On the grass."),
        ("Can you segment it?", "Sure, [SEG]."),
    ]
    batch = Collator(tok)([make_sample([conv])])
    runs = unmasked_runs(batch.labels[0])
    expected = [
        tok.encode("It is red.", add_special_tokens=False) + [2],
        tok.encode("On the grass.", add_special_tokens=False) + [2],
        tok.encode("Sure, [SEG].", add_special_tokens=False) + [2],
    ]
    assert runs == expected
    # The questions of later rounds start with "▁USER" right after the previous "</s>".
    ids = batch.input_ids[0].tolist()
    eos_positions = [i for i, t in enumerate(ids) if t == 2]
    for pos in eos_positions[:-1]:
        assert tok.convert_ids_to_tokens(ids[pos + 1]) == "▁USER"
        assert batch.labels[0, pos + 1] == IGNORE_INDEX


def test_llava_llama_2_labels_by_hand():
    tok = llama2_tokenizer()
    conv = [
        ("<image>\nWhat is the red ball in this image?", "Sure, [SEG]."),
        ("Why?", "It is round."),
    ]
    batch = Collator(tok, template="llava_llama_2")([make_sample([conv])])
    text = batch.conversations[0]
    assert text.startswith("[INST] <<SYS>>\n") and "<im_start><image><im_end>\n" in text
    assert text.endswith("[/INST] It is round. </s>")
    ids = batch.input_ids[0].tolist()
    assert ids.count(-200) == 1 and ids.count(tok.seg_token_id) == 1
    runs = unmasked_runs(batch.labels[0])
    tokens = [tok.convert_ids_to_tokens(r) for r in runs]
    assert tokens == [
        ["▁Sure", ",", "[SEG]", "▁", ".", "▁", "</s>"],
        tok.convert_ids_to_tokens(tok.encode("It is round. ", add_special_tokens=False))
        + ["</s>"],
    ]
    # The second round's "<s>" and its "[INST] Why? [/INST]" are masked.
    second_bos = ids.index(1, 1)
    assert ids[second_bos - 1] == 2
    first_answer_token = ids.index(tok.convert_tokens_to_ids("▁It"), second_bos)
    assert (batch.labels[0, second_bos:first_answer_token] == IGNORE_INDEX).all()
    assert tok.convert_ids_to_tokens(ids[first_answer_token - 1]) == "]"


def test_label_mismatch_raises_naming_conversation():
    tok = tokenizer()
    # A literal "<unk>" has the pad id: it is not counted as a token, so the rounds do not add up.
    sample = make_sample([[("<image>\nIs this an <unk> thing?", "Sure, [SEG].")]])
    with pytest.raises(ValueError, match=r"label masking mismatch.*Is this an <unk> thing"):
        Collator(tok)([sample])
    # As in the original, the check only runs for conversations shorter than model_max_length.
    batch = Collator(tok, model_max_length=60, num_image_tokens=8, truncate=False)([sample])
    assert batch.input_ids.shape[1] > 60


def test_answer_separator_is_space_assistant_colon_space():
    tok = tokenizer()
    # The original splits rounds at " ASSISTANT: " (sep + role + ": "): a quoted "(ASSISTANT: "
    # in the question is not a split point, a second " ASSISTANT: " is an error.
    ok = make_sample([[("<image>\nWhat does (ASSISTANT: hi) mean?", "Sure, [SEG].")]])
    batch = Collator(tok)([ok])
    assert tok.convert_ids_to_tokens(unmasked_runs(batch.labels[0])[0]) == [
        "▁Sure",
        ",",
        "[SEG]",
        "▁",
        ".",
        "</s>",
    ]
    bad = make_sample([[("<image>\nWhat does ASSISTANT: hi mean?", "Sure, [SEG].")]])
    with pytest.raises(ValueError, match=r"round 0 holds 2 answer separators ' ASSISTANT: '"):
        Collator(tok)([bad])


def test_round_without_answer_separator_raises():
    ids = torch.tensor(tokenizer().tokenizer_image_token("USER: hello</s>"))
    with pytest.raises(ValueError, match="answer separator"):
        conversation_labels("USER: hello</s>", ids, tokenizer())


# --------------------------------------------------------------------------- truncation


def long_answer(n_words: int) -> str:
    return " ".join(["grass"] * n_words)


def test_training_truncates_to_text_budget_but_validation_does_not():
    tok = tokenizer()
    short = make_sample([[("<image>\nWhat is it?", "Sure, [SEG].")]], path="short.png")
    long = make_sample(
        [[("<image>\nDescribe the scene.", long_answer(300))]], path="long.png", source="vqa"
    )
    full = Collator(tok, inference=True)([short, long])
    width = full.input_ids.shape[1]
    assert width > 257
    train = Collator(tok)([short, long])
    assert Collator(tok).max_text_tokens == 512 - 256 + 1 == 257
    assert train.input_ids.shape == train.labels.shape == train.attention_mask.shape
    assert train.input_ids.shape == (2, 257)
    assert torch.equal(train.input_ids, full.input_ids[:, :257])
    assert torch.equal(train.labels, full.labels[:, :257])
    assert torch.equal(train.attention_mask, full.attention_mask[:, :257])
    assert int(full.attention_mask[1].sum()) == width  # the long row sets the padded width
    # truncate=False keeps everything in training mode too.
    assert Collator(tok, truncate=False)([short, long]).input_ids.shape[1] == width
    # A batch that fits is not touched (no padding up to 257 either).
    only_short = Collator(tok)([short])
    assert only_short.input_ids.shape[1] == int(only_short.attention_mask.sum()) < 257


def test_truncated_seg_token_raises_with_image_path_and_counts():
    tok = tokenizer()
    sample = make_sample(
        [[("<image>\nDescribe it, then segment it.", long_answer(250) + " [SEG].")]],
        path="/data/far_seg.jpg",
    )
    with pytest.raises(ValueError, match=r"/data/far_seg\.jpg.*0 \[SEG\].*truncat.*1 masks"):
        Collator(tok)([sample])
    batch = Collator(tok, inference=True)([sample])
    assert int((batch.input_ids == tok.seg_token_id).sum()) == 1


def test_seg_tokens_in_ids_must_match_masks():
    # Sample.validate counts [SEG] in answers only; the ids also hold the one in the question.
    sample = make_sample([[("<image>\nWhat does [SEG] mean?", "Sure, [SEG].")]], path="q.png")
    with pytest.raises(ValueError, match=r"q\.png.*2 \[SEG\] tokens but it has 1 masks"):
        Collator(tokenizer())([sample])


# --------------------------------------------------------------------------- batch plumbing


def test_offsets_zero_masks_and_no_im_start_end():
    tok = tokenizer()
    vqa = make_sample(
        [[("<image>\nWhat is here?", "A wall.")]], path="vqa.png", source="vqa", n_masks=0
    )
    seg = make_sample(
        [
            [("<image>\nCan you segment the wall in this image?", "It is [SEG].")],
            [("<image>\nPlease segment the floor in this image.", "[SEG].")],
            [("<image>\nWhat is sky in this image?", "Sure, [SEG].")],
        ],
        image=np.zeros((30, 17, 3), np.uint8),
        path="seg.png",
    )
    batch = Collator(tok, use_im_start_end=False)([vqa, seg])
    assert batch.offsets == [0, 1, 4]
    assert batch.gt_masks[0].shape == (0, H, W)
    assert batch.gt_masks[1].shape == (3, 30, 17)
    assert batch.original_sizes == [(H, W), (30, 17)]
    assert batch.resize_sizes == [(768, 1024), (1024, 580)]
    assert "<im_start>" not in "".join(batch.conversations)
    assert (batch.input_ids == -200).sum(1).tolist() == [1, 1, 1, 1]
    assert not ((batch.input_ids == 801) | (batch.input_ids == 802)).any()
    assert (batch.input_ids == tok.seg_token_id).sum(1).tolist() == [0, 1, 1, 1]
    assert batch.sources == ["vqa", "reason_seg"]


def test_batch_to_moves_every_tensor():
    batch = Collator(tokenizer())([make_sample([[("<image>\nWhat is it?", "[SEG].")]])])
    moved = batch.to("meta")
    tensors = [moved.images_clip, moved.images_sam, moved.input_ids, moved.attention_mask]
    tensors += [moved.labels, *moved.gt_masks, *moved.label_maps]
    assert all(t.device.type == "meta" for t in tensors)
    assert moved.input_ids.dtype == torch.long and moved.attention_mask.dtype == torch.bool
    assert moved.offsets == batch.offsets and moved.conversations == batch.conversations
    assert batch.input_ids.device.type == "cpu"


def test_dataloader_uses_collator():
    samples = [
        make_sample([[("<image>\nWhat is it?", "It is [SEG].")]], path=f"{i}.png")
        for i in range(3)
    ]
    loader = torch.utils.data.DataLoader(samples, batch_size=2, collate_fn=Collator(tokenizer()))
    batches = list(loader)
    assert [b.num_images for b in batches] == [2, 1]
    assert batches[0].image_paths == ["0.png", "1.png"]


def test_pad_right_and_bad_arguments():
    assert pad_right([[1, 2, 3], [4]], 0).tolist() == [[1, 2, 3], [4, 0, 0]]
    with pytest.raises(ValueError, match="empty list"):
        Collator(tokenizer())([])
    with pytest.raises(ValueError, match="unknown conversation template"):
        Collator(tokenizer(), template="vicuna")
    with pytest.raises(ValueError, match="model_max_length"):
        Collator(tokenizer(), model_max_length=256)
    bad = make_sample([[("<image>\nWhat is it?", "It is [SEG].")]], n_masks=2, path="bad.png")
    with pytest.raises(ValueError, match=r"bad\.png"):
        Collator(tokenizer())([bad])
