"""Perplexity, KL divergence and top-1 agreement on the EVAL.md protocol."""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np

from qformat.corpus import EVAL_WINDOW, eval_windows


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens
    windows: int
    kl: float | None = None  # mean KL(reference || model), nats per token
    top1: float | None = None  # fraction of positions where both argmaxes agree

    def lines(self) -> list[str]:
        out = [f"perplexity: {self.ppl:.4f} ({self.windows} windows, {self.tokens} predicted tokens, "
               f"mean nll {self.nll:.5f})"]
        if self.kl is not None:
            out.append(f"kl divergence vs reference: {self.kl:.6f} nats/token")
            out.append(f"top-1 agreement vs reference: {self.top1:.4f}")
        return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def perplexity(model, text: str, n_windows: int = 40, window: int = EVAL_WINDOW, reference=None,
               progress: bool = False) -> PerplexityResult:
    """Tokenize `text` once (no special tokens), evaluate the first n_windows non-overlapping
    windows from an empty cache each; mean NLL over the window-1 predicted tokens per window."""
    ids = model.tokenizer.encode(text, add_bos=False)
    wins = eval_windows(ids, window, n_windows)
    if not wins:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one window of {window}")
    nll_sum, kl_sum, agree, count = 0.0, 0.0, 0, 0
    for i, w in enumerate(wins):
        logp = log_softmax(model.logits(w)[:-1])
        target = np.asarray(w[1:])
        nll_sum -= float(logp[np.arange(target.size), target].sum())
        if reference is not None:
            ref = log_softmax(reference.logits(w)[:-1])
            kl_sum += float((np.exp(ref) * (ref - logp)).sum())
            agree += int((ref.argmax(-1) == logp.argmax(-1)).sum())
        count += target.size
        if progress:
            print(f"\rwindow {i + 1}/{len(wins)}: ppl so far {math.exp(nll_sum / count):.4f}", end="",
                  file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    nll = nll_sum / count
    return PerplexityResult(math.exp(nll), nll, count, len(wins),
                            kl_sum / count if reference is not None else None,
                            agree / count if reference is not None else None)
