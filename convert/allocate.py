"""Bits per tensor for a size budget: `--target-bpw` and `--max-kl`.

Every quantizable tensor (decoder projections, embedding, head) is scored once per candidate
scheme: its exact bytes in the file (plan.planned_arrays, aligned) and the loss its round-to-
nearest error is predicted to cost the model (sensitivity.Sensitivity.predicted_loss). The
choice of one candidate per tensor is a multiple-choice knapsack, solved by Lagrangian
relaxation: for a price λ per byte every tensor takes the candidate of least loss + λ·bytes,
which is optimal for the total bytes it gives; λ is bisected to the budget, and the bytes the
relaxation leaves unspent go to the upgrades with the best loss saved per byte that still fit.
The fixed part of the file (header, norms, tokenizer, tensors kept in float) is computed
exactly (writer.QbinSizer), so the file written is the size planned.

The errors of different tensors are added, which ignores how they interact; quantizing with
the method (GPTQ, AWQ) then compensates within each layer.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from qformat.schemes import Scheme, parse_scheme

from .groupquant import fake_quant
from .sensitivity import Sensitivity

# The candidates every quantizable tensor may take by default: each has a decode GEMV on int8
# activations (or q8's float one) on the VNNI path. Groups of 32 only for q4, the one width with
# a fast kernel for them (the others measured ~1 ms for 1536x576, 10x their bytes' worth); pass
# them with --candidates to include them anyway. Up to 5 bits the grouped ones store log-coded
# 8-bit scales ("-dq", spec §4.3): 8 bits per group less than float16 scales for +0.1-0.8% of
# RTN's squared weight error on SmolLM2 at 2-4 bits and +1.7% at int5-g64
# (bench/bench_log_scales.py), a fraction of what the bits saved buy elsewhere. int6 feels the
# grid's steps more (+6.9% at g64), so it comes both ways and the allocator weighs the two.
DEFAULT_CANDIDATES = ("int2-g64-dq", "int2-g128-dq", "int3-g64-dq", "int3-g128-dq", "int4-g32-dq", "int4-g64-dq",
                      "int4-g128-dq", "int5-g64-dq", "int5-g128-dq", "int6-g64", "int6-g64-dq", "int6-g128",
                      "int6-g128-dq", "int8")

@dataclass(frozen=True)
class Choice:
    """One candidate of one tensor: its scheme, its bytes in the file and its predicted loss."""

    scheme: Scheme
    nbytes: int
    loss: float


def parse_candidates(text: str | tuple[str, ...] | None) -> tuple[Scheme, ...]:
    """Candidate schemes from a comma-separated list ("int4-g64,int6-g128,..."); None: the default."""
    names = DEFAULT_CANDIDATES if text is None else (
        tuple(n.strip() for n in text.split(",") if n.strip()) if isinstance(text, str) else tuple(text))
    if not names:
        raise ValueError("--candidates is empty; give schemes such as int4-g64,int6-g64,int8")
    schemes = tuple(parse_scheme(n) for n in names)
    for s in schemes:
        if not s.quantized or s.act_bits:
            raise ValueError(f"candidate {s.name}: candidates are weight-only quantized schemes (intN-gG, nf4-gG)")
    return schemes


def score(ckpt, planned: list, sens: Sensitivity, candidates: tuple[Scheme, ...], nbytes: Callable,
          score_kind: str = "fisher", progress: bool = True) -> dict[str, list[Choice]]:
    """Every candidate of every planned tensor with statistics in `sens`: bytes from
    nbytes(planned tensor, scheme), loss from the candidate's round-to-nearest weight."""
    out: dict[str, list[Choice]] = {}
    targets = [p for p in planned if p.name in sens.stats]
    bar = targets
    if progress:
        from tqdm import tqdm

        bar = tqdm(targets, unit="tensor", file=sys.stderr, dynamic_ncols=True, leave=False, desc="scoring")
    dev = next(iter(sens.stats.values())).out_sq_grad
    dev = dev.device if dev is not None else torch.device("cpu")
    for p in bar:
        w = torch.from_numpy(ckpt.read(p.hf_name)).to(dev)
        out[p.name] = [Choice(s, nbytes(p, s), sens.predicted_loss(p.name, w, fake_quant(w, s), score_kind))
                       for s in candidates]
        del w
    return out


# The knapsack counts bytes in units of at least budget / MAX_UNITS (rounded up per candidate),
# which bounds its table at MAX_UNITS + 1 entries per tensor: exact below 256 KiB budgets, and
# for SmolLM2 at 4 bits units of 256 bytes, at most 211 x 256 bytes of rounding (which the
# final fill spends again).
MAX_UNITS = 1 << 18


def _total(pick: dict[str, Choice], attr: str) -> float:
    return sum(getattr(c, attr) for c in pick.values())


