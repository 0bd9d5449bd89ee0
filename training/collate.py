"""Turn dataset :class:`~training.data.types.Sample` s into one model batch, as the original LISA.

The original ``collate_fn`` (``utils/dataset.py``) flattens the conversations of all images of a
batch into the LLM batch, tokenizes them with ``tokenizer_image_token``, right-pads them, builds
the next-token targets by masking everything but the assistant answers, and (training only) cuts
the text to the length left over after the image tokens. :class:`Collator` does the same, token for
token, and also runs the CLIP/SAM image preprocessing (it is meant to run inside ``DataLoader``
workers).

How the targets are masked (``llava_v1``; ``llava_llama_2`` differs only in the separators):

* the rendered conversation is split at the round separator ``"</s>"``; each non-empty piece is a
  round ``"<question part> ASSISTANT: <answer>"``;
* position 0 (BOS) is masked; for each round, starting at ``cur`` (1 for the first round), the
  first ``len(tokenizer_image_token(question part + " ASSISTANT: ")) - 2`` tokens are masked
  (the ``-2`` drops the BOS and the trailing ``"▁"`` of the separator's space), then
  ``cur += len(tokenizer_image_token(round))`` (its BOS stands for the round's ``</s>``);
* everything from ``cur`` on is masked (padding included);
* when ``cur < model_max_length`` it must equal the number of non-pad tokens, otherwise the
  round-by-round token count disagrees with the tokenization of the whole string and the labels
  would be shifted: the original asserted, we raise :class:`ValueError` naming the conversation.

For ``llava_llama_2`` the answer separator is ``"[/INST] "``; rounds after the first start with
``"<s>"``, which the per-round tokenization turns into a second BOS, so the same arithmetic masks
that ``<s>`` together with the round's question. The answer tokens include the ``"▁"`` of the
space the template puts before ``</s>``.

The image placeholder counts as one token here; truncation keeps the text that fits next to the
``num_image_tokens`` patch embeddings it becomes inside the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lisa_model.modeling import IGNORE_INDEX
from lisa_model.processing import SAM_IMAGE_SIZE, prepare_image
from lisa_model.prompts import SEG_TOKEN, get_template, render_conversation
from lisa_model.tokenizer import DEFAULT_MODEL_MAX_LENGTH, LisaTokenizer
from training.data.types import Sample

#: Image patch tokens the LLM sees per image (CLIP ViT-L/14 at 224 px: 16 x 16).
DEFAULT_NUM_IMAGE_TOKENS = 256


@dataclass
class Batch:
    """One training/validation batch: ``B_img`` images owning ``B_conv`` conversations.

    Image ``i`` owns the conversation rows ``offsets[i]:offsets[i + 1]``. Per-image lists are in
    image order; per-conversation tensors in row order.

    Attributes:
        images_clip: ``(B_img, 3, 224, 224)`` float32, CLIP-normalised RGB.
        images_sam: ``(B_img, 3, 1024, 1024)`` float32, SAM-normalised RGB, zero-padded at the
            bottom/right beyond ``resize_sizes[i]``.
        input_ids: ``(B_conv, L)`` int64, ``tokenizer_image_token`` ids (``-200`` = the image
            placeholder), right-padded with the pad id (0 = ``<unk>``).
        attention_mask: ``(B_conv, L)`` bool, ``input_ids != pad_id``, exactly as the original.
            Note this is a comparison with the pad id, not a record of which positions were
            padded: a genuine ``<unk>`` token (id 0) inside the text would also be masked out.
        labels: ``(B_conv, L)`` int64, ``input_ids`` with ``-100`` everywhere except the answer
            tokens (and their ``</s>``); see the module docstring for the exact rule.
        offsets: ``B_img + 1`` cumulative conversation counts, ``offsets[0] == 0``.
        gt_masks: per image ``(n_i, H_i, W_i)`` float32 0/1, one mask per ``[SEG]`` of its
            conversations in order, in the original image frame.
        label_maps: per image ``(H_i, W_i)`` uint8 ground truth with 255 = ignore (the metric
            target of mask ``k`` is ``gt_masks[i][k]`` with ``label_maps[i] == 255`` set to 255).
        resize_sizes: per image ``(h', w')`` of the resized image inside the SAM input.
        original_sizes: per image ``(H, W)`` of the image as read.
        conversations: the ``B_conv`` rendered conversation strings (``<image>`` expanded).
        image_paths: per image, the file it was read from.
        texts: per image, the sampled class names / sentences (for logs).
        sources: per image, the data source (``"reason_seg"``, ``"refcoco"``, ...).
        is_sentence: per image, the ReasonSeg long-sentence flag.
        inference: ``True`` for a validation batch (teacher-forced, never truncated).
        skipped: what was wrong with the bad samples skipped in place of this batch's images
            (:attr:`Sample.skipped`), one message each.
    """

    images_clip: torch.Tensor
    images_sam: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    offsets: list[int]
    gt_masks: list[torch.Tensor]
    label_maps: list[torch.Tensor]
    resize_sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]]
    conversations: list[str]
    image_paths: list[str]
    texts: list[list[str]]
    sources: list[str]
    is_sentence: list[bool]
    inference: bool
    skipped: list[str] = dataclasses.field(default_factory=list)

    @property
    def num_images(self) -> int:
        """``B_img``."""
        return len(self.offsets) - 1

    @property
    def num_conversations(self) -> int:
        """``B_conv``."""
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with every tensor on ``device`` (dtypes kept); lists of strings/ints shared."""

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        return dataclasses.replace(
            self,
            images_clip=move(self.images_clip),
            images_sam=move(self.images_sam),
            input_ids=move(self.input_ids),
            attention_mask=move(self.attention_mask),
            labels=move(self.labels),
            gt_masks=[move(m) for m in self.gt_masks],
            label_maps=[move(m) for m in self.label_maps],
        )

    def pin_memory(self) -> Batch:
        """A copy with every tensor in pinned memory (``DataLoader(pin_memory=True)`` calls it)."""
        return dataclasses.replace(
            self,
            images_clip=self.images_clip.pin_memory(),
            images_sam=self.images_sam.pin_memory(),
            input_ids=self.input_ids.pin_memory(),
            attention_mask=self.attention_mask.pin_memory(),
            labels=self.labels.pin_memory(),
            gt_masks=[m.pin_memory() for m in self.gt_masks],
            label_maps=[m.pin_memory() for m in self.label_maps],
        )


