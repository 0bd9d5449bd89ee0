"""The shared names: dtypes, modes, device defaults."""

from __future__ import annotations

import pytest
import torch

from lisa_model import options


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("float32", torch.float32),
        ("FP32", torch.float32),
        ("bf16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("fp16", torch.float16),
        (torch.float16, torch.float16),
    ],
)
def test_parse_dtype_accepts_every_spelling(name, expected) -> None:
    assert options.parse_dtype(name) is expected


def test_parse_dtype_names_the_accepted_spellings() -> None:
    with pytest.raises(ValueError, match=r"unknown dtype 'half'; expected one of float32, fp32"):
        options.parse_dtype("half")


def test_dtype_name_is_canonical() -> None:
    assert [options.dtype_name(n) for n in ("fp32", "bf16", torch.float16)] == list(
        options.DTYPE_NAMES
    )


def test_modes_and_their_check() -> None:
    assert options.DEFAULT_MODE in options.MODES == ("generate", "segment")
    assert options.check_mode("segment") == "segment"
    with pytest.raises(ValueError, match="mode 'fast'; expected one of generate, segment"):
        options.check_mode("fast")


def test_device_defaults() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert options.default_device().type == expected
    assert options.resolve_device(None).type == expected
    assert options.resolve_device("  ").type == expected
    assert options.resolve_device("cpu") == torch.device("cpu")
    assert options.default_dtype("cpu") == "float32"
    assert options.default_dtype("cuda:1") == "bfloat16"
    assert options.resolve_dtype("", "cpu") is torch.float32
    assert options.resolve_dtype("bf16", "cpu") is torch.bfloat16


def test_resolve_device_names_bad_devices() -> None:
    with pytest.raises(ValueError, match="'gpu' is not a torch device"):
        options.resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda' requested but CUDA is not available"):
            options.resolve_device("cuda")


def test_native_bf16_is_a_property_of_the_device() -> None:
    assert options.native_bf16("meta") is False
    assert isinstance(options.native_bf16("cpu"), bool)


def test_cpu_bf16_note_only_where_bf16_is_emulated() -> None:
    assert options.cpu_bf16_note("cpu", "float32") is None
    assert options.cpu_bf16_note("meta", "bfloat16") is None
    note = options.cpu_bf16_note("cpu", "bfloat16")
    if options.native_bf16("cpu"):
        assert note is None
    else:
        assert note is not None and "emulated" in note


def test_the_names_load_without_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys; import lisa_model.options as o; "
        "assert 'torch' not in sys.modules, 'torch imported'; print(o.MODES)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
