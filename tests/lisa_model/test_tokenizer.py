"""LisaTokenizer against the original's transformers 4.31 slow LlamaTokenizer outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lisa_model.prompts import IMAGE_TOKEN_INDEX
from lisa_model.tokenizer import (
    ADDED_TOKENS_FILE,
    SPECIAL_TOKENS_MAP_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_MODEL_FILE,
    LisaTokenizer,
    train_sentencepiece,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
REFERENCE_DIR = REPO_ROOT / "tests" / "fixtures" / "lisa_reference"
TINY_7B = REFERENCE_DIR / "lisa-tiny"
TINY_LLAMA2 = REFERENCE_DIR / "lisa-tiny-llama2-style"
CASES = json.loads((REFERENCE_DIR / "expected" / "tokenizer_cases.json").read_text("utf-8"))
GENERATE = json.loads((REFERENCE_DIR / "expected" / "generate.json").read_text("utf-8"))
VARIANT = CASES["llama2_style_variant"]
TOKENIZER_FILES = (
    TOKENIZER_MODEL_FILE,
    ADDED_TOKENS_FILE,
    SPECIAL_TOKENS_MAP_FILE,
    TOKENIZER_CONFIG_FILE,
)
ORDER_7B_V1 = ["<im_patch>", "<im_start>", "<im_end>", "[SEG]"]
ORDER_13B_LLAMA2 = ["[SEG]", "<im_start>", "<im_end>"]

TRAIN_CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "What is the red ball in this image? Please output segmentation mask.",
    "Can you segment the person in this image? Sure, it is the segmentation result.",
    "Where is it? The cat sits on the mat near the window, and the dog sleeps.",
    "There are 12 cats, 21 dogs and 112 birds in 2012.",
] * 4


@pytest.fixture(scope="module")
def tok7b() -> LisaTokenizer:
    return LisaTokenizer.from_pretrained(TINY_7B)


@pytest.fixture(scope="module")
def tok_llama2() -> LisaTokenizer:
    return LisaTokenizer.from_pretrained(TINY_LLAMA2)


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_sentencepiece(TRAIN_CORPUS, 320, tmp_path_factory.mktemp("spm") / "tiny.model")


def _case_id(case: dict) -> str:
    return repr(case["text"])[:40]


# ---------------------------------------------------------------------------- fixture oracle


def test_layout_7b_v1(tok7b: LisaTokenizer) -> None:
    assert tok7b.seg_token_id == CASES["seg_token_idx"] == 803
    assert len(tok7b) == CASES["len_tokenizer"]
    assert tok7b.vocab_size == CASES["sp_vocab_size"]
    assert tok7b.added_tokens == CASES["added_tokens"]
    assert list(tok7b.added_tokens) == ORDER_7B_V1  # id order
    special = CASES["special"]
    assert (tok7b.bos_token_id, tok7b.eos_token_id) == (special["bos"], special["eos"])
    assert (tok7b.unk_token_id, tok7b.pad_token_id) == (special["unk"], special["pad"])
    assert tok7b.model_max_length == 512


def test_layout_13b_llama2(tok_llama2: LisaTokenizer) -> None:
    assert tok_llama2.seg_token_id == VARIANT["seg_token_idx"] == 800
    assert len(tok_llama2) == VARIANT["len_tokenizer"]
    assert tok_llama2.added_tokens == VARIANT["added_tokens"]
    assert list(tok_llama2.added_tokens) == ORDER_13B_LLAMA2


@pytest.mark.parametrize("tok_name", ["tok7b", "tok_llama2"])
def test_seg_token_id_is_the_originals_definition(
    tok_name: str, request: pytest.FixtureRequest
) -> None:
    # The original: seg_token_idx = tokenizer("[SEG]", add_special_tokens=False).input_ids[0]
    tok = request.getfixturevalue(tok_name)
    assert tok.encode("[SEG]", add_special_tokens=False) == [tok.seg_token_id]


@pytest.mark.parametrize("case", CASES["encode"], ids=_case_id)
def test_encode_cases(tok7b: LisaTokenizer, case: dict) -> None:
    assert tok7b.tokenize(case["text"]) == case["tokens"]
    assert tok7b.encode(case["text"]) == case["input_ids"]
    assert tok7b.encode(case["text"], add_special_tokens=False) == case["input_ids_no_special"]
    assert tok7b.convert_tokens_to_ids(case["tokens"]) == case["input_ids_no_special"]
    assert tok7b.convert_ids_to_tokens(case["input_ids_no_special"]) == case["tokens"]


@pytest.mark.parametrize("case", VARIANT["encode"], ids=_case_id)
def test_encode_cases_llama2_layout(tok_llama2: LisaTokenizer, case: dict) -> None:
    assert tok_llama2.encode(case["text"]) == case["input_ids"]


@pytest.mark.parametrize("index", range(len(CASES["tokenizer_image_token"])))
def test_tokenizer_image_token_cases(tok7b: LisaTokenizer, index: int) -> None:
    case = CASES["tokenizer_image_token"][index]
    ids = tok7b.tokenizer_image_token(case["prompt"])
    assert ids == case["input_ids"]
    assert ids.count(IMAGE_TOKEN_INDEX) == 1 and ids.count(tok7b.bos_token_id) == 1


@pytest.mark.parametrize("index", range(len(VARIANT["tokenizer_image_token"])))
def test_tokenizer_image_token_cases_llama2_layout(tok_llama2: LisaTokenizer, index: int) -> None:
    case = VARIANT["tokenizer_image_token"][index]
    assert tok_llama2.tokenizer_image_token(case["prompt"]) == case["input_ids"]


@pytest.mark.parametrize("case", CASES["decode"], ids=lambda c: str(c["ids"][:4]))
def test_decode_cases(tok7b: LisaTokenizer, case: dict) -> None:
    text = tok7b.decode(case["ids"])
    assert text == case["decode"]
    assert tok7b.decode(case["ids"], skip_special_tokens=True) == case["decode_skip_special"]
    # chat.py's post-processing of the decoded text
    assert text.replace("\n", "").replace("  ", " ") == case["chat_postprocess"]


@pytest.mark.parametrize("sample", GENERATE, ids=lambda s: s["key"])
def test_generate_outputs(tok7b: LisaTokenizer, sample: dict) -> None:
    assert tok7b.tokenizer_image_token(sample["prompt"]) == sample["input_ids"]
    assert tok7b.convert_ids_to_tokens(sample["generated_ids"]) == sample["generated_tokens"]
    assert tok7b.decode(sample["generated_ids"]) == sample["decoded_answer"]
    text = tok7b.decode([i for i in sample["output_ids"] if i != IMAGE_TOKEN_INDEX])
    text = text.replace("\n", "").replace("  ", " ")
    if text.splitlines() != [text]:
        # The fixture recorded chat.py's printed line, which ends at characters that
        # str.splitlines() treats as line breaks (here a generated <0x1D> byte).
        text = text.splitlines()[0]
    assert text == sample["decoded_text_output"]


def test_decode_accepts_arrays(tok7b: LisaTokenizer) -> None:
    case = CASES["decode"][3]
    assert tok7b.decode(np.asarray(case["ids"], dtype=np.int64)) == case["decode"]
    assert tok7b.convert_ids_to_tokens(np.int64(803)) == "[SEG]"


# ---------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("source", [TINY_7B, TINY_LLAMA2], ids=["7b-v1", "13b-llama2"])
def test_save_pretrained_writes_the_original_files(source: Path, tmp_path: Path) -> None:
    tok = LisaTokenizer.from_pretrained(source)
    written = tok.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in written) == sorted(TOKENIZER_FILES)
    for name in TOKENIZER_FILES:
        assert (tmp_path / "out" / name).read_bytes() == (source / name).read_bytes(), name


@pytest.mark.parametrize(
    ("source", "order"),
    [(TINY_7B, ORDER_7B_V1), (TINY_LLAMA2, ORDER_13B_LLAMA2)],
    ids=["7b-v1", "13b-llama2"],
)
def test_from_sentencepiece_rebuilds_the_checkpoint(
    source: Path, order: list[str], tmp_path: Path
) -> None:
    tok = LisaTokenizer.from_sentencepiece((source / TOKENIZER_MODEL_FILE).read_bytes(), order)
    tok.save_pretrained(tmp_path)
    for name in TOKENIZER_FILES:
        assert (tmp_path / name).read_bytes() == (source / name).read_bytes(), name


def test_round_trip_reloads_identical_behaviour(tok7b: LisaTokenizer, tmp_path: Path) -> None:
    tok7b.save_pretrained(tmp_path)
    again = LisaTokenizer.from_pretrained(tmp_path)
    assert again.added_tokens == tok7b.added_tokens
    for case in CASES["encode"]:
        assert again.encode(case["text"]) == case["input_ids"]
    for case in CASES["decode"]:
        assert again.decode(case["ids"]) == case["decode"]
        assert again.decode(case["ids"], skip_special_tokens=True) == case["decode_skip_special"]
    for case in CASES["tokenizer_image_token"]:
        assert again.tokenizer_image_token(case["prompt"]) == case["input_ids"]


def test_round_trip_after_add_tokens(trained_model: Path, tmp_path: Path) -> None:
    tok = LisaTokenizer.from_sentencepiece(trained_model, ["<im_start>", "<im_end>"])
    assert tok.add_tokens("[SEG]") == 1
    tok.save_pretrained(tmp_path)
    again = LisaTokenizer.from_pretrained(tmp_path)
    assert again.added_tokens == {"<im_start>": 320, "<im_end>": 321, "[SEG]": 322}
    text = "USER: <im_start> x <im_end>\n Where is it? ASSISTANT: Sure, [SEG].</s>"
    assert again.encode(text) == tok.encode(text)
    assert (tmp_path / TOKENIZER_MODEL_FILE).read_bytes() == trained_model.read_bytes()


# ---------------------------------------------------------------------------- trained tokenizer


def test_train_sentencepiece_is_llama_like(trained_model: Path) -> None:
    tok = LisaTokenizer.from_sentencepiece(trained_model)
    assert tok.vocab_size == 320
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 13, 258]) == [
        "<unk>",
        "<s>",
        "</s>",
        "<0x00>",
        "<0x0A>",
        "<0xFF>",
    ]
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    # dummy prefix, whitespace kept as is, digits split, bytes for unseen characters
    assert tok.tokenize(" ") == ["▁", "▁"]
    learned = tok.convert_ids_to_tokens(range(259, tok.vocab_size))
    assert "1" in learned and all(sum(c.isdigit() for c in piece) <= 1 for piece in learned)
    assert "<0xE6>" in tok.tokenize("東")
    assert tok.decode(tok.encode("the  cat\n")) == "<s>the  cat\n"


def test_train_sentencepiece_is_deterministic(trained_model: Path, tmp_path: Path) -> None:
    again = train_sentencepiece(iter(TRAIN_CORPUS), 320, tmp_path / "again.model")
    assert again.read_bytes() == trained_model.read_bytes()
    # and in a fresh interpreter
    script = (
        "import sys; from lisa_model.tokenizer import train_sentencepiece; "
        "train_sentencepiece(sys.argv[2:], 320, sys.argv[1])"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    out = tmp_path / "subprocess.model"
    subprocess.run(
        [sys.executable, "-c", script, str(out), *TRAIN_CORPUS], check=True, env=env, timeout=120
    )
    assert out.read_bytes() == trained_model.read_bytes()


def test_train_sentencepiece_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        train_sentencepiece([], 300, tmp_path / "x.model")
    with pytest.raises(ValueError, match="5000-piece"):
        train_sentencepiece(TRAIN_CORPUS, 5000, tmp_path / "x.model")


@pytest.mark.parametrize(
    ("order", "seg_offset"), [(ORDER_7B_V1, 3), (ORDER_13B_LLAMA2, 0)], ids=["7b-v1", "13b"]
)
def test_trained_tokenizer_layouts(trained_model: Path, order: list[str], seg_offset: int) -> None:
    tok = LisaTokenizer.from_sentencepiece(trained_model, order)
    assert tok.seg_token_id == tok.vocab_size + seg_offset
    assert len(tok) == tok.vocab_size + len(order)
    assert list(tok.added_tokens) == order
    assert tok.encode("[SEG]") == [1, tok.seg_token_id]


def test_original_add_token_sequences(trained_model: Path) -> None:
    # train_ds.py: add_tokens("[SEG]"), then add_tokens([<im_start>, <im_end>]).
    base_7b = LisaTokenizer.from_sentencepiece(
        trained_model, ["<im_patch>", "<im_start>", "<im_end>"]
    )
    assert base_7b.add_tokens("[SEG]") == 1
    assert base_7b.add_tokens(["<im_start>", "<im_end>"]) == 0
    assert base_7b.seg_token_id == 323
    base_13b = LisaTokenizer.from_sentencepiece(trained_model)
    assert base_13b.add_tokens("[SEG]") == 1
    assert base_13b.add_tokens(["<im_start>", "<im_end>", "<im_start>"]) == 2
    assert base_13b.added_tokens == {"[SEG]": 320, "<im_start>": 321, "<im_end>": 322}
    # pieces of the SentencePiece model and special tokens are never added
    piece = base_13b.convert_ids_to_tokens(300)
    assert base_13b.add_tokens([piece, "<s>", "</s>", "<unk>"]) == 0
    with pytest.raises(ValueError, match="non-empty"):
        base_13b.add_tokens([""])


def test_whitespace_next_to_added_tokens_is_stripped(trained_model: Path) -> None:
    tok = LisaTokenizer.from_sentencepiece(trained_model, ORDER_13B_LLAMA2)

    def sp(text: str) -> list[str]:
        return LisaTokenizer.from_sentencepiece(trained_model).tokenize(text)

    assert tok.tokenize("Sure, [SEG].") == sp("Sure,") + ["[SEG]"] + sp(".")
    assert tok.tokenize(" \n [SEG] \n ") == ["[SEG]"]
    assert tok.tokenize("USER: <im_start>") == sp("USER:") + ["<im_start>"]
    assert tok.tokenize("<im_end>\n Where is it?") == ["<im_end>"] + sp("Where is it?")
    assert tok.tokenize("<im_start> <im_end>") == ["<im_start>", "<im_end>"]
    assert tok.tokenize("a[SEG]b") == sp("a") + ["[SEG]"] + sp("b")
    # <s>/</s>/<unk> are AddedTokens without lstrip/rstrip: whitespace stays
    assert tok.tokenize("the </s> cat") == sp("the ") + ["</s>"] + sp(" cat")
    assert tok.tokenize("<s><unk>") == ["<s>", "<unk>"]
    # an added token that contains another one: the longest match wins
    assert tok.add_tokens(["[SEG]x"]) == 1
    assert tok.tokenize("a [SEG]x [SEG]") == sp("a") + ["[SEG]x", "[SEG]"]


def test_plain_string_special_tokens_strip_like_added_tokens(
    trained_model: Path, tmp_path: Path
) -> None:
    # 4.31: a special token given as a plain string in special_tokens_map.json is not an
    # AddedToken, so whitespace on both sides is stripped.
    LisaTokenizer.from_sentencepiece(trained_model, ["[SEG]"]).save_pretrained(tmp_path)
    special_map = json.loads((tmp_path / SPECIAL_TOKENS_MAP_FILE).read_text("utf-8"))
    special_map["eos_token"] = "</s>"
    (tmp_path / SPECIAL_TOKENS_MAP_FILE).write_text(json.dumps(special_map), "utf-8")
    tok = LisaTokenizer.from_pretrained(tmp_path)
    sp = LisaTokenizer.from_sentencepiece(trained_model).tokenize
    assert tok.tokenize("the </s> cat") == sp("the") + ["</s>"] + sp("cat")
    assert tok.tokenize("the <s> cat") == sp("the ") + ["<s>"] + sp(" cat")
    tok.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / SPECIAL_TOKENS_MAP_FILE).read_text("utf-8")) == (
        special_map
    )


def test_encode_is_fast(tok7b: LisaTokenizer) -> None:
    prompt = CASES["tokenizer_image_token"][0]["prompt"]
    start = time.perf_counter()
    for _ in range(200):
        tok7b.tokenizer_image_token(prompt)
    # ~0.1 ms per prompt in practice; the bound only catches pathological regressions.
    assert time.perf_counter() - start < 2.0


# ---------------------------------------------------------------------------- errors


def test_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_checkpoint"
    with pytest.raises(FileNotFoundError, match="no_such_checkpoint"):
        LisaTokenizer.from_pretrained(missing)


def test_missing_tokenizer_model(tmp_path: Path) -> None:
    (tmp_path / ADDED_TOKENS_FILE).write_text('{"[SEG]": 32000}', "utf-8")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.model") as info:
        LisaTokenizer.from_pretrained(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_unreadable_tokenizer_model(tmp_path: Path) -> None:
    (tmp_path / TOKENIZER_MODEL_FILE).write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(ValueError, match="not a valid SentencePiece model") as info:
        LisaTokenizer.from_pretrained(tmp_path)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(FileNotFoundError, match="nothing.model"):
        LisaTokenizer.from_sentencepiece(tmp_path / "nothing.model")


def _copy_checkpoint(tmp_path: Path) -> Path:
    out = tmp_path / "ckpt"
    out.mkdir()
    for name in TOKENIZER_FILES:
        (out / name).write_bytes((TINY_7B / name).read_bytes())
    return out


def test_non_consecutive_added_tokens(tmp_path: Path) -> None:
    ckpt = _copy_checkpoint(tmp_path)
    (ckpt / ADDED_TOKENS_FILE).write_text('{"<im_start>": 800, "[SEG]": 805}', "utf-8")
    with pytest.raises(
        ValueError, match=r"added_tokens\.json.*'\[SEG\]' has id 805, expected 801"
    ):
        LisaTokenizer.from_pretrained(ckpt)
    (ckpt / ADDED_TOKENS_FILE).write_text('{"[SEG]": "803"}', "utf-8")
    with pytest.raises(ValueError, match="integer id"):
        LisaTokenizer.from_pretrained(ckpt)


def test_added_token_that_is_a_piece(tmp_path: Path, tok7b: LisaTokenizer) -> None:
    ckpt = _copy_checkpoint(tmp_path)
    piece = tok7b.convert_ids_to_tokens(400)
    (ckpt / ADDED_TOKENS_FILE).write_text(json.dumps({piece: 800}), "utf-8")
    with pytest.raises(ValueError, match="already a piece"):
        LisaTokenizer.from_pretrained(ckpt)


def test_bad_json_names_the_file(tmp_path: Path) -> None:
    ckpt = _copy_checkpoint(tmp_path)
    (ckpt / TOKENIZER_CONFIG_FILE).write_text("{not json", "utf-8")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json"):
        LisaTokenizer.from_pretrained(ckpt)


def test_unsupported_config(tmp_path: Path) -> None:
    ckpt = _copy_checkpoint(tmp_path)
    config = json.loads((TINY_7B / TOKENIZER_CONFIG_FILE).read_text("utf-8"))
    (ckpt / TOKENIZER_CONFIG_FILE).write_text(json.dumps(dict(config, legacy=False)), "utf-8")
    with pytest.raises(ValueError, match="legacy"):
        LisaTokenizer.from_pretrained(ckpt)
    (ckpt / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config), "utf-8")
    special_map = json.loads((TINY_7B / SPECIAL_TOKENS_MAP_FILE).read_text("utf-8"))
    special_map["pad_token"] = "<pad>"
    (ckpt / SPECIAL_TOKENS_MAP_FILE).write_text(json.dumps(special_map), "utf-8")
    with pytest.raises(ValueError, match="pad_token '<pad>'"):
        LisaTokenizer.from_pretrained(ckpt)


def test_optional_files_default_to_llama(tmp_path: Path) -> None:
    (tmp_path / TOKENIZER_MODEL_FILE).write_bytes((TINY_7B / TOKENIZER_MODEL_FILE).read_bytes())
    tok = LisaTokenizer.from_pretrained(tmp_path, model_max_length=256)
    assert tok.added_tokens == {}
    assert tok.model_max_length == 256
    assert tok.encode("<s>hello</s>world") == [1, 1, 516, 293, 732, 2, 377, 297]
    with pytest.raises(ValueError, match=r"no added token '\[SEG\]'"):
        _ = tok.seg_token_id


def test_decode_rejects_the_image_placeholder(tok7b: LisaTokenizer) -> None:
    with pytest.raises(ValueError, match="-200"):
        tok7b.decode([1, IMAGE_TOKEN_INDEX, 803])
    with pytest.raises(ValueError, match="804"):
        tok7b.decode([804])
