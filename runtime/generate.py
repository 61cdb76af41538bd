"""Text generation over a Transformer: prefix-cached prefill, sampling, stop strings, streaming."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from .model import Transformer
from .sampling import SamplingParams, sample
from .tokenizer import Tokenizer

# Prompts are prefilled in chunks of this many tokens: bounded activation memory, full BLAS blocks.
PREFILL_CHUNK = 512


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
    """Owns the KV cache contents: which token ids it holds, so a new prompt that extends the
    previous conversation (chat turns) only prefills what is new."""

    def __init__(self, model: Transformer):
        self.model = model
        self.ids: list[int] = []  # tokens whose keys/values are in the cache, in order
        self.last_prefilled = 0  # tokens the last feed() actually ran (the rest came from the cache)

    def feed(self, ids: list[int], all_logits: bool = False) -> np.ndarray:
        """Make the cache hold exactly `ids`; return the logits after the last one (or all new)."""
        if not ids:
            raise ValueError("empty prompt: nothing to run the model on")
        if len(ids) > self.model.context:
            raise ValueError(f"prompt of {len(ids)} tokens is longer than the context of "
                             f"{self.model.context} tokens; shorten it or pass a larger --context")
        common = 0
        if not all_logits:
            limit = min(len(ids), len(self.ids)) - 1  # re-run at least one token to get its logits
            while common < limit and ids[common] == self.ids[common]:
                common += 1
        self.ids = self.ids[:common]
        self.last_prefilled = len(ids) - common
        outs = []
        logits = None
        for start in range(common, len(ids), PREFILL_CHUNK):
            chunk = ids[start:start + PREFILL_CHUNK]
            logits = self.model.forward(chunk, start, all_logits=all_logits)
            self.ids.extend(chunk)
            outs.append(logits)
        return np.concatenate(outs) if all_logits else logits

    def step(self, token: int) -> np.ndarray:
        logits = self.model.forward([token], len(self.ids))
        self.ids.append(token)
        return logits


def _held_suffix(text: str, stops: Iterable[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def generate(session: Session, tokenizer: Tokenizer, prompt_ids: list[int], max_tokens: int,
             params: SamplingParams, seed: int | None, stop: Iterable[str], eos_ids: Iterable[int],
             stats: GenerationStats) -> Iterator[str]:
    """Yield text pieces as tokens are decoded, until EOS, a stop string, max_tokens or the context."""
    stops = [s for s in stop if s]
    eos = set(int(i) for i in eos_ids)
    rng = np.random.default_rng(seed)
    stats.prompt_tokens = len(prompt_ids)
    t0 = time.perf_counter()
    logits = session.feed(prompt_ids)
    stats.prefill_tokens = session.last_prefilled
    stats.prefill_s = time.perf_counter() - t0
    stream = tokenizer.stream()
    pending = ""
    generated: list[int] = []
    t1 = time.perf_counter()
    stats.stop_reason = "max_tokens"
    while len(generated) < max_tokens:
        previous = np.asarray(session.ids, np.int64) if params.repetition_penalty != 1.0 else None
        token = sample(logits, params, rng, previous)
        if token in eos:
            stats.stop_reason = "eos"
            break
        generated.append(token)
        stats.generated_tokens = len(generated)
        pending += stream.push(token)
        if stops:
            hit = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
            if hit >= 0:
                if pending[:hit]:
                    yield pending[:hit]
                stats.stop_reason = "stop"
                pending = ""
                break
            keep = _held_suffix(pending, stops)
            emit, pending = pending[:len(pending) - keep], pending[len(pending) - keep:]
        else:
            emit, pending = pending, ""
        if emit:
            yield emit
        if len(session.ids) >= session.model.context:
            stats.stop_reason = "context"
            break
        if len(generated) < max_tokens:
            logits = session.step(token)
    if stats.stop_reason != "stop":
        pending += stream.flush()
        if pending:
            yield pending
    stats.decode_s = time.perf_counter() - t1
