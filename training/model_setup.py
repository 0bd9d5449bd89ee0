"""Turn a checkpoint into a model ready to train: tokens, new parts, LoRA, trainable sets.

Two starting points, as in the paper:

* a **base LLaVA** checkpoint (no ``train_mask_decoder`` in ``config.json``): ``[SEG]`` (and
  ``<im_start>``/``<im_end>`` when missing) is added to the tokenizer, the LLM's input and output
  embeddings grow by that many rows (new rows drawn from N(0, ``initializer_range``), as
  transformers initialises resized embeddings), SAM comes from ``model.sam_checkpoint`` and the
  ``[SEG]`` projector is new;
* a published **LISA** checkpoint (``xinlai/LISA-7B-v1``, an export of ours): everything is in the
  checkpoint (the original crashes here, its issues #85/#169; and its SAM must not be replaced
  by the original SAM weights, #159).

Then LoRA adapters (peft) go into the LLM's decoder layers only, by a regular expression over
module names relative to the LLM (``model.layers.<i>.(...).<q_proj|v_proj>``): CLIP's and SAM's
layers of the same names are never matched. The adapters are injected in place
(``peft.inject_adapter_in_model``), so module paths stay those of :class:`LisaModel` and the
published key map applies after :func:`merge_lora`.

Every random draw here (new embedding rows, the ``[SEG]`` projector, LoRA's ``A`` matrices) is
seeded by ``run.seed``, so :func:`prepare_model_for_training` rebuilds the same starting model
every time; ``lisa-export`` relies on it to restore frozen weights that the checkpoints leave out.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from lisa_model.checkpoint import load_lisa, resolve_source
from lisa_model.config import CheckpointError, LisaConfig
from lisa_model.modeling import LisaModel, LossWeights
from lisa_model.options import parse_dtype
from lisa_model.prompts import IM_END_TOKEN, IM_START_TOKEN, SEG_TOKEN
from lisa_model.tokenizer import LisaTokenizer
from training.config import ConfigError, TrainConfig

log = logging.getLogger(__name__)

#: ``train.<flag>`` -> parameter-name prefixes it makes trainable (``train.lora`` is separate).
TRAINABLE_PREFIXES: dict[str, tuple[str, ...]] = {
    "lm_head": ("llm.lm_head.",),
    "embed_tokens": ("llm.model.embed_tokens.",),
    "mask_decoder": ("sam.mask_decoder.",),
    "seg_projector": ("seg_projector.",),
    "vision_tower": ("vision_tower.",),
    "mm_projector": ("mm_projector.",),
    "sam_encoder": ("sam.image_encoder.",),
    "sam_prompt_encoder": ("sam.prompt_encoder.",),
}
#: Config keys the original's ``LisaModel`` sets for every LISA model (base LLaVA gets them).
LISA_CONFIG_KEYS = {
    "architectures": ["LISAForCausalLM"],
    "train_mask_decoder": True,
    "out_dim": 256,
    "use_cache": False,
    "mm_vision_select_feature": "patch",
    "image_aspect_ratio": "square",
    "image_grid_pinpoints": None,
    "tune_mm_mlp_adapter": False,
    "freeze_mm_mlp_adapter": True,
    "pretrain_mm_mlp_adapter": None,
    "mm_use_im_patch_token": False,
}


@dataclass
class SetupReport:
    """What :func:`prepare_model_for_training` did.

    Attributes:
        source: the checkpoint directory the model was read from.
        source_kind: ``"lisa"`` or ``"llava"`` (base LLaVA).
        added_tokens: tokens added to the tokenizer now, with their ids.
        vocab_size: rows of the LLM's embeddings after resizing.
        initialised: parts that got new weights (``sam``, ``seg_projector``, vocabulary rows).
        lora_target_regex: the peft ``target_modules`` pattern (relative to ``model.llm``), or
            ``None`` without LoRA.
        lora_modules: full names of the layers that got adapters.
        trainable_names: names of the trainable parameters.
        trainable_params / total_params: element counts.
        gradient_checkpointing: whether the LLM recomputes activations in the backward pass.
    """

    source: str
    source_kind: str
    added_tokens: dict[str, int] = field(default_factory=dict)
    vocab_size: int = 0
    initialised: list[str] = field(default_factory=list)
    lora_target_regex: str | None = None
    lora_modules: list[str] = field(default_factory=list)
    trainable_names: list[str] = field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0
    gradient_checkpointing: bool = False


# --------------------------------------------------------------------------- pieces
def checkpoint_kind(config: LisaConfig) -> str:
    """``"lisa"`` for a LISA checkpoint (config has ``train_mask_decoder``), else ``"llava"``."""
    return "lisa" if config.is_lisa else "llava"


def add_lisa_tokens(tokenizer: LisaTokenizer, use_im_start_end: bool) -> dict[str, int]:
    """Add ``[SEG]`` and (when asked) ``<im_start>``/``<im_end>`` if missing, in the original's
    order. Returns the tokens added now with their ids."""
    before = dict(tokenizer.added_tokens)
    tokenizer.add_tokens([SEG_TOKEN])
    if use_im_start_end:
        tokenizer.add_tokens([IM_START_TOKEN, IM_END_TOKEN])
    return {t: i for t, i in tokenizer.added_tokens.items() if t not in before}


def _grow_rows(
    weight: torch.Tensor, rows: int, generator: torch.Generator, std: float
) -> torch.Tensor:
    """``weight (V, H)`` with ``rows - V`` rows from N(0, std) appended: ``(rows, H)``."""
    extra = torch.empty(rows - weight.shape[0], weight.shape[1], dtype=torch.float32)
    extra.normal_(0.0, std, generator=generator)
    return torch.cat([weight.detach(), extra.to(device=weight.device, dtype=weight.dtype)])


def resize_vocabulary(llm: nn.Module, size: int, generator: torch.Generator, std: float) -> int:
    """Grow the LLM's input embeddings and ``lm_head`` to ``size`` rows; returns rows added.

    Never shrinks (extra rows of a checkpoint are kept, unused). New rows of both matrices are
    drawn from N(0, ``std``) with ``generator`` (transformers' resize initialises them so).
    """
    embed = llm.get_input_embeddings()
    old = int(embed.weight.shape[0])
    if size <= old:
        return 0
    embed.weight = nn.Parameter(_grow_rows(embed.weight, size, generator, std))
    embed.num_embeddings = size
    head = llm.get_output_embeddings()
    if llm.config.tie_word_embeddings:
        llm.tie_weights()
    else:
        head.weight = nn.Parameter(_grow_rows(head.weight, size, generator, std))
        head.out_features = size
    llm.config.vocab_size = size
    return size - old


def lora_target_regex(target_modules: tuple[str, ...] | list[str]) -> str:
    """peft ``target_modules`` pattern for the LLM's decoder layers only.

    Matched (``re.fullmatch``) against module names relative to ``model.llm``, e.g.
    ``model.layers.3.self_attn.q_proj``; ``lm_head`` and everything outside ``model.llm`` (CLIP,
    SAM, projectors) can never match.
    """
    names = "|".join(re.escape(t) for t in target_modules)
    return rf"model\.layers\.\d+\.(?:[\w.]+\.)?(?:{names})"


def apply_lora(
    llm: nn.Module, r: int, alpha: float, dropout: float, regex: str, seed: int
) -> list[str]:
    """Inject LoRA adapters (peft, bias none) into the layers of ``llm`` matching ``regex``.

    ``A`` is initialised Kaiming-uniform from ``seed`` (in a forked RNG), ``B`` with zeros, so
    the model's output is unchanged. Returns the adapted module names relative to ``llm``.

    Raises:
        ConfigError: no layer matches.
    """
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", target_modules=regex
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            inject_adapter_in_model(config, llm)
        except ValueError as exc:
            raise ConfigError(
                f"lora.target_modules: no layer of the LLM matches ({exc})"
            ) from None
    return [name for name, m in llm.named_modules() if isinstance(m, LoraLayer)]


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA adapter into its base layer (``W += B @ A * alpha / r``) and put the plain
    ``nn.Linear`` back in its place, so parameter names are those of the published layout.

    Returns the number of merged layers.
    """
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        module.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module.get_base_layer())
        merged += 1
    for sub in model.modules():  # peft's bookkeeping attribute, meaningless once merged
        if hasattr(sub, "peft_config"):
            del sub.peft_config
    return merged


