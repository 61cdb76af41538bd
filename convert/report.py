"""What a conversion did (or, for a dry run, would do): per tensor and for the whole file."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from qformat.config import ModelArgs
from qformat.tensors import tensor_group

from .rtn import QuantStats


@dataclass
class TensorReport:
    name: str
    role: str
    shape: tuple[int, ...]
    scheme: str  # scheme name the tensor is stored in
    nbytes: int
    stats: QuantStats | None = None  # None for norms, biases and dry runs

    @property
    def n(self) -> int:
        return int(np.prod(self.shape))

    @property
    def size_class(self) -> str:
        if self.role in ("norm", "bias"):
            return "norms+biases"
        if self.role == "embed":
            return "embeddings"
        if self.role == "head":
            return "head"
        return "attention" if tensor_group(self.name) == "attention" else "ffn"


@dataclass
class ConvertReport:
    """What a conversion did (or, for a dry run, would do)."""

    src: Path
    dst: Path
    scheme: str
    model: ModelArgs
    tensors: list[TensorReport]
    tokenizer_nbytes: int
    file_size: int  # bytes of the written file; for a dry run, the estimate
    seconds: float
    dry_run: bool
    head: str  # scheme of the LM head (tok_embeddings' when tied)
    embed: str
    clip_search: bool
    notes: list[str] = field(default_factory=list)

    @property
    def n_params(self) -> int:
        return sum(t.n for t in self.tensors if not (t.role == "head" and self.model.tie_embeddings))

    @property
    def weight_nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def bpw(self) -> float:
        """Bits per weight over every stored number (scales, zeros, norms included)."""
        return 8 * self.weight_nbytes / max(self.n_params, 1)

    @property
    def linear_bpw(self) -> float:
        """Bits per weight of the transformer blocks' projections: the scheme's effective rate."""
        lin = [t for t in self.tensors if t.role == "linear"]
        return 8 * sum(t.nbytes for t in lin) / max(sum(t.n for t in lin), 1)

    def class_sizes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.size_class] = out.get(t.size_class, 0) + t.nbytes
        out["tokenizer"] = self.tokenizer_nbytes
        return out

    def rel_mse(self, roles: Iterable[str] = ("linear",), minmax: bool = False) -> float | None:
        """Error energy / weight energy summed over tensors of the given roles."""
        stats = [t.stats for t in self.tensors if t.role in roles and t.stats is not None]
        if not stats:
            return None
        w = sum(s.sq_weight for s in stats)
        e = sum(s.sq_err_minmax if minmax else s.sq_err for s in stats)
        return e / w if w > 0 else 0.0

    def summary(self) -> str:
        """A few human-readable lines: time, size, bits per weight, sizes per class, errors."""
        verb = "would write" if self.dry_run else "wrote"
        approx = "about " if self.dry_run else ""
        lines = [
            f"{verb} {self.dst} ({self.scheme}; embeddings {self.embed}, head {self.head}"
            f"{', tied' if self.model.tie_embeddings else ''}) in {self.seconds:.1f} s: "
            f"{approx}{self.file_size / 1e6:.2f} MB, {self.n_params / 1e6:.2f} M weights, "
            f"{self.bpw:.3f} bits/weight overall, {self.linear_bpw:.3f} in the projections",
            "sizes: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in self.class_sizes().items()),
        ]
        for roles, label in ((("linear",), "projections"), (("embed", "head"), "embeddings/head")):
            clip = self.rel_mse(roles)
            if clip is None:
                continue
            plain = self.rel_mse(roles, minmax=True)
            if self.clip_search:
                lines.append(f"weight rel-MSE ({label}): min/max {plain:.3e}, clip-searched {clip:.3e} "
                             f"({100 * (1 - clip / plain) if plain else 0.0:.1f}% lower)")
            else:
                lines.append(f"weight rel-MSE ({label}): {clip:.3e} (min/max, no clip search)")
        lines.extend(self.notes)
        return "\n".join(lines)

    def plan_lines(self) -> list[str]:
        """One line per tensor: name, shape, stored scheme, bytes (the dry run's plan)."""
        return [f"{t.name:32s} {'x'.join(map(str, t.shape)):>12s}  {t.scheme:12s} {t.nbytes:>12d} B"
                for t in self.tensors]
