"""The evaluation corpus of EVAL.md: CPython's pydoc topics, present on every Python install.

The text is `pydoc_data.topics.topics`' values joined in sorted key order with a blank line
between. Perplexity uses the first windows of its token stream; calibration (GPTQ, AWQ, ...) uses
the second half, which the evaluated windows never reach.
"""
from __future__ import annotations

from typing import Callable, Sequence

EVAL_WINDOW = 512
EVAL_WINDOWS = 40


def eval_text() -> str:
    """The whole corpus as one string."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def token_stream(encode: Callable[[str], Sequence[int]]) -> list[int]:
    """The corpus tokenized once; `encode` must add no special tokens."""
    return [int(i) for i in encode(eval_text())]


def eval_windows(ids: Sequence[int], window: int = EVAL_WINDOW, count: int = EVAL_WINDOWS) -> list[list[int]]:
    """The first `count` non-overlapping windows of `window` tokens (fewer if the text is short)."""
    n = min(count, len(ids) // window)
    return [list(ids[i * window:(i + 1) * window]) for i in range(n)]


def calibration_ids(ids: Sequence[int]) -> list[int]:
    """The second half of the token stream: calibration data disjoint from the evaluated windows."""
    half = len(ids) // 2
    if EVAL_WINDOW * EVAL_WINDOWS > half:
        raise ValueError(f"corpus of {len(ids)} tokens is too short: its evaluated windows reach the second half")
    return list(ids[half:])
