"""The text tokenizer of the published LISA checkpoints, id for id.

The original code loads a checkpoint's tokenizer with transformers 4.31's *slow* ``LlamaTokenizer``
in legacy mode. Its ids are not what a plain SentencePiece call (or transformers 5.x) gives:

* the text is first cut at every "no-split" token: the added tokens of ``added_tokens.json``
  (``<im_patch>``, ``<im_start>``, ``<im_end>``, ``[SEG]``) and the special ``<s>``, ``</s>``,
  ``<unk>``; at equal start positions the longest token wins;
* whitespace next to an added token that was loaded from ``added_tokens.json`` (a plain string to
  4.31, not an ``AddedToken``) is deleted: the chunk on its left is ``rstrip``-ed and the chunk on
  its right ``lstrip``-ed (``"<im_end>\\nWhat"`` loses the newline). Special tokens stored as
  ``AddedToken`` objects strip only as their ``lstrip``/``rstrip`` flags say (``False`` for the
  LLaMA ``<s>``/``</s>``/``<unk>``);
* every remaining non-empty text chunk is encoded on its own with ``sp.encode(chunk)``, so each one
  starts with the dummy-prefix ``▁``;
* ``encode`` prepends ``<s>`` (``add_bos_token``), never appends ``</s>`` (``add_eos_token``);
* ``decode`` keeps added tokens as separate pieces joined with single spaces and runs the rest
  through LLaMA's special-token aware ``convert_tokens_to_string``; no clean-up of spaces.

This module reproduces that on top of ``sentencepiece`` alone, reads and writes the four tokenizer
files of a checkpoint in the 4.31 format, and trains tiny LLaMA-like SentencePiece models for
tests and demo checkpoints.
"""

from __future__ import annotations

import copy
import io
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, SupportsInt, overload

import sentencepiece as spm

from lisa_model.prompts import IMAGE_TOKEN, IMAGE_TOKEN_INDEX, SEG_TOKEN

TOKENIZER_MODEL_FILE = "tokenizer.model"
ADDED_TOKENS_FILE = "added_tokens.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

#: The context length the original passes to ``from_pretrained`` (``--model_max_length``).
DEFAULT_MODEL_MAX_LENGTH = 512

# Keys of tokenizer_config.json that name files of the directory it was loaded from; 4.31 drops
# them on save.
_FILE_KEYS = ("vocab_file", "tokenizer_file", "name_or_path", "special_tokens_map_file")
# Special-token slots the LISA checkpoints leave empty; anything there would change tokenization.
_UNSUPPORTED_SPECIAL_KEYS = ("sep_token", "cls_token", "mask_token", "additional_special_tokens")


@dataclass(frozen=True)
class SpecialToken:
    """One of ``<s>``/``</s>``/``<unk>`` as the 4.31 tokenizer holds it.

    ``added_token`` is ``True`` for a tokenizers ``AddedToken`` (a JSON object in the files; it
    strips neighbouring whitespace only as ``lstrip``/``rstrip`` say) and ``False`` for a plain
    string (4.31 then strips both neighbours, like an added token).
    """

    content: str
    lstrip: bool = False
    rstrip: bool = False
    normalized: bool = True
    single_word: bool = False
    added_token: bool = True

    def to_json(self, type_field: bool) -> dict[str, Any] | str:
        """The 4.31 serialisation (``__type`` only in tokenizer_config.json)."""
        if not self.added_token:
            return self.content
        out: dict[str, Any] = {
            "content": self.content,
            "lstrip": self.lstrip,
            "normalized": self.normalized,
            "rstrip": self.rstrip,
            "single_word": self.single_word,
        }
        if type_field:
            out["__type"] = "AddedToken"
        return out


def _added_token_json(content: str) -> dict[str, Any]:
    return SpecialToken(content).to_json(type_field=True)  # type: ignore[return-value]


