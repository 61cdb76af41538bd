"""CPU linear ops: a qbin Tensor wrapped once at load time, then called per token.

`prepare` does all per-tensor work up front (dtype views, sidecar index arrays) so that a decode
step's `gemv` is one compiled call. Weights stay views of the memory map: nothing here copies the
codes or the 16-bit data (the only copies are the small f16 sidecars widened to f32).
"""
from __future__ import annotations

import numba
import numpy as np

from qformat.packing import padded_len
from qformat.schemes import KINDS, Tensor

from . import dense, gemm_vnni, quant
from ..reference import q8act
from .features import VNNI
from .threads import run_row_chunks, run_tasks
from ..registry import register

H2F = quant.half_table()
# Rows dequantized per BLAS call on the prefill path: ~8 MiB of float32 per block keeps the block
# in L2/L3 while numpy's matmul consumes it.
GEMM_BLOCK_BYTES = 8 << 20
# Below this many tokens the GEMV loop beats dequantize-then-BLAS (measured on SmolLM2 shapes).
GEMM_MIN_TOKENS = 8

_KERNELS = {  # kind -> (GEMV, dequantize rows)
    "q8": (quant.gemv_q8, quant.dequant_q8), "q4": (quant.gemv_q4, quant.dequant_q4),
    "q3": (quant.gemv_q3, quant.dequant_q3), "q2": (quant.gemv_q2, quant.dequant_q2),
    "nf4": (quant.gemv_nf4, quant.dequant_nf4),
}


class _Sidecars:
    """Permutation, sparse outliers and 16-bit columns of a quantized tensor (all optional)."""

    def __init__(self, t: Tensor):
        a = t.arrays
        rows = t.shape[0]
        self.perm = np.asarray(a["perm"], np.int64) if "perm" in a else None
        self.outliers = None
        if "outlier_rowptr" in a:
            row_of = np.repeat(np.arange(rows), np.diff(a["outlier_rowptr"]))
            self.outliers = (row_of, np.asarray(a["outlier_cols"], np.int64),
                             np.asarray(a["outlier_values"], np.float32))
        self.fp = None
        if "fp_cols" in a:
            self.fp = (np.asarray(a["fp_cols"], np.int64), np.asarray(a["fp_weight"], np.float32))
        self.any = self.perm is not None or self.outliers is not None or self.fp is not None

    def stored_x(self, x: np.ndarray) -> np.ndarray:
        """The dense part's input: x with the 16-bit columns zeroed (their dense weights are zero,
        so this changes no float product, but an int8-activation kernel then scales each group
        by its ordinary channels instead of an outlier's), in stored column order (x[..., perm])."""
        if self.fp is not None:
            x = x.copy()
            x[..., self.fp[0]] = 0.0
        return x if self.perm is None else np.ascontiguousarray(x[..., self.perm])

    def add_gemv(self, x: np.ndarray, out: np.ndarray) -> None:
        if self.outliers is not None:
            row_of, cols, vals = self.outliers
            out += np.bincount(row_of, weights=vals * x[cols], minlength=out.shape[0]).astype(np.float32)
        if self.fp is not None:
            cols, w = self.fp
            out += w @ x[cols]

    def add_gemm(self, x: np.ndarray, out: np.ndarray) -> None:
        if self.outliers is not None:
            row_of, cols, vals = self.outliers
            np.add.at(out.T, row_of, (x[:, cols] * vals).T)
        if self.fp is not None:
            cols, w = self.fp
            out += x[:, cols] @ w.T

    def fix_rows(self, ids: np.ndarray, stored: np.ndarray) -> np.ndarray:
        """Stored-order dequantized rows -> logical rows with the sidecars added."""
        out = stored
        if self.perm is not None:
            out = np.empty_like(stored)
            out[:, self.perm] = stored
        if self.outliers is not None:
            row_of, cols, vals = self.outliers
            for i, r in enumerate(ids):
                sel = row_of == r
                np.add.at(out[i], cols[sel], vals[sel])
        if self.fp is not None:
            cols, w = self.fp
            out[:, cols] += w[ids]
        return out


