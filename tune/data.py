"""Training data for qtune: plain text, or JSONL of chat conversations rendered with the file's
chat template, as token ids with a loss mask (a conversation's assistant turns only), packed into
sequences of the training context."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qformat.reader import QbinReader
from qformat.runtime.chat import render_chat
from qformat.runtime.tokenizer import Tokenizer


class DataError(ValueError):
    """Training data that cannot be used; the message names the file, the line and the fix."""


@dataclass
class Example:
    """One document's tokens and, per token, whether the loss counts its prediction."""

    ids: list[int]
    loss: list[bool]


class Renderer:
    """The file's tokenizer and chat template, turning text and conversations into Examples."""

    def __init__(self, reader: QbinReader):
        self.reader = reader
        info = reader.tokenizer
        if info is None:
            raise DataError(f"{reader.path}: the file has no tokenizer; re-convert it with its tokenizer files")
        args = reader.model
        self.tokenizer = Tokenizer(info, reader.raw_bytes(info.tensor), bos_id=args.bos_token_id, source=reader.path)
        self.template = reader.chat_template
        tok = self.tokenizer
        self.bos = tok.decode([args.bos_token_id], skip_special=False) if args.bos_token_id is not None else ""
        self.eos_ids = list(args.eos_token_ids)
        self.eos = tok.decode([self.eos_ids[0]], skip_special=False) if self.eos_ids else ""

    def text(self, text: str) -> Example:
        """A plain document: every token after the first is predicted, an end-of-text id closes it."""
        ids = self.tokenizer.encode(text) + self.eos_ids[:1]
        return Example(ids, [True] * len(ids))

    def conversation(self, messages: list[dict], where: str) -> Example:
        """A chat: the loss on the assistant turns' tokens (and what the template closes them
        with), never on the system's or the user's."""
        if not self.template:
            raise DataError(f"{where}: chat messages need a chat template, and {self.reader.path} has none; "
                            "give plain text ({\"text\": ...}) instead")
        if not any(m.get("role") == "assistant" for m in messages):
            raise DataError(f"{where}: no assistant message, so nothing to learn from")
        ids: list[int] = []
        loss: list[bool] = []
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            prompt = self._ids(messages[:i], True, where)
            whole = self._ids(messages[:i + 1], False, where)
            if whole[:len(prompt)] != prompt or prompt[:len(ids)] != ids:
                raise DataError(f"{where}: the chat template's rendering of turn {i} does not extend the "
                                "conversation before it token for token; train on plain text instead")
            loss += [False] * (len(prompt) - len(ids)) + [True] * (len(whole) - len(prompt))
            ids = whole
        return Example(ids, loss)

    def _ids(self, messages: list[dict], generation_prompt: bool, where: str) -> list[int]:
        text = render_chat(self.template, messages, self.bos, self.eos, generation_prompt, source=where)
        return self.tokenizer.encode(text, add_bos=False)


def read_examples(path: str | Path, renderer: Renderer) -> list[Example]:
    """A .jsonl file ({"messages": [...]} or {"text": ...} per line) or any other text file
    (one document, or documents separated by blank lines)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; give a .jsonl of {{\"messages\": [...]}} or {{\"text\": ...}} lines, "
                        "or a text file")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}); convert it to UTF-8") from None
    if path.suffix != ".jsonl":
        return [renderer.text(doc) for doc in content.split("\n\n") if doc.strip()]
    out = []
    for n, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not JSON ({e.msg})") from None
        if isinstance(row, dict) and isinstance(row.get("messages"), list):
            if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                       for m in row["messages"]):
                raise DataError(f"{where}: every message needs a string role and content")
            out.append(renderer.conversation(row["messages"], where))
        elif isinstance(row, dict) and isinstance(row.get("text"), str):
            out.append(renderer.text(row["text"]))
        else:
            raise DataError(f"{where}: expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}]}} or {{\"text\": ...}}")
    if not out:
        raise DataError(f"{path}: no examples")
    return out


def pack(examples: list[Example], context: int) -> tuple[np.ndarray, np.ndarray]:
    """Examples joined end to end and cut into rows of `context` + 1 tokens (inputs and their
    next-token targets): (ids (rows, context + 1) int64, loss mask of the targets (rows, context)).
    The tail that does not fill a row is dropped."""
    ids = np.array([i for e in examples for i in e.ids], np.int64)
    loss = np.array([m for e in examples for m in e.loss], bool)
    rows = (len(ids) - 1) // context
    if rows < 1:
        raise DataError(f"{len(ids)} tokens of data do not fill one sequence of {context}; give more data or a "
                        "smaller --context")
    starts = np.arange(rows) * context
    take = starts[:, None] + np.arange(context + 1)
    return ids[take], loss[take[:, 1:]]