def answer_separator(template: str) -> str:
    """The string the original splits each round at to find where the answer starts.

    ``" ASSISTANT: "`` (``sep + role + ": "``) for ``llava_v1``, ``"[/INST] "`` otherwise.
    """
    conv = get_template(template)
    if conv.style == "two":
        return conv.sep + conv.roles[1] + ": "
    return "[/INST] "


def conversation_labels(
    conversation: str,
    input_ids: torch.Tensor,
    tokenizer: LisaTokenizer,
    template: str = "llava_v1",
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
) -> torch.Tensor:
    """Next-token targets of one rendered conversation, as the original ``collate_fn`` builds them.

    Args:
        conversation: the rendered string (``<image>`` already expanded as it was tokenized).
        input_ids: ``(L,)`` int64, its ``tokenizer_image_token`` ids, right-padded with the pad id.
        tokenizer: the tokenizer that produced ``input_ids``.
        template: ``"llava_v1"`` or ``"llava_llama_2"``.
        model_max_length: the consistency check below runs only for conversations shorter than
            this (as in the original, whose tokenizer length is ``--model_max_length``).

    Returns:
        ``(L,)`` int64: ``input_ids`` with ``-100`` outside the answer tokens.

    Raises:
        ValueError: a round does not hold exactly one answer separator, or the round-by-round
            token count differs from the number of non-pad tokens.
    """
    conv = get_template(template)
    sep = answer_separator(template)
    labels = input_ids.clone()
    total_len = int(input_ids.ne(tokenizer.pad_token_id).sum())

    cur_len = 1
    labels[:cur_len] = IGNORE_INDEX  # BOS
    for k, round_text in enumerate(conversation.split(conv.sep2)):
        if round_text == "":
            break
        parts = round_text.split(sep)
        if len(parts) != 2:
            raise ValueError(
                f"conversation round {k} holds {len(parts) - 1} answer separators {sep!r}, "
                f"expected exactly 1 (template {template!r}); round: {round_text!r}; "
                f"conversation: {conversation!r}"
            )
        instruction = parts[0] + sep
        # -2: the BOS of the separate tokenization and the "▁" of the separator's trailing space.
        instruction_len = len(tokenizer.tokenizer_image_token(instruction)) - 2
        # The round's own BOS takes the place of its "</s>" in the whole conversation.
        round_len = len(tokenizer.tokenizer_image_token(round_text))
        labels[cur_len : cur_len + instruction_len] = IGNORE_INDEX
        cur_len += round_len
    labels[cur_len:] = IGNORE_INDEX

    if cur_len < model_max_length and cur_len != total_len:
        raise ValueError(
            f"label masking mismatch: the rounds add up to {cur_len} tokens but the conversation "
            f"has {total_len} (template {template!r}; the text probably does not follow the "
            f"template, or holds a token with the pad id); conversation: {conversation!r}"
        )
    return labels


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """``(B, max_len)`` int64 with each sequence left-aligned and ``pad_id`` after it."""
    length = max((len(s) for s in sequences), default=0)
    out = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        out[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
    return out


class Collator:
    """``DataLoader`` ``collate_fn``: a list of :class:`Sample` -> one :class:`Batch`.

    Args:
        tokenizer: the checkpoint's tokenizer (pad id, ``[SEG]`` id, ``tokenizer_image_token``).
        template: conversation template, ``"llava_v1"`` (LISA-7B-v1) or ``"llava_llama_2"``.
        model_max_length: the LLM context the original configures (``--model_max_length``).
        use_im_start_end: wrap ``<image>`` as ``<im_start><image><im_end>`` (published models).
        num_image_tokens: image patch tokens the placeholder expands to inside the model.
        truncate: training only: cut ``input_ids``/``labels``/``attention_mask`` to
            ``model_max_length - num_image_tokens + 1`` columns (the text that fits next to the
            image tokens; 257 for the defaults, the original's ``model_max_length - 255``). Masks
            are not cut, so a ``[SEG]`` cut off makes its image fail the ``[SEG]``/mask check.
        inference: validation batches: never truncated, ``Batch.inference`` set.
        sam_image_size: side of SAM's square input (the model's ``sam_image_size``; 1024 for
            every published SAM).
    """

    def __init__(
        self,
        tokenizer: LisaTokenizer,
        template: str = "llava_v1",
        model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
        use_im_start_end: bool = True,
        num_image_tokens: int = DEFAULT_NUM_IMAGE_TOKENS,
        truncate: bool = True,
        inference: bool = False,
        sam_image_size: int = SAM_IMAGE_SIZE,
    ) -> None:
        get_template(template)  # fail early on an unknown name
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
        if model_max_length <= num_image_tokens:
            raise ValueError(
                f"model_max_length ({model_max_length}) must exceed num_image_tokens "
                f"({num_image_tokens}) to leave room for text"
            )
        self.tokenizer = tokenizer
        self.template = template
        self.model_max_length = int(model_max_length)
        self.use_im_start_end = bool(use_im_start_end)
        self.num_image_tokens = int(num_image_tokens)
        self.truncate = bool(truncate)
        self.inference = bool(inference)
        self.sam_image_size = int(sam_image_size)

    @property
    def max_text_tokens(self) -> int:
        """Columns kept by training truncation: ``model_max_length - num_image_tokens + 1``."""
        return self.model_max_length - self.num_image_tokens + 1

    def render(self, sample: Sample) -> list[str]:
        """The sample's conversations as the strings that are tokenized."""
        return [
            render_conversation(rounds, self.template, self.use_im_start_end)
            for rounds in sample.conversations
        ]

    def __call__(self, samples: Sequence[Sample]) -> Batch:
        """Collate ``samples`` (each checked with :meth:`Sample.validate`) into a batch.

        Raises:
            ValueError: an empty list, an invalid sample, a conversation whose labels cannot be
                masked (see :func:`conversation_labels`), or an image whose ``[SEG]`` tokens in
                the (possibly truncated) ``input_ids`` do not match its number of masks.
        """
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        clips, sams, resize_sizes, original_sizes = [], [], [], []
        gt_masks, label_maps, conversations, offsets = [], [], [], [0]
        for sample in samples:
            sample.validate()
            prepared = prepare_image(sample.image, sam_size=self.sam_image_size)
            clips.append(prepared.clip)
            sams.append(prepared.sam)
            resize_sizes.append(prepared.resized_hw)
            original_sizes.append(prepared.original_hw)
            gt_masks.append(torch.from_numpy(sample.masks).float())
            label_maps.append(torch.from_numpy(sample.label.copy()))
            rendered = self.render(sample)
            conversations.extend(rendered)
            offsets.append(offsets[-1] + len(rendered))

        pad_id = self.tokenizer.pad_token_id
        input_ids = pad_right(
            [self.tokenizer.tokenizer_image_token(c) for c in conversations], pad_id
        )
        attention_mask = input_ids.ne(pad_id)
        labels = torch.stack(
            [
                conversation_labels(
                    conv, ids, self.tokenizer, self.template, self.model_max_length
                )
                for conv, ids in zip(conversations, input_ids, strict=True)
            ]
        )

        truncated = False
        if self.truncate and not self.inference and input_ids.shape[1] > self.max_text_tokens:
            keep = self.max_text_tokens
            input_ids, labels = input_ids[:, :keep], labels[:, :keep]
            attention_mask = attention_mask[:, :keep]
            truncated = True

        self._check_seg_counts(samples, input_ids, offsets, truncated)
        return Batch(
            images_clip=torch.stack(clips),
            images_sam=torch.stack(sams),
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            offsets=offsets,
            gt_masks=gt_masks,
            label_maps=label_maps,
            resize_sizes=resize_sizes,
            original_sizes=original_sizes,
            conversations=conversations,
            image_paths=[s.image_path for s in samples],
            texts=[list(s.texts) for s in samples],
            sources=[s.source for s in samples],
            is_sentence=[bool(s.is_sentence) for s in samples],
            inference=self.inference,
            skipped=[m for s in samples for m in s.skipped],
        )

    def _check_seg_counts(
        self,
        samples: Sequence[Sample],
        input_ids: torch.Tensor,
        offsets: list[int],
        truncated: bool,
    ) -> None:
        """Every image needs one mask per ``[SEG]`` token left in its rows of ``input_ids``."""
        is_seg = input_ids.eq(self.tokenizer.seg_token_id)
        for i, sample in enumerate(samples):
            n_seg = int(is_seg[offsets[i] : offsets[i + 1]].sum())
            n_masks = int(sample.masks.shape[0])
            if n_seg != n_masks:
                why = (
                    f" after truncating the text to {self.max_text_tokens} tokens "
                    "(model_max_length - num_image_tokens + 1)"
                    if truncated
                    else ""
                )
                raise ValueError(
                    f"image {sample.image_path} ({sample.source}): its conversations hold "
                    f"{n_seg} {SEG_TOKEN} tokens{why} but it has {n_masks} masks; expected one "
                    f"mask per {SEG_TOKEN}"
                )
