"""Conversation templates and the question/answer lists of the original LISA.

The strings here are the published ones, character for character: the checkpoints were trained on
them, and the token ids (including the whitespace the tokenizer strips next to added tokens) depend
on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

IMAGE_TOKEN = "<image>"
IM_START_TOKEN = "<im_start>"
IM_END_TOKEN = "<im_end>"
IM_PATCH_TOKEN = "<im_patch>"
SEG_TOKEN = "[SEG]"
#: The id the image placeholder gets in ``input_ids``; replaced by the projected CLIP features.
IMAGE_TOKEN_INDEX = -200

SHORT_QUESTION_LIST = (
    IMAGE_TOKEN + "\nCan you segment the {class_name} in this image?",
    IMAGE_TOKEN + "\nPlease segment the {class_name} in this image.",
    IMAGE_TOKEN + "\nWhat is {class_name} in this image? Please respond with segmentation mask.",
    IMAGE_TOKEN + "\nWhat is {class_name} in this image? Please output segmentation mask.",
)
LONG_QUESTION_LIST = (
    IMAGE_TOKEN + "\n{sent} Please respond with segmentation mask.",
    IMAGE_TOKEN + "\n{sent} Please output segmentation mask.",
)
EXPLANATORY_QUESTION_LIST = (
    "Please output segmentation mask and explain why.",
    "Please output segmentation mask and explain the reason.",
    "Please output segmentation mask and give some explanation.",
)
ANSWER_LIST = (
    "It is [SEG].",
    "Sure, [SEG].",
    "Sure, it is [SEG].",
    "Sure, the segmentation result is [SEG].",
    "[SEG].",
)

#: The fixed answer of the teacher-forced (segment-only / validation) path.
SEGMENT_ONLY_ANSWER = "[SEG]."


@dataclass(frozen=True)
class ConversationTemplate:
    """One chat format. ``style`` is ``"two"`` (llava_v1) or ``"llama_2"``."""

    name: str
    system: str
    roles: tuple[str, str]
    style: str
    sep: str
    sep2: str

    def render(self, messages: list[tuple[str, str | None]]) -> str:
        """Render ``[(role, text), ...]``; a ``None`` text leaves the turn open for the model.

        Roles must alternate user/assistant starting with the user, as in the original.
        """
        for i, (role, _) in enumerate(messages):
            if role != self.roles[i % 2]:
                raise ValueError(
                    f"template {self.name!r}: message {i} has role {role!r}, "
                    f"expected {self.roles[i % 2]!r}"
                )
        if self.style == "two":
            seps = (self.sep, self.sep2)
            out = self.system + seps[0]
            for i, (role, text) in enumerate(messages):
                out += f"{role}: {text}{seps[i % 2]}" if text else f"{role}:"
            return out
        if self.style == "llama_2":
            out = ""
            for i, (_, text) in enumerate(messages):
                if i == 0 and not text:
                    raise ValueError(
                        f"template {self.name!r}: the first message must not be empty"
                    )
                if not text:
                    continue
                if i == 0:
                    text = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n" + text
                if i % 2 == 0:
                    out += self.sep + f"[INST] {text} [/INST]"
                else:
                    out += " " + text + " " + self.sep2
            # str.lstrip with a multi-character argument strips characters, as the original does.
            return out.lstrip(self.sep)
        raise ValueError(f"template {self.name!r}: unknown style {self.style!r}")

    @property
    def answer_separator(self) -> str:
        """The string after which the assistant's answer starts within one round."""
        return self.roles[1] + ": " if self.style == "two" else "[/INST] "

    @property
    def round_separator(self) -> str:
        """The string that ends one user/assistant round."""
        return self.sep2


TEMPLATES: dict[str, ConversationTemplate] = {
    "llava_v1": ConversationTemplate(
        name="llava_v1",
        system=(
            "A chat between a curious human and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the human's questions."
        ),
        roles=("USER", "ASSISTANT"),
        style="two",
        sep=" ",
        sep2="</s>",
    ),
    "llava_llama_2": ConversationTemplate(
        name="llava_llama_2",
        system=(
            "You are a helpful language and vision assistant. You are able to understand the "
            "visual content that the user provides, and assist the user with a variety of tasks "
            "using natural language."
        ),
        roles=("USER", "ASSISTANT"),
        style="llama_2",
        sep="<s>",
        sep2="</s>",
    ),
}


