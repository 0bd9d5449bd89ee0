"""Loading and saving LISA checkpoints in the published layout.

A published checkpoint (``xinlai/LISA-7B-v1``, ``xinlai/LISA-13B-llama2-v1`` and their
``-explanatory`` variants) is a directory with ``config.json``, sharded ``pytorch_model-*.bin``
(or ``model-*.safetensors``) plus an index, and slow-LLaMA tokenizer files. Keys:

=================================  =============================
published key                      our module
=================================  =============================
``model.embed_tokens/layers/norm``  ``llm.model.*``
``lm_head.weight``                  ``llm.lm_head.weight``
``model.mm_projector.*``            ``mm_projector.*``
``model.text_hidden_fcs.0.*``       ``seg_projector.*``
``model.visual_model.*``            ``sam.*``
=================================  =============================

The CLIP tower is not in the checkpoint (the original's merge script drops it); it comes from
``mm_vision_tower`` (a hub id or a path), a ``vision_tower/`` folder inside the checkpoint (our
self-contained checkpoints), or an explicit override.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lisa_model.config import CheckpointError, LisaConfig, read_json_object
from lisa_model.file_modes import follow_umask
from lisa_model.modeling import LisaModel, build_mm_projector, build_seg_projector
from lisa_model.options import parse_dtype
from lisa_model.sam import build_sam, infer_sam_geometry
from lisa_model.tokenizer import LisaTokenizer

log = logging.getLogger(__name__)

#: (published prefix, our prefix); the first match wins.
KEY_MAP: tuple[tuple[str, str], ...] = (
    ("model.visual_model.", "sam."),
    ("model.text_hidden_fcs.0.", "seg_projector."),
    ("model.mm_projector.", "mm_projector."),
    ("lm_head.", "llm.lm_head."),
    ("model.", "llm.model."),
)
#: Keys that may be present and are safely ignored (with the reason).
IGNORED_KEYS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r".*\.rotary_emb\.inv_freq$"), "RoPE frequencies are recomputed in float32"),
    (re.compile(r"^model\.vision_tower\."), "the CLIP tower comes from mm_vision_tower"),
)
VISION_TOWER_DIR = "vision_tower"
WEIGHT_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadReport:
    """What :func:`load_lisa` found: ignored keys (with reasons) and where things came from."""

    source: Path
    vision_tower: str
    ignored: dict[str, str] = field(default_factory=dict)
    initialised: list[str] = field(default_factory=list)


def to_published_key(ours: str) -> str:
    """Our parameter name -> the published checkpoint key."""
    for published, mine in KEY_MAP:
        if ours.startswith(mine):
            return published + ours[len(mine) :]
    raise KeyError(f"parameter {ours!r} has no place in the published layout")


def from_published_key(published: str) -> str | None:
    """Published checkpoint key -> our parameter name (``None`` if unknown)."""
    for pub, mine in KEY_MAP:
        if published.startswith(pub):
            return mine + published[len(pub) :]
    return None


# --------------------------------------------------------------------------- locating files
def resolve_source(source: str | os.PathLike[str]) -> Path:
    """A local checkpoint directory, or a hub id resolved through the Hugging Face cache.

    Hub ids (``xinlai/LISA-7B-v1``) are fetched with ``huggingface_hub`` (which honours
    ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE``). Raises :class:`CheckpointError` naming the source.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: not a LISA checkpoint (no config.json)")
        return path
    if path.exists():
        raise CheckpointError(f"{path}: expected a checkpoint directory, got a file")
    text = str(source)
    if not _HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise CheckpointError(f"{text}: no such checkpoint directory")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            text,
            allow_patterns=["*.json", "*.bin", "*.safetensors", "tokenizer.model", "*.txt"],
        )
    except Exception as exc:  # noqa: BLE001 - many hub error types; all mean "not available"
        raise CheckpointError(
            f"{text}: not a local directory and could not be fetched from the hub "
            f"({type(exc).__name__}: {exc})"
        ) from None
    return resolve_source(local)


def weight_files(directory: Path) -> list[Path]:
    """The weight shards of a checkpoint directory, in index order."""
    for name in WEIGHT_INDEX_FILES:
        index = directory / name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except OSError as exc:
                raise CheckpointError(f"{index}: cannot be read ({exc.strerror or exc})") from None
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(
                    f"{index}: malformed weight index ({type(exc).__name__}: {exc}); expected "
                    '{"weight_map": {tensor name: shard file}}'
                ) from None
            if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()
            ):
                raise CheckpointError(
                    f"{index}: malformed weight index; 'weight_map' must map tensor names to "
                    "shard file names"
                )
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (directory / f).is_file()]
            if missing:
                raise CheckpointError(f"{index}: lists shards that are missing: {missing}")
            return [directory / f for f in files]
    for name in SINGLE_WEIGHT_FILES:
        if (directory / name).is_file():
            return [directory / name]
    expected = " or ".join(WEIGHT_INDEX_FILES + SINGLE_WEIGHT_FILES)
    raise CheckpointError(f"{directory}: no weights (expected {expected})")


