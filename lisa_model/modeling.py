"""The LISA model: a LLaVA-style VLM with a ``[SEG]`` token whose hidden state prompts SAM.

Parts, all from upstream packages and passed in by the builders (``__init__`` only assembles):

- ``llm``: a ``transformers`` causal LM (``LlamaForCausalLM`` for the published checkpoints);
- ``vision_tower``: ``transformers.CLIPVisionModel``; features of layer ``mm_vision_select_layer``
  (-2) without CLS, i.e. ``(B, 256, C)`` for 224 px / patch 14;
- ``mm_projector``: CLIP features -> LLM embedding width (one ``Linear`` for LLaVA v1);
- ``seg_projector``: ``Linear(H, H) -> ReLU -> Linear(H, 256)`` (published name:
  ``text_hidden_fcs``), mapping the ``[SEG]`` hidden state to a SAM prompt embedding;
- ``sam``: ``segment_anything.modeling.Sam`` (image encoder, prompt encoder, mask decoder).

Which hidden state: the published weights were trained with the final-norm hidden state of the
token *before* each ``[SEG]`` (the state whose LM-head output predicts ``[SEG]``).
:func:`seg_hidden_positions` is the single place that implements this, from token ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lisa_model.config import LisaConfig
from lisa_model.losses import mask_losses
from lisa_model.processing import postprocess_masks

IGNORE_INDEX = -100


# --------------------------------------------------------------------------- token bookkeeping
def expanded_positions(
    input_ids: torch.Tensor, image_token_index: int, num_image_tokens: int
) -> torch.Tensor:
    """Where each token of ``input_ids`` lands once every image placeholder is expanded.

    Args:
        input_ids: ``(B, L)`` token ids with ``image_token_index`` placeholders.
        num_image_tokens: how many feature vectors replace one placeholder (256 for CLIP-L/14
            at 224 px).

    Returns:
        ``(B, L)`` long: the index in the expanded sequence of each token (for a placeholder,
        the index of its first image feature).
    """
    is_image = (input_ids == image_token_index).long()
    images_before = torch.cumsum(is_image, dim=1) - is_image  # (B, L) placeholders strictly before
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
    return positions + (num_image_tokens - 1) * images_before


def seg_hidden_positions(
    input_ids: torch.Tensor, seg_token_id: int, image_token_index: int, num_image_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and expanded positions of the hidden states that feed SAM, one per ``[SEG]``.

    The published convention: for a ``[SEG]`` at expanded position ``e``, the hidden state at
    ``e - 1`` (the token that predicts ``[SEG]``), after the LLM's final norm.

    Args:
        input_ids: ``(B, L)`` token ids (right padding allowed; pad ids are never ``[SEG]``).

    Returns:
        ``(rows, positions)``: two ``(N,)`` long tensors, ordered row by row, left to right.
    """
    rows, cols = torch.nonzero(input_ids == seg_token_id, as_tuple=True)
    if bool((cols == 0).any()):
        raise ValueError("a [SEG] token at position 0 has no preceding token to take a state from")
    expanded = expanded_positions(input_ids, image_token_index, num_image_tokens)
    return rows, expanded[rows, cols] - 1


# --------------------------------------------------------------------------- outputs
@dataclass
class LisaForwardOutput:
    """Result of a teacher-forced forward pass over a batch (training and validation).

    Attributes:
        pred_masks: per image, ``(n_i, H_i, W_i)`` float32 mask logits in its original frame.
        low_res_masks: per image, ``(n_i, 256, 256)`` mask-decoder logits (padded 1024 frame / 4).
        loss: ``ce_loss + mask_bce_loss + mask_dice_loss`` (weights applied) when labels and
            ground-truth masks were given, else ``None``; the parts likewise.
    """

    pred_masks: list[torch.Tensor]
    low_res_masks: list[torch.Tensor]
    loss: torch.Tensor | None = None
    ce_loss: torch.Tensor | None = None
    mask_bce_loss: torch.Tensor | None = None
    mask_dice_loss: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class LossWeights:
    """Weights of the three losses (the paper's defaults)."""

    ce: float = 1.0
    bce: float = 2.0
    dice: float = 0.5


