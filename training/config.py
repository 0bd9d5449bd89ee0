"""The training configuration: typed sections read from YAML, with dotted command-line overrides.

One YAML file describes a run (``training/configs/*.yaml``); ``lisa-train --config FILE
optim.lr=1e-4 data.dataset_dir=/data`` overrides single keys (values parsed as YAML scalars).
Every section is a dataclass validated in ``__post_init__``; an unknown key or a bad value raises
:class:`ConfigError` naming the dotted key.

The DeepSpeed configuration is not a separate file: :func:`deepspeed_config` renders it from the
:class:`TrainConfig` (the single source of truth) and the engine writes the rendered JSON into the
run directory for the record.

Defaults are the paper's (``train_ds.py`` of the original, github.com/dvlab-research/LISA): LoRA r
8 / alpha 16 / dropout 0.05 on the LLM's ``q_proj``/``v_proj``; ``lm_head``, ``embed_tokens``, the
mask decoder and the ``[SEG]`` projector trained in full; AdamW lr 3e-4, betas (0.9, 0.95), no
weight decay, WarmupDecayLR with 100 warm-up steps, clipping 1.0; micro-batch 2 x accumulation 10,
10 epochs x 500 steps; loss weights CE 1.0, BCE 2.0, Dice 0.5; ZeRO-2.
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lisa_model.prompts import TEMPLATES
from lisa_model.tokenizer import DEFAULT_MODEL_MAX_LENGTH
from training.data.mixture import DataConfig

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: ``data.*`` keys that the engine sets itself (with the reason shown to the user).
DERIVED_DATA_KEYS = {
    "seed": "it is run.seed",
    "samples_per_epoch": (
        "it is derived: optim.micro_batch_size x optim.grad_accumulation_steps x "
        "optim.steps_per_epoch x number of processes"
    ),
}


class ConfigError(ValueError):
    """A training configuration file, key or value is not what it should be."""


# --------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    """Where the model comes from and how its prompts look.

    Attributes:
        source: a LISA checkpoint (``xinlai/LISA-7B-v1``, a directory written by ``lisa-export``)
            or a base LLaVA checkpoint (directory or hub id) to add ``[SEG]``, SAM and the
            ``[SEG]`` projector to, as the paper did.
        sam_checkpoint: SAM weights (``sam_vit_h_4b8939.pth``); required for a base LLaVA source
            unless ``init_missing``; ignored for a LISA source (its SAM is in the checkpoint).
        vision_tower: CLIP tower path or hub id overriding the checkpoint's ``mm_vision_tower``.
        init_missing: build a random SAM when a base LLaVA source has no ``sam_checkpoint`` (for
            tiny models trained from scratch only).
        conv_template: ``llava_v1`` (every published LISA) or ``llava_llama_2``.
        model_max_length: the LLM context in tokens, image tokens included (512).
        use_im_start_end: wrap the image as ``<im_start><image><im_end>`` (published models);
            the tokens are added to the tokenizer when missing.
    """

    source: str = ""
    sam_checkpoint: str | None = None
    vision_tower: str | None = None
    init_missing: bool = False
    conv_template: str = "llava_v1"
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH
    use_im_start_end: bool = True

    def __post_init__(self) -> None:
        if not self.source:
            raise ConfigError("model.source: required (a LISA or base LLaVA checkpoint)")
        if self.conv_template not in TEMPLATES:
            raise ConfigError(
                f"model.conv_template: {self.conv_template!r} is not one of {sorted(TEMPLATES)}"
            )
        if self.model_max_length < 2:
            raise ConfigError(f"model.model_max_length: must be >= 2, got {self.model_max_length}")


@dataclass
class ValConfig:
    """Validation during training (teacher-forced, as the original ``validate``).

    Attributes:
        dataset: the original's ``--val_dataset``: ``"ReasonSeg|val"`` or
            ``"refcoco|unc|val"``; ``None`` turns validation (and best-checkpoint saving) off.
        dataset_dir: root of the validation data; defaults to ``data.dataset_dir``.
        interval: validate every this many optimizer steps; ``None`` = at the end of each epoch.
    """

    dataset: str | None = "ReasonSeg|val"
    dataset_dir: str | None = None
    interval: int | None = None

    def __post_init__(self) -> None:
        if self.dataset is not None and len(self.dataset.split("|")) not in (2, 3):
            raise ConfigError(
                f"val.dataset: {self.dataset!r}; expected 'ReasonSeg|val' or "
                "'<refer dataset>|<splitBy>|<split>' (or null for no validation)"
            )
        _check_interval("val.interval", self.interval)


@dataclass
class LoraSettings:
    """LoRA on the LLM's decoder layers (peft), used when ``train.lora`` is true.

    Attributes:
        r / alpha / dropout: rank, scaling numerator (``scaling = alpha / r``), input dropout.
        target_modules: names of the ``nn.Linear`` layers inside ``llm.model.layers.*`` that get
            adapters (the original's ``--lora_target_modules``). CLIP's and SAM's layers of the
            same names are never touched.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"lora.r: must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha: must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout: must be in [0, 1), got {self.dropout}")
        self.target_modules = tuple(t.strip() for t in self.target_modules if t.strip())
        if not self.target_modules:
            raise ConfigError("lora.target_modules: expected at least one module name")


