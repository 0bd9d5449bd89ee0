"""Training and validation samples over every query of a reasoning-shapes split.

:class:`ShapesQueryDataset` draws training conversations from ``<split>/queries.jsonl``
(:mod:`training.shapes.records`) in the paper's question templates (the same ones as
:class:`~training.data.reason_seg.ReasonSegDataset`), so a model trained on it answers the
questions the predictor asks (:func:`lisa_model.prompts.format_query`) and the validation
template; its answers take the styles of :class:`ShapesQueryMix`, among them the query's concept
restated from its words (:func:`query_focus`, :func:`concept_answer`, :func:`terse_answer`).
:class:`ShapesValDataset` gives one teacher-forced validation sample per query (the ReasonSeg
validation template), for per-kind metrics over every query of a split. ``lisa-train`` reads
them as ``datasets: shapes`` (:mod:`training.data.mixture`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lisa_model.prompts import (
    ANSWER_LIST,
    EXPLANATORY_QUESTION_LIST,
    IMAGE_TOKEN,
    LONG_QUESTION_LIST,
    SEG_TOKEN,
    SEGMENT_ONLY_ANSWER,
    SHORT_QUESTION_LIST,
)
from training.data.types import (
    Sample,
    check_counts,
    check_image_size,
    check_index,
    item_rng,
    read_image,
    require_path,
)
from training.shapes.queries import QUERY_KINDS
from training.shapes.records import (
    PRESENT_GROUPS,
    ShapesImageRecord,
    ShapesQueriesFile,
    ShapesQueryRecord,
)
from training.shapes.writer import SIDECAR_FILE


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def segment_question(text: str, is_sentence: bool, rng: np.random.Generator) -> str:
    """A training question for ``text`` in the paper's templates (as ``ReasonSegDataset``)."""
    if is_sentence:
        return _pick(rng, LONG_QUESTION_LIST).format(sent=text)
    return _pick(rng, SHORT_QUESTION_LIST).format(class_name=text.lower())


#: Comparison concepts of :mod:`training.shapes.queries` -> (terse key, noun phrase) of their
#: target.
_COMPARISON_FOCUS: dict[str, tuple[str, str]] = {
    "most_corners": ("most corners", "one with the most corners"),
    "fewest_corners": ("fewest corners", "one with the fewest corners"),
    "biggest": ("biggest", "biggest one"),
    "smallest": ("smallest", "smallest one"),
    "closest_to_top": ("highest", "highest one"),
    "closest_to_bottom": ("lowest", "lowest one"),
    "closest_to_left": ("leftmost", "leftmost one"),
    "closest_to_right": ("rightmost", "rightmost one"),
}
_SIDES = ("left", "right", "top", "bottom")


@dataclass(frozen=True)
class Focus:
    """What a present-target query asks for, restated from its words alone.

    Attributes:
        key: the concept first, e.g. ``"green"``, ``"round"``, ``"red triangle"``,
            ``"biggest on the left"``; :func:`terse_answer` starts with it.
        phrase: a noun phrase, e.g. ``"green one"``, ``"round ones"``, ``"stars"``,
            ``"biggest one on the left"`` (plural when the query has several targets).
    """

    key: str
    phrase: str


@dataclass(frozen=True)
class Turn:
    """One drawn training conversation of a shapes sample.

    Attributes:
        question: the user's turn, ``<image>`` first (a training template).
        answer: the assistant's turn, one ``[SEG]`` per entry of ``masks``.
        text: the query text the question was made from.
        is_sentence: whether that text is a sentence (the long templates).
        masks: per ``[SEG]``, the object ids whose union is its target mask.
    """

    question: str
    answer: str
    text: str
    is_sentence: bool
    masks: tuple[tuple[int, ...], ...]


