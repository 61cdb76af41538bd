"""CPU backend: Numba kernels (parallel, compiled on first use and cached on disk).

The layouts it runs (the registry reads LINEAR_OPS) and where each one's decode GEMV is:
  f32 / f16 / bf16 dense      dense.DenseOp          dense.gemv_f32 / gemv_f16 / gemv_bf16
  q2 to q6 dense (int4-gG ...) grouped.GroupQuantOp  quant.gemv_q8act on int8 activations
                                                     (groups of 64k columns: group_vnni.rows
                                                     on AVX512-VNNI CPUs, else quant's loops)
  q8 / nf4 dense              grouped.GroupQuantOp   quant.GEMV[kind] on float activations
  any grouped kind, n:m       sparse.SparseGroupQuantOp  q4: gemv_nm_q4_q8act (nm_vnni on
                                                     VNNI+VBMI CPUs); others: gemv_nm
  any grouped kind, W8A8      int8.W8A8Op            per-channel q8: int8.GEMV (vpdpbusd)
Prefill of q4 and W8A8 goes through gemm_vnni on VNNI CPUs, everything else through BLAS on
dequantized rows (base.LinearBase.gemm). The decode step of a whole model is fused.py's; a LoRA
adapter beside any of these is lora.py's LoraOp.

The kernels' numba cache (where, and how it survives damage) is cache.py's; it is set up here,
before the kernels import numba.
"""
from __future__ import annotations

from pathlib import Path

from .cache import setup as _setup_cache

_setup_cache(Path(__file__).resolve().parent)

# After the cache directory is chosen: these import numba.
from qformat.schemes import FLOAT_KINDS, QUANT_KINDS  # noqa: E402

from ..layouts import A8, DENSE, NM  # noqa: E402
from .dense import DenseOp  # noqa: E402
from .device import CPUOps  # noqa: E402
from .fused import build as build_decoder  # noqa: E402
from .grouped import GroupQuantOp  # noqa: E402
from .int8 import W8A8Op  # noqa: E402
from .lora import CpuLoraOp as LoraOp  # noqa: E402
from .sparse import SparseGroupQuantOp  # noqa: E402
from .threads import set_threads  # noqa: E402

LINEAR_OPS = {
    **{(kind, DENSE): DenseOp for kind in FLOAT_KINDS},
    **{(kind, DENSE): GroupQuantOp for kind in QUANT_KINDS},
    **{(kind, NM): SparseGroupQuantOp for kind in QUANT_KINDS},
    **{(kind, A8): W8A8Op for kind in QUANT_KINDS},
}
DEVICE_OPS = CPUOps()

__all__ = ["DEVICE_OPS", "LINEAR_OPS", "LoraOp", "build_decoder", "set_threads"]