def weights_label(directory: Path, files: list[Path]) -> Path:
    """What names a checkpoint's weights in messages: the index of a sharded checkpoint, else
    its one weight file."""
    for name in WEIGHT_INDEX_FILES:
        if (directory / name).is_file():
            return directory / name
    return files[0] if len(files) == 1 else directory


def _first_sentence(exc: BaseException, limit: int = 160) -> str:
    """A foreign error message cut to its first line and sentence (torch's run to paragraphs)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = text.split(". ")[0].rstrip(".")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unpickler_refusal(exc: BaseException) -> str:
    """What torch's weights-only unpickler refused, from its long message."""
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"refused global {found.group(1)}"
    found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    return found.group(1).strip() if found else _first_sentence(exc)


def load_torch_file(
    file: str | os.PathLike[str], safe_globals: Sequence[Any] = (), what: str = "weights"
) -> Any:
    """``torch.load(file, weights_only=True)`` (memory-mapped when the file is a zip), so that
    no code stored in the file runs; ``safe_globals`` are the few classes the file may hold
    besides tensors and plain containers (e.g. DeepSpeed's optimizer state).

    Raises:
        CheckpointError: naming ``file``: missing, unreadable, empty, truncated or corrupt, or
            holding pickled objects that are not allowed (nothing from the file runs).
    """
    file = Path(file)
    magic = _file_head(file, what)
    is_zip = magic == b"PK\x03\x04"
    try:
        allowed = (
            torch.serialization.safe_globals(list(safe_globals))
            if safe_globals
            else contextlib.nullcontext()
        )
        with allowed:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{file}: holds pickled objects other than {what} ({_unpickler_refusal(exc)}); "
            "not loaded, as loading would run code from the file"
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError/EOFError/KeyError...
        kind = "zip archive" if is_zip else "file"
        raise CheckpointError(
            f"{file}: truncated or corrupt PyTorch {what} {kind} "
            f"({type(exc).__name__}: {_first_sentence(exc)})"
        ) from None


def _file_head(file: Path, what: str) -> bytes:
    """The first bytes of ``file``; :class:`CheckpointError` if it is missing, unreadable or
    empty."""
    try:
        with file.open("rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing") from None
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot be read ({exc.strerror or exc})") from None
    if not head:
        raise CheckpointError(f"{file}: empty file; expected {what}")
    return head


