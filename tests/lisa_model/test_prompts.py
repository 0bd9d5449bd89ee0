"""Prompt strings and their token ids against the original implementation's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lisa_model.prompts import (
    EXPLANATORY_QUESTION_LIST,
    IMAGE_TOKEN,
    IMAGE_TOKEN_INDEX,
    LONG_QUESTION_LIST,
    SHORT_QUESTION_LIST,
    build_chat_prompt,
    expand_image_token,
    render_conversation,
)
from lisa_model.tokenizer import LisaTokenizer

REFERENCE_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "lisa_reference"
EXPECTED = REFERENCE_DIR / "expected"


def _load(name: str) -> dict | list:
    return json.loads((EXPECTED / name).read_text("utf-8"))


CASES = _load("tokenizer_cases.json")
GENERATE = _load("generate.json")
VAL_SINGLE = _load("val_single.json")["samples"]
VAL_BATCHED = _load("val_batched.json")["samples"]
TRAIN_FORWARD = _load("train_forward.json")
QUERIES = {
    q["id"]: q
    for q in json.loads((REFERENCE_DIR / "inputs" / "inputs.json").read_text("utf-8"))["queries"]
}
CHAT_TEXTS = [q["chat_text"] for q in QUERIES.values()]


@pytest.fixture(scope="module")
def tok7b() -> LisaTokenizer:
    return LisaTokenizer.from_pretrained(REFERENCE_DIR / "lisa-tiny")


@pytest.fixture(scope="module")
def tok_llama2() -> LisaTokenizer:
    return LisaTokenizer.from_pretrained(REFERENCE_DIR / "lisa-tiny-llama2-style")


def _chat_text_of(prompt: str) -> str:
    matches = [text for text in CHAT_TEXTS if text in prompt]
    assert len(matches) == 1, prompt
    return matches[0]


@pytest.mark.parametrize("index", range(len(CASES["tokenizer_image_token"])))
def test_chat_prompt_both_templates(tok7b: LisaTokenizer, index: int) -> None:
    case = CASES["tokenizer_image_token"][index]
    prompt = build_chat_prompt(_chat_text_of(case["prompt"]), template=case["template"])
    assert prompt == case["prompt"]
    assert tok7b.tokenizer_image_token(prompt) == case["input_ids"]


@pytest.mark.parametrize(
    "index", range(len(CASES["llama2_style_variant"]["tokenizer_image_token"]))
)
def test_chat_prompt_llama2_layout(tok_llama2: LisaTokenizer, index: int) -> None:
    case = CASES["llama2_style_variant"]["tokenizer_image_token"][index]
    template = "llava_llama_2" if case["prompt"].startswith("[INST]") else "llava_v1"
    prompt = build_chat_prompt(_chat_text_of(case["prompt"]), template=template)
    assert prompt == case["prompt"]
    assert tok_llama2.tokenizer_image_token(prompt) == case["input_ids"]


@pytest.mark.parametrize("sample", GENERATE, ids=lambda s: s["key"])
def test_chat_py_prompts(tok7b: LisaTokenizer, sample: dict) -> None:
    prompt = build_chat_prompt(sample["user_text"])  # chat.py's default: llava_v1
    assert prompt == sample["prompt"]
    assert tok7b.tokenizer_image_token(prompt) == sample["input_ids"]


def _val_question(query: dict) -> str:
    # ValDataset's ReasonSeg questions: note the space after "<image>\n".
    if query["is_sentence"]:
        return IMAGE_TOKEN + "\n {} Please output segmentation mask.".format(query["text"])
    return IMAGE_TOKEN + "\n What is {} in this image? Please output segmentation mask.".format(
        query["text"]
    )


@pytest.mark.parametrize("sample", VAL_SINGLE, ids=lambda s: s["key"])
def test_validation_conversations(tok7b: LisaTokenizer, sample: dict) -> None:
    query = QUERIES[sample["key"].split("_", 1)[1]]
    conversation = render_conversation([(_val_question(query), "[SEG].")])
    assert [conversation] == sample["conversation"]
    ids = tok7b.tokenizer_image_token(conversation)
    assert ids == sample["input_ids"]
    seg_positions = [i for i, t in enumerate(ids) if t == tok7b.seg_token_id]
    assert seg_positions == sample["seg_token_positions"]


@pytest.mark.parametrize("sample", VAL_BATCHED, ids=lambda s: s["key"])
def test_batched_validation_ids(tok7b: LisaTokenizer, sample: dict) -> None:
    # The stored strings are from before collate_fn expanded <image>; ids are padded with 0.
    for conversation, padded in zip(sample["conversations"], sample["input_ids_padded"]):
        ids = tok7b.tokenizer_image_token(expand_image_token(conversation))
        assert padded[: len(ids)] == ids
        assert set(padded[len(ids) :]) <= {tok7b.pad_token_id}
    assert max(
        len(tok7b.tokenizer_image_token(expand_image_token(c))) for c in sample["conversations"]
    ) == len(sample["input_ids_padded"][0])


def test_training_conversations(tok7b: LisaTokenizer) -> None:
    short, long, explain = QUERIES["q0_short"], QUERIES["q1_long"], QUERIES["q2_explain"]
    rounds = [
        (SHORT_QUESTION_LIST[0].format(class_name=short["class_name"]), "Sure, [SEG]."),
        (LONG_QUESTION_LIST[1].format(sent=long["text"]), "It is [SEG]."),
        (
            IMAGE_TOKEN + "\n" + explain["text"] + " " + EXPLANATORY_QUESTION_LIST[0],
            "Sure, it is [SEG]. It is the highest part, so the rain reaches it first.",
        ),
    ]
    conversations = [render_conversation([r]) for r in rounds]
    assert conversations == TRAIN_FORWARD["conversations"]
    for conversation, padded, mask in zip(
        conversations, TRAIN_FORWARD["input_ids"], TRAIN_FORWARD["attention_masks"]
    ):
        ids = tok7b.tokenizer_image_token(conversation)
        assert ids == padded[: sum(mask)]
        assert ids.count(IMAGE_TOKEN_INDEX) == 1 and ids[-1] == tok7b.eos_token_id


def test_teacher_forced_answer_matches_chat_prompt() -> None:
    text = CHAT_TEXTS[0]
    assert build_chat_prompt(text, answer="[SEG].") == build_chat_prompt(text) + " [SEG].</s>"
    assert build_chat_prompt(text, answer="[SEG].") == render_conversation(
        [(IMAGE_TOKEN + "\n" + text, "[SEG].")]
    )