@dataclass
class TrainableConfig:
    """Which parts are trained; the rest is frozen. Defaults = the paper.

    Attributes:
        lora: LoRA adapters on the LLM (``lora.*``); false trains the whole LLM (tiny models
            trained from scratch) unless ``llm_layers`` is false.
        llm_layers: with ``lora`` false, whether the LLM's decoder layers and final norm train
            (false: a stage that trains only the parts named below, e.g. the demo model's first
            stage, where SAM learns to read ``[SEG]`` prompts from a fixed LLM).
        lm_head / embed_tokens: the LLM's output and input embeddings, in full.
        mask_decoder: SAM's mask decoder, in full.
        seg_projector: the ``[SEG]`` projector (published ``text_hidden_fcs``), in full.
        vision_tower / mm_projector: CLIP and the CLIP->LLM projector (frozen in the paper).
        sam_encoder / sam_prompt_encoder: SAM's image and prompt encoders (frozen in the paper).
    """

    lora: bool = True
    llm_layers: bool = True
    lm_head: bool = True
    embed_tokens: bool = True
    mask_decoder: bool = True
    seg_projector: bool = True
    vision_tower: bool = False
    mm_projector: bool = False
    sam_encoder: bool = False
    sam_prompt_encoder: bool = False


@dataclass
class LossConfig:
    """Loss weights: ``ce * CE + bce * BCE + dice * Dice`` (the original's defaults)."""

    ce: float = 1.0
    bce: float = 2.0
    dice: float = 0.5

    def __post_init__(self) -> None:
        for name in ("ce", "bce", "dice"):
            if getattr(self, name) < 0:
                raise ConfigError(f"loss.{name}: must be >= 0, got {getattr(self, name)}")


