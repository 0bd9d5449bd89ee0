"""Follow-up commands: multi-round prompts, history with the prefix cache, history trimming.

"The trained format" is checked against the training code's own view of a two-round
conversation: ``render_conversation`` (checked against the original's rendered conversations in
test_prompts.py) tokenized and labelled by ``conversation_labels`` (the original collate's
labelling): the second round's prompt must be exactly the ids training feeds before the second
answer's first target token.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from lisa_model.conversation import Conversation
from lisa_model.predictor import LisaPredictor
from lisa_model.prompts import (
    IMAGE_TOKEN,
    IMAGE_TOKEN_INDEX,
    SEGMENT_ONLY_ANSWER,
    TEMPLATES,
    build_chat_prompt,
    format_query,
    render_conversation,
)
from lisa_model.tokenizer import LisaTokenizer
from lisa_model.types import SegmentationResult
from tests.conftest import REFERENCE_DIR, read_rgb
from training.collate import IGNORE_INDEX, conversation_labels

IMG0 = REFERENCE_DIR / "inputs" / "img0.png"
Q1 = "What is the red ball in this image? Please output segmentation mask."
A1 = "Sure, [SEG]."
Q2 = "Which one is on the left? Please output segmentation mask."
A2 = "It is [SEG]."
LAYOUTS = ["lisa-tiny", "lisa-tiny-llama2-style"]


@pytest.fixture(scope="module", params=LAYOUTS)
def tokenizer(request) -> LisaTokenizer:
    return LisaTokenizer.from_pretrained(REFERENCE_DIR / request.param)


def second_answer_start(tok: LisaTokenizer, template: str, first: tuple[str, str]) -> list[int]:
    """The ids training feeds for ``[first, (Q2, A2)]`` before A2's first target token."""
    conversation = render_conversation(
        [(IMAGE_TOKEN + "\n" + first[0], first[1]), (Q2, A2)], template
    )
    ids = tok.tokenizer_image_token(conversation)
    labels = conversation_labels(conversation, torch.tensor(ids), tok, template).tolist()
    targets = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    # Two answers, each closed by EOS (llava_v1) or by " </s>" (llama_2); the second starts after
    # the first one's tokens and the second user turn.
    gaps = [i for i, (a, b) in enumerate(zip(targets, targets[1:])) if b != a + 1]
    assert len(gaps) == 1, targets
    return ids[: targets[gaps[0] + 1]]


# ----------------------------------------------------------------------------- prompt strings


def test_two_round_prompt_strings() -> None:
    system = TEMPLATES["llava_v1"].system
    assert build_chat_prompt(Q2, history=[(Q1, A1)]) == (
        f"{system} USER: <im_start><image><im_end>\n{Q1} ASSISTANT: {A1}</s>USER: {Q2} ASSISTANT:"
    )
    system2 = TEMPLATES["llava_llama_2"].system
    assert build_chat_prompt(Q2, "llava_llama_2", history=[(Q1, A1), (Q2, A2)]) == (
        f"[INST] <<SYS>>\n{system2}\n<</SYS>>\n\n<im_start><image><im_end>\n{Q1} [/INST] {A1} </s>"
        f"<s>[INST] {Q2} [/INST] {A2} </s><s>[INST] {Q2} [/INST]"
    )
    # No history: the single-round prompt (checked against the original in test_prompts.py).
    assert build_chat_prompt(Q1, history=()) == build_chat_prompt(Q1)
    assert build_chat_prompt(Q1, use_im_start_end=False, history=[(Q2, A2)]).count("<image>") == 1


@pytest.mark.parametrize(
    ("history", "words"),
    [
        ([("q", "")], "answer must be a non-empty"),
        ([(" ", "a")], "user text must be a non-empty"),
        ([("q", "a", "b")], "pair"),
        (["qa"], "pair"),
        ([("<image>\nq", "a")], "must not contain <image>"),
        ([("q", 3)], "answer"),
    ],
)
def test_bad_history_is_refused(history, words) -> None:
    with pytest.raises(ValueError, match=words):
        build_chat_prompt(Q2, history=history)


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_second_round_ids_are_the_trained_conversation(tokenizer, template) -> None:
    for answer in (A1, SEGMENT_ONLY_ANSWER, "Sure, it is [SEG]. It is round, so it rolls."):
        ids = tokenizer.tokenizer_image_token(
            build_chat_prompt(Q2, template, history=[(Q1, answer)])
        )
        assert ids == second_answer_start(tokenizer, template, (Q1, answer))
        # The first round inside it is the finished one-round conversation training sees.
        first = tokenizer.tokenizer_image_token(
            render_conversation([(IMAGE_TOKEN + "\n" + Q1, answer)], template)
        )
        assert ids[: len(first)] == first and len(ids) > len(first)
        assert ids.count(IMAGE_TOKEN_INDEX) == 1
        assert ids.count(tokenizer.seg_token_id) == 1  # the earlier answer's [SEG], as text
        assert ids.count(tokenizer.eos_token_id) == 1  # the round separator after it