def query_focus(record: ShapesImageRecord, query: ShapesQueryRecord) -> Focus:
    """The :class:`Focus` of a present-target query (nothing in it needs the image).

    The colour or shape named by a concept comes from the query's targets (all targets of a
    colour / shape / roll query share it, and the query's words determine it: "the colour of
    grass" is green); comparisons restate the comparison ("the biggest one on the left"), whose
    winner only the image tells.

    Raises:
        ValueError: for an absent query, or a concept :mod:`training.shapes.queries` does not
            make.
    """
    if query.kind == "absent" or not query.target_ids:
        raise ValueError(f"query_focus: {query.texts[0]!r} has no target")
    many = len(query.target_ids) > 1
    first = record.objects[query.target_ids[0]]
    concept = query.concept
    if concept == "colour_shape":
        key = f"{first.colour} {first.shape}"
        return Focus(key, key + ("s" if many else ""))
    if concept in ("shape", "shape_knowledge"):
        return Focus(first.shape, first.shape + ("s" if many else ""))
    if concept in ("colour", "colour_knowledge"):
        return Focus(first.colour, f"{first.colour} {'ones' if many else 'one'}")
    if concept == "roll":
        return Focus("round", f"round {'ones' if many else 'one'}")
    if concept in _COMPARISON_FOCUS:
        return Focus(*_COMPARISON_FOCUS[concept])
    if concept in ("biggest_in_half", "smallest_in_half"):
        words = " ".join(query.texts).lower().replace("?", " ").split()
        side = next((s for s in _SIDES if s in words), None)
        if side is None:
            raise ValueError(f"query_focus: no side named in {query.texts!r} ({concept})")
        word = concept.split("_")[0]
        where = f"on the {side}" if side in ("left", "right") else f"at the {side}"
        return Focus(f"{word} {where}", f"{word} one {where}")
    raise ValueError(f"query_focus: unknown concept {concept!r} of {query.texts[0]!r}")


def _capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]


def concept_answer(record: ShapesImageRecord, query: ShapesQueryRecord) -> str:
    """``"It is the green one [SEG]."`` / ``"They are the round ones [SEG]."``: the query's
    concept restated (:func:`query_focus`), one ``[SEG]`` for the union of the targets."""
    focus = query_focus(record, query)
    if len(query.target_ids) > 1:
        return f"They are the {focus.phrase} {SEG_TOKEN}."
    return f"It is the {focus.phrase} {SEG_TOKEN}."


def terse_answer(record: ShapesImageRecord, query: ShapesQueryRecord) -> str:
    """``"Green [SEG]."`` / ``"Biggest on the left [SEG]."``: the concept key first, one
    ``[SEG]`` for the union of the targets.

    The answer's first token names the concept, so the language-model loss trains the hidden
    state of the prompt's last token (the one that feeds SAM in the fast path, whose answer is
    ``"[SEG]."``) to know what to look for.
    """
    return f"{_capitalised(query_focus(record, query).key)} {SEG_TOKEN}."


def val_question(text: str, is_sentence: bool) -> str:
    """The ReasonSeg validation question (as ``ReasonSegValDataset``) for ``text``."""
    text = text.strip()
    if is_sentence:
        return IMAGE_TOKEN + f"\n {text} Please output segmentation mask."
    return IMAGE_TOKEN + f"\n What is {text} in this image? Please output segmentation mask."