def _default_config() -> dict[str, Any]:
    """tokenizer_config.json as 4.31 saves it for a LISA checkpoint (LLaMA defaults)."""
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": _added_token_json("<s>"),
        "clean_up_tokenization_spaces": False,
        "eos_token": _added_token_json("</s>"),
        "legacy": True,
        "model_max_length": DEFAULT_MODEL_MAX_LENGTH,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": _added_token_json("<unk>"),
    }


def _dump_json(obj: Any) -> str:
    """JSON text exactly as transformers 4.31 writes its tokenizer files."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or ``None`` if the file does not exist."""
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable JSON tokenizer file ({err})") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _parse_special(value: Any, key: str, path: Path, from_config: bool) -> SpecialToken:
    """A special token entry of tokenizer_config.json (``from_config``) or special_tokens_map.json.

    A string in tokenizer_config.json becomes an ``AddedToken`` without stripping (as
    ``LlamaTokenizer.__init__`` does); a string in special_tokens_map.json stays a plain string.
    """
    if isinstance(value, str):
        return SpecialToken(value, added_token=from_config)
    if isinstance(value, dict):
        fields = {k: v for k, v in value.items() if k != "__type"}
        if from_config and value.get("__type") != "AddedToken":
            raise ValueError(f'{path}: {key} is an object without "__type": "AddedToken"')
        content = fields.get("content")
        if not isinstance(content, str) or not content:
            raise ValueError(f"{path}: {key} needs a non-empty string 'content'")
        flags = {}
        for name, default in (
            ("lstrip", False),
            ("rstrip", False),
            ("normalized", True),
            ("single_word", False),
        ):
            flag = fields.get(name, default)
            if not isinstance(flag, bool):
                raise ValueError(f"{path}: {key}.{name} must be true or false")
            flags[name] = flag
        return SpecialToken(content, **flags, added_token=True)
    raise ValueError(f"{path}: {key} must be a string or an AddedToken object, got {value!r}")


def _special_content(value: Any) -> str | None:
    if isinstance(value, dict):
        content = value.get("content")
        return content if isinstance(content, str) else None
    return value if isinstance(value, str) else None


