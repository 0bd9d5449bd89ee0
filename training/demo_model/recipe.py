"""The demo model's recipe: its sizes, its scratch initialisation, and the ``init`` stages in
order (tokenizer, language warm-up, SAM encoder and decoder warm-ups, ``[SEG]`` projector fit).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lisa_model.builders import ModelSpec, build_lisa
from lisa_model.checkpoint import save_lisa
from lisa_model.modeling import LisaModel
from lisa_model.sam import SamGeometry
from training.demo_model.language import LanguageWarmup, center_seg_projector_, warm_up_language
from training.demo_model.sam_decoder import DecoderWarmup, fit_seg_projector_, warm_up_sam_decoder
from training.demo_model.sam_encoder import EncoderWarmup, warm_up_sam_encoder
from training.demo_model.tokenizer import DEMO_VOCAB_SIZE, train_demo_tokenizer

#: Sizes of the demo model (stored in float32 with its CLIP tower: under 30 MiB).
DEMO_SPEC = ModelSpec(
    hidden_size=256,
    num_layers=4,
    num_heads=4,
    intermediate_size=688,
    max_position_embeddings=512,
    clip_hidden=128,
    clip_layers=2,
    clip_heads=4,
    clip_intermediate=512,
    clip_image_size=224,
    clip_patch_size=14,
    sam=SamGeometry(
        img_size=256,
        patch_size=8,
        embed_dim=128,
        depth=4,
        encoder="conv",
        conv_widths=(32, 64, 96),
        decoder_mlp_dim=512,
    ),
)


def build_initial_demo_checkpoint(
    out_dir: str | Path,
    data_dir: str | Path,
    spec: ModelSpec = DEMO_SPEC,
    seed: int = 0,
    vocab_size: int = DEMO_VOCAB_SIZE,
    warmup: LanguageWarmup | None = None,
    encoder_warmup: EncoderWarmup | None = None,
    decoder_warmup: DecoderWarmup | None = None,
    progress: bool = True,
) -> Path:
    """Write the untrained demo model to ``out_dir`` (published layout, CLIP tower included).

    Args:
        out_dir: the checkpoint directory to write (created; existing weight files replaced).
        data_dir: a shapes data set (``<data_dir>/train/queries.jsonl``) for the tokenizer and
            the language warm-up.
        spec: model sizes.
        seed: weight initialisation seed.
        vocab_size: SentencePiece pieces of the tokenizer.
        warmup: the LLM's text-only warm-up (:func:`warm_up_language`); ``None``: the
            defaults of :class:`LanguageWarmup` with ``seed``.
        encoder_warmup: SAM's image encoder warm-up (:func:`warm_up_sam_encoder`); ``None``:
            the defaults of :class:`EncoderWarmup` with ``seed``.
        decoder_warmup: SAM's mask decoder warm-up (:func:`warm_up_sam_decoder`) and the
            ``[SEG]`` projector fit after it (:func:`fit_seg_projector_`); ``None``: the
            defaults of :class:`DecoderWarmup` with ``seed``.
        progress: progress bars for the warm-ups.

    Returns:
        ``out_dir`` as a Path.
    """
    tokenizer = train_demo_tokenizer(data_dir, vocab_size)
    model = build_lisa(spec, tokenizer, seed=seed)
    scale_for_scratch_training_(model, seed)
    warmup = LanguageWarmup(seed=seed) if warmup is None else warmup
    if warmup.steps > 0:
        warm_up_language(model, data_dir, warmup, progress=progress)
        center_seg_projector_(model, data_dir, warmup)
    encoder_warmup = EncoderWarmup(seed=seed) if encoder_warmup is None else encoder_warmup
    if encoder_warmup.steps > 0:
        warm_up_sam_encoder(model, data_dir, encoder_warmup, progress=progress)
    decoder_warmup = DecoderWarmup(seed=seed) if decoder_warmup is None else decoder_warmup
    if decoder_warmup.steps > 0:
        _, prompts = warm_up_sam_decoder(model, data_dir, decoder_warmup, progress)
        fit = fit_seg_projector_(model, data_dir, prompts, decoder_warmup, progress)
        if progress:
            print(
                f"[SEG] projector fit, cosine to the concept prompts: {fit.before:.2f} before, "
                f"{fit.fitted:.2f} fitted, {fit.held_out:.2f} held out"
            )
    return save_lisa(model, out_dir, llm_dtype=torch.float32, include_vision_tower=True)


#: Standard deviation of the demo LLM's initial token embeddings (LLaMA's own init: 0.02).
EMBEDDING_INIT_STD = 1.0
#: Factor on the initial output layer of the ``[SEG]`` projector.
SEG_PROMPT_INIT_GAIN = 5.0


@torch.no_grad()
def scale_for_scratch_training_(model: LisaModel, seed: int = 0) -> None:
    """Initial scales for a LISA trained from scratch: distinct ``[SEG]`` prompts from step 0.

    With LLaMA's initialisation (embeddings N(0, 0.02)) the residual stream of a fresh LLM is
    dominated by attention averages over the 256 image tokens, so the ``[SEG]`` states of
    different queries are alike (cosine 0.62 between equal answers, 0.64 between different
    ones, measured on the shapes data). Token embeddings of N(0, 1) make the state before
    ``[SEG]`` carry that token (0.99 vs 0.39), and a ``[SEG]`` projector output of norm ~20
    matches the scale of SAM's own point prompts (N(0, 1) embeddings plus Fourier features).

    Measured limit (see the README's demo-model section): this alone does not keep SAM's
    freshly initialised mask decoder from learning to ignore its prompt token within the
    30-minute CPU budget.
    """
    generator = torch.Generator().manual_seed(seed + 1)
    embed = model.llm.get_input_embeddings().weight
    embed.copy_(torch.randn(embed.shape, generator=generator) * EMBEDDING_INIT_STD)
    last = model.seg_projector[2]  # Linear(H, 256)
    last.weight.mul_(SEG_PROMPT_INIT_GAIN)
    last.bias.mul_(SEG_PROMPT_INIT_GAIN)
