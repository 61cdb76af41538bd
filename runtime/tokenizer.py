"""The tokenizer stored inside a qbin file: encode, decode, and a streaming UTF-8 decoder.

Built from the file's own bytes (tokenizers' tokenizer.json or a SentencePiece model proto), never
from the network. At load the header's self-test strings are encoded and compared with the ids the
converter recorded, so a tokenizer library that disagrees is caught before any generation.
"""
from __future__ import annotations

from qformat.config import TokenizerInfo
from qformat.errors import QbinError


class Tokenizer:
    """encode(text) -> ids, decode(ids) -> text, stream() -> StreamDecoder."""

    def __init__(self, info: TokenizerInfo, data: bytes, bos_id: int | None = None):
        self.info = info
        self.bos_id = bos_id
        self.kind = info.kind
        if info.kind == "hf-json":
            from tokenizers import Tokenizer as HfTokenizer

            self._hf = HfTokenizer.from_str(data.decode("utf-8"))
            self._sp = None
        elif info.kind == "sentencepiece":
            import sentencepiece

            self._sp = sentencepiece.SentencePieceProcessor(model_proto=data)
            self._hf = None
        else:
            raise ValueError(f"unknown tokenizer kind {info.kind!r} (known: hf-json, sentencepiece)")

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; a BOS id is prepended when add_bos (default: the file's setting)."""
        if self._hf is not None:
            ids = self._hf.encode(text, add_special_tokens=False).ids
        else:
            ids = list(self._sp.encode(text))
        if add_bos is None:
            add_bos = self.info.add_bos
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return [int(i) for i in ids]

    def decode(self, ids, skip_special: bool = True) -> str:
        """Text of `ids` (special tokens dropped unless skip_special is False)."""
        ids = [int(i) for i in ids]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=skip_special)
        if skip_special:
            ids = [i for i in ids if not (self._sp.is_control(i) or self._sp.is_unknown(i))]
        return self._sp.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (e.g. "<|im_end|>"), or None if the vocabulary lacks it."""
        if self._hf is not None:
            return self._hf.token_to_id(token)
        i = self._sp.piece_to_id(token)
        return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else int(i)

    def stream(self) -> "StreamDecoder":
        """A decoder that turns ids, pushed one at a time, into complete UTF-8 text pieces."""
        return StreamDecoder(self)

    def selftest(self, path: object) -> None:
        """Raise QbinError if encoding the header's self-test strings gives other ids."""
        for case in self.info.selftest:
            got = self.encode(case.text, add_bos=False)
            if got != list(case.ids):
                raise QbinError(path, f"tokenizer self-test failed on {case.text!r}: got {got[:12]}, file "
                                      f"expects {list(case.ids)[:12]}; install the tokenizers/sentencepiece "
                                      "version the file was converted with")


class StreamDecoder:
    """Incremental detokenization: text appears only once it is complete UTF-8.

    A multi-byte character split across tokens decodes to U+FFFD until its last byte arrives, so
    a piece ending in U+FFFD is held back. Decoding a short window (from the previous emitted
    token) and diffing keeps the cost per token constant and keeps SentencePiece's leading-space
    handling right (the window always starts on an already-decoded token).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window
        self.read = 0  # tokens whose text has been emitted

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text ('' while a character is incomplete)."""
        self.ids.append(int(token_id))
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]