def build_seg_projector(hidden_size: int, out_dim: int = 256) -> nn.Sequential:
    """``Linear(H, H) -> ReLU -> Linear(H, out_dim) -> Dropout(0)``; indices match the published
    ``text_hidden_fcs.0.{0,2}`` keys."""
    return nn.Sequential(
        nn.Linear(hidden_size, hidden_size),
        nn.ReLU(),
        nn.Linear(hidden_size, out_dim),
        nn.Dropout(0.0),
    )


def build_mm_projector(kind: str, mm_hidden_size: int, hidden_size: int) -> nn.Module:
    """The CLIP -> LLM projector: ``linear`` (LLaVA v1) or ``mlp<N>x_gelu`` (LLaVA-1.5 style)."""
    if kind == "linear":
        return nn.Linear(mm_hidden_size, hidden_size)
    if kind.startswith("mlp") and kind.endswith("x_gelu"):
        depth = int(kind[3:-6])
        layers: list[nn.Module] = [nn.Linear(mm_hidden_size, hidden_size)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]
        return nn.Sequential(*layers)
    raise ValueError(f"unknown mm_projector_type {kind!r}; expected 'linear' or 'mlp2x_gelu'")


def dense_positional_encoding(prompt_encoder: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """SAM's dense positional encoding ``(1, 256, h, w)``, computed in float32, cast to ``dtype``.

    Upstream ``get_dense_pe`` mixes a float32 grid with the Gaussian buffer's dtype, which fails
    once the prompt encoder is cast to bf16; this computes the same values in float32.
    """
    pe_layer = prompt_encoder.pe_layer
    gaussian = pe_layer.positional_encoding_gaussian_matrix.float()
    h, w = prompt_encoder.image_embedding_size
    ys = (torch.arange(h, device=gaussian.device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=gaussian.device, dtype=torch.float32) + 0.5) / w
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (h, w, 2) as (x, y)
    coords = 2 * torch.pi * ((2 * grid - 1) @ gaussian)  # (h, w, C/2)
    pe = torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)  # (h, w, C)
    return pe.permute(2, 0, 1).unsqueeze(0).to(dtype)


