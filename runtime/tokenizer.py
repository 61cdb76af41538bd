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

    def __init__(self, info: TokenizerInfo, data: bytes, bos_id: int | None = None,
                 source: object = "tokenizer"):
        """source: what the bytes came from (the qbin's path), named by the QbinError a tokenizer
        that does not load raises."""
        self.info = info
        self.bos_id = bos_id
        self.kind = info.kind
        self.data = bytes(data)  # the file's tokenizer, as stored
        self._hf = self._sp = None
        if info.kind not in ("hf-json", "sentencepiece"):
            raise QbinError(source, f"unknown tokenizer kind {info.kind!r} (known: hf-json, sentencepiece)")
        try:
            if info.kind == "hf-json":
                from tokenizers import Tokenizer as HfTokenizer

                self._hf = HfTokenizer.from_str(self.data.decode("utf-8"))
            else:
                import sentencepiece

                self._sp = sentencepiece.SentencePieceProcessor(model_proto=self.data)
            self.decode(self.encode("Hello, world", add_bos=False))  # an empty model loads, then fails here
        except BaseException as e:
            # the libraries raise their own types, and a Rust panic is a BaseException
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise QbinError(source, f"the stored {info.kind} tokenizer does not load ({type(e).__name__}: "
                                    f"{str(e)[:200]}); re-convert the file from its checkpoint") from None

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

    def special_ids(self) -> list[int]:
        """Ids of the control and unknown tokens (SentencePiece vocabularies)."""
        sp = self._require_sp()
        return [i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)]

    def token_bytes(self) -> list[bytes]:
        """Each id's bytes in decoded text (SentencePiece vocabularies; what a grammar engine
        matches against): '▁' is a space, <0xNN> pieces are that byte."""
        sp = self._require_sp()
        out = []
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            if sp.is_byte(i):
                out.append(bytes([int(piece[3:5], 16)]))
            else:
                out.append(piece.replace("▁", " ").encode("utf-8"))
        return out

    def encode_continuation(self, text: str) -> list[int]:
        """Ids whose decoded bytes are exactly `text`, as it would continue a sequence: without
        the space SentencePiece puts before a text's first word."""
        ids = self.encode(text, add_bos=False)
        if self._sp is None or not ids or text.startswith(" "):
            return ids
        first = self._sp.id_to_piece(ids[0])
        if not first.startswith("\u2581"):
            return ids
        rest = first[1:]
        if not rest:
            return ids[1:]
        whole = self._sp.piece_to_id(rest)
        if self._sp.id_to_piece(whole) == rest:
            return [whole] + ids[1:]
        head = []
        for ch in rest:  # each character's own piece, or its bytes (byte-fallback pieces)
            i = self._sp.piece_to_id(ch)
            head += [i] if self._sp.id_to_piece(i) == ch else [self._sp.piece_to_id(f"<0x{b:02X}>") for b in ch.encode()]
        return head + ids[1:]

    def _require_sp(self):
        if self._sp is None:
            raise ValueError(f"a {self.kind} tokenizer has no SentencePiece pieces")
        return self._sp

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