class _Base:
    def __init__(self, t: Tensor):
        if len(t.shape) != 2:
            raise ValueError(f"tensor {t.name}: a linear weight is 2-D, got shape {list(t.shape)}")
        self.name = t.name
        self.out_features, self.in_features = t.shape
        self._block = max(1, GEMM_BLOCK_BYTES // (4 * max(1, self.in_features)))

    def _gemv_rows(self, x: np.ndarray) -> np.ndarray:
        out = np.empty((x.shape[0], self.out_features), np.float32)
        for i in range(x.shape[0]):
            self.gemv(x[i], out[i])
        return out

    def _weight_block(self, ids: np.ndarray) -> np.ndarray:
        """float32 rows `ids` in the layout that `_prep_x` gives the activations."""
        raise NotImplementedError

    def _prep_x(self, x: np.ndarray) -> np.ndarray:
        return x

    def _add_gemm(self, x: np.ndarray, out: np.ndarray) -> None:
        pass

    def gemm(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        if x.shape[0] < GEMM_MIN_TOKENS:
            return self._gemv_rows(x)
        out = np.empty((x.shape[0], self.out_features), np.float32)
        xs = self._prep_x(x)
        # at least one block per thread; each dequantizes its rows and multiplies them (threads.py)
        step = max(1, min(self._block, -(-self.out_features // numba.get_num_threads())))

        def block(r0: int) -> None:
            ids = np.arange(r0, min(self.out_features, r0 + step), dtype=np.int64)
            np.matmul(xs, self._weight_block(ids).T, out=out[:, r0:ids[-1] + 1])

        run_tasks(block, range(0, self.out_features, step))
        self._add_gemm(x, out)
        return out


class DenseOp(_Base):
    """f32, f16 or bf16 weights."""

    def __init__(self, t: Tensor):
        super().__init__(t)
        data = t.arrays["data"]
        self.kind = t.kind
        self.w = data.view(np.uint16) if t.kind in ("f16", "bf16") else data
        self._gemv = {"f32": dense.gemv_f32, "f16": dense.gemv_f16, "bf16": dense.gemv_bf16}[t.kind]

    def gemv(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        self._gemv(self.w, x, out)
        return out

    def _weight_block(self, ids: np.ndarray) -> np.ndarray:
        if self.kind == "f32":
            return self.w[ids]
        out = np.empty((ids.size, self.in_features), np.float32)
        dense.widen16_rows(self.w, self.kind == "bf16", ids, out)
        return out

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return self._weight_block(np.asarray(ids, np.int64))


class GroupQuantOp(_Base):
    """q8, q4, q3, q2 and nf4 weights, symmetric or affine, any group size."""

    def __init__(self, t: Tensor):
        super().__init__(t)
        if t.sparsity is not None:  # built by group_quant_op instead
            raise ValueError(f"tensor {t.name}: n:m sparse; use kernels.cpu.sparse.SparseGroupQuantOp")
        if t.activation is not None:
            raise NotImplementedError(f"tensor {t.name}: {t.kind} with 8-bit activations has no CPU kernel yet")
        a = t.arrays
        kind = KINDS[t.kind]
        self.codes = a["codes"]
        self.scales = a["scales"].view(np.uint16)
        self.has_zeros = "zeros" in a
        self.zeros = a["zeros"] if self.has_zeros else np.zeros((1, 1), np.uint8)
        # a group wider than the row is one partial group: the same bytes as a group of the row
        self.group = min(t.group_size, self.in_features)
        self.padded = padded_len(self.group)
        self.bits = kind.bits
        self.nf4 = kind.nf4
        self._gemv, self._dequant = _KERNELS[t.kind]
        # GEMV on int8 activations (see quant.py); prefill too on VNNI CPUs (act_group below)
        self.q8act = q8act(t.kind, self.group)
        self.side = _Sidecars(t)
        # prefill on int8 activations where decode runs on them (q4), through gemm_vnni
        self.act_group = (gemm_vnni.act_group(t.kind, self.group, self.in_features)
                          if VNNI and self.q8act else None)
        self._width = -(-self.in_features // self.group) * padded_len(self.group)
        self._logical = quant.logical_columns(self.in_features, self.group)
        tail = self.in_features % self.group
        self._unwritten = self._width - (self.padded - padded_len(tail) if tail else 0)

    def gemv(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        xs_in = self.side.stored_x(x) if self.side.any else x
        if self.q8act:
            xq, d, sums = quant.quantize_x(xs_in, self.in_features, self.group, self.padded)
            quant.gemv_q4_q8act(self.codes, self.scales, self.zeros, self.has_zeros, H2F, xq, d, sums,
                                self.in_features, self.group, out)
        else:
            xp, xs = quant.pad_x(xs_in, self.in_features, self.group, self.padded)
            self._gemv(self.codes, self.scales, self.zeros, self.has_zeros, H2F, xp, xs,
                       self.in_features, self.group, out)
        if self.side.any:
            self.side.add_gemv(x, out)
        return out

    def gemm(self, x: np.ndarray) -> np.ndarray:
        if self.act_group is None:
            return super().gemm(x)
        x = np.ascontiguousarray(x, np.float32)
        if x.shape[0] < gemm_vnni.MIN_TOKENS:  # the GEMV's int8 activations too
            return self._gemv_rows(x)
        xs = self.side.stored_x(x) if self.side.any else x
        out = gemm_vnni.gemm_q8act(self.codes, self.scales, self.zeros, self.has_zeros, H2F, self.bits,
                                   self.in_features, self.group, self.act_group, xs)
        self._add_gemm(x, out)
        return out

    def _prep_x(self, x: np.ndarray) -> np.ndarray:
        """Activations in stored column order, each group zero-padded to P columns."""
        xs = self.side.stored_x(x) if self.side.any else x
        out = np.empty((x.shape[0], self._width), np.float32)
        run_row_chunks(lambda rows: quant.pad_rows(xs[rows], self.in_features, self.group, out[rows]), x.shape[0])
        return out

    def _add_gemm(self, x: np.ndarray, out: np.ndarray) -> None:
        if self.side.any:
            self.side.add_gemm(x, out)

    def _weight_block(self, ids: np.ndarray) -> np.ndarray:
        out = np.empty((ids.size, self._width), np.float32)
        self._dequant(self.codes, self.scales, self.zeros, self.has_zeros, H2F, self.in_features,
                      self.group, ids, out)
        if self._unwritten < self._width:  # a short tail group leaves its slot's end unwritten
            out[:, self._unwritten:] = 0.0
        return out

    def rows(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        stored = self._weight_block(ids)[:, self._logical]
        return self.side.fix_rows(ids, stored) if self.side.any else stored


def register_all() -> None:
    """Fill the (cpu, kind) table and the CPU's one-call decode step."""
    from ..registry import register_decoder, register_device_ops
    from .device import CPUOps
    from .fused import build

    register_decoder("cpu", build)
    register_device_ops("cpu", CPUOps())
    for kind in ("f32", "f16", "bf16"):
        register("cpu", kind, DenseOp)
    for kind in _KERNELS:
        register("cpu", kind, group_quant_op)


def group_quant_op(t: Tensor):
    """The op of a grouped quantized weight: n:m sparse ones run the kernels of sparse.py,
    ones with 8-bit activations (W8A8) those of int8.py."""
    if t.activation is not None:
        from .int8 import W8A8Op
        return W8A8Op(t)
    if t.sparsity is not None:
        from .sparse import SparseGroupQuantOp
        return SparseGroupQuantOp(t)
    return GroupQuantOp(t)