def read_weight_file(file: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of one weight file: ``.safetensors``, or a ``torch.save`` file (``.bin``,
    ``.pth``) read by :func:`load_torch_file`.

    Raises:
        CheckpointError: naming ``file``: missing, unreadable, empty, truncated or corrupt, or
            holding pickled objects other than tensors and plain containers.
    """
    file = Path(file)
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        _file_head(file, "weights")
        try:
            state = load_file(str(file))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type
            raise CheckpointError(
                f"{file}: truncated or corrupt safetensors file ({_first_sentence(exc)})"
            ) from None
    else:
        state = load_torch_file(file, what="tensors")
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{file}: expected a mapping of tensor names to tensors")
    return state


def iter_state_dict(
    files: list[Path], origins: dict[str, Path] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of all shards (:func:`read_weight_file`); ``origins`` (if given) is filled with
    the file each key came from."""
    for file in files:
        shard = read_weight_file(file)
        if origins is not None:
            origins.update(dict.fromkeys(shard, file))
        yield from shard.items()


# --------------------------------------------------------------------------- CLIP
def resolve_vision_tower(config: LisaConfig, directory: Path, override: str | None) -> str:
    """Where CLIP comes from: override > ``<ckpt>/vision_tower`` > ``mm_vision_tower``."""
    if override:
        return str(override)
    bundled = directory / VISION_TOWER_DIR
    if (bundled / "config.json").is_file():
        return str(bundled)
    name = config.mm_vision_tower
    relative = directory / name
    if not Path(name).is_absolute() and (relative / "config.json").is_file():
        return str(relative)
    return name


def load_vision_tower(name: str, dtype: torch.dtype) -> nn.Module:
    """A CLIP vision tower from a directory or hub id; :class:`CheckpointError` naming it."""
    from transformers import CLIPVisionModel
    from transformers.utils import logging as hf_logging

    local = Path(name)
    if local.is_dir():
        _probe_tower_files(local)
    hf_logging.disable_progress_bar()
    try:
        tower = CLIPVisionModel.from_pretrained(name, dtype=dtype, attn_implementation="sdpa")
    except OSError as exc:
        raise CheckpointError(
            f"{name}: CLIP vision tower not found locally or in the hub cache "
            f"({_first_sentence(exc)}); pass vision_tower=<path to a CLIP ViT-L/14 checkpoint> "
            "or set HF_HUB_CACHE"
        ) from None
    except Exception as exc:  # noqa: BLE001 - transformers' many loading errors
        raise CheckpointError(
            f"{name}: cannot load the CLIP vision tower ({type(exc).__name__}: "
            f"{_first_sentence(exc)})"
        ) from None
    finally:
        hf_logging.enable_progress_bar()
    tower.requires_grad_(False)
    return tower.eval()


def _probe_tower_files(directory: Path) -> None:
    """Cheap checks of a local CLIP tower's ``config.json`` and safetensors header, since
    transformers' errors for a broken file do not name it."""
    read_json_object(directory / "config.json", "missing (a CLIP vision tower's config)")
    weights = directory / "model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(weights), framework="pt") as f:
                f.keys()
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type
            raise CheckpointError(
                f"{weights}: truncated or corrupt safetensors file ({_first_sentence(exc)})"
            ) from None


def load_tokenizer(directory: Path) -> LisaTokenizer:
    """The checkpoint's tokenizer files; :class:`CheckpointError` naming the file at fault."""
    try:
        return LisaTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise CheckpointError(str(exc)) from None


# --------------------------------------------------------------------------- load
def load_lisa(
    source: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    quantization: str | None = None,
    vision_tower: str | None = None,
    *,
    sam_checkpoint: str | os.PathLike[str] | None = None,
    init_missing: bool = False,
    seed: int = 0,
    encoder_dtype: str | torch.dtype | None = None,
) -> LisaModel:
    """Load a LISA checkpoint in the published layout.

    Args:
        source: a checkpoint directory or a hub id (``xinlai/LISA-7B-v1``).
        device: where the model runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        dtype: compute dtype: float32 (CPU, tests), bfloat16 / float16 (GPU).
        quantization: ``None``, ``"8bit"`` or ``"4bit"`` (bitsandbytes, CUDA only): the LLM's
            decoder layers are quantised; SAM, CLIP and the projectors never are.
        vision_tower: path or hub id of the CLIP tower, overriding the checkpoint's.
        sam_checkpoint: a SAM ``.pth`` (``sam_vit_h_4b8939.pth``) for a base LLaVA checkpoint
            that has no ``model.visual_model.*`` weights yet (training start).
        init_missing: initialise LISA parts absent from the checkpoint (``[SEG]`` projector,
            SAM without ``sam_checkpoint``) instead of failing; for starting training only.
        encoder_dtype: dtype of the two image encoders (CLIP tower, SAM image encoder); None =
            ``dtype``. E.g. bfloat16 encoders with a float32 LLM on a CPU with native bfloat16
            (:func:`lisa_model.options.native_bf16`); inputs and outputs are cast at their
            boundaries (:meth:`~lisa_model.modeling.LisaModel.set_encoder_dtype`).

    Every checkpoint key must be used and every parameter provided; only known-harmless keys
    (``rotary_emb.inv_freq``, a stray vision tower) are ignored. Raises
    :class:`~lisa_model.config.CheckpointError` otherwise.
    """
    directory = resolve_source(source)
    config = LisaConfig.from_json_file(directory / "config.json")
    dtype = parse_dtype(dtype)
    encoder_dtype = dtype if encoder_dtype is None else parse_dtype(encoder_dtype)
    device = torch.device(device)
    if quantization not in (None, "8bit", "4bit"):
        raise ValueError(f"quantization {quantization!r}; expected None, '8bit' or '4bit'")
    if quantization and device.type != "cuda":
        raise ValueError(f"quantization {quantization!r} needs a CUDA device, got {device}")
    tokenizer = load_tokenizer(directory)
    report = LoadReport(source=directory, vision_tower="")

    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    files = weight_files(directory)
    weights = weights_label(directory, files)
    origins: dict[str, Path] = {}
    for key, tensor in iter_state_dict(files, origins):
        if key.startswith("base_model.model.") or "lora_" in key:
            raise CheckpointError(
                f"{origins[key]}: holds LoRA/peft keys ({key}); export it first with lisa-export"
            )
        reason = next((r for pattern, r in IGNORED_KEYS if pattern.match(key)), None)
        if reason:
            report.ignored[key] = reason
            continue
        ours = from_published_key(key)
        if ours is None:
            unexpected.append(key)
        else:
            state[ours] = tensor
    if unexpected:
        raise CheckpointError(
            f"{weights}: unexpected keys {unexpected[:8]} ({len(unexpected)} in all), not part of "
            "a LISA checkpoint"
        )

    # Parts, built without initialising weights that the checkpoint provides.
    torch.manual_seed(seed)
    has_sam = any(k.startswith("sam.") for k in state)
    if has_sam:
        geometry = infer_sam_geometry(state, prefix="sam.")
    elif sam_checkpoint is not None:
        sam_state = read_weight_file(sam_checkpoint)
        geometry = infer_sam_geometry(sam_state)
        state.update({"sam." + k: v for k, v in sam_state.items()})
        report.initialised.append(f"sam from {sam_checkpoint}")
    elif init_missing:
        from lisa_model.sam import SAM_VIT_H

        geometry = SAM_VIT_H
        report.initialised.append("sam (random ViT-H)")
    else:
        raise CheckpointError(
            f"{directory}: no SAM weights (model.visual_model.*); this looks like a base LLaVA "
            "checkpoint: pass sam_checkpoint=<sam_vit_h.pth> (or init_missing=True)"
        )

    from transformers import LlamaForCausalLM

    with _meta_parameters():
        llm = LlamaForCausalLM(config.llm_config())
        mm_projector = build_mm_projector(
            config.mm_projector_type, config.mm_hidden_size, config.hidden_size
        )
        seg_projector = build_seg_projector(config.hidden_size, config.out_dim)
        sam = build_sam(geometry)

    tower_name = resolve_vision_tower(config, directory, vision_tower)
    report.vision_tower = tower_name
    clip = load_vision_tower(tower_name, torch.float32)
    model = LisaModel(config, llm, clip, mm_projector, seg_projector, sam, tokenizer)

    expected = {k for k, _ in _named_tensors(model) if not k.startswith("vision_tower.")}
    missing = sorted(expected - set(state))
    if missing and init_missing:
        fresh = _init_parameters(model, missing)
        state.update(fresh)
        report.initialised.extend(sorted({m.split(".")[0] for m in missing}))
        missing = []
    config_file = directory / "config.json"
    if missing:
        raise CheckpointError(
            f"{weights}: does not match {config_file}: missing keys "
            f"{_published(missing[:3])} ({len(missing)} in all)"
        )
    extra = sorted(set(state) - expected)
    if extra:
        raise CheckpointError(
            f"{weights}: does not match {config_file}: unexpected keys "
            f"{_published(extra[:3])} ({len(extra)} in all)"
        )
    _check_shapes(model, state, origins, config_file)
    model.load_state_dict(state, strict=False, assign=True)
    model.llm.tie_weights()  # no-op unless tie_word_embeddings

    if report.ignored:
        reasons = sorted(set(report.ignored.values()))
        log.info("%s: ignored %d keys (%s)", directory, len(report.ignored), "; ".join(reasons))
    model.load_report = report
    model.requires_grad_(False)
    model.eval()
    if quantization:
        from lisa_model.quantization import quantize_llm

        model.to(dtype=dtype)
        quantize_llm(model, quantization, device=device, compute_dtype=dtype)
        model.to(device)
    else:
        model.to(device=device, dtype=dtype)
    if encoder_dtype != dtype:
        model.set_encoder_dtype(encoder_dtype)
    return model


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers, i.e. what a state dict holds."""
    yield from model.state_dict(keep_vars=True).items()


def _published(names: list[str]) -> list[str]:
    """Our parameter names as the checkpoint keys a user finds in the files."""
    out = []
    for name in names:
        try:
            out.append(to_published_key(name))
        except KeyError:
            out.append(name)
    return out


def _check_shapes(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    origins: Mapping[str, Path],
    config_file: Path,
) -> None:
    """:class:`CheckpointError` naming the first weight file whose tensors do not have the
    shapes ``config.json`` gives."""
    bad = [
        (k, tuple(state[k].shape), tuple(t.shape))
        for k, t in _named_tensors(model)
        if k in state and tuple(state[k].shape) != tuple(t.shape)
    ]
    if bad:
        key = to_published_key(bad[0][0])
        where = origins.get(key, config_file.parent)
        details = "; ".join(f"{to_published_key(k)} {a} vs {b}" for k, a, b in bad[:3])
        raise CheckpointError(
            f"{where}: shape mismatch with {config_file} ({len(bad)} tensors, file vs config): "
            + details
        )


def _init_parameters(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Materialise and initialise meta parameters ``names`` the way their modules would."""
    fresh: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    for owner in sorted({n.rsplit(".", 1)[0] for n in names}):
        module = modules[owner]
        module.to_empty(device="cpu", recurse=False)
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight)
        for pname, tensor in module.named_parameters(recurse=False):
            full = f"{owner}.{pname}"
            if full in names:
                fresh[full] = tensor.detach().clone()
        for bname, tensor in module.named_buffers(recurse=False):
            full = f"{owner}.{bname}"
            if full in names:
                fresh[full] = tensor.detach().clone()
    return fresh