def enable_activation_checkpointing(llm: nn.Module) -> None:
    """Recompute the LLM's decoder layers in the backward pass (non-reentrant), and make the
    input embeddings require grad (needed when they are frozen, as with LoRA)."""
    kwargs = {"use_reentrant": False}
    if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5.x name
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    llm.enable_input_require_grads()


def set_trainable(model: LisaModel, cfg: TrainConfig) -> list[str]:
    """Freeze everything, then unfreeze what ``cfg.train`` names; returns trainable names.

    With ``train.lora`` only the adapters of the LLM train (plus ``lm_head``/``embed_tokens`` if
    set); without, the whole LLM trains (its decoder layers and final norm only when
    ``train.llm_layers``).
    """
    flags = cfg.train
    prefixes = tuple(
        p for key, ps in TRAINABLE_PREFIXES.items() if getattr(flags, key) for p in ps
    )
    names = []
    for name, param in model.named_parameters():
        if flags.lora:
            train = "lora_" in name or name.startswith(prefixes)
        else:
            train = (flags.llm_layers and name.startswith("llm.")) or name.startswith(prefixes)
        param.requires_grad_(train)
        if train:
            names.append(name)
    return names


def update_config(model: LisaModel, kind: str, use_im_start_end: bool) -> None:
    """Make ``model.config`` describe what the model now is (saved by ``lisa-export``)."""
    raw = model.config.raw
    if kind == "llava":
        raw.update(LISA_CONFIG_KEYS)
        raw["out_dim"] = int(model.seg_projector[2].out_features)
        raw["vision_tower"] = raw.get("mm_vision_tower") or model.config.mm_vision_tower
        raw.setdefault("mm_vision_tower", raw["vision_tower"])
    raw["mm_use_im_start_end"] = bool(use_im_start_end)
    raw["vocab_size"] = int(model.llm.get_input_embeddings().weight.shape[0])
    tokenizer = model.tokenizer
    raw["bos_token_id"] = tokenizer.bos_token_id
    raw["eos_token_id"] = tokenizer.eos_token_id
    raw["pad_token_id"] = tokenizer.pad_token_id