# ----------------------------------------------------------------------------- the predictor


@pytest.fixture(scope="module")
def llama2_layout_model():
    """A random tiny model with the LISA-13B-llama2 token layout (the fixture has no weights)."""
    from lisa_model.builders import ModelSpec, build_lisa

    tok = LisaTokenizer.from_pretrained(REFERENCE_DIR / "lisa-tiny-llama2-style")
    return build_lisa(ModelSpec(), tok, seed=3)


class SeenIds:
    """Records the ids each full-prompt embedding call gets (``cache_prefix=False``)."""

    def __init__(self, model, monkeypatch) -> None:
        self.ids: list[list[int]] = []
        original = model.embed_inputs

        def spy(input_ids, *args, **kwargs):
            self.ids.append(input_ids[0].tolist())
            return original(input_ids, *args, **kwargs)

        monkeypatch.setattr(model, "embed_inputs", spy)


@pytest.mark.parametrize(
    ("layout", "template"),
    [("lisa-tiny", "llava_v1"), ("lisa-tiny-llama2-style", "llava_v1"),
     ("lisa-tiny-llama2-style", "llava_llama_2")],
)  # fmt: skip
def test_the_model_sees_the_first_round_in_the_second(
    layout, template, reference_model, llama2_layout_model, monkeypatch
) -> None:
    model = reference_model if layout == "lisa-tiny" else llama2_layout_model
    predictor = LisaPredictor(model, template=template, cache_prefix=False)
    predictor.set_image(read_rgb(IMG0))
    seen = SeenIds(model, monkeypatch)
    first = predictor.predict(Q1, raw_prompt=True, max_new_tokens=6)
    second = predictor.predict(Q2, raw_prompt=True, max_new_tokens=6, history=[first.turn])
    assert first.turn == (Q1, first.text) and first.text
    assert second.history_used == 1
    assert seen.ids[-1] == second_answer_start(model.tokenizer, template, first.turn)
    # Only this round's [SEG] tokens give masks, never the ones in the history.
    assert second.masks.shape[0] == second.token_ids.count(model.seg_token_id)
    segment = predictor.predict(Q2, raw_prompt=True, mode="segment", history=[first.turn])
    assert seen.ids[-1] == second_answer_start(model.tokenizer, template, first.turn)
    assert segment.masks.shape[0] == 1 and segment.turn == (Q2, SEGMENT_ONLY_ANSWER)


@contextmanager
def forward_lengths(model) -> Iterator[list[int]]:
    """The number of new positions each LLM forward processes, in call order."""
    lengths: list[int] = []

    def hook(module, args, kwargs):
        x = kwargs.get("inputs_embeds")
        lengths.append(int((x if x is not None else kwargs["input_ids"]).shape[1]))

    handle = model.llm.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield lengths
    finally:
        handle.remove()


def test_history_with_the_prefix_cache_matches_no_cache(reference_model) -> None:
    rgb = read_rgb(IMG0)
    cached = LisaPredictor(reference_model)
    uncached = LisaPredictor(reference_model, cache_prefix=False)
    cached.set_image(rgb)
    uncached.set_image(rgb)
    first = cached.predict(Q1, raw_prompt=True, max_new_tokens=8)
    history = [first.turn, (Q2, A2)]
    for mode in ("generate", "segment"):
        with forward_lengths(reference_model) as fed_cached:
            a = cached.predict("the blue square", mode=mode, max_new_tokens=8, history=history)
        with forward_lengths(reference_model) as fed_full:
            b = uncached.predict("the blue square", mode=mode, max_new_tokens=8, history=history)
        assert a.token_ids == b.token_ids and a.text == b.text
        assert a.masks.shape == b.masks.shape and a.history_used == b.history_used == 2
        np.testing.assert_allclose(a.logits, b.logits, atol=1e-5)
        # The cache held the system prompt and the image; the history went with the query.
        prompt = cached.prompt_ids(format_query("the blue square"), history)
        assert fed_full[0] == len(prompt) + reference_model.num_image_tokens - 1
        assert fed_cached[0] == fed_full[0] - cached._frame.prefix_length
        # ... and the history matters: without it the mask logits are others.
        alone = cached.predict("the blue square", mode=mode, max_new_tokens=8)
        if alone.logits.shape == a.logits.shape:
            assert not np.allclose(alone.logits, a.logits, atol=1e-4)
    # The cache is back to the prefix after each query.
    assert cached._frame.prefix_cache.get_seq_length() == cached._frame.prefix_length