@dataclass
class OptimConfig:
    """AdamW + DeepSpeed WarmupDecayLR (linear warm-up to ``lr``, then linear decay to 0).

    One optimizer step = ``grad_accumulation_steps`` micro-batches of ``micro_batch_size`` images
    on every process; an epoch is ``steps_per_epoch`` optimizer steps.
    """

    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100
    grad_clip: float = 1.0
    micro_batch_size: int = 2
    grad_accumulation_steps: int = 10
    epochs: int = 10
    steps_per_epoch: int = 500

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr: must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay: must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas: expected two values in [0, 1), got {self.betas}")
        for name in ("micro_batch_size", "grad_accumulation_steps", "epochs", "steps_per_epoch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"optim.{name}: must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 1:  # DeepSpeed's WarmupDecayLR needs a positive count
            raise ConfigError(f"optim.warmup_steps: must be >= 1, got {self.warmup_steps}")
        if self.warmup_steps > self.total_steps:
            raise ConfigError(
                f"optim.warmup_steps ({self.warmup_steps}) exceeds the {self.total_steps} "
                "optimizer steps of the run (optim.epochs x optim.steps_per_epoch)"
            )
        if self.grad_clip < 0:
            raise ConfigError(f"optim.grad_clip: must be >= 0 (0 = off), got {self.grad_clip}")

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run."""
        return self.epochs * self.steps_per_epoch


@dataclass
class DeepSpeedSettings:
    """ZeRO settings (the original's: stage 2, contiguous gradients, overlapped communication,
    reduce-scatter, 5e8-element buckets)."""

    zero_stage: int = 2
    contiguous_gradients: bool = True
    overlap_comm: bool = True
    reduce_scatter: bool = True
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000

    def __post_init__(self) -> None:
        if self.zero_stage not in (1, 2):
            raise ConfigError(
                f"deepspeed.zero_stage: {self.zero_stage} is not supported; expected 1 or 2 "
                "(validation and export assume every process holds the whole model)"
            )
        for name in ("reduce_bucket_size", "allgather_bucket_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"deepspeed.{name}: must be >= 1, got {getattr(self, name)}")


@dataclass
class RunConfig:
    """Where the run writes, how it logs, and machine-dependent choices.

    Attributes:
        output_dir: run directory: ``run.json``, ``deepspeed_config.json``, ``metrics.jsonl``,
            ``tensorboard/``, ``ckpt/`` (DeepSpeed checkpoints ``best`` and ``latest``).
        seed: seeds the data (``data.seed``), the new weights and the global torch RNG.
        precision: ``fp32``, ``bf16``, ``fp16``, or ``auto`` (bf16 on a GPU, fp32 on the CPU).
        gradient_checkpointing: ``auto`` (on for a GPU), or true/false.
        num_workers: DataLoader worker processes per training process.
        log_interval: optimizer steps between logged (all-reduced) training losses.
        save_interval: optimizer steps between ``latest`` checkpoints; ``None`` = each epoch end.
        progress: show a tqdm progress bar (rank 0).
    """

    output_dir: str = "runs/lisa"
    seed: int = 0
    precision: str = "auto"
    gradient_checkpointing: bool | str = "auto"
    num_workers: int = 4
    log_interval: int = 1
    save_interval: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ConfigError("run.output_dir: required")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"run.precision: {self.precision!r} is not one of {PRECISIONS}")
        if self.gradient_checkpointing not in ("auto", True, False):
            raise ConfigError(
                "run.gradient_checkpointing: expected auto, true or false, got "
                f"{self.gradient_checkpointing!r}"
            )
        if self.num_workers < 0:
            raise ConfigError(f"run.num_workers: must be >= 0, got {self.num_workers}")
        if self.log_interval < 1:
            raise ConfigError(f"run.log_interval: must be >= 1, got {self.log_interval}")
        _check_interval("run.save_interval", self.save_interval)

    def resolved_precision(self, device: torch.device) -> str:
        """``fp32``/``bf16``/``fp16``: ``auto`` is bf16 on a GPU and fp32 on the CPU."""
        if self.precision != "auto":
            return self.precision
        return "fp32" if device.type == "cpu" else "bf16"

    def resolved_gradient_checkpointing(self, device: torch.device) -> bool:
        """``auto`` is on for a GPU (memory) and off on the CPU (speed)."""
        if self.gradient_checkpointing == "auto":
            return device.type != "cpu"
        return bool(self.gradient_checkpointing)


def _check_interval(key: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"{key}: must be >= 1 (or null), got {value}")


@dataclass
class TrainConfig:
    """A whole training run. Build it with :func:`load_config` (YAML + overrides) or in code.

    ``data`` is the datasets' own :class:`~training.data.mixture.DataConfig`; its ``seed`` follows
    ``run.seed`` and its ``samples_per_epoch`` is derived from ``optim`` (per process; the engine
    multiplies by the number of processes).
    """

    model: ModelConfig
    data: DataConfig
    val: ValConfig = field(default_factory=ValConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainableConfig = field(default_factory=TrainableConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        o = self.optim
        self.data = dataclasses.replace(
            self.data,
            seed=self.run.seed,
            samples_per_epoch=o.micro_batch_size * o.grad_accumulation_steps * o.steps_per_epoch,
        )

    @property
    def val_interval(self) -> int | None:
        """Optimizer steps between validations (``None`` when validation is off)."""
        if self.val.dataset is None:
            return None
        return self.val.interval or self.optim.steps_per_epoch

    @property
    def save_interval(self) -> int:
        """Optimizer steps between ``latest`` checkpoints."""
        return self.run.save_interval or self.optim.steps_per_epoch

    @property
    def val_dataset_dir(self) -> str:
        return self.val.dataset_dir or self.data.dataset_dir

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists for tuples) that :func:`config_from_dict` reads back."""
        out = _plain(dataclasses.asdict(self))
        for key in DERIVED_DATA_KEYS:
            out["data"].pop(key, None)
        return out


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------- DeepSpeed
def deepspeed_config(cfg: TrainConfig, precision: str) -> dict[str, Any]:
    """The DeepSpeed config dict of a run (the original's ``train_ds.py`` settings).

    The optimizer is not in it: the engine passes a torch AdamW client optimizer (no DeepSpeed
    C++ Adam build). ``precision`` is the resolved one (``fp32``/``bf16``/``fp16``).
    """
    o, z = cfg.optim, cfg.deepspeed
    return {
        "train_micro_batch_size_per_gpu": o.micro_batch_size,
        "gradient_accumulation_steps": o.grad_accumulation_steps,
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "total_num_steps": o.total_steps,
                "warmup_min_lr": 0,
                "warmup_max_lr": o.lr,
                "warmup_num_steps": o.warmup_steps,
                "warmup_type": "linear",
            },
        },
        "fp16": {"enabled": precision == "fp16"},
        "bf16": {"enabled": precision == "bf16"},
        "gradient_clipping": o.grad_clip,
        "zero_optimization": {
            "stage": z.zero_stage,
            "contiguous_gradients": z.contiguous_gradients,
            "overlap_comm": z.overlap_comm,
            "reduce_scatter": z.reduce_scatter,
            "reduce_bucket_size": z.reduce_bucket_size,
            "allgather_bucket_size": z.allgather_bucket_size,
        },
        "steps_per_print": 10**9,  # the engine logs itself
        "wall_clock_breakdown": False,
    }