class LisaTokenizer:
    """transformers 4.31's slow ``LlamaTokenizer`` (legacy) with a LISA checkpoint's added tokens.

    Build it with :meth:`from_pretrained` (a checkpoint directory) or :meth:`from_sentencepiece`
    (a bare SentencePiece model). Ids ``[0, vocab_size)`` are SentencePiece pieces; added tokens
    follow in order (``[SEG]`` is 32003 in LISA-7B-v1, 32000 in LISA-13B-llama2-v1). The pad token
    is ``<unk>`` (id 0), as the original sets it.
    """

    def __init__(
        self,
        model_proto: bytes,
        *,
        added_tokens: Sequence[str] = (),
        bos: SpecialToken | None = None,
        eos: SpecialToken | None = None,
        unk: SpecialToken | None = None,
        config: dict[str, Any] | None = None,
        source: str = "<in-memory>",
    ) -> None:
        """Assemble from a serialized SentencePiece model; prefer the ``from_*`` constructors.

        ``config`` is the raw tokenizer_config.json content (kept for :meth:`save_pretrained`);
        ``source`` names where the tokenizer came from in error messages.
        """
        self._source = source
        self._model_proto = bytes(model_proto)
        self._sp = _load_sentencepiece(self._model_proto, source)
        self._config = copy.deepcopy(config) if config is not None else _default_config()
        self._check_config()
        self._add_bos = bool(self._config.get("add_bos_token", True))
        self._add_eos = bool(self._config.get("add_eos_token", False))
        self._clean_up_spaces = bool(self._config.get("clean_up_tokenization_spaces", False))
        self._bos = bos or SpecialToken("<s>")
        self._eos = eos or SpecialToken("</s>")
        self._unk = unk or SpecialToken("<unk>")
        self._added: dict[str, int] = {}
        self._added_by_id: dict[int, str] = {}
        for special in (self._bos, self._eos, self._unk):
            if not self._sp_has_piece(special.content):
                raise ValueError(
                    f"tokenizer {source}: special token {special.content!r} is not a piece of the "
                    "SentencePiece model (a LLaMA model has <unk> 0, <s> 1, </s> 2)"
                )
        for token in added_tokens:
            self._append(token)
        self._rebuild_split()

    # ------------------------------------------------------------------ construction / files

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, *, model_max_length: int | None = None
    ) -> LisaTokenizer:
        """Load ``tokenizer.model`` + ``added_tokens.json`` + ``special_tokens_map.json`` +
        ``tokenizer_config.json`` from a LISA/LLaVA checkpoint directory.

        Only ``tokenizer.model`` is required. ``model_max_length`` overrides the stored value, as
        the original's ``from_pretrained(..., model_max_length=512)`` does.
        """
        root = Path(directory)
        if not root.is_dir():
            raise FileNotFoundError(
                f"tokenizer directory {root} does not exist or is not a folder"
            )
        model_path = root / TOKENIZER_MODEL_FILE
        if not model_path.is_file():
            raise FileNotFoundError(
                f"{model_path}: missing (the SentencePiece model of the checkpoint's tokenizer)"
            )
        try:
            model_proto = model_path.read_bytes()
        except OSError as err:
            raise OSError(f"{model_path}: cannot be read ({err.strerror or err})") from err

        config_path = root / TOKENIZER_CONFIG_FILE
        config = _read_json_object(config_path)
        if config is None:
            config = {}
        special_map_path = root / SPECIAL_TOKENS_MAP_FILE
        special_map = _read_json_object(special_map_path) or {}
        if model_max_length is not None:
            config["model_max_length"] = int(model_max_length)

        specials: dict[str, SpecialToken] = {}
        for key, default in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>")):
            # 4.31: tokenizer_config.json gives the constructor arguments (LLaMA defaults),
            # special_tokens_map.json then overrides them attribute by attribute.
            if key in special_map:
                value, path, from_config = special_map[key], special_map_path, False
            elif key in config:
                value, path, from_config = config[key], config_path, True
            else:
                value, path, from_config = default, config_path, True
            if value is None:
                raise ValueError(f"{path}: {key} is null; a LLaMA tokenizer needs it")
            specials[key] = _parse_special(value, key, path, from_config)
        unk_content = specials["unk_token"].content
        for path, mapping in ((special_map_path, special_map), (config_path, config)):
            pad = _special_content(mapping.get("pad_token"))
            if pad is not None and pad != unk_content:
                raise ValueError(
                    f"{path}: pad_token {pad!r} is not supported; LISA uses the "
                    f"unk token {unk_content!r} as pad"
                )
            for key in _UNSUPPORTED_SPECIAL_KEYS:
                if mapping.get(key):
                    raise ValueError(
                        f"{path}: {key} is not supported (LISA checkpoints only "
                        "define bos/eos/unk/pad)"
                    )

        added_path = root / ADDED_TOKENS_FILE
        added_raw = _read_json_object(added_path) or {}
        for token, index in added_raw.items():
            if not token or isinstance(index, bool) or not isinstance(index, int):
                raise ValueError(
                    f"{added_path}: expected {{token: integer id}}, got {token!r}: {index!r}"
                )
        ordered = sorted(added_raw.items(), key=lambda item: item[1])

        tokenizer = cls(
            model_proto,
            bos=specials["bos_token"],
            eos=specials["eos_token"],
            unk=specials["unk_token"],
            config=config,
            source=str(model_path),
        )
        for token, index in ordered:
            expected = len(tokenizer)
            if index != expected:
                raise ValueError(
                    f"{added_path}: added token {token!r} has id {index}, expected "
                    f"{expected} (added ids must continue the SentencePiece vocabulary of "
                    f"{tokenizer.vocab_size} without gaps)"
                )
            if tokenizer._has_token(token):
                raise ValueError(
                    f"{added_path}: added token {token!r} is already a piece of {model_path}"
                )
            tokenizer._append(token)
        tokenizer._rebuild_split()
        return tokenizer

    @classmethod
    def from_sentencepiece(
        cls, model_path_or_bytes: str | Path | bytes, added_tokens: Sequence[str] | None = None
    ) -> LisaTokenizer:
        """A tokenizer over a bare SentencePiece model with the LLaMA/LISA defaults.

        ``added_tokens`` are appended with :meth:`add_tokens` semantics, in order: LISA-7B-v1 is
        ``["<im_patch>", "<im_start>", "<im_end>", "[SEG]"]``, LISA-13B-llama2-v1 is
        ``["[SEG]", "<im_start>", "<im_end>"]``.
        """
        if isinstance(model_path_or_bytes, (bytes, bytearray)):
            proto, source = bytes(model_path_or_bytes), "<sentencepiece bytes>"
        else:
            path = Path(model_path_or_bytes)
            try:
                proto = path.read_bytes()
            except OSError as err:
                raise FileNotFoundError(f"cannot read SentencePiece model {path}: {err}") from err
            source = str(path)
        tokenizer = cls(proto, source=source)
        if added_tokens:
            tokenizer.add_tokens(list(added_tokens))
        return tokenizer

    def save_pretrained(self, directory: str | Path) -> tuple[Path, ...]:
        """Write the four tokenizer files as transformers 4.31 does (the original can load them).

        ``tokenizer.model`` is the loaded model byte for byte. Returns the written paths.
        """
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(self._config)
        for key in _FILE_KEYS:
            config.pop(key, None)
        config["model_max_length"] = self.model_max_length
        config["clean_up_tokenization_spaces"] = self._clean_up_spaces
        config["tokenizer_class"] = "LlamaTokenizer"
        special_map = {
            "bos_token": self._bos.to_json(type_field=False),
            "eos_token": self._eos.to_json(type_field=False),
            "unk_token": self._unk.to_json(type_field=False),
            "pad_token": self._unk.content,
        }
        files = {
            TOKENIZER_CONFIG_FILE: _dump_json(config),
            SPECIAL_TOKENS_MAP_FILE: _dump_json(special_map),
            ADDED_TOKENS_FILE: _dump_json(self._added),
        }
        written = []
        for name, text in files.items():
            path = root / name
            path.write_text(text, encoding="utf-8")
            written.append(path)
        model_path = root / TOKENIZER_MODEL_FILE
        model_path.write_bytes(self._model_proto)
        written.append(model_path)
        return tuple(written)

    def add_tokens(self, tokens: str | Sequence[str]) -> int:
        """Append new (non-special) tokens in order, ids from ``len(self)``; returns how many.

        Tokens already known (a SentencePiece piece, an added token or ``<unk>``) are skipped, as
        4.31's ``add_tokens`` does; the others become no-split tokens that strip whitespace
        around them.
        """
        if isinstance(tokens, str):
            tokens = [tokens]
        added = 0
        for token in tokens:
            if not isinstance(token, str) or not token:
                raise ValueError(f"add_tokens: expected non-empty strings, got {token!r}")
            if self._has_token(token):
                continue
            self._append(token)
            added += 1
        if added:
            self._rebuild_split()
        return added

    # ------------------------------------------------------------------ properties

    @property
    def vocab_size(self) -> int:
        """Number of SentencePiece pieces (without added tokens)."""
        return self._sp.get_piece_size()

    def __len__(self) -> int:
        return self.vocab_size + len(self._added)

    @property
    def added_tokens(self) -> dict[str, int]:
        """Added token -> id, in id order."""
        return dict(self._added)

    @property
    def bos_token(self) -> str:
        return self._bos.content

    @property
    def eos_token(self) -> str:
        return self._eos.content

    @property
    def unk_token(self) -> str:
        return self._unk.content

    @property
    def pad_token(self) -> str:
        """The pad token is the unk token (``tokenizer.pad_token = tokenizer.unk_token``)."""
        return self._unk.content

    @property
    def bos_token_id(self) -> int:
        return self._token_to_id(self._bos.content)

    @property
    def eos_token_id(self) -> int:
        return self._token_to_id(self._eos.content)

    @property
    def unk_token_id(self) -> int:
        return self._token_to_id(self._unk.content)

    @property
    def pad_token_id(self) -> int:
        return self.unk_token_id

    @property
    def seg_token_id(self) -> int:
        """Id of ``[SEG]``; ``ValueError`` if the tokenizer has none (not a LISA checkpoint)."""
        try:
            return self._added[SEG_TOKEN]
        except KeyError:
            raise ValueError(
                f"tokenizer {self._source} has no added token {SEG_TOKEN!r} "
                f"(added tokens: {sorted(self._added)}); is it a LISA checkpoint?"
            ) from None

    @property
    def model_max_length(self) -> int:
        """Maximum sequence length of the checkpoint's tokenizer config (512 for LISA)."""
        value = self._config.get("model_max_length", DEFAULT_MODEL_MAX_LENGTH)
        return int(value)

    @property
    def all_special_ids(self) -> frozenset[int]:
        """Ids of bos/eos/unk(=pad): what ``skip_special_tokens`` drops."""
        return frozenset(self._token_to_id(t.content) for t in (self._bos, self._eos, self._unk))

    def __repr__(self) -> str:
        return (
            f"LisaTokenizer(source={self._source!r}, vocab_size={self.vocab_size}, "
            f"added_tokens={self._added})"
        )

    # ------------------------------------------------------------------ encoding

    def tokenize(self, text: str) -> list[str]:
        """Token strings of ``text`` (no BOS), exactly as 4.31's slow tokenizer gives them."""
        parts = self._cut(text)
        strip = self._strip_flags
        # Same in-place pass as 4.31: a neighbour stripped by one token is seen stripped by the
        # next one.
        for i in range(len(parts)):
            flags = strip.get(parts[i])
            if flags is None:
                continue
            strip_left, strip_right = flags
            if strip_right and i + 1 < len(parts) and parts[i + 1]:
                parts[i + 1] = parts[i + 1].lstrip()
            if strip_left and i > 0 and parts[i - 1]:
                parts[i - 1] = parts[i - 1].rstrip()
        tokens: list[str] = []
        for part in parts:
            if not part:
                continue
            if part in strip:
                tokens.append(part)
            else:
                tokens.extend(self._sp.encode(part, out_type=str))
        return tokens

    @overload
    def convert_tokens_to_ids(self, tokens: str) -> int: ...

    @overload
    def convert_tokens_to_ids(self, tokens: Sequence[str]) -> list[int]: ...

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Ids of token strings; unknown strings map to ``<unk>`` (0)."""
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        return [self._token_to_id(t) for t in tokens]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` a leading BOS (LLaMA: no EOS)."""
        ids = [self._token_to_id(t) for t in self.tokenize(text)]
        if not add_special_tokens:
            return ids
        prefix = [self.bos_token_id] if self._add_bos else []
        suffix = [self.eos_token_id] if self._add_eos else []
        return prefix + ids + suffix

    def tokenizer_image_token(
        self, prompt: str, image_token_index: int = IMAGE_TOKEN_INDEX
    ) -> list[int]:
        """Ids of a prompt holding ``<image>`` placeholders, as LLaVA's ``tokenizer_image_token``.

        Each ``<image>``-separated chunk is encoded on its own (so whitespace next to
        ``<im_start>``/``<im_end>`` is stripped within the chunk); one BOS is kept at the start and
        each placeholder becomes a single ``image_token_index`` (-200).
        """
        chunks = [self.encode(chunk) for chunk in prompt.split(IMAGE_TOKEN)]
        offset = 1 if chunks[0] and chunks[0][0] == self.bos_token_id else 0
        ids = chunks[0][:1] if offset else []
        for i, chunk in enumerate(chunks):
            if i:
                ids.append(image_token_index)
            ids.extend(chunk[offset:])
        return ids

    # ------------------------------------------------------------------ decoding

    @overload
    def convert_ids_to_tokens(
        self, ids: SupportsInt, skip_special_tokens: bool = False
    ) -> str: ...

    @overload
    def convert_ids_to_tokens(
        self, ids: Iterable[SupportsInt], skip_special_tokens: bool = False
    ) -> list[str]: ...

    def convert_ids_to_tokens(
        self, ids: SupportsInt | Iterable[SupportsInt], skip_special_tokens: bool = False
    ) -> str | list[str]:
        """Token strings of ids (a single int gives a single string, never skipped)."""
        ids = _as_python(ids)
        if isinstance(ids, int):
            return self._id_to_token(ids)
        special = self.all_special_ids if skip_special_tokens else frozenset()
        return [self._id_to_token(i) for i in ids if i not in special]

    def decode(self, ids: Iterable[SupportsInt], skip_special_tokens: bool = False) -> str:
        """Text of ids as 4.31's slow ``decode`` gives it (``spaces_between_special_tokens``).

        Added tokens are kept as separate pieces joined with single spaces; ``<s>``/``</s>``
        appear literally unless ``skip_special_tokens``. The image placeholder (-200) is not a
        token: drop it first.
        """
        tokens = self.convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens)
        if isinstance(tokens, str):
            tokens = [tokens]
        sub_texts: list[str] = []
        run: list[str] = []
        for token in tokens:
            if token in self._added:
                if run:
                    sub_texts.append(self._pieces_to_string(run))
                    run = []
                sub_texts.append(token)
            else:
                run.append(token)
        if run:
            sub_texts.append(self._pieces_to_string(run))
        text = " ".join(sub_texts)
        return _clean_up_tokenization(text) if self._clean_up_spaces else text

    # ------------------------------------------------------------------ internals

    def _check_config(self) -> None:
        legacy = self._config.get("legacy", True)
        if legacy is False:
            raise ValueError(
                f'tokenizer {self._source}: tokenizer_config.json has "legacy": false; only '
                "the legacy LLaMA tokenization the LISA checkpoints were trained with is supported"
            )
        if self._config.get("sp_model_kwargs"):
            raise ValueError(
                f"tokenizer {self._source}: non-empty sp_model_kwargs "
                f"{self._config['sp_model_kwargs']!r} are not supported"
            )

    def _sp_has_piece(self, piece: str) -> bool:
        return self._sp.id_to_piece(self._sp.piece_to_id(piece)) == piece

    def _has_token(self, token: str) -> bool:
        return token in self._added or self._sp_has_piece(token)

    def _append(self, token: str) -> None:
        index = len(self)
        self._added[token] = index
        self._added_by_id[index] = token

    def _rebuild_split(self) -> None:
        """Recompile the no-split regex and the strip flags of every no-split token."""
        # Tokens from added_tokens.json are plain strings in 4.31: they strip both neighbours.
        strip: dict[str, tuple[bool, bool]] = {token: (True, True) for token in self._added}
        for special in (self._bos, self._eos, self._unk):
            if special.added_token:
                strip[special.content] = (special.lstrip, special.rstrip)
            else:
                strip[special.content] = (True, True)
        self._strip_flags = strip
        # Longest first, so that at one position the longest token matches.
        ordered = sorted(strip, key=lambda t: (-len(t), t))
        self._split_re = re.compile("|".join(re.escape(t) for t in ordered))

    def _cut(self, text: str) -> list[str]:
        """``text`` cut into no-split tokens and the text between them (no empty pieces)."""
        parts: list[str] = []
        start = 0
        for match in self._split_re.finditer(text):
            if match.start() > start:
                parts.append(text[start : match.start()])
            parts.append(match.group())
            start = match.end()
        if start < len(text):
            parts.append(text[start:])
        return parts

    def _token_to_id(self, token: str) -> int:
        index = self._added.get(token)
        if index is not None:
            return index
        return self._sp.piece_to_id(token)

    def _id_to_token(self, index: int) -> str:
        token = self._added_by_id.get(index)
        if token is not None:
            return token
        if not 0 <= index < self.vocab_size:
            hint = " (drop image placeholders before decoding)" if index < 0 else ""
            raise ValueError(
                f"token id {index} is outside the vocabulary [0, {len(self)}) of tokenizer "
                f"{self._source}{hint}"
            )
        return self._sp.id_to_piece(index)

    def _pieces_to_string(self, pieces: list[str]) -> str:
        """LLaMA's ``convert_tokens_to_string``: special tokens are not passed to SentencePiece
        and get a space before them unless they follow another special token or come first."""
        specials = (self._bos.content, self._eos.content, self._unk.content)
        out = ""
        run: list[str] = []
        prev_is_special = False
        for i, piece in enumerate(pieces):
            if piece in specials:
                if not prev_is_special and i != 0:
                    out += " "
                out += self._sp.decode(run) + piece
                prev_is_special = True
                run = []
            else:
                run.append(piece)
                prev_is_special = False
        out += self._sp.decode(run)
        return out