def test_a_history_too_long_for_the_model_drops_the_oldest_rounds(reference_model) -> None:
    predictor = LisaPredictor(reference_model)
    predictor.set_image(read_rgb(IMG0))
    history = [(f"Round {i}: " + "ball " * 400 + "?", A1) for i in range(6)]
    budget = predictor.query_budget(mode="segment")  # the fast path keeps no room for text
    room = budget.positions - budget.answer_tokens

    def positions(rounds) -> int:  # the image placeholder takes the image's positions
        return len(predictor.prompt_ids(Q2, rounds)) - 1 + budget.image_tokens

    assert positions(history) > room  # the whole history cannot fit
    result = predictor.predict(Q2, raw_prompt=True, mode="segment", history=history)
    kept = history[len(history) - result.history_used :]
    assert 0 < result.history_used < len(history)
    assert positions(kept) <= room
    assert positions(history[-result.history_used - 1 :]) > room
    same = predictor.predict(Q2, raw_prompt=True, mode="segment", history=kept)
    np.testing.assert_allclose(same.logits, result.logits, atol=1e-6)
    # A query that cannot fit even alone still fails clearly.
    with pytest.raises(ValueError, match="too long"):
        predictor.predict("ball " * 3000, history=history)


# ----------------------------------------------------------------------------- Conversation


def result_with(turn: tuple[str, str] | None) -> SegmentationResult:
    empty = np.zeros((0, 2, 2))
    return SegmentationResult(empty > 0, empty.astype(np.float32), "", turn=turn)


def test_conversation_keeps_the_newest_rounds_of_one_frame() -> None:
    conversation = Conversation(max_turns=2)
    assert conversation.history_for("frame-1") == () and conversation.frame == "frame-1"
    for i in range(3):
        assert conversation.record(result_with((f"q{i}", f"a{i}")), "frame-1")
    assert conversation.history_for("frame-1") == (("q1", "a1"), ("q2", "a2"))
    assert not conversation.record(result_with(None), "frame-1")  # nothing to remember
    assert len(conversation) == 2
    # Another frame: the earlier answers described another image.
    assert conversation.history_for(("stamp", 2.5)) == ()
    assert conversation.frame == ("stamp", 2.5) and len(conversation) == 0
    assert conversation.add("q", "a", ("stamp", 2.5))
    assert conversation.record(result_with(("q3", "a3")), "frame-3")
    assert conversation.turns == (("q3", "a3"),)
    conversation.reset()
    assert conversation.frame is None and conversation.turns == ()


def test_conversation_arguments() -> None:
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="max_turns"):
            Conversation(max_turns=bad)
    stateless = Conversation(max_turns=0)
    assert not stateless.add("q", "a", 1) and stateless.history_for(1) == ()
    with pytest.raises(ValueError, match="answer"):
        Conversation().add("q", " ", 1)
    with pytest.raises(ValueError, match="<image>"):
        Conversation().add("<image> q", "a", 1)


def test_conversation_with_the_predictor(reference_model) -> None:
    predictor = LisaPredictor(reference_model)
    predictor.set_image(read_rgb(IMG0))
    conversation = Conversation(max_turns=3)
    segment = predictor.predict(
        "the red ball", mode="segment", history=conversation.history_for(0)
    )
    assert segment.turn == (format_query("the red ball"), SEGMENT_ONLY_ANSWER)
    conversation.record(segment, 0)
    follow = predictor.predict(
        "Which one is on the left?", max_new_tokens=8, history=conversation.history_for(0)
    )
    assert follow.history_used == 1 and follow.turn == (
        format_query("Which one is on the left?"),
        follow.text,
    )
    conversation.record(follow, 0)
    assert conversation.turns == (segment.turn, follow.turn)
