"""What a stored tensor asks of a backend, decided here once for every backend.

A weight's *layout* is its kind (f16, q4, ...) and its *form*: dense rows, n:m structured
sparsity (spec §6.3) or int8 activations (W8A8, spec §6.5). Each backend's table maps
(kind, form) to the op that runs it (qformat.kernels.registry). The rules below fix numerics
that the CPU and CUDA backends must share, so that both give one answer for one file.
"""
from __future__ import annotations

from qformat.schemes import Tensor

DENSE, NM, A8 = "dense", "n:m", "w8a8"
FORMS = (DENSE, NM, A8)

# Kinds whose decode GEMV quantizes the activations to int8 per weight group, on every backend:
# the integer inner loop is ~1.3x faster than float for 4-bit codes on a CPU (3-5x for the widths
# stored in several planes), and a GPU computes the same numbers so that both backends give one
# answer. kernels.reference's gemv_q8act_reference (dense) and gemv_nm_q8act_reference (n:m
# sparse, q4 only) model them exactly. q8 (one byte per code) and nf4 (a table lookup) keep
# float activations.
Q8ACT_KINDS = ("q2", "q3", "q4", "q5", "q6")
Q8ACT_SPARSE_KINDS = ("q4",)


def form_of(t: Tensor) -> str:
    """The form of a tensor: A8 when it quantizes its inputs (whatever its rows), else NM for
    n:m sparse rows, else DENSE. Sidecars (§6.1, 6.2, 6.4) go with every form."""
    if t.activation is not None:
        return A8
    return NM if t.sparsity is not None else DENSE


def q8act(kind: str, group: int, sparse: bool = False) -> bool:
    """Whether the GEMV of a `kind` weight with groups of `group` columns runs on int8 activations:
    q2 to q6 with whole bytes per slice (group % 8 == 0, every usual scheme), and every n:m
    sparse q4."""
    if sparse:
        return kind in Q8ACT_SPARSE_KINDS
    return kind in Q8ACT_KINDS and group % 8 == 0


def w8a8_static(t: Tensor) -> bool:
    """Whether a tensor with `activation` (W8A8, spec §6.5) quantizes its inputs with the stored
    act_scale (static) or per token (dynamic); ValueError for a mode this runtime does not know."""
    mode = t.activation.get("mode")
    if t.activation.get("bits") != 8 or mode not in ("dynamic", "static"):
        raise ValueError(f"tensor {t.name}: activation {t.activation} is not one this runtime knows "
                         '(bits 8, mode "dynamic" or "static")')
    return mode == "static"