# --------------------------------------------------------------------------- the model
class LisaModel(nn.Module):
    """LISA assembled from its parts. Build with :func:`lisa_model.builders.build_lisa` or load
    with :func:`lisa_model.checkpoint.load_lisa`.

    ``tokenizer`` (a :class:`lisa_model.tokenizer.LisaTokenizer`) travels with the model because
    the ``[SEG]`` id and the prompt format are part of what the weights mean.

    ``train_encoders``: ``False`` (the paper) runs the SAM image encoder and the CLIP tower with
    its projector under ``torch.no_grad()`` in :meth:`forward`, so they never receive gradients;
    ``True`` runs them with autograd on (their ``requires_grad`` flags then decide what trains),
    e.g. for a small model trained from scratch. An attribute, not saved with the weights.
    """

    def __init__(
        self,
        config: LisaConfig,
        llm: nn.Module,
        vision_tower: nn.Module,
        mm_projector: nn.Module,
        seg_projector: nn.Module,
        sam: nn.Module,
        tokenizer: object,
        loss_weights: LossWeights | None = None,
        train_encoders: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        self.llm = llm
        self.vision_tower = vision_tower
        self.mm_projector = mm_projector
        self.seg_projector = seg_projector
        self.sam = sam
        self.tokenizer = tokenizer
        self.loss_weights = loss_weights or LossWeights()
        self.train_encoders = bool(train_encoders)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.llm.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The LLM's compute dtype (float32 / bfloat16 / float16)."""
        return self.llm.model.embed_tokens.weight.dtype

    @property
    def sam_dtype(self) -> torch.dtype:
        """The dtype of SAM's prompt encoder and mask decoder (and of image embeddings)."""
        return self.sam.mask_decoder.iou_token.weight.dtype

    @property
    def sam_encoder_dtype(self) -> torch.dtype:
        """The dtype SAM's image encoder computes in (may differ: :meth:`set_encoder_dtype`)."""
        return next(self.sam.image_encoder.parameters()).dtype

    def set_encoder_dtype(self, dtype: torch.dtype) -> LisaModel:
        """Cast the two image encoders (the CLIP tower and SAM's image encoder) to ``dtype``,
        leaving the LLM, the projectors and SAM's decoder as they are.

        :meth:`encode_clip` and :meth:`encode_sam` cast at the boundaries: pixels go in as
        ``dtype``, features come out in the projector's / mask decoder's dtype. E.g. bfloat16
        encoders on a CPU with native bfloat16 and a float32 LLM. Returns the model.
        """
        self.vision_tower.to(dtype=dtype)
        self.sam.image_encoder.to(dtype=dtype)
        return self

    @property
    def seg_token_id(self) -> int:
        return self.tokenizer.seg_token_id

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def image_token_index(self) -> int:
        return self.config.image_token_index

    @property
    def num_image_tokens(self) -> int:
        """Feature vectors per image: ``(image_size // patch_size) ** 2`` (256 for CLIP-L/14)."""
        vc = self.vision_tower.config
        return (vc.image_size // vc.patch_size) ** 2

    @property
    def clip_image_size(self) -> int:
        return int(self.vision_tower.config.image_size)

    @property
    def sam_image_size(self) -> int:
        return int(self.sam.image_encoder.img_size)

    # ------------------------------------------------------------------ image encoders
    def encode_clip(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 224, 224)`` CLIP-normalised images -> ``(B, P, H)`` projected features.

        ``P = num_image_tokens``; features of layer ``mm_vision_select_layer`` with CLS dropped.
        """
        dtype = next(self.vision_tower.parameters()).dtype
        hidden = self.clip_hidden_states(pixel_values.to(device=self.device, dtype=dtype))
        feats = hidden[:, 1:]  # (B, P, C)
        proj_dtype = next(self.mm_projector.parameters()).dtype
        return self.mm_projector(feats.to(proj_dtype)).to(self.dtype)

    def clip_hidden_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP hidden states of layer ``mm_vision_select_layer``, CLS included: ``(B, 1+P, C)``.

        Entry ``i`` of CLIP's ``hidden_states`` tuple is the input of encoder layer ``i``, so
        only the first ``i`` layers run (the published select layer -2 skips the last one).
        Towers without the ``transformers`` CLIP layout run whole with ``output_hidden_states``.
        """
        tower = self.vision_tower
        select = self.config.mm_vision_select_layer
        layers = getattr(getattr(tower, "encoder", None), "layers", None)
        if not (hasattr(tower, "embeddings") and hasattr(tower, "pre_layrnorm") and layers):
            return tower(pixel_values, output_hidden_states=True).hidden_states[select]
        count = len(layers) + 1  # entries of the hidden_states tuple
        if not -count <= select < count:
            raise ValueError(
                f"mm_vision_select_layer {select} is outside CLIP's {count} hidden states"
            )
        hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))
        for layer in layers[: select % count]:
            hidden = layer(hidden, None)
            if isinstance(hidden, tuple):  # layers of older transformers return tuples
                hidden = hidden[0]
        return hidden

    def encode_sam(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 1024, 1024)`` normalised, padded images -> ``(B, 256, 64, 64)`` embeddings.

        Runs one image at a time (as the original) to bound activation memory, in the image
        encoder's dtype; the embeddings are returned in :attr:`sam_dtype`.
        """
        x = pixel_values.to(device=self.device, dtype=self.sam_encoder_dtype)
        out = [self.sam.image_encoder(x[i : i + 1]) for i in range(x.shape[0])]
        return torch.cat(out).to(self.sam_dtype)

    # ------------------------------------------------------------------ LLM inputs
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` ids without image placeholders -> ``(B, L, H)`` embeddings."""
        return self.llm.get_input_embeddings()(input_ids)

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        image_features: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Replace every image placeholder by its ``P`` image features.

        Args:
            input_ids: ``(B, L)`` with ``image_token_index`` placeholders; every row must hold
                the same number ``k`` of them (one per image, in order).
            image_features: ``(B * k, P, H)`` features, row-major over the placeholders.
            attention_mask: optional ``(B, L)``; image positions take the placeholder's value.
            labels: optional ``(B, L)``; image positions become ``IGNORE_INDEX``.

        Returns:
            ``(inputs_embeds (B, L + k*(P-1), H), attention_mask or None, labels or None)``.
        """
        batch, length = input_ids.shape
        is_image = input_ids == self.image_token_index
        per_row = is_image.sum(dim=1)
        if bool((per_row != per_row[0]).any()):
            raise ValueError(
                f"rows hold different numbers of image placeholders: {per_row.tolist()}"
            )
        k = int(per_row[0])
        num_p = image_features.shape[1] if k else self.num_image_tokens
        if image_features.shape[0] != batch * k:
            raise ValueError(
                f"{batch * k} image placeholders but {image_features.shape[0]} feature sets"
            )
        new_len = length + k * (num_p - 1)
        positions = expanded_positions(input_ids, self.image_token_index, num_p)  # (B, L)

        text_embeds = self.embed_tokens(input_ids.masked_fill(is_image, 0))  # (B, L, H)
        embeds = text_embeds.new_zeros(batch, new_len, text_embeds.shape[-1])
        t_rows, t_cols = torch.nonzero(~is_image, as_tuple=True)
        embeds[t_rows, positions[t_rows, t_cols]] = text_embeds[t_rows, t_cols]
        i_rows, i_cols = torch.nonzero(is_image, as_tuple=True)
        if k:
            span = positions[i_rows, i_cols].unsqueeze(1) + torch.arange(
                num_p, device=input_ids.device
            )  # (B*k, P)
            embeds[i_rows.unsqueeze(1), span] = image_features.to(embeds.dtype)

        new_mask = None
        if attention_mask is not None:
            new_mask = attention_mask.new_zeros(batch, new_len)
            new_mask[t_rows, positions[t_rows, t_cols]] = attention_mask[t_rows, t_cols]
            if k:
                new_mask[i_rows.unsqueeze(1), span] = attention_mask[i_rows, i_cols].unsqueeze(1)
        new_labels = None
        if labels is not None:
            new_labels = labels.new_full((batch, new_len), IGNORE_INDEX)
            new_labels[t_rows, positions[t_rows, t_cols]] = labels[t_rows, t_cols]
        return embeds, new_mask, new_labels

    def seg_embeddings(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Final-norm ``hidden (B, L', H)`` -> ``(N, 256)`` SAM prompts, one per ``[SEG]``."""
        rows, pos = seg_hidden_positions(
            input_ids, self.seg_token_id, self.image_token_index, self.num_image_tokens
        )
        return self.project_seg_hidden(hidden[rows, pos])

    def project_seg_hidden(self, seg_hidden: torch.Tensor) -> torch.Tensor:
        """``(N, H)`` hidden states -> ``(N, 256)`` prompt embeddings."""
        dtype = next(self.seg_projector.parameters()).dtype
        return self.seg_projector(seg_hidden.to(dtype))

    # ------------------------------------------------------------------ SAM decoding
    def decode_masks(self, image_embedding: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """All masks of one image in one mask-decoder call.

        Args:
            image_embedding: ``(1, 256, 64, 64)`` from :meth:`encode_sam`.
            prompts: ``(N, 256)`` prompt embeddings (the projected ``[SEG]`` states).

        Returns:
            ``(N, 256, 256)`` low-resolution logits (mask token 0), in the padded 1024 frame / 4.
        """
        dtype = self.sam_dtype
        prompt_encoder = self.sam.prompt_encoder
        n = prompts.shape[0]
        h, w = prompt_encoder.image_embedding_size
        if n == 0:  # an image whose answers hold no [SEG] (absent target, text only)
            return prompts.new_zeros((0, 4 * h, 4 * w), dtype=dtype)
        sparse = prompts.to(dtype).unsqueeze(1)  # (N, 1, 256)
        dense = prompt_encoder.no_mask_embed.weight.to(dtype).reshape(1, -1, 1, 1)
        dense = dense.expand(n, -1, h, w)  # (N, 256, h, w)
        low_res, _ = self.sam.mask_decoder(
            image_embeddings=image_embedding.to(dtype),
            image_pe=dense_positional_encoding(prompt_encoder, dtype),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return low_res[:, 0]

    # ------------------------------------------------------------------ teacher-forced pass
    def forward(
        self,
        images_clip: torch.Tensor,
        images_sam: torch.Tensor,
        input_ids: torch.Tensor,
        offsets: list[int] | torch.Tensor,
        resize_sizes: list[tuple[int, int]],
        original_sizes: list[tuple[int, int]],
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        gt_masks: list[torch.Tensor] | None = None,
    ) -> LisaForwardOutput:
        """Teacher-forced pass over a batch of images and their conversations.

        Args:
            images_clip: ``(B_img, 3, 224, 224)``.
            images_sam: ``(B_img, 3, 1024, 1024)``.
            input_ids: ``(B_conv, L)`` right-padded conversations, one image placeholder each.
            offsets: ``B_img + 1`` cumulative conversation counts: image ``i`` owns rows
                ``offsets[i]:offsets[i+1]``.
            resize_sizes / original_sizes: per image ``(h, w)`` after SAM resizing / as read.
            attention_mask: ``(B_conv, L)`` (1 = token, 0 = padding).
            labels: ``(B_conv, L)`` with ``IGNORE_INDEX`` outside the answers; gives ``ce_loss``.
            gt_masks: per image ``(n_i, H_i, W_i)`` float targets; gives the mask losses.
        """
        offsets = [int(o) for o in offsets]
        n_img = len(offsets) - 1
        if images_clip.shape[0] != n_img or images_sam.shape[0] != n_img:
            raise ValueError(
                f"{n_img} images in offsets but {images_clip.shape[0]} CLIP and "
                f"{images_sam.shape[0]} SAM inputs"
            )
        # Frozen (the paper) unless train_encoders.
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_encoders):
            image_embeddings = self.encode_sam(images_sam)  # (B_img, 256, 64, 64)
            clip_feats = self.encode_clip(images_clip)  # (B_img, P, H)
        counts = torch.tensor([offsets[i + 1] - offsets[i] for i in range(n_img)])
        row_feats = clip_feats.repeat_interleave(counts.to(clip_feats.device), dim=0)
        input_ids = input_ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        if labels is not None:
            labels = labels.to(self.device)
        embeds, mask, exp_labels = self.embed_inputs(input_ids, row_feats, attention_mask, labels)
        out = self.llm.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
        hidden = out.last_hidden_state  # (B_conv, L', H), after the final norm

        rows, pos = seg_hidden_positions(
            input_ids, self.seg_token_id, self.image_token_index, self.num_image_tokens
        )
        prompts = self.project_seg_hidden(hidden[rows, pos])  # (N, 256)
        pred_masks, low_res_masks = [], []
        for i in range(n_img):
            sel = (rows >= offsets[i]) & (rows < offsets[i + 1])
            low_res = self.decode_masks(image_embeddings[i : i + 1], prompts[sel])
            low_res_masks.append(low_res)
            pred_masks.append(
                postprocess_masks(low_res, resize_sizes[i], original_sizes[i], self.sam_image_size)
            )

        result = LisaForwardOutput(pred_masks=pred_masks, low_res_masks=low_res_masks)
        losses = []
        if exp_labels is not None:
            logits = self.llm.lm_head(hidden).float()  # (B_conv, L', V)
            result.ce_loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                exp_labels[:, 1:].reshape(-1),
                ignore_index=IGNORE_INDEX,
            )
            losses.append(self.loss_weights.ce * result.ce_loss)
        if gt_masks is not None:
            ml = mask_losses(
                pred_masks,
                [g.to(device=self.device, dtype=torch.float32) for g in gt_masks],
                bce_weight=self.loss_weights.bce,
                dice_weight=self.loss_weights.dice,
            )
            result.mask_bce_loss, result.mask_dice_loss = ml.bce, ml.dice
            losses.append(ml.total)
        if losses:
            result.loss = torch.stack(losses).sum()
        return result