def _knapsack(choices: dict[str, list[Choice]], budget: int) -> tuple[np.ndarray, "callable"]:
    """Dynamic programming over the byte budget: (least total loss for every budget 0..B units,
    the function giving the pick for a budget in units) for the multiple-choice knapsack."""
    unit = max(1, -(-budget // MAX_UNITS))
    top = budget // unit
    best = np.zeros(top + 1)
    names = list(choices)
    arg = np.zeros((len(names), top + 1), np.uint8)
    for t, n in enumerate(names):
        new = np.full(top + 1, np.inf)
        for j, c in enumerate(choices[n]):
            u = -(-c.nbytes // unit)
            if u > top:
                continue
            cand = np.full(top + 1, np.inf)
            cand[u:] = best[:top + 1 - u] + c.loss
            better = cand < new
            new[better] = cand[better]
            arg[t, better] = j
        best = new

    def pick_at(b: int) -> dict[str, Choice]:
        out = {}
        for t in reversed(range(len(names))):
            c = choices[names[t]][arg[t, b]]
            out[names[t]] = c
            b -= -(-c.nbytes // unit)
        return {n: out[n] for n in names}

    return best, pick_at


def solve_budget(choices: dict[str, list[Choice]], budget: int) -> dict[str, Choice]:
    """The candidates of least total predicted loss whose bytes sum to at most `budget` (a
    multiple-choice knapsack, solved exactly up to MAX_UNITS' rounding); ValueError when even
    the smallest candidates do not fit."""
    smallest = {n: min(c, key=lambda ch: (ch.nbytes, ch.loss)) for n, c in choices.items()}
    if _total(smallest, "nbytes") > budget:
        raise ValueError(f"the smallest candidates take {int(_total(smallest, 'nbytes'))} bytes, over the "
                         f"budget of {budget}; raise the target or add narrower candidates")
    best, pick_at = _knapsack(choices, budget)
    if not np.isfinite(best[-1]):  # rounded up to units, the smallest pick no longer fits
        return _fill(choices, smallest, budget)
    return _fill(choices, pick_at(len(best) - 1), budget)


def _fill(choices: dict[str, list[Choice]], pick: dict[str, Choice], budget: int) -> dict[str, Choice]:
    """Spend what the units' rounding left: repeatedly the upgrade saving the most loss per byte
    that fits."""
    pick = dict(pick)
    slack = budget - _total(pick, "nbytes")
    while True:
        best, best_rate = None, 0.0
        for n, cands in choices.items():
            cur = pick[n]
            for c in cands:
                extra = c.nbytes - cur.nbytes
                gain = cur.loss - c.loss
                if gain > 0 and extra <= slack:
                    rate = gain / max(extra, 1)
                    if rate > best_rate:
                        best, best_rate = (n, c), rate
        if best is None:
            return pick
        slack -= best[1].nbytes - pick[best[0]].nbytes
        pick[best[0]] = best[1]


def solve_max_loss(choices: dict[str, list[Choice]], max_loss: float) -> dict[str, Choice]:
    """The candidates of fewest total bytes whose predicted losses sum to at most `max_loss` (the
    smallest budget whose knapsack optimum meets the bound); ValueError when even the widest
    candidates exceed it."""
    widest = {n: min(c, key=lambda ch: (ch.loss, ch.nbytes)) for n, c in choices.items()}
    if _total(widest, "loss") > max_loss:
        raise ValueError(f"even the widest candidates are predicted to cost {_total(widest, 'loss'):.4g} nats/token, "
                         f"over --max-kl {max_loss}; raise the bound or add wider candidates")
    everything = int(sum(max(ch.nbytes for ch in c) for c in choices.values()))
    best, pick_at = _knapsack(choices, everything)
    b = int(np.argmax(best <= max_loss))
    return pick_at(b)


def allocate(choices: dict[str, list[Choice]], file_size: Callable[[dict[str, Choice]], int],
             target_bytes: int | None = None, max_loss: float | None = None) -> tuple[dict[str, Choice], int]:
    """(pick, exact file size) for a whole-file budget of `target_bytes` or a loss bound.

    file_size(pick) is the exact size of the file a pick writes; the tensors' budget starts at
    the target minus the file's other bytes under the smallest pick and is lowered by any
    overshoot (the header's length depends a little on the pick) until the file fits."""
    if max_loss is not None:
        pick = solve_max_loss(choices, max_loss)
        return pick, file_size(pick)
    smallest = {n: min(c, key=lambda ch: (ch.nbytes, ch.loss)) for n, c in choices.items()}
    fixed = file_size(smallest) - int(_total(smallest, "nbytes"))
    budget = target_bytes - fixed
    if budget < _total(smallest, "nbytes"):
        raise ValueError(f"a file of {target_bytes} bytes cannot hold this model: its smallest candidates make "
                         f"{file_size(smallest)} bytes; raise --target-bpw or add narrower candidates")
    for _ in range(8):
        pick = solve_budget(choices, budget)
        size = file_size(pick)
        if size <= target_bytes:
            return pick, size
        budget -= size - target_bytes
    raise RuntimeError("the file size did not settle under the budget")  # the header shrinks with fewer bytes


def bits_per_weight(nbytes: int, n_weights: int) -> float:
    return 8.0 * nbytes / n_weights if n_weights else math.nan


def summary(pick: dict[str, Choice]) -> dict[str, int]:
    """How many tensors took each scheme."""
    out: dict[str, int] = {}
    for c in pick.values():
        out[c.scheme.name] = out.get(c.scheme.name, 0) + 1
    return dict(sorted(out.items()))


__all__ = ["Choice", "DEFAULT_CANDIDATES", "allocate", "bits_per_weight", "parse_candidates", "score",
           "solve_budget", "solve_max_loss", "summary"]