class _meta_parameters:  # noqa: N801 - used as a context manager, reads like one
    """Create module parameters on the meta device (no memory, no init); buffers stay real.

    The checkpoint tensors are then assigned in place of the meta parameters, so a 7B model is
    held in memory once.
    """

    def __enter__(self) -> None:
        self._original = nn.Module.register_parameter

        def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
            self._original(module, name, param)
            if param is not None:
                kwargs = {"requires_grad": param.requires_grad}
                module._parameters[name] = nn.Parameter(param.to("meta"), **kwargs)

        nn.Module.register_parameter = register  # type: ignore[method-assign]

    def __exit__(self, *exc: Any) -> None:
        nn.Module.register_parameter = self._original  # type: ignore[method-assign]


# --------------------------------------------------------------------------- save
def published_state_dict(model: LisaModel) -> dict[str, torch.Tensor]:
    """The model's weights under published keys (no CLIP tower, no non-persistent buffers)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("vision_tower."):
            continue
        out[to_published_key(name)] = tensor
    return out


def save_lisa(
    model: LisaModel,
    directory: str | os.PathLike[str],
    *,
    llm_dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 10 * 1024**3,
    safe_serialization: bool = False,
    include_vision_tower: bool = False,
) -> Path:
    """Write ``model`` in the published layout (loads with :func:`load_lisa` and the original).

    As the published checkpoints: LLM, ``mm_projector`` and ``lm_head`` stored in ``llm_dtype``
    (bf16), SAM and the ``[SEG]`` projector in float32; sharded ``pytorch_model-*.bin`` with an
    index (or ``.safetensors`` with ``safe_serialization``); tokenizer files; ``config.json``.
    With ``include_vision_tower`` the CLIP tower is saved under ``vision_tower/`` so the directory
    is self-contained (no hub needed).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, tensor in published_state_dict(model).items():
        tensor = tensor.detach().to("cpu")
        keep_fp32 = key.startswith(("model.visual_model.", "model.text_hidden_fcs."))
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float32 if keep_fp32 else llm_dtype)
        state[key] = tensor.contiguous()

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += nbytes
    ext = "safetensors" if safe_serialization else "bin"
    stem = "model" if safe_serialization else "pytorch_model"
    for stale in list(directory.glob(f"{stem}*.{ext}")) + [
        directory / n for n in WEIGHT_INDEX_FILES + SINGLE_WEIGHT_FILES
    ]:
        stale.unlink(missing_ok=True)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        name = (
            f"{stem}.{ext}" if len(shards) == 1 else f"{stem}-{i:05d}-of-{len(shards):05d}.{ext}"
        )
        if safe_serialization:
            from safetensors.torch import save_file

            save_file(shard, str(directory / name), metadata={"format": "pt"})
            follow_umask(directory / name)  # safetensors writes 0600
        else:
            torch.save(shard, directory / name)
        weight_map.update(dict.fromkeys(shard, name))
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2) + "\n")

    model.config.to_json_file(directory / "config.json")
    generation = {
        "_from_model_config": True,
        "bos_token_id": model.tokenizer.bos_token_id,
        "eos_token_id": model.tokenizer.eos_token_id,
        "pad_token_id": model.tokenizer.pad_token_id,
    }
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    model.tokenizer.save_pretrained(directory)
    if include_vision_tower:
        save_vision_tower(model.vision_tower, directory / VISION_TOWER_DIR)
    return directory


def save_vision_tower(tower: nn.Module, directory: Path) -> None:
    """Write a CLIP tower as ``config.json`` + ``model.safetensors`` (loadable with
    ``CLIPVisionModel.from_pretrained``), without transformers' save machinery."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tower.config.to_json_file(directory / "config.json")
    state = {k: v.detach().cpu().contiguous() for k, v in tower.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    follow_umask(directory / "model.safetensors")  # safetensors writes 0600
