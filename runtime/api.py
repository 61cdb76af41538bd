"""The embedding API: `m = qformat.load(path)`; m.generate(...), m.logits(...), m.tokenizer."""
from __future__ import annotations

import os
from typing import Iterable, Iterator

import numpy as np

from qformat.kernels import device_ops
from qformat.errors import QbinError
from qformat.reader import QbinReader

from .chat import Conversation, render_chat
from .engine import Engine, Request
from .generate import GenerationStats, Session, generate
from .grammar import json_schema_grammar
from .lora import LoraPair, read_adapter
from .model import Transformer
from .sampling import SamplingParams
from .tokenizer import Tokenizer

DEVICES = ("cpu", "cuda", "auto")


class Model:
    """A qbin model ready to generate. Weights stay in the memory map; nothing is copied."""

    def __init__(self, reader: QbinReader, device: str = "cpu", context: int | None = None,
                 kv_blocks: int | None = None, lora: dict[str, LoraPair] | None = None):
        self.reader = reader
        self.args = reader.model
        self.device = device
        info = reader.tokenizer
        if info is None:
            raise QbinError(reader.path, "the file has no tokenizer; re-convert it with its tokenizer files")
        self.tokenizer = Tokenizer(info, reader.raw_bytes(info.tensor), bos_id=self.args.bos_token_id,
                                   source=reader.path)
        self.tokenizer.selftest(reader.path)
        self.transformer = Transformer(reader, device, context, kv_blocks=kv_blocks, lora=lora)
        self.engine = Engine(self.transformer, self.tokenizer, max_batch=1)
        self.stats = GenerationStats()  # of the last generate() call
        self.chat_template = reader.chat_template
        self.eos_ids = list(self.args.eos_token_ids)

    @property
    def context(self) -> int:
        return self.transformer.context

    def generate(self, prompt: str | list[int], max_tokens: int = 256, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 seed: int | None = None, stop: Iterable[str] = (), add_bos: bool | None = None,
                 json_schema: dict | None = None) -> Iterator[str]:
        """Yield text pieces as they are decoded. prompt: text (encoded with the file's tokenizer,
        BOS per the file unless add_bos says otherwise) or token ids. temperature 0 is greedy.
        json_schema: the text is JSON valid under this schema ({} for any JSON value; needs
        llguidance, in the serve extra). Timings of the call are in `self.stats` once the iterator
        is exhausted."""
        params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty)
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        ids = self.tokenizer.encode(prompt, add_bos=add_bos) if isinstance(prompt, str) else [int(i) for i in prompt]
        if not ids:
            raise ValueError("empty prompt: give some text to continue")
        if len(ids) >= self.context:
            raise ValueError(f"prompt of {len(ids)} tokens does not fit the context of {self.context} "
                             "tokens (one position is needed for the answer); shorten it or raise --context")
        self.stats = GenerationStats()
        grammar = json_schema_grammar(json_schema) if json_schema is not None else None
        request = Request(ids, max_tokens, params, seed, tuple(stop), frozenset(self.eos_ids), grammar=grammar)
        return generate(self.engine, request, self.stats)

    def logits(self, token_ids) -> np.ndarray:
        """float32 (len(token_ids), vocab): next-token logits at every position, from an empty cache."""
        ids = [int(i) for i in token_ids]
        session = Session(self.transformer)
        try:
            return session.feed(ids, all_logits=True).astype(np.float32, copy=False)
        finally:
            session.kv.free()

    def chat_prompt(self, conversation: Conversation, add_generation_prompt: bool = True) -> str:
        """The conversation rendered with the file's chat template."""
        return self.render_messages(conversation.all(), add_generation_prompt)

    def render_messages(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Messages ([{"role", "content"}]) rendered with the file's chat template; ValueError
        without one, QbinError when it fails to render."""
        if not self.chat_template:
            raise ValueError(f"{self.reader.path}: the file has no chat template; use a plain prompt")
        tok = self.tokenizer
        bos = tok.decode([self.args.bos_token_id], skip_special=False) if self.args.bos_token_id is not None else ""
        eos = tok.decode([self.eos_ids[0]], skip_special=False) if self.eos_ids else ""
        return render_chat(self.chat_template, messages, bos, eos, add_generation_prompt, source=self.reader.path)

    def chat(self, conversation: Conversation, user: str, **kwargs) -> Iterator[str]:
        """Add a user turn, stream the assistant's answer, and append it to the conversation."""
        conversation.messages.append({"role": "user", "content": user})
        ids = self.tokenizer.encode(self.chat_prompt(conversation), add_bos=False)
        pieces = []
        for piece in self.generate(ids, **kwargs):
            pieces.append(piece)
            yield piece
        conversation.messages.append({"role": "assistant", "content": "".join(pieces)})


def resolve_device(device: str) -> tuple[str, str]:
    """("cpu" or "cuda", a few words on why): "auto" takes the GPU when CuPy sees one; "cuda"
    without one is a ValueError naming the fix."""
    if device not in DEVICES:
        raise ValueError(f"device {device!r} is not one of {', '.join(DEVICES)}")
    if device == "cpu":
        return "cpu", "asked for"
    from qformat.kernels.cuda.module import gpu_status

    ok, detail = gpu_status()
    if ok:
        return "cuda", detail
    if device == "cuda":
        raise ValueError(f"device cuda: {detail}; use --device cpu (or auto)")
    return "cpu", f"no GPU: {detail}"


def load(path: str | os.PathLike, device: str = "cpu", threads: int | None = None,
         context: int | None = None, verify: bool = False, kv_blocks: int | None = None,
         lora: str | os.PathLike | None = None, lora_scale: float = 1.0) -> Model:
    """Open a .qbin file and build its model on `device`: "cpu", "cuda" (an NVIDIA GPU through
    CuPy) or "auto" (the GPU when there is one; `Model.device` says which). threads: CPU kernel
    threads (default: all cores). context: positions per sequence (default: the model's
    max_seq_len). kv_blocks: blocks of the KV pool (default: one sequence of the whole context).
    lora: a LoRA adapter folder in peft's layout (qtune's output, or peft's own) run beside the
    file's projections, its product times lora_scale (the CPU's one-call decode step runs it too;
    on a GPU, decode then runs per operation)."""
    device, _ = resolve_device(device)
    device_ops(device).set_threads(threads)
    reader = QbinReader(path, verify=verify)
    try:
        adapter = read_adapter(lora, reader, lora_scale) if lora is not None else None
        return Model(reader, device, context, kv_blocks, adapter)
    except BaseException:
        reader.close()
        raise
