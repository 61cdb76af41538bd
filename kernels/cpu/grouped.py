"""Dense grouped weights (q8, q6, q5, q4, q3, q2, nf4; symmetric or affine, any group size) on the CPU.

Decode: q2 to q6 run quant.gemv_q8act on int8 activations (kernels.layouts.q8act; on
AVX512-VNNI CPUs their groups of 64k columns take group_vnni.rows), q8 and nf4 quant.GEMV[kind]
on float activations; a batched decode step of a few sequences runs the same GEMVs for all of
them in one pass over the weights (gemv_many: q2-q6 on int8 activations, q8 by
quant.gemm_rows_q8; nf4 a GEMV per token). Prefill: q4 (and q8 where its groups allow) through
gemm_vnni's int8 GEMM on VNNI CPUs, else rows dequantized by quant.DEQUANT[kind] and multiplied
by BLAS.
"""
from __future__ import annotations

import numpy as np

from qformat.packing import padded_len
from qformat.schemes import KINDS, Tensor

from . import gemm_vnni, quant
from ..layouts import q8act
from .base import H2F, LinearBase, Sidecars, grouped_row
from .features import VNNI
from .threads import run_row_chunks


class GroupQuantOp(LinearBase):
    """q8, q6, q5, q4, q3, q2 and nf4 weights in dense rows, with any sidecars. float_activations: the
    float kernels whatever layouts.q8act says (W8A8's dense part, whose inputs are int8 codes
    already: a second rounding would change them)."""

    def __init__(self, t: Tensor, float_activations: bool = False):
        super().__init__(t)
        if t.sparsity is not None or t.activation is not None:
            raise ValueError(f"tensor {t.name}: not a dense grouped weight (its form has its own op)")
        a = t.arrays
        kind = KINDS[t.kind]
        self.kind = t.kind
        self.codes = a["codes"]
        self.scales = a["scales"].view(np.uint16)
        # offsets (spec §4.2) run the codes' part with zeros 0; Sidecars adds the offsets' part
        self.has_zeros = "zeros" in a or "offsets" in a
        self.zeros = (a["zeros"] if "zeros" in a else np.zeros(a["scales"].shape, np.uint8) if self.has_zeros
                      else np.zeros((1, 1), np.uint8))
        # a group wider than the row is one partial group: the same bytes as a group of the row
        self.group = min(t.group_size, self.in_features)
        self.padded = padded_len(self.group)
        self.bits = kind.bits
        self._gemv, self._dequant = quant.GEMV[t.kind], quant.DEQUANT[t.kind]
        # GEMV on int8 activations (see quant.py); prefill too for q4 on VNNI CPUs (act_group below)
        self.q8act = q8act(t.kind, self.group) and not float_activations
        self.side = Sidecars(t)
        # prefill on int8 activations where decode runs on them (q4), through gemm_vnni
        # (offsets: dequantized rows and BLAS, exact; the int8 GEMM's activation groups do not
        # give the offsets their rounded sums)
        self.act_group = (gemm_vnni.act_group(t.kind, self.group, self.in_features)
                          if VNNI and self.q8act and "offsets" not in a else None)
        self._width = -(-self.in_features // self.group) * padded_len(self.group)
        tail = self.in_features % self.group
        self._unwritten = self._width - (self.padded - padded_len(tail) if tail else 0)

    def gemv(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        xs_in = self.side.stored_x(x) if self.side.any else x
        quantized = None
        if self.q8act:
            xq, d, sums = quant.quantize_x(xs_in, self.in_features, self.group, self.padded)
            quant.gemv_q8act(self.codes, self.scales, self.zeros, self.has_zeros, H2F, xq, d, sums,
                             self.in_features, self.group, self.bits, out)
            quantized = d, sums
        else:
            xp, xs = quant.pad_x(xs_in, self.in_features, self.group, self.padded)
            self._gemv(self.codes, self.scales, self.zeros, self.has_zeros, H2F, xp, xs,
                       self.in_features, self.group, out)
        if self.side.any:
            self.side.add_gemv(x, out, quantized)
        return out

    def gemm(self, x: np.ndarray) -> np.ndarray:
        if self.act_group is None:
            return super().gemm(x)
        x = np.ascontiguousarray(x, np.float32)
        if x.shape[0] < gemm_vnni.MIN_TOKENS:  # the GEMV's int8 activations too
            return self.gemv_rows(x)
        xs = self.side.stored_x(x) if self.side.any else x
        out = gemm_vnni.gemm_q8act(self.codes, self.scales, self.zeros, self.has_zeros, H2F, self.bits,
                                   self.in_features, self.group, self.act_group, xs)
        self.add_gemm(x, out)
        return out

    def gemv_many(self, x: np.ndarray) -> np.ndarray:
        """The GEMV of every token of x (n, in_features), each token's row bit for bit its
        gemv()'s. On int8 activations in one pass over the weights (quant.gemm_rows_q8act:
        each block of rows meets all n tokens while it is in cache, their integer sums exact);
        q8 on float activations (an int8 head) with its rows read once too (quant.gemm_rows_q8,
        equal within rounding: its float sums run in another order); nf4 one GEMV per token."""
        if not self.q8act:
            return self.gemv_rows(x) if self.kind != "q8" else self._gemm_rows_q8(x)
        x = np.ascontiguousarray(x, np.float32)
        xs_in = self.side.stored_x(x) if self.side.any else x
        out = np.empty((x.shape[0], self.out_features), np.float32)
        xq, d, sums = quant.quantize_rows(xs_in, self.in_features, self.group, self.padded)
        quant.gemm_rows_q8act(self.codes, self.scales, self.zeros, self.has_zeros, H2F, xq, d, sums,
                              self.in_features, self.group, self.bits, out)
        if self.side.any:
            for i in range(x.shape[0]):
                self.side.add_gemv(x[i], out[i], (d[i], sums[i]))
        return out

    def _gemm_rows_q8(self, x: np.ndarray) -> np.ndarray:
        """gemv_many of q8 on float activations (an int8 head): quant.gemm_rows_q8."""
        xs_in = self.side.stored_x(x) if self.side.any else x
        padded = [quant.pad_x(row, self.in_features, self.group, self.padded) for row in xs_in]
        xp, xs = np.stack([p for p, _ in padded]), np.stack([s for _, s in padded])
        out = np.empty((x.shape[0], self.out_features), np.float32)
        quant.gemm_rows_q8(self.codes, self.scales, self.zeros, self.has_zeros, H2F, xp, xs, self.in_features,
                           self.group, out)
        if self.side.any:
            for i in range(x.shape[0]):
                self.side.add_gemv(x[i], out[i], None)
        return out

    def prepare_x(self, x: np.ndarray) -> np.ndarray:
        """Activations in stored column order, each group zero-padded to P columns."""
        xs = self.side.stored_x(x) if self.side.any else x
        out = np.empty((x.shape[0], self._width), np.float32)
        run_row_chunks(lambda rows: quant.pad_rows(xs[rows], self.in_features, self.group, out[rows]), x.shape[0])
        return out

    def add_gemm(self, x: np.ndarray, out: np.ndarray) -> None:
        if self.side.any:
            self.side.add_gemm(x, out)

    def weight_block(self, ids: np.ndarray) -> np.ndarray:
        out = np.empty((ids.size, self._width), np.float32)
        self._dequant(self.codes, self.scales, self.zeros, self.has_zeros, H2F, self.in_features,
                      self.group, ids, out)
        if self._unwritten < self._width:  # a short tail group leaves its slot's end unwritten
            out[:, self._unwritten:] = 0.0
        return out

    def fused_row(self):
        row, keep = grouped_row("q8act" if self.q8act else self.kind, self.codes, self.scales,
                                self.zeros if self.has_zeros else None, self.group, self.in_features, self.bits)
        return row, keep + self.side.fill_row(row)