# --------------------------------------------------------------------------- main entry
def prepare_model_for_training(
    cfg: TrainConfig,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> tuple[LisaModel, SetupReport]:
    """Load ``cfg.model.source`` and make it trainable as ``cfg`` says.

    Args:
        cfg: the run configuration (``model``, ``lora``, ``train``, ``loss``, ``run.seed``,
            ``run.precision``, ``run.gradient_checkpointing``).
        device: where the weights go.
        dtype: weight dtype; defaults to the run's precision on ``device`` (fp32 on the CPU).

    Returns:
        ``(model, report)``; the model is in eval mode (the engine switches it to train mode).

    Raises:
        ConfigError: a base LLaVA source without ``model.sam_checkpoint`` (and without
            ``model.init_missing``), or LoRA targets that match nothing.
        CheckpointError: the checkpoint cannot be read or lacks weights.
    """
    device = torch.device(device)
    precision = cfg.run.resolved_precision(device)
    dtype = parse_dtype(dtype if dtype is not None else precision)
    directory = resolve_source(cfg.model.source)
    kind = checkpoint_kind(LisaConfig.from_json_file(directory / "config.json"))
    sam_checkpoint = cfg.model.sam_checkpoint
    if kind == "lisa" and sam_checkpoint:
        log.warning(
            "model.sam_checkpoint %s ignored: %s is a LISA checkpoint with its own trained SAM",
            sam_checkpoint,
            directory,
        )
        sam_checkpoint = None
    if kind == "llava" and not sam_checkpoint and not cfg.model.init_missing:
        raise ConfigError(
            f"model.sam_checkpoint: required because model.source {cfg.model.source} is a base "
            "LLaVA checkpoint (no train_mask_decoder in config.json); pass the SAM weights "
            "(sam_vit_h_4b8939.pth), or model.init_missing=true for a random SAM"
        )

    # 1. Weights. A base LLaVA gets SAM from the .pth and a fresh [SEG] projector.
    model = load_lisa(
        directory,
        device=device,
        dtype=dtype,
        vision_tower=cfg.model.vision_tower,
        sam_checkpoint=sam_checkpoint,
        init_missing=kind == "llava",
        seed=cfg.run.seed,
    )
    report = SetupReport(source=str(directory), source_kind=kind)
    initialised = list(model.load_report.initialised)
    unexpected = [p for p in initialised if not p.startswith(("sam", "seg_projector"))]
    if unexpected:
        raise CheckpointError(
            f"{directory}: lacks weights of {unexpected}; only SAM and the [SEG] projector may "
            "be missing from a base LLaVA checkpoint"
        )
    report.initialised = initialised

    # 2. Tokens: [SEG] (+ image delimiters), and embedding rows for them.
    report.added_tokens = add_lisa_tokens(model.tokenizer, cfg.model.use_im_start_end)
    generator = torch.Generator().manual_seed(cfg.run.seed)
    std = float(model.config.raw.get("initializer_range", 0.02))
    grown = resize_vocabulary(model.llm, len(model.tokenizer), generator, std)
    if grown:
        report.initialised.append(f"{grown} vocabulary rows")
    report.vocab_size = int(model.llm.get_input_embeddings().weight.shape[0])
    update_config(model, kind, cfg.model.use_im_start_end)
    model.config.conv_template = cfg.model.conv_template
    model.loss_weights = LossWeights(ce=cfg.loss.ce, bce=cfg.loss.bce, dice=cfg.loss.dice)

    # 3. LoRA on the LLM's decoder layers only.
    if cfg.train.lora:
        regex = lora_target_regex(cfg.lora.target_modules)
        adapted = apply_lora(
            model.llm, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, regex, cfg.run.seed
        )
        model.llm.to(device)
        report.lora_target_regex = regex
        report.lora_modules = [f"llm.{n}" for n in adapted]

    # 4. What trains. CLIP, its projector and SAM's image encoder run under no_grad unless one
    # of them trains (LisaModel.train_encoders).
    report.trainable_names = set_trainable(model, cfg)
    t = cfg.train
    model.train_encoders = t.vision_tower or t.mm_projector or t.sam_encoder
    report.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report.total_params = sum(p.numel() for p in model.parameters())

    # 5. Activation memory: recompute the LLM's layers in the backward pass.
    report.gradient_checkpointing = cfg.run.resolved_gradient_checkpointing(device)
    if report.gradient_checkpointing:
        enable_activation_checkpointing(model.llm)

    log.info(
        "trainable parameters: %s of %s (%.3f%%); LoRA layers: %d; added tokens: %s",
        f"{report.trainable_params:,}",
        f"{report.total_params:,}",
        100.0 * report.trainable_params / max(report.total_params, 1),
        len(report.lora_modules),
        report.added_tokens or "none",
    )
    return model, report
