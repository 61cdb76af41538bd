"""Next-token sampling from logits: pure NumPy, reproducible with a seeded Generator."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; top_k 0, top_p 1, min_p 0, repetition_penalty 1 and the presence
    and frequency penalties 0 disable those."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")


def apply_repetition_penalty(logits: np.ndarray, previous: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL's rule (as transformers): divide positive logits of seen tokens by penalty, multiply negative."""
    if penalty == 1.0 or len(previous) == 0:
        return logits
    out = logits.copy()
    seen = np.unique(previous)
    vals = out[seen]
    out[seen] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def apply_openai_penalties(logits: np.ndarray, generated: np.ndarray, p: SamplingParams) -> np.ndarray:
    """OpenAI's presence and frequency penalties over the tokens generated so far: subtract
    presence_penalty once from every generated token's logit and frequency_penalty per occurrence."""
    if (p.presence_penalty == 0 and p.frequency_penalty == 0) or len(generated) == 0:
        return logits
    ids, counts = np.unique(generated, return_counts=True)
    out = logits.astype(np.float32, copy=True)
    out[ids] -= p.presence_penalty + p.frequency_penalty * counts
    return out


def filtered_probs(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """Probabilities after temperature, top-k, top-p and min-p (zeros outside the kept set)."""
    z = logits.astype(np.float64) / p.temperature
    z -= z.max()
    probs = np.exp(z)
    probs /= probs.sum()
    keep = np.ones(probs.shape, bool)
    if p.top_k and p.top_k < probs.size:
        kth = np.partition(probs, -p.top_k)[-p.top_k]
        keep &= probs >= kth
    if p.min_p > 0:
        keep &= probs >= p.min_p * probs.max()
    if p.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order])
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        cutoff = int(np.searchsorted(cum, p.top_p)) + 1
        nucleus = np.zeros(probs.shape, bool)
        nucleus[order[:cutoff]] = True
        keep &= nucleus
    probs = np.where(keep, probs, 0.0)
    return probs / probs.sum()


def sample(logits: np.ndarray, p: SamplingParams, rng: np.random.Generator,
           previous: np.ndarray | None = None, generated: np.ndarray | None = None) -> int:
    """One token id from a (vocab,) logits row; previous: prompt and generated tokens (the
    repetition penalty's), generated: the generated ones (presence and frequency penalties')."""
    if previous is not None and p.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, previous, p.repetition_penalty)
    if generated is not None:
        logits = apply_openai_penalties(logits, generated, p)
    if p.temperature == 0:
        return int(np.argmax(logits))
    probs = filtered_probs(logits, p)
    return int(rng.choice(probs.size, p=probs))
