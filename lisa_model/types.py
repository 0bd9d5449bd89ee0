"""Typed results shared by the predictor, the CLI, the ROS node and the evaluation tools."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SegmentationResult:
    """What one query on one frame produced.

    Attributes:
        masks: ``(N, H, W)`` bool, one mask per ``[SEG]`` in the answer, in the original image
            frame (the ``rgb`` given to ``set_image``). ``N == 0`` when nothing was found.
        logits: ``(N, H, W)`` float32 mask logits in the same frame; ``masks == logits > 0``.
        text: the answer with ``[SEG]`` kept as a readable marker (``"It is [SEG]."``), without
            the prompt, BOS/EOS or padding. Empty for the segment-only path.
        found: ``N > 0``.
        token_ids: generated token ids (empty for the segment-only path).
        timings: seconds per stage of this call (``"llm"``, ``"mask_decoder"``, ...).
        turn: this query and answer as a later ``predict(..., history=...)`` takes them:
            ``(user text as put in the prompt, answer)``. The answer is ``text`` when
            generating, the fixed teacher-forced answer ``"[SEG]."`` on the segment-only path;
            None when there is nothing to remember (an empty generated answer, or one holding
            the image placeholder, which a prompt cannot repeat).
        history_used: how many of the earlier rounds given as ``history`` were in the prompt
            (the oldest are dropped when the prompt would not fit the model's positions).
    """

    masks: np.ndarray
    logits: np.ndarray
    text: str
    token_ids: list[int] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    turn: tuple[str, str] | None = None
    history_used: int = 0

    @property
    def found(self) -> bool:
        return int(self.masks.shape[0]) > 0

    @property
    def union_mask(self) -> np.ndarray:
        """``(H, W)`` bool union of all masks (all False when nothing was found)."""
        if self.masks.shape[0] == 0:
            return np.zeros(self.masks.shape[1:], dtype=bool)
        return self.masks.any(axis=0)