def get_template(name: str) -> ConversationTemplate:
    """The template called ``name`` (``llava_v1`` or ``llava_llama_2``)."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(
            f"unknown conversation template {name!r}; expected one of {sorted(TEMPLATES)}"
        ) from None


def expand_image_token(text: str, use_im_start_end: bool = True) -> str:
    """``<image>`` -> ``<im_start><image><im_end>`` as the published checkpoints expect."""
    if not use_im_start_end:
        return text
    return text.replace(IMAGE_TOKEN, IM_START_TOKEN + IMAGE_TOKEN + IM_END_TOKEN)


def check_history(history: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """Validate earlier rounds ``[(user_text, answer), ...]``; return them as a tuple of pairs.

    Raises:
        ValueError: a round that is not a pair of strings, an empty question or answer, or text
            holding the image placeholder (the image is only ever in the first user turn).
    """
    rounds = []
    for i, item in enumerate(history):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError(f"history round {i} must be a (user text, answer) pair, got {item!r}")
        question, answer = item
        for name, text in (("user text", question), ("answer", answer)):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"history round {i}: the {name} must be a non-empty string")
            if IMAGE_TOKEN in text:
                raise ValueError(f"history round {i}: the {name} must not contain {IMAGE_TOKEN}")
        rounds.append((question, answer))
    return tuple(rounds)


def build_chat_prompt(
    user_text: str,
    template: str = "llava_v1",
    answer: str | None = None,
    use_im_start_end: bool = True,
    history: Sequence[tuple[str, str]] = (),
) -> str:
    """The prompt the original ``chat.py`` builds for a question about one image.

    ``user_text`` is what the user typed (no ``<image>``); the image placeholder is prepended to
    the first user turn. With ``answer=None`` the assistant turn is left open (generation); with
    an answer the string is the teacher-forced conversation (the original appends ``</s>`` to a
    finished llava_v1 turn).

    ``history`` holds earlier rounds on the same image, ``(user_text, answer)`` oldest first
    (see :func:`check_history`). They come first, in the multi-round layout the checkpoints
    were trained with (LLaVA's instruction data): the image in the first user turn only, each
    earlier answer closed by the template's round separator (``</s>``), e.g. for llava_v1
    ``"{system} USER: <im_start><image><im_end>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:"``.
    """
    rounds: list[tuple[str, str | None]] = [*check_history(history), (user_text, answer)]
    first, first_answer = rounds[0]
    rounds[0] = (IMAGE_TOKEN + "\n" + first, first_answer)
    return render_conversation(rounds, template, use_im_start_end)


def render_conversation(
    rounds: Sequence[tuple[str, str | None]],
    template: str = "llava_v1",
    use_im_start_end: bool = True,
) -> str:
    """A multi-round conversation ``[(question, answer), ...]`` as training sees it.

    Questions already carry their ``<image>`` placeholder (the dataset templates put it first).
    A ``None`` answer (last round only) leaves the assistant turn open for generation.
    """
    conv = get_template(template)
    messages: list[tuple[str, str | None]] = []
    for question, answer in rounds:
        messages.append((conv.roles[0], expand_image_token(question, use_im_start_end)))
        messages.append((conv.roles[1], answer))
    return conv.render(messages)


_SENTENCE_END = (".", "?", "!")
#: Commands longer than this many words are treated as sentences (LONG template).
SHORT_PHRASE_MAX_WORDS = 8


def is_sentence(query: str) -> bool:
    """Whether a command reads as a sentence (ReasonSeg ``is_sentence``) rather than a phrase."""
    text = query.strip()
    return text.endswith(_SENTENCE_END) or len(text.split()) > SHORT_PHRASE_MAX_WORDS


def format_query(query: str, explain: bool = False) -> str:
    """Turn a robot command into the question style the checkpoints were trained on.

    - already LISA-style (mentions "segmentation mask"): kept as is;
    - ``explain``: ``"{query} Please output segmentation mask and explain why."``;
    - a sentence: ``"{sentence} Please output segmentation mask."`` (LONG template);
    - a phrase: ``"What is {phrase} in this image? Please output segmentation mask."``.

    Whitespace runs are collapsed; raises ``ValueError`` for an empty query.
    """
    text = " ".join(query.split())
    if not text:
        raise ValueError("empty query: expected a description of what to segment")
    if "segmentation mask" in text.lower():
        return text
    if explain:
        return f"{text} {EXPLANATORY_QUESTION_LIST[0]}"
    if is_sentence(text):
        return f"{text} Please output segmentation mask."
    return f"What is {text} in this image? Please output segmentation mask."
