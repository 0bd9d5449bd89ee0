"""``LisaPredictor``: numpy in, numpy out, with per-frame caching.

``set_image(rgb)`` does everything that depends only on the frame: CLIP features, the SAM image
embedding, and the LLM's KV cache for the prompt up to the image (the system prompt, ``USER:``
and the image tokens), so several queries on one frame pay for these once.

``predict(query)`` then answers one query in one of two ways:

- ``mode="generate"`` (default): greedy decoding with a KV cache, one mask per emitted ``[SEG]``,
  stopping at EOS or ``max_new_tokens``; ``found`` is False when no ``[SEG]`` was produced.
  This is what the original ``chat.py`` does (without its per-token recomputation).
- ``mode="segment"``: the fast path; one teacher-forced forward of the prompt whose answer is
  ``"[SEG]."`` (as the original's validation), i.e. exactly one mask and no decoding loop.

A query must fit the model's positions (``max_position_embeddings``) together with the image
tokens, the chat template and the answer: :meth:`LisaPredictor.check_query` raises
:class:`QueryTooLongError` (limit in tokens and an estimate in characters) before any work, and
:meth:`LisaPredictor.query_budget` gives the limit itself (to log it, or to show it to a user).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lisa_model.generation import crop_cache, greedy_generate
from lisa_model.modeling import LisaModel
from lisa_model.options import check_mode
from lisa_model.processing import postprocess_masks, prepare_image
from lisa_model.prompts import (
    ANSWER_LIST,
    EXPLANATORY_QUESTION_LIST,
    IM_END_TOKEN,
    IMAGE_TOKEN,
    LONG_QUESTION_LIST,
    SEGMENT_ONLY_ANSWER,
    SHORT_QUESTION_LIST,
    build_chat_prompt,
    check_history,
    format_query,
)
from lisa_model.types import SegmentationResult

#: English text whose characters per token estimate how many characters fit a token budget.
_CHARS_SAMPLE = " ".join(
    q.replace(IMAGE_TOKEN, "").format(class_name="the red mug", sent="Where could I put the keys?")
    for q in SHORT_QUESTION_LIST + LONG_QUESTION_LIST + EXPLANATORY_QUESTION_LIST + ANSWER_LIST
).strip()


class QueryTooLongError(ValueError):
    """A query does not fit the model's positions after the image, the prompt and the answer.

    Attributes:
        tokens: how many tokens the query takes.
        max_tokens: the most tokens a query of this kind may take with these options.
        max_chars_estimate: about how many characters that is (at this query's characters per
            token).
        positions: the model's positions (``max_position_embeddings``).
    """

    def __init__(
        self, tokens: int, max_tokens: int, max_chars_estimate: int, positions: int
    ) -> None:
        self.tokens = tokens
        self.max_tokens = max_tokens
        self.max_chars_estimate = max_chars_estimate
        self.positions = positions
        super().__init__(
            f"query too long: {tokens} tokens, at most {max_tokens} tokens fit (about "
            f"{max_chars_estimate} characters): the model has {positions} positions for the "
            "image, the prompt template, the query and the answer"
        )


@dataclass(frozen=True)
class QueryBudget:
    """How long a query may be (see :meth:`LisaPredictor.query_budget`).

    Attributes:
        max_tokens: the most tokens a query may take (the smallest over the prompt styles the
            options allow; :meth:`LisaPredictor.check_query` is exact for a given query).
        max_chars_estimate: about how many characters of English that is.
        positions: the model's positions (``max_position_embeddings``).
        image_tokens: positions the image takes.
        answer_tokens: positions kept for the answer (``max_new_tokens - 1`` when generating).
    """

    max_tokens: int
    max_chars_estimate: int
    positions: int
    image_tokens: int
    answer_tokens: int


@dataclass
class _FrameCache:
    """Per-frame state. Shapes: ``image_features (1, P, H)``, ``image_embedding (1,256,64,64)``."""

    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    image_features: torch.Tensor
    image_embedding: torch.Tensor
    prefix_ids: list[int] | None = None
    prefix_cache: object | None = None
    prefix_length: int = 0  # positions held by prefix_cache (image tokens expanded)


class LisaPredictor:
    """Answers queries about one frame at a time (see the module docstring).

    Args:
        model: a loaded :class:`~lisa_model.modeling.LisaModel` (eval mode).
        template: chat template; defaults to the checkpoint's (``llava_v1``).
        cache_prefix: keep the prompt prefix's KV cache per frame (on by default).
        sync_timings: synchronise CUDA around stages so ``timings`` are exact (slower).
        compile: ``torch.compile`` the model's fixed-shape image encoders in place
            (:func:`lisa_model.speed.compile_model`); worth it on a GPU, slow to warm up.
    """

    def __init__(
        self,
        model: LisaModel,
        template: str | None = None,
        cache_prefix: bool = True,
        sync_timings: bool = False,
        compile: bool = False,
    ) -> None:
        if compile:
            from lisa_model.speed import compile_model

            compile_model(model)
        self.model = model
        self.template = template or model.config.conv_template
        self.cache_prefix = cache_prefix
        self.sync_timings = sync_timings
        self._frame: _FrameCache | None = None
        self.last_set_image_timings: dict[str, float] = {}

    # ------------------------------------------------------------------ frame
    @property
    def is_image_set(self) -> bool:
        return self._frame is not None

    def reset_image(self) -> None:
        """Forget the current frame (frees its cached tensors)."""
        self._frame = None

    @torch.inference_mode()
    def set_image(self, rgb: np.ndarray) -> None:
        """Compute and cache the per-frame work for ``rgb``: ``(H, W, 3)`` uint8 RGB."""
        model = self.model
        timings: dict[str, float] = {}
        self._frame = None
        t0 = self._now()
        prepared = prepare_image(rgb, sam_size=model.sam_image_size)
        t1 = self._now()
        features = model.encode_clip(prepared.clip.unsqueeze(0))  # (1, P, H)
        t2 = self._now()
        embedding = model.encode_sam(prepared.sam.unsqueeze(0))  # (1, 256, 64, 64)
        t3 = self._now()
        frame = _FrameCache(prepared.original_hw, prepared.resized_hw, features, embedding)
        if self.cache_prefix:
            prefix_ids = self._prefix_ids()
            embeds = self._embed(prefix_ids, frame)
            from transformers import DynamicCache

            cache = DynamicCache()
            model.llm.model(inputs_embeds=embeds, cache=cache, use_cache=True)
            frame.prefix_ids, frame.prefix_cache = prefix_ids, cache
            frame.prefix_length = embeds.shape[1]
        t4 = self._now()
        timings.update(preprocess=t1 - t0, clip=t2 - t1, sam_encoder=t3 - t2, llm_prefix=t4 - t3)
        self.last_set_image_timings = timings
        self._frame = frame

    # ------------------------------------------------------------------ query
    @torch.inference_mode()
    def predict(
        self,
        query: str,
        explain: bool = False,
        max_new_tokens: int = 64,
        mode: str = "generate",
        raw_prompt: bool = False,
        history: Sequence[tuple[str, str]] = (),
    ) -> SegmentationResult:
        """Answer ``query`` about the current frame.

        Args:
            query: what to segment, in plain language. Unless ``raw_prompt``, it is put in the
                trained question style by :func:`lisa_model.prompts.format_query`.
            explain: ask for an explanation (generation only).
            max_new_tokens: decoding budget (generation only).
            mode: ``"generate"`` or ``"segment"`` (fast path, exactly one mask, no text).
            raw_prompt: use ``query`` verbatim as the user turn (what ``chat.py`` does).
            history: earlier rounds on this frame, ``(user text, answer)`` oldest first, as
                earlier results' ``turn`` give them (``lisa_model.conversation.Conversation``
                keeps them). They go into the prompt after the cached image prefix, in the
                trained multi-round format (:func:`lisa_model.prompts.build_chat_prompt`); the
                oldest are dropped when the prompt would not fit the model's positions
                (``result.history_used`` says how many were kept). ``[SEG]`` in earlier answers
                stays as text: only this turn's ``[SEG]`` tokens give masks.

        Returns:
            :class:`~lisa_model.types.SegmentationResult` with masks in the frame of the image
            given to :meth:`set_image`.
        """
        if self._frame is None:
            raise RuntimeError("no image set: call set_image(rgb) before predict()")
        prompt_ids = self._checked_prompt_ids(query, explain, mode, max_new_tokens, raw_prompt)
        user_text = query.strip() if raw_prompt else format_query(query, explain)
        if history:
            prompt_ids, history = self._fit_history(user_text, history, mode, max_new_tokens)
        frame = self._frame
        timings: dict[str, float] = {}
        t0 = self._now()
        cache, embeds = self._prompt_inputs(prompt_ids, frame)
        try:
            if mode == "segment":
                out = self.model.llm.model(inputs_embeds=embeds, cache=cache, use_cache=True)
                seg_hidden = out.last_hidden_state[0, -1:]  # (1, H): the state before [SEG]
                tokens: list[int] = []
            else:
                gen = greedy_generate(
                    self.model.llm,
                    embeds,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=self.model.eos_token_id,
                    seg_token_id=self.model.seg_token_id,
                    cache=cache,
                )
                seg_hidden, tokens = gen.seg_hidden, gen.token_ids
        finally:
            if frame.prefix_cache is not None and cache is frame.prefix_cache:
                crop_cache(cache, frame.prefix_length)
        t1 = self._now()
        logits = self._masks(seg_hidden, frame)
        t2 = self._now()
        timings.update(llm=t1 - t0, masks=t2 - t1)
        logits_np = logits.cpu().numpy()
        text = self.readable_text(tokens)
        answer = SEGMENT_ONLY_ANSWER if mode == "segment" else text
        return SegmentationResult(
            masks=logits_np > 0,
            logits=logits_np,
            text=text,
            token_ids=tokens,
            timings=timings,
            turn=(user_text, answer) if answer and IMAGE_TOKEN not in answer else None,
            history_used=len(history),
        )

    # ------------------------------------------------------------------ query length
    def check_query(
        self,
        query: str,
        explain: bool = False,
        mode: str = "generate",
        max_new_tokens: int = 64,
        raw_prompt: bool = False,
    ) -> None:
        """Check that :meth:`predict` can answer ``query`` with these options (no image needed).

        Raises:
            QueryTooLongError: the query does not fit the model's positions; the message gives
                the limit in tokens and an estimate in characters.
            ValueError: an empty query, an unknown mode, ``explain`` with the segment mode, or
                ``max_new_tokens < 1``.
        """
        self._checked_prompt_ids(query, explain, mode, max_new_tokens, raw_prompt)

    def query_budget(
        self,
        explain: bool = False,
        mode: str = "generate",
        max_new_tokens: int = 64,
        raw_prompt: bool = False,
    ) -> QueryBudget:
        """How many tokens (and about how many characters) a query may take with these options.

        The model's ``max_position_embeddings`` hold the image tokens, the chat template around
        the query and, when generating, ``max_new_tokens - 1`` answer tokens (the last one is
        never fed back); the query gets the rest. The template differs between a short phrase
        and a sentence (:func:`~lisa_model.prompts.format_query`): this is the smaller budget.
        """
        self._check_options(explain, mode, max_new_tokens)
        if raw_prompt:
            probes = ["thing"]
        elif explain:
            probes = ["the thing"]
        else:
            probes = ["thing", "the thing."]  # a phrase, a sentence
        fixed = 0
        for probe in probes:
            user_text = probe if raw_prompt else format_query(probe, explain)
            query_tokens = len(self.model.tokenizer.encode(probe, add_special_tokens=False))
            fixed = max(fixed, self._positions(self.prompt_ids(user_text)) - query_tokens)
        answer = self._answer_positions(mode, max_new_tokens)
        positions = self.model.config.max_position_embeddings
        max_tokens = max(0, positions - fixed - answer)
        return QueryBudget(
            max_tokens=max_tokens,
            max_chars_estimate=int(max_tokens * self._chars_per_token()),
            positions=positions,
            image_tokens=self.model.num_image_tokens,
            answer_tokens=answer,
        )

    def max_query_tokens(
        self,
        explain: bool = False,
        mode: str = "generate",
        max_new_tokens: int = 64,
        raw_prompt: bool = False,
    ) -> int:
        """``query_budget(...).max_tokens``: the most tokens a query may take."""
        return self.query_budget(explain, mode, max_new_tokens, raw_prompt).max_tokens

    def _check_options(self, explain: bool, mode: str, max_new_tokens: int) -> None:
        check_mode(mode)
        if explain and mode == "segment":
            raise ValueError("explain=True needs mode='generate' (the fast path produces no text)")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")

    def _checked_prompt_ids(
        self, query: str, explain: bool, mode: str, max_new_tokens: int, raw_prompt: bool
    ) -> list[int]:
        """The prompt ids of ``query`` after checking the options and the length."""
        self._check_options(explain, mode, max_new_tokens)
        if not isinstance(query, str) or not query.strip():
            raise ValueError("empty query: expected a description of what to segment")
        user_text = query.strip() if raw_prompt else format_query(query, explain)
        prompt_ids = self.prompt_ids(user_text)
        positions = self.model.config.max_position_embeddings
        needed = self._positions(prompt_ids) + self._answer_positions(mode, max_new_tokens)
        if needed > positions:
            text = " ".join(query.split())
            tokens = len(self.model.tokenizer.encode(text, add_special_tokens=False))
            max_tokens = max(0, positions - (needed - tokens))
            raise QueryTooLongError(
                tokens=tokens,
                max_tokens=max_tokens,
                max_chars_estimate=int(max_tokens * len(text) / max(tokens, 1)),
                positions=positions,
            )
        return prompt_ids

    def _positions(self, prompt_ids: list[int]) -> int:
        """Positions of a prompt once every image placeholder is replaced by the image tokens."""
        images = sum(1 for t in prompt_ids if t == self.model.image_token_index)
        return len(prompt_ids) + images * (self.model.num_image_tokens - 1)

    @staticmethod
    def _answer_positions(mode: str, max_new_tokens: int) -> int:
        """Positions the answer takes: the fast path reads the state after the prompt; greedy
        decoding feeds back all but the last of ``max_new_tokens`` ids."""
        return 0 if mode == "segment" else max_new_tokens - 1

    def _chars_per_token(self) -> float:
        tokens = self.model.tokenizer.encode(_CHARS_SAMPLE, add_special_tokens=False)
        return len(_CHARS_SAMPLE) / max(len(tokens), 1)

    def segment(self, query: str, raw_prompt: bool = False) -> SegmentationResult:
        """The fast path: ``predict(query, mode="segment")``."""
        return self.predict(query, mode="segment", raw_prompt=raw_prompt)

    # ------------------------------------------------------------------ helpers
    def prompt_ids(self, user_text: str, history: Sequence[tuple[str, str]] = ()) -> list[int]:
        """Token ids of the chat prompt for ``user_text`` after ``history`` (image included)."""
        prompt = build_chat_prompt(
            user_text,
            self.template,
            use_im_start_end=self.model.config.use_im_start_end,
            history=history,
        )
        return self.model.tokenizer.tokenizer_image_token(prompt)

    def _fit_history(
        self, user_text: str, history: Sequence[tuple[str, str]], mode: str, max_new_tokens: int
    ) -> tuple[list[int], tuple[tuple[str, str], ...]]:
        """Prompt ids with the newest earlier rounds whose prompt fits the model's positions.

        Returns the ids and the rounds kept; with none kept the ids are the plain prompt's
        (which :meth:`_checked_prompt_ids` has checked).
        """
        rounds = check_history(history)
        room = self.model.config.max_position_embeddings - self._answer_positions(
            mode, max_new_tokens
        )
        while True:
            ids = self.prompt_ids(user_text, rounds)
            if not rounds or self._positions(ids) <= room:
                return ids, rounds
            rounds = rounds[1:]  # drop the oldest round

    def readable_text(self, token_ids: list[int]) -> str:
        """The answer as text: EOS dropped, ``[SEG]`` kept, no space before punctuation."""
        ids = [t for t in token_ids if t != self.model.eos_token_id]
        text = self.model.tokenizer.decode(ids, skip_special_tokens=True)
        return re.sub(r"\s+([.,!?;:])", r"\1", " ".join(text.split()))

    def _prefix_ids(self) -> list[int]:
        """Ids of the prompt up to and including the image (query-independent)."""
        prompt = build_chat_prompt(
            "", self.template, use_im_start_end=self.model.config.use_im_start_end
        )
        marker = IM_END_TOKEN if self.model.config.use_im_start_end else IMAGE_TOKEN
        prefix = prompt[: prompt.index(marker) + len(marker)]
        return self.model.tokenizer.tokenizer_image_token(prefix)

    def _embed(self, ids: list[int], frame: _FrameCache) -> torch.Tensor:
        input_ids = torch.tensor([ids], device=self.model.device)
        n_images = int((input_ids == self.model.image_token_index).sum())
        feats = frame.image_features.expand(n_images, -1, -1)
        embeds, _, _ = self.model.embed_inputs(input_ids, feats)
        return embeds

    def _prompt_inputs(
        self, prompt_ids: list[int], frame: _FrameCache
    ) -> tuple[object | None, torch.Tensor]:
        """(cache to continue from, embeddings of what is not cached yet)."""
        prefix = frame.prefix_ids
        if prefix is not None and prompt_ids[: len(prefix)] == prefix:
            rest = prompt_ids[len(prefix) :]
            if self.model.image_token_index not in rest and rest:
                ids = torch.tensor([rest], device=self.model.device)
                return frame.prefix_cache, self.model.embed_tokens(ids)
        return None, self._embed(prompt_ids, frame)

    def _masks(self, seg_hidden: torch.Tensor, frame: _FrameCache) -> torch.Tensor:
        """``(N, H)`` hidden states -> ``(N, H_img, W_img)`` float32 logits."""
        if seg_hidden.shape[0] == 0:
            return torch.zeros((0, *frame.original_hw), dtype=torch.float32)
        prompts = self.model.project_seg_hidden(seg_hidden)
        low_res = self.model.decode_masks(frame.image_embedding, prompts)
        return postprocess_masks(
            low_res, frame.resized_hw, frame.original_hw, self.model.sam_image_size
        )

    def _now(self) -> float:
        if self.sync_timings and self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
        return time.perf_counter()
