"""Follow-up commands: the rounds of a conversation about one frame.

A command may refer to the previous answer on the same frame ("the mugs" ... "now the one on the
left"). :class:`Conversation` keeps those rounds and hands them to
``LisaPredictor.predict(history=...)``, which puts them in the prompt in the multi-round format
the checkpoints were trained with (:func:`lisa_model.prompts.build_chat_prompt`)::

    conversation = Conversation(max_turns=3)
    result = predictor.predict(query, history=conversation.history_for(frame_key))
    conversation.record(result, frame_key)

What a round holds: the user turn exactly as it was put in the prompt (after
:func:`lisa_model.prompts.format_query`) and the assistant's answer, both taken from the result's
``turn``. A generated answer is the answer text with ``[SEG]`` kept (``"Sure, [SEG]."``); the
segment-only path generates no text, so its answer is the fixed ``"[SEG]."`` it teacher-forces
(:data:`lisa_model.prompts.SEGMENT_ONLY_ANSWER`, the validation answer of the original). A
result without an answer (an empty generation) adds no round.

A conversation belongs to one frame: a query on another frame starts a new conversation, since
the earlier answers describe another image. Frame keys are any values compared with ``==`` (the
node: the colour frame's stamp and ``frame_id``). At most ``max_turns`` rounds are kept (the
oldest go first); the predictor also drops the oldest rounds when the prompt would not fit the
model's positions, so a long conversation never makes a query fail.
"""

from __future__ import annotations

from collections.abc import Hashable

from lisa_model.prompts import check_history
from lisa_model.types import SegmentationResult


class Conversation:
    """The rounds of a conversation about one frame (see the module docstring).

    Args:
        max_turns: most earlier rounds kept (0: none, every query stands alone).

    Not thread-safe: the one thread that runs the model owns it.
    """

    def __init__(self, max_turns: int = 3) -> None:
        if isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 0:
            raise ValueError(f"max_turns must be an integer >= 0, got {max_turns!r}")
        self.max_turns = max_turns
        self._frame: Hashable | None = None
        self._turns: list[tuple[str, str]] = []

    @property
    def frame(self) -> Hashable | None:
        """The key of the frame the rounds are about (None before the first round)."""
        return self._frame

    @property
    def turns(self) -> tuple[tuple[str, str], ...]:
        """The rounds kept, ``(user text, answer)``, oldest first."""
        return tuple(self._turns)

    def __len__(self) -> int:
        return len(self._turns)

    def history_for(self, frame: Hashable) -> tuple[tuple[str, str], ...]:
        """The rounds to give ``predict(history=...)`` for a query on ``frame``.

        A frame other than the conversation's starts a new, empty conversation about it.
        """
        self._switch(frame)
        return tuple(self._turns)

    def record(self, result: SegmentationResult, frame: Hashable) -> bool:
        """Keep the round ``result`` answered on ``frame`` (``result.turn``).

        Returns:
            Whether a round was added (False when the result has no answer to remember or
            ``max_turns`` is 0).
        """
        if result.turn is None:
            self._switch(frame)
            return False
        question, answer = result.turn
        return self.add(question, answer, frame)

    def add(self, user_text: str, answer: str, frame: Hashable) -> bool:
        """Keep a round given as text (e.g. the previous question and answer of an action goal).

        ``user_text`` is the user turn as it goes in the prompt (a result's ``turn[0]``, or a
        command put through :func:`lisa_model.prompts.format_query`).

        Raises:
            ValueError: an empty text or one holding the image placeholder.
        """
        check_history([(user_text, answer)])
        self._switch(frame)
        if self.max_turns == 0:
            return False
        self._turns.append((user_text, answer))
        del self._turns[: -self.max_turns]
        return True

    def reset(self, frame: Hashable | None = None) -> None:
        """Forget every round; the conversation is then about ``frame``."""
        self._frame = frame
        self._turns.clear()

    def _switch(self, frame: Hashable) -> None:
        if frame != self._frame:
            self.reset(frame)