# --------------------------------------------------------------------------- reading
SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "val": ValConfig,
    "lora": LoraSettings,
    "train": TrainableConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "deepspeed": DeepSpeedSettings,
    "run": RunConfig,
}


def _fields(cls: type) -> dict[str, Any]:
    """Field name -> resolved type hint of a config dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _describe(hint: Any) -> str:
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is not None:
        return "a list"
    return getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` (from YAML) as type ``hint``; :class:`ConfigError` naming ``key`` otherwise."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: must not be null (expected {_describe(hint)})")
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_describe(hint)}, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):  # PyYAML reads 5e8 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin in (tuple, list, collections.abc.Sequence):
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, (list, tuple)):
            args = typing.get_args(hint)
            if origin is tuple and args and args[-1] is not Ellipsis:
                if len(items) != len(args):
                    raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
                return tuple(
                    _coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(items, args))
                )
            item_hint = args[0] if args else Any
            if item_hint is Any:
                return tuple(items)
            return tuple(_coerce(v, item_hint, f"{key}[{i}]") for i, v in enumerate(items))
    elif hint is Any:
        return value
    raise ConfigError(f"{key}: expected {_describe(hint)}, got {value!r}")


def _unknown_keys(data: dict[str, Any]) -> list[str]:
    unknown = []
    for section, values in data.items():
        cls = SECTIONS.get(section)
        if cls is None:
            unknown.append(section)
            continue
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: expected a mapping of keys, got {values!r}")
        known = set(_fields(cls))
        unknown.extend(f"{section}.{k}" for k in values if k not in known)
    return unknown


def config_from_dict(data: dict[str, Any], where: str = "config") -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from nested dicts (YAML content).

    Raises:
        ConfigError: unknown or derived keys (all named), missing required keys, bad values.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of sections, got {type(data).__name__}")
    unknown = _unknown_keys(data)
    if unknown:
        raise ConfigError(
            f"{where}: unknown keys {unknown}; known sections: {sorted(SECTIONS)} "
            "(see training/configs/*.yaml)"
        )
    data_section = data.get("data") or {}
    for key, why in DERIVED_DATA_KEYS.items():
        if key in data_section:
            raise ConfigError(f"{where}: data.{key} cannot be set: {why}")
    if "dataset_dir" not in data_section:
        raise ConfigError(f"{where}: data.dataset_dir: required (the datasets' root directory)")
    if not (data.get("model") or {}).get("source"):
        raise ConfigError(f"{where}: model.source: required (a LISA or base LLaVA checkpoint)")

    sections: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        values = data.get(section) or {}
        hints = _fields(cls)
        kwargs = {k: _coerce(v, hints[k], f"{section}.{k}") for k, v in values.items()}
        try:
            sections[section] = cls(**kwargs)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:  # a section's own validation (DataConfig)
            raise ConfigError(f"{where}: {section}: {exc}") from None
    try:
        return TrainConfig(**sections)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-4"`` -> ``(["optim", "lr"], 1e-4)``; the value is parsed as a YAML scalar."""
    import yaml

    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. optim.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of ``data`` with each ``section.key=value`` override set."""
    import copy

    out = copy.deepcopy(data)
    for text in overrides:
        (section, key), value = parse_override(text)
        if section not in SECTIONS:
            raise ConfigError(f"override {text!r}: unknown section {section!r}")
        if out.get(section) is None:
            out[section] = {}
        out[section][key] = value
    return out


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML training config and apply dotted ``key=value`` overrides.

    Raises:
        ConfigError: the file is missing or not YAML, or a key/value is invalid (named).
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return config_from_dict(apply_overrides(data, list(overrides or [])), where=str(path))


def dump_config(cfg: TrainConfig) -> str:
    """The resolved configuration as YAML text (loads back with :func:`load_config`)."""
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def with_absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """A copy whose local paths are absolute, so ``run.json`` stays valid from any directory.

    ``model.source``/``sam_checkpoint``/``vision_tower`` become absolute only when they exist
    locally (hub ids stay as they are); data and output directories always.
    """

    def local(value: str | None) -> str | None:
        if value is None:
            return None
        path = Path(value).expanduser()
        return str(path.resolve()) if path.exists() else value

    def absolute(value: str | None) -> str | None:
        return None if value is None else str(Path(value).expanduser().resolve())

    m = cfg.model
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(
            m,
            source=local(m.source),
            sam_checkpoint=local(m.sam_checkpoint),
            vision_tower=local(m.vision_tower),
        ),
        data=dataclasses.replace(cfg.data, dataset_dir=absolute(cfg.data.dataset_dir)),
        val=dataclasses.replace(cfg.val, dataset_dir=absolute(cfg.val.dataset_dir)),
        run=dataclasses.replace(cfg.run, output_dir=absolute(cfg.run.output_dir)),
    )
