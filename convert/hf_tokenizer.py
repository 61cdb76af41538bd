"""The tokenizer, chat template and special-token settings of a Hugging Face model folder.

The tokenizer file (tokenizer.json for the `tokenizers` library, preferred, or SentencePiece's
tokenizer.model) is stored byte for byte, xz-compressed: uncompressed, SmolLM2's tokenizer.json
alone is 0.2 bits per weight of a 4-bit file. A self-test of a few strings, encoded here exactly as the
runtime will encode them (no special tokens added), lets the runtime prove it tokenizes alike.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from qformat.config import SelfTestCase, TokenizerInfo
from qformat.schemes import Tensor, xz_tensor

TOKENIZER_TENSOR = "tokenizer"

# Plain ASCII, accents and CJK, whitespace runs and newlines, digits, code, emoji.
SELFTEST_TEXTS = (
    "The capital of France is Paris.",
    "Grüße aus Köln — naïve café, 東京と北京。",
    "  leading spaces,\ttabs\n\nand two newlines  ",
    "Pi is 3.14159; 2024-11-24 had 86400 seconds.",
    "def add(a, b):\n    return a + b  # sum\n",
    "Emoji: 🙂👍🏽🚀 and ZWJ 👩‍💻!",
)


@dataclass
class TokenizerFiles:
    """What the converter takes from the folder's tokenizer files."""

    info: TokenizerInfo
    data: bytes  # the tokenizer file
    chat_template: str | None
    files: list[Path]  # every file read, for provenance hashes

    @cached_property
    def stored(self) -> Tensor:
        """The tensor the file is written as (kind xz, named info.tensor)."""
        return xz_tensor(self.info.tensor, self.data)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from None


def _chat_template(folder: Path, tok_config: dict[str, Any]) -> tuple[str | None, list[Path]]:
    """chat_template.jinja (transformers 5 layout) or tokenizer_config.json's chat_template."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8"), [jinja]
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template, []


def _hf_json(data: bytes, tok_config: dict[str, Any]) -> tuple[bool, list[SelfTestCase]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(data.decode("utf-8"))
    cases = [SelfTestCase(t, tok.encode(t, add_special_tokens=False).ids) for t in SELFTEST_TEXTS]
    add_bos = tok_config.get("add_bos_token")
    if add_bos is None:
        # The post-processor decides: does encoding with special tokens put one in front?
        plain = tok.encode("a", add_special_tokens=False).ids
        full = tok.encode("a", add_special_tokens=True).ids
        add_bos = len(full) > len(plain) and full[1 : 1 + len(plain)] == plain
    return bool(add_bos), cases


def _sentencepiece(data: bytes, tok_config: dict[str, Any]) -> tuple[bool, list[SelfTestCase]]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=data)
    cases = [SelfTestCase(t, [int(i) for i in sp.encode(t)]) for t in SELFTEST_TEXTS]
    # LlamaTokenizer's default is to add BOS; tokenizer_config.json may say otherwise.
    return bool(tok_config.get("add_bos_token", True)), cases


def read_tokenizer(folder: Path) -> TokenizerFiles:
    """Tokenizer bytes, TokenizerInfo (kind, add_bos, self-test) and chat template of a folder."""
    folder = Path(folder)
    config_path = folder / "tokenizer_config.json"
    tok_config = _read_json(config_path) if config_path.is_file() else {}
    files = [config_path] if config_path.is_file() else []
    if (folder / "tokenizer.json").is_file():
        path, kind, build = folder / "tokenizer.json", "hf-json", _hf_json
    elif (folder / "tokenizer.model").is_file():
        path, kind, build = folder / "tokenizer.model", "sentencepiece", _sentencepiece
    else:
        raise ValueError(f"{folder}: no tokenizer.json or tokenizer.model; the qbin must carry its tokenizer")
    data = path.read_bytes()
    try:
        add_bos, cases = build(data, tok_config)
    except Exception as e:  # the libraries raise assorted types for a corrupt file
        raise ValueError(f"{path}: cannot load the tokenizer ({type(e).__name__}: {e})") from None
    template, template_files = _chat_template(folder, tok_config)
    info = TokenizerInfo(kind=kind, tensor=TOKENIZER_TENSOR, add_bos=add_bos, selftest=cases)
    return TokenizerFiles(info, data, template, [path, *files, *template_files])


def tokenizer_json_files(data: bytes, add_bos: bool | None, chat_template: str | None,
                         files: list[Path]) -> TokenizerFiles:
    """TokenizerFiles of a tokenizer.json built elsewhere (a GGUF's vocabulary): the self-test
    and, when add_bos is None, the post-processor's BOS rule, exactly as for a folder's file."""
    try:
        found_bos, cases = _hf_json(data, {} if add_bos is None else {"add_bos_token": add_bos})
    except Exception as e:  # the tokenizers library raises assorted types
        raise ValueError(f"cannot build the tokenizer ({type(e).__name__}: {e})") from None
    info = TokenizerInfo(kind="hf-json", tensor=TOKENIZER_TENSOR, add_bos=found_bos, selftest=cases)
    return TokenizerFiles(info, data, chat_template, files)