# --------------------------------------------------------------------------- training
@dataclass(frozen=True)
class ShapesQueryMix:
    """How :class:`ShapesQueryDataset` draws its conversations.

    A present-target answer takes one of five styles, drawn with the probabilities
    ``segment_answer``, ``plain_answer``, ``concept_answer``, ``terse_answer`` and the rest (the
    query's own answer):

    * segment: ``"[SEG]."`` right after the prompt, the union of the targets as its mask: the
      fast path's answer (the predictor's segment mode, the ReasonSeg validation), which reads
      the ``[SEG]`` embedding from the prompt's last token;
    * plain: one of the paper's ``ANSWER_LIST`` (``"It is [SEG]."``), the union of the targets
      as its mask;
    * concept: :func:`concept_answer`, ``"It is the green one [SEG]."``, the query's concept
      restated from its words (no perception needed to say it), union mask;
    * terse: :func:`terse_answer`, ``"Green [SEG]."``, union mask;
    * own: the generator's answer naming each target as seen (``"It is the green circle
      [SEG]."``, ``"They are the red star [SEG] and the blue ring [SEG]."``), one ``[SEG]``
      and mask per target.

    Attributes:
        absent: probability that a conversation asks for an absent target (answer without
            ``[SEG]``, e.g. ``"There is no purple star in this image."``).
        present_weights: weights of the present-target groups :data:`PRESENT_GROUPS`
            (explicit, reasoning phrase, reasoning sentence); a group is drawn, then a query in
            it uniformly. The default is the ReasonSeg json policy of
            :mod:`training.shapes.writer`.
        segment_answer / plain_answer / concept_answer / terse_answer: answer-style
            probabilities (sum <= 1).
        concepts: only queries of these concepts (``"colour"``, ``"colour_knowledge"``,
            ``"roll"``, ...; see :mod:`training.shapes.queries`); empty: all. An image without any
            such query uses all of its queries.
        explain: probability that the question asks for an explanation (the paper's
            ``EXPLANATORY_QUESTION_LIST``); the answer is then followed by the explanation.
    """

    absent: float = 0.2
    present_weights: tuple[float, float, float] = (0.2, 0.4, 0.4)
    concepts: tuple[str, ...] = ()
    segment_answer: float = 0.0
    plain_answer: float = 0.5
    concept_answer: float = 0.0
    terse_answer: float = 0.0
    explain: float = 0.1

    def __post_init__(self) -> None:
        names = (
            "absent",
            "segment_answer",
            "plain_answer",
            "concept_answer",
            "terse_answer",
            "explain",
        )
        for name in names:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"ShapesQueryMix.{name} must be in [0, 1], got {value}")
        styles = (self.segment_answer, self.plain_answer, self.concept_answer, self.terse_answer)
        if sum(styles) > 1.0 + 1e-9:
            raise ValueError(
                "ShapesQueryMix: segment_answer + plain_answer + concept_answer + terse_answer "
                f"must not exceed 1, got {' + '.join(str(x) for x in styles)}"
            )
        w = self.present_weights
        if len(w) != len(PRESENT_GROUPS) or min(w) < 0 or sum(w) <= 0:
            raise ValueError(
                f"ShapesQueryMix.present_weights must be 3 weights >= 0 (explicit, reasoning "
                f"phrase, reasoning sentence), not all zero; got {w}"
            )

    def answer_style(self, u: float) -> str:
        """``"segment"``, ``"plain"``, ``"concept"``, ``"terse"`` or ``"own"`` for a uniform
        draw ``u``."""
        for style, p in (
            ("segment", self.segment_answer),
            ("plain", self.plain_answer),
            ("concept", self.concept_answer),
            ("terse", self.terse_answer),
        ):
            if u < p:
                return style
            u -= p
        return "own"