def _load_sentencepiece(model_proto: bytes, source: str) -> spm.SentencePieceProcessor:
    try:
        return spm.SentencePieceProcessor(model_proto=model_proto)
    except (RuntimeError, OSError, ValueError, TypeError) as err:
        raise ValueError(
            f"{source}: not a valid SentencePiece model (cannot be parsed: truncated or corrupt)"
        ) from err


def _as_python(ids: Any) -> int | list[int]:
    """Ints from an int, a sequence, a numpy array or a torch tensor."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, Iterable):
        return [int(i) for i in ids]
    return int(ids)


def _clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (off for LISA checkpoints)."""
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text


def train_sentencepiece(
    corpus: Iterable[str],
    vocab_size: int,
    out_path: str | Path,
    *,
    character_coverage: float = 1.0,
    split_digits: bool = True,
    max_sentence_length: int = 4192,
) -> Path:
    """Train a small LLaMA-like BPE SentencePiece model in-process and write it to ``out_path``.

    Settings as LLaMA's: BPE, byte fallback (256 ``<0xXX>`` pieces at ids 3-258), ``<unk>`` 0 /
    ``<s>`` 1 / ``</s>`` 2, no pad piece, identity normalisation, dummy prefix, whitespace kept as
    is, whitespace-only pieces allowed, digits split. ``vocab_size`` is exact (at least 259 plus
    what the corpus needs for its characters). ``corpus`` yields one sentence per item. Training
    uses one thread and every sentence (no sampling), so the same corpus gives the same bytes.
    """
    sentences = [s for s in corpus if s]
    if not sentences:
        raise ValueError("train_sentencepiece: the corpus is empty")
    out = Path(out_path)
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=buffer,
            model_type="bpe",
            vocab_size=int(vocab_size),
            character_coverage=character_coverage,
            byte_fallback=True,
            split_digits=split_digits,
            allow_whitespace_only_pieces=True,
            normalization_rule_name="identity",
            add_dummy_prefix=True,
            remove_extra_whitespaces=False,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            max_sentence_length=max_sentence_length,
            minloglevel=2,
        )
    except RuntimeError as err:
        raise ValueError(
            f"train_sentencepiece: training a {vocab_size}-piece model on {len(sentences)} "
            f"sentences failed: {err}"
        ) from err
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buffer.getvalue())
    return out
