"""One sequence over a Transformer (Session: logits of a prompt, the KV kept across calls) and
one request's text through the engine (generate), with its timings."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .engine import PREFILL_CHUNK, Engine, Request
from .model import Transformer


@dataclass
class GenerationStats:
    """Timings of the last generate() call (prefill covers only the tokens not already cached)."""

    prompt_tokens: int = 0
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    generated_tokens: int = 0
    decode_s: float = 0.0
    stop_reason: str = ""

    @property
    def prefill_tps(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tps(self) -> float:
        # the first new token comes out of the prefill; decode steps are the ones after it
        steps = max(0, self.generated_tokens - 1)
        return steps / self.decode_s if self.decode_s > 0 else float("nan")


class Session:
    """One sequence of the model's KV pool, kept across calls: a new prompt that extends the
    previous conversation (chat turns), or starts like a published prefix, only prefills what is
    new."""

    def __init__(self, model: Transformer):
        self.model = model
        self.kv = model.new_sequence()
        self.last_prefilled = 0  # tokens the last feed() actually ran (the rest came from the cache)

    @property
    def ids(self) -> list[int]:
        """Tokens whose keys/values are in the cache, in order."""
        return self.kv.ids

    def feed(self, ids: list[int], all_logits: bool = False) -> np.ndarray:
        """Make the cache hold exactly `ids`; return the logits after the last one (or all new)."""
        if not ids:
            raise ValueError("empty prompt: nothing to run the model on")
        if len(ids) > self.model.context:
            raise ValueError(f"prompt of {len(ids)} tokens is longer than the context of "
                             f"{self.model.context} tokens; shorten it or pass a larger --context")
        common = 0 if all_logits else self.kv.match(ids)
        self.kv.truncate(common)
        self.last_prefilled = len(ids) - common
        outs = [self.model.run([(self.kv, ids[start:start + PREFILL_CHUNK])], all_logits)[0]
                for start in range(common, len(ids), PREFILL_CHUNK)]
        return np.concatenate(outs) if all_logits else outs[-1]

    def step(self, token: int) -> np.ndarray:
        return self.model.run([(self.kv, [token])])[0]


def generate(engine: Engine, request: Request, stats: GenerationStats) -> Iterator[str]:
    """Yield text pieces of one request as the engine decodes them, until EOS, a stop string,
    max_tokens or the context. A caller that stops early cancels it (its blocks go back)."""
    seq = engine.submit(request)
    stats.prompt_tokens = len(request.prompt_ids)
    try:
        while not seq.done:
            engine.step()
            piece = seq.take()
            if piece:
                yield piece
        piece = seq.take()
        if piece:
            yield piece
    finally:
        engine.cancel(seq)
        end = seq.finished_at or time.perf_counter()
        first = seq.first_token_at or end
        stats.prefill_tokens = seq.prefill_tokens
        stats.prefill_s = first - seq.submitted
        stats.generated_tokens = len(seq.generated)
        stats.decode_s = end - first
        stats.stop_reason = seq.finish_reason or ""
