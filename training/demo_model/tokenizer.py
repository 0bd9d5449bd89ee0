"""The demo model's tokenizer: SentencePiece trained on the shapes data's own sentences."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

from lisa_model.builders import ADDED_TOKEN_LAYOUTS
from lisa_model.prompts import (
    ANSWER_LIST,
    EXPLANATORY_QUESTION_LIST,
    LONG_QUESTION_LIST,
    SHORT_QUESTION_LIST,
    TEMPLATES,
)
from lisa_model.tokenizer import LisaTokenizer, train_sentencepiece
from training.shapes.datasets import concept_answer, terse_answer
from training.shapes.records import ShapesQueriesFile
from training.shapes.writer import SIDECAR_FILE

#: SentencePiece vocabulary size of the demo tokenizer (before the added tokens).
DEMO_VOCAB_SIZE = 1000
DEMO_TOKEN_LAYOUT = "7b-v1"
#: How often the fixed template sentences enter the tokenizer corpus.
TEMPLATE_REPEATS = 5000


def demo_corpus(data_dir: str | Path, split: str = "train") -> Iterator[str]:
    """Sentences the demo tokenizer is trained on, in a fixed order.

    The chat template's system prompt and roles and the paper's question/answer templates
    (each :data:`TEMPLATE_REPEATS` times: they are in every conversation, so their words should
    be single pieces), then every text, answer and explanation of
    ``<data_dir>/<split>/queries.jsonl`` (line order).
    """
    templates = []
    for template in TEMPLATES.values():
        templates += [template.system, " ".join(template.roles) + ":"]
    for question in (*SHORT_QUESTION_LIST, *LONG_QUESTION_LIST):
        templates.append(
            question.replace("<image>\n", "").format(class_name="the red circle", sent="")
        )
    templates += [*EXPLANATORY_QUESTION_LIST, *ANSWER_LIST]
    for _ in range(TEMPLATE_REPEATS):
        yield from templates
    sidecar = ShapesQueriesFile(Path(data_dir) / split / SIDECAR_FILE)
    for i in range(len(sidecar)):
        record = sidecar.record(i)
        for query in record.queries:
            yield from query.texts
            yield query.answer
            yield query.explanation
            if query.target_ids:
                yield concept_answer(record, query)
                yield terse_answer(record, query)


def train_demo_tokenizer(
    data_dir: str | Path, vocab_size: int = DEMO_VOCAB_SIZE, split: str = "train"
) -> LisaTokenizer:
    """A LISA tokenizer whose SentencePiece model is trained on :func:`demo_corpus`.

    Deterministic: the same data gives the same ids. ``[SEG]`` and the image tokens are
    added after the SentencePiece pieces (LISA-7B-v1 order).
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = train_sentencepiece(
            demo_corpus(data_dir, split), vocab_size, Path(tmp) / "sp.model"
        )
        return LisaTokenizer.from_sentencepiece(
            path.read_bytes(), ADDED_TOKEN_LAYOUTS[DEMO_TOKEN_LAYOUT]
        )