class ShapesQueryDataset:
    """Training samples over the full query set of a shapes split, seeded per item.

    Item ``idx`` reads image ``idx % n_images`` and draws from ``item_rng(seed, idx, epoch)``
    ``num_queries_per_image`` distinct queries (one conversation each) as :class:`ShapesQueryMix`
    says. Questions: sentences in ``LONG_QUESTION_LIST``, phrases (lower-cased) in
    ``SHORT_QUESTION_LIST``, or ``"<image>\\n" + text + " " + EXPLANATORY_QUESTION`` when an
    explanation is asked for. Answers: the style :class:`ShapesQueryMix` draws (one union
    mask, or one mask per target in ``[SEG]`` order for the query's own answer); absent targets:
    the query's answer, no mask; plus ``" " + explanation`` when asked. ``masks`` hold one mask per
    ``[SEG]`` over all conversations in order; ``label`` is all zero (nothing ignored).

    Args:
        root: the data set directory (holding ``<split>/queries.jsonl`` and the images).
        split: ``"train"``, ``"val"`` or ``"test"``.
        seed: base seed of the per-item generators.
        num_queries_per_image: conversations per sample (fewer when the image has fewer queries).
        mix: the conversation mix.
        samples_per_epoch: dataset length (wrapping over the images); defaults to the image count.
    """

    source = "shapes"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        seed: int = 0,
        num_queries_per_image: int = 3,
        mix: ShapesQueryMix | None = None,
        samples_per_epoch: int | None = None,
    ) -> None:
        check_counts(
            num_queries_per_image=num_queries_per_image, samples_per_epoch=samples_per_epoch
        )
        self.root = Path(root)
        self.split = split
        self.split_dir = require_path(self.root / split, "shapes split directory")
        self.file = ShapesQueriesFile(self.split_dir / SIDECAR_FILE)
        self.seed = int(seed)
        self.epoch = 0
        self.num_queries_per_image = int(num_queries_per_image)
        self.mix = mix or ShapesQueryMix()
        self.samples_per_epoch = samples_per_epoch

    def __len__(self) -> int:
        return self.samples_per_epoch or len(self.file)

    def set_epoch(self, epoch: int) -> None:
        """Mix ``epoch`` into the per-item generators (fresh draws every epoch)."""
        self.epoch = int(epoch)

    def _choose(self, record: ShapesImageRecord, rng: np.random.Generator) -> list[int]:
        """Indices of the queries of one sample: distinct, in draw order.

        Each draw takes an absent query with probability ``mix.absent``, else a present group
        by ``mix.present_weights`` and a query in it uniformly; when one side has run out the
        other is used (and groups whose weights are all zero are drawn uniformly).
        """
        pools: dict[str, list[int]] = {g: [] for g in ("absent", *PRESENT_GROUPS)}
        wanted = set(self.mix.concepts)
        eligible = [j for j, q in enumerate(record.queries) if not wanted or q.concept in wanted]
        eligible = eligible or list(range(len(record.queries)))
        for j in eligible:
            pools[record.queries[j].group].append(j)
        chosen: list[int] = []
        while len(chosen) < min(self.num_queries_per_image, len(eligible)):
            present = [g for g in PRESENT_GROUPS if pools[g]]
            if pools["absent"] and (not present or rng.random() < self.mix.absent):
                pool = pools["absent"]
            else:
                w = np.array([self.mix.present_weights[PRESENT_GROUPS.index(g)] for g in present])
                if w.sum() == 0:
                    w = np.ones(len(present))
                pool = pools[present[int(rng.choice(len(present), p=w / w.sum()))]]
            chosen.append(pool.pop(int(rng.integers(len(pool)))))
        return chosen

    def draw_turns(self, record: ShapesImageRecord, rng: np.random.Generator) -> list[Turn]:
        """The conversations of one sample of ``record`` (no image is read): the queries
        :meth:`_choose` picks, each asked in a training template and answered in a style of
        :attr:`mix`. Also what :func:`training.demo_model.language.warm_up_language` trains on."""
        turns = []
        for j in self._choose(record, rng):
            q = record.queries[j]
            text = _pick(rng, q.texts)
            explain = rng.random() < self.mix.explain
            if explain:
                question = IMAGE_TOKEN + "\n" + text + " " + _pick(rng, EXPLANATORY_QUESTION_LIST)
            else:
                question = segment_question(text, q.is_sentence, rng)
            style = self.mix.answer_style(rng.random())
            if q.kind == "absent" or style == "own":
                answer = q.answer
                groups = tuple((k,) for k in q.target_ids)
            else:
                if style == "segment":
                    answer = SEGMENT_ONLY_ANSWER
                elif style == "plain":
                    answer = _pick(rng, ANSWER_LIST)
                elif style == "concept":
                    answer = concept_answer(record, q)
                else:
                    answer = terse_answer(record, q)
                groups = (tuple(q.target_ids),)
            if explain:
                answer = answer + " " + q.explanation
            turns.append(Turn(question, answer, text, q.is_sentence, groups))
        return turns

    def __getitem__(self, idx: int) -> Sample:
        i = check_index(idx, len(self), "ShapesQueryDataset")
        rng = item_rng(self.seed, i, self.epoch)
        record = self.file.record(i % len(self.file))
        image_path = self.split_dir / record.image
        image = read_image(image_path)
        check_image_size(image, (record.height, record.width), image_path, str(self.file.path))

        conversations, masks, texts = [], [], []
        turns = self.draw_turns(record, rng)
        for turn in turns:
            texts.append(turn.text)
            conversations.append([(turn.question, turn.answer)])
            for group in turn.masks:
                union = np.zeros((record.height, record.width), dtype=np.uint8)
                for k in group:
                    union |= record.object_mask(k)
                masks.append(union)

        h, w = record.height, record.width
        return Sample(
            image_path=str(image_path),
            image=image,
            conversations=conversations,
            masks=np.stack(masks) if masks else np.zeros((0, h, w), dtype=np.uint8),
            label=np.zeros((h, w), dtype=np.uint8),
            texts=texts,
            is_sentence=turns[0].is_sentence,
            source=self.source,
        ).validate()


