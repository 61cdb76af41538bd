"""The tokenizer a qbin carries is the checkpoint's: the same ids as tokenizer.json (or
tokenizer.model) on the EVAL corpora and on random text, and decode(encode(s)) gives back s as
the checkpoint's tokenizer normalizes it. With SmolLM2's checkpoint at $QFORMAT_SMOLLM2 (default
~/.cache/qformat/smollm2, EVAL.md) its real tokenizer is checked too."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("transformers")

from qformat import QbinReader  # noqa: E402
from qformat.corpus import eval_text  # noqa: E402
from qformat.runtime.tokenizer import Tokenizer  # noqa: E402

LICENSES = Path("/usr/share/common-licenses")
PROSE = ("GPL-3", "GFDL-1.3", "Apache-2.0", "MPL-2.0", "LGPL-2.1", "GPL-2", "Artistic", "CC0-1.0", "MPL-1.1")
SMOLLM2 = Path(os.environ.get("QFORMAT_SMOLLM2", Path.home() / ".cache" / "qformat" / "smollm2"))
# every code point but surrogates (not encodable as UTF-8), weighted towards what text holds
TEXT = st.text(st.one_of(st.characters(blacklist_categories=("Cs",)),
                         st.sampled_from(list(" \t\n\r  \u200b\ufeffé日本🙂\u0301"))), max_size=120)


class Reference:
    """The checkpoint folder's own tokenizer, as the tokenizers / sentencepiece libraries load it."""

    def __init__(self, folder: Path):
        if (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HfTokenizer

            self.hf = HfTokenizer.from_file(str(folder / "tokenizer.json"))
            self.sp = None
        else:
            import sentencepiece

            self.hf, self.sp = None, sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids if self.hf else list(self.sp.encode(text))

    def round_trip(self, text: str) -> str:
        """decode(encode(text)) by the checkpoint's tokenizer."""
        ids = self.encode(text)
        return self.hf.decode(ids, skip_special_tokens=False) if self.hf else self.sp.decode(ids)

    def normalized(self, text: str) -> str:
        """`text` as the tokenizer's normalizer leaves it: what a lossless round trip gives back."""
        if self.hf is not None and self.hf.normalizer is not None:
            return self.hf.normalizer.normalize_str(text)
        return text


def _stored_tokenizer(qbin: Path) -> Tokenizer:
    with QbinReader(qbin) as r:
        return Tokenizer(r.tokenizer, r.raw_bytes(r.tokenizer.tensor), bos_id=r.model.bos_token_id, source=qbin)


@pytest.fixture(scope="module", params=["hf-json", "sentencepiece", "smollm2"])
def pair(request, tmp_path_factory):
    """(the tokenizer stored in a converted file, the checkpoint's own, whether its vocabulary
    covers every byte: the tiny ones do; SmolLM2's lacks 21 byte tokens (0x04, 0xC0, 0xF1, ...),
    so a character holding one of those bytes decodes as U+FFFD or not at all, in transformers too)."""
    from qformat.convert import convert

    if request.param == "smollm2":
        if not (SMOLLM2 / "tokenizer.json").is_file():
            pytest.skip(f"no SmolLM2 checkpoint at {SMOLLM2} (python -m qformat.convert.demo {SMOLLM2})")
        folder, scheme = SMOLLM2, "int4-g64"
    else:
        from tiny_models import make_tiny_checkpoint

        folder = make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), tokenizer=request.param)
        scheme = "int8"
    out = tmp_path_factory.mktemp("qbin") / "m.qbin"
    convert(folder, out, scheme, progress=False)
    return _stored_tokenizer(out), Reference(folder), request.param != "smollm2"


def _corpora() -> dict[str, str]:
    prose = [LICENSES / name for name in PROSE if (LICENSES / name).is_file()]
    assert prose, f"{LICENSES}: none of {PROSE} (Debian's base-files)"
    return {"pydoc": eval_text(), "prose": "\n\n".join(p.read_text(encoding="utf-8") for p in prose)}


def test_same_ids_as_the_checkpoint_on_the_eval_corpora(pair):
    stored, reference, _ = pair
    for name, text in _corpora().items():
        for line in text.splitlines(keepends=True)[:1500]:  # line by line: a mismatch names its line
            assert stored.encode(line, add_bos=False) == reference.encode(line), (name, line)
        ids = stored.encode(text, add_bos=False)
        assert ids == reference.encode(text), name
        assert stored.decode(ids, skip_special=False) == reference.normalized(text), name


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
def test_same_ids_and_a_round_trip_on_random_text(pair, text):
    stored, reference, every_byte = pair
    ids = stored.encode(text, add_bos=False)
    assert ids == reference.encode(text)
    decoded = stored.decode(ids, skip_special=False)
    assert decoded == reference.round_trip(text)
    if every_byte:
        assert decoded == reference.normalized(text)
