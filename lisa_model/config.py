"""Configuration of a LISA model, read from and written to the published ``config.json``.

The published checkpoints (``xinlai/LISA-7B-v1`` and friends) store one flat LLaVA-style
``config.json`` (``model_type: llava``, ``architectures: [LISAForCausalLM]``). It describes the LLM
and the vision side but not SAM: the original always built ViT-H, so the SAM geometry is inferred
from the weights (see :mod:`lisa_model.sam`).

``LisaConfig`` keeps the raw dictionary so that saving writes back exactly what was read, and
exposes the fields the code needs as typed, validated properties.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lisa_model.prompts import IMAGE_TOKEN_INDEX, TEMPLATES

DEFAULT_VISION_TOWER = "openai/clip-vit-large-patch14"

#: Keys every LISA ``config.json`` has (besides the LLM's own).
_REQUIRED_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
)
#: Keys that must be positive integers where present.
_POSITIVE_INT_KEYS = (
    *_REQUIRED_KEYS,
    "num_key_value_heads",
    "max_position_embeddings",
    "mm_hidden_size",
    "out_dim",
)


class CheckpointError(ValueError):
    """A checkpoint directory or file is not what a LISA checkpoint should be.

    The message is one line that starts with the file (or directory) at fault and says what is
    wrong with it, e.g. ``/ckpt/pytorch_model.bin: truncated or corrupt ...``; line breaks in the
    text it is given are folded, so a log line or a CLI ``error:`` line holds all of it.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(line.strip() for line in str(message).splitlines()).strip())


def read_json_object(path: Path, if_missing: str) -> dict[str, Any]:
    """The JSON object in ``path``; :class:`CheckpointError` naming it (``if_missing`` says what
    a missing file means)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {if_missing}") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return raw


@dataclass
class LisaConfig:
    """Typed view over a LISA ``config.json``.

    Attributes:
        raw: the dictionary as stored (LLaMA fields + LLaVA/LISA fields); written back verbatim
            by :func:`lisa_model.checkpoint.save_lisa`.
        conv_template: which chat template prompts use (``llava_v1`` for every published
            checkpoint, including the llama-2 based 13B: the original's chat.py default).
        image_token_index: the placeholder id of ``<image>`` in ``input_ids``.
    """

    raw: dict[str, Any]
    conv_template: str = "llava_v1"
    image_token_index: int = IMAGE_TOKEN_INDEX
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [k for k in _REQUIRED_KEYS if k not in self.raw]
        if missing:
            raise CheckpointError(f"lacks {missing}; is this a LISA/LLaVA checkpoint?")
        bad = {
            k: self.raw[k]
            for k in _POSITIVE_INT_KEYS
            if k in self.raw
            and not (
                isinstance(self.raw[k], int)
                and not isinstance(self.raw[k], bool)
                and self.raw[k] > 0
            )
        }
        if bad:
            raise CheckpointError(f"expected positive integers, got {bad}")
        if self.conv_template not in TEMPLATES:
            raise ValueError(
                f"conv_template {self.conv_template!r} is not one of {sorted(TEMPLATES)}"
            )
        if self.mm_vision_select_feature != "patch":
            raise CheckpointError(
                f"mm_vision_select_feature {self.mm_vision_select_feature!r} is not supported "
                "(LISA uses 'patch': CLS dropped)"
            )
        if self.hidden_size % self.raw["num_attention_heads"]:
            raise CheckpointError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                f"{self.raw['num_attention_heads']}"
            )

    # ------------------------------------------------------------------ file I/O
    @classmethod
    def from_json_file(cls, path: str | Path, **kwargs: Any) -> LisaConfig:
        """Read ``config.json``; :class:`CheckpointError` naming ``path`` and what is wrong."""
        path = Path(path)
        raw = read_json_object(path, "no config.json; expected a LISA checkpoint")
        try:
            return cls(raw=raw, **kwargs)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from None

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.raw, indent=2, sort_keys=True) + "\n")

    # ------------------------------------------------------------------ LLM
    @property
    def hidden_size(self) -> int:
        return int(self.raw["hidden_size"])

    @property
    def vocab_size(self) -> int:
        return int(self.raw["vocab_size"])

    @property
    def max_position_embeddings(self) -> int:
        return int(self.raw.get("max_position_embeddings", 2048))

    @property
    def is_lisa(self) -> bool:
        """True for a LISA checkpoint (SAM and ``[SEG]`` projector), False for base LLaVA."""
        return "train_mask_decoder" in self.raw

    def llm_config(self) -> Any:
        """A ``transformers.LlamaConfig`` for the language model.

        Only the LLaMA fields are passed on. RoPE frequencies are computed from ``rope_theta``
        (stored ``inv_freq`` buffers are bf16-rounded and ignored, as the original does).
        Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` (``sdpa``).
        """
        from transformers import LlamaConfig

        r = self.raw
        rope_theta = float(r.get("rope_theta", 10000.0))
        rope_scaling = r.get("rope_scaling")
        if rope_scaling:
            rope_parameters = dict(rope_scaling)
            rope_parameters.setdefault("rope_theta", rope_theta)
            if "type" in rope_parameters and "rope_type" not in rope_parameters:
                rope_parameters["rope_type"] = rope_parameters.pop("type")
        else:
            rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=int(r["intermediate_size"]),
            num_hidden_layers=int(r["num_hidden_layers"]),
            num_attention_heads=int(r["num_attention_heads"]),
            num_key_value_heads=int(r.get("num_key_value_heads") or r["num_attention_heads"]),
            hidden_act=r.get("hidden_act", "silu"),
            max_position_embeddings=int(r.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(r.get("rms_norm_eps", 1e-6)),
            rope_parameters=rope_parameters,
            attention_bias=bool(r.get("attention_bias", False)),
            tie_word_embeddings=bool(r.get("tie_word_embeddings", False)),
            bos_token_id=r.get("bos_token_id", 1),
            eos_token_id=r.get("eos_token_id", 2),
            pad_token_id=r.get("pad_token_id", 0),
            use_cache=True,
            attn_implementation="sdpa",
        )

    # ------------------------------------------------------------------ vision
    @property
    def mm_vision_tower(self) -> str:
        return str(
            self.raw.get("mm_vision_tower") or self.raw.get("vision_tower") or DEFAULT_VISION_TOWER
        )

    @property
    def mm_hidden_size(self) -> int:
        return int(self.raw.get("mm_hidden_size", 1024))

    @property
    def mm_vision_select_layer(self) -> int:
        return int(self.raw.get("mm_vision_select_layer", -2))

    @property
    def mm_vision_select_feature(self) -> str:
        return str(self.raw.get("mm_vision_select_feature", "patch"))

    @property
    def mm_projector_type(self) -> str:
        """``linear`` for LLaVA v1 checkpoints; ``mlp2x_gelu`` for LLaVA-1.5-style ones."""
        return str(self.raw.get("mm_projector_type", "linear"))

    @property
    def use_im_start_end(self) -> bool:
        return bool(self.raw.get("mm_use_im_start_end", True))

    # ------------------------------------------------------------------ LISA
    @property
    def out_dim(self) -> int:
        return int(self.raw.get("out_dim", 256))

    @property
    def eos_token_id(self) -> int:
        return int(self.raw.get("eos_token_id", 2))