# --------------------------------------------------------------------------- validation
class ShapesValDataset:
    """One teacher-forced validation sample per (image, query), no randomness.

    Present targets: the ReasonSeg validation question for the query's first text, answer
    ``"[SEG]."``, mask = the union of the targets (what the fast path is scored on). Absent
    targets (only with ``"absent"`` in ``kinds``): the same question, the query's answer, no mask.

    Args:
        root / split: as :class:`ShapesQueryDataset`.
        kinds: query kinds to include, out of ``("explicit", "reasoning", "absent")``.
        json_only: only the query each image's ReasonSeg json holds (the ReasonSeg val set).
        max_images: only the first this many images (all by default).
        concepts: only queries of these concepts (all by default).
    """

    source = "shapes"

    def __init__(
        self,
        root: str | Path,
        split: str = "val",
        kinds: Sequence[str] = ("explicit", "reasoning"),
        json_only: bool = False,
        max_images: int | None = None,
        concepts: Collection[str] | None = None,
    ) -> None:
        bad = [k for k in kinds if k not in QUERY_KINDS]
        if bad or not kinds:
            raise ValueError(f"kinds {list(kinds)}: expected a non-empty subset of {QUERY_KINDS}")
        self.root = Path(root)
        self.split_dir = require_path(self.root / split, "shapes split directory")
        self.file = ShapesQueriesFile(self.split_dir / SIDECAR_FILE)
        self.items: list[tuple[int, int]] = []
        self._queries: list[ShapesQueryRecord] = []
        n_images = len(self.file) if max_images is None else min(max_images, len(self.file))
        for i in range(n_images):
            record = self.file.record(i)
            picks = [record.json_query] if json_only else range(len(record.queries))
            for j in picks:
                q = record.queries[j]
                if q.kind in kinds and (concepts is None or q.concept in concepts):
                    self.items.append((i, j))
                    self._queries.append(q)

    def __len__(self) -> int:
        return len(self.items)

    def query(self, idx: int) -> ShapesQueryRecord:
        """The query of item ``idx`` (kind, concept, targets for per-kind breakdowns)."""
        return self._queries[check_index(idx, len(self), "ShapesValDataset")]

    def __getitem__(self, idx: int) -> Sample:
        n = check_index(idx, len(self), "ShapesValDataset")
        i, j = self.items[n]
        record = self.file.record(i)
        q = record.queries[j]
        image_path = self.split_dir / record.image
        image = read_image(image_path)
        check_image_size(image, (record.height, record.width), image_path, str(self.file.path))
        text = q.texts[0].strip()
        h, w = record.height, record.width
        if q.kind == "absent":
            answer, masks = q.answer, np.zeros((0, h, w), dtype=np.uint8)
        else:
            answer, masks = SEGMENT_ONLY_ANSWER, record.union_mask(q.target_ids)[None]
        return Sample(
            image_path=str(image_path),
            image=image,
            conversations=[[(val_question(text, q.is_sentence), answer)]],
            masks=masks,
            label=np.zeros((h, w), dtype=np.uint8),
            texts=[text],
            is_sentence=q.is_sentence,
            source=self.source,
        ).validate()
