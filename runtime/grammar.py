"""Constrained decoding: which tokens a grammar (a JSON schema, a regex, a Lark grammar) allows
next, so that sampling can only produce text the grammar accepts.

The grammar engine is llguidance (the one behind OpenAI-style structured outputs in vLLM, SGLang
and llama.cpp): it compiles a grammar against the model's vocabulary and gives a bitmask of the
allowed tokens per step in microseconds. It is an optional dependency (the `serve` extra).
"""
from __future__ import annotations

import json

import numpy as np

from .tokenizer import Tokenizer

try:
    import llguidance
except ImportError:  # the runtime works without it; constrained requests then say what to install
    llguidance = None

# A JSON grammar's separators are fixed (", " and ": ", no newlines) unless the schema's own
# "x-guidance" options say otherwise: free whitespace lets a model wander in blank space.
JSON_DEFAULTS = {"whitespace_flexible": False}


def _require() -> None:
    if llguidance is None:
        raise ValueError("constrained decoding needs llguidance: pip install 'qformat[serve]'")


class _PieceTokens:
    """A SentencePiece vocabulary as llguidance's TokenizerWrapper reads it: each id's bytes."""

    def __init__(self, tokenizer: Tokenizer, eos_id: int):
        self.tokens = tokenizer.token_bytes()
        self.eos_token_id = eos_id
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = tokenizer.special_ids()
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode_continuation(text)


class TokenGrammar:
    """The model's vocabulary compiled for llguidance (about a quarter second, so once per
    model): checks grammars and starts a Constraint per sequence."""

    def __init__(self, tokenizer: Tokenizer, n_vocab: int, eos_ids: list[int]):
        _require()
        eos = list(eos_ids) or [0]
        if tokenizer.kind == "hf-json":
            source = tokenizer.data.decode("utf-8")
        else:
            source = llguidance.TokenizerWrapper(_PieceTokens(tokenizer, eos[0]))
        self.tokenizer = llguidance.LLTokenizer(source, n_vocab=n_vocab, eos_token=eos)
        self.n_vocab = n_vocab

    def check(self, grammar: str) -> None:
        """ValueError naming the problem if llguidance rejects the grammar."""
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise ValueError(f"the JSON schema or grammar is not usable: {error}")

    def constraint(self, grammar: str) -> "Constraint":
        return Constraint(self, grammar)


def json_schema_grammar(schema: dict | None) -> str:
    """The grammar of JSON text valid under `schema` (None: any JSON object)."""
    _require()
    if schema is None:
        schema = {"type": "object"}
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_DEFAULTS)
    except ValueError as e:
        raise ValueError(f"not a usable JSON schema: {e}") from None


class Constraint:
    """One sequence's place in its grammar: masks the logits of the next token, then advances
    with the token sampled."""

    def __init__(self, grammar: TokenGrammar, text: str):
        self.matcher = llguidance.LLMatcher(grammar.tokenizer, text)
        if self.matcher.is_error():
            raise ValueError(f"the JSON schema or grammar is not usable: {self.matcher.get_error()}")
        self.n_vocab = grammar.n_vocab
        self.bits = np.full((grammar.n_vocab + 31) // 32, -1, np.int32)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """logits with every token the grammar forbids next set to -inf (a copy)."""
        self.matcher.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)
        allowed = np.unpackbits(self.bits.view(np.uint8), bitorder="little")[:self.n_vocab].astype(bool)
        out = np.full(logits.shape, -np.inf, logits.dtype)
        n = min(logits.shape[-1], self.n_vocab)
        out[:n] = np.where(allowed[:n], logits[:n], -np.inf)
        return out

    def advance(self, token: int) -> bool:
        """Take the sampled token; True when the grammar is complete and allows nothing more."""
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar rejected token {token}: {self.matcher.get_error()}")
        return self.matcher.is_stopped()
