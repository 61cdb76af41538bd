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
dequantized rows (base.LinearBase.gemm). The decode step of a whole model is fused.py's.

Numba reads its cache location when it is first imported, so it is chosen here, before the
kernels import numba: beside the package when that directory is writable, otherwise in the
user's cache directory, unless the user already set NUMBA_CACHE_DIR. Either way in a folder
named by a hash of the sources the kernels are compiled from (this package's and the format
core's, whose tables fused.py's constants come from): numba keys a cached function on its own
file only, so a kernel that another module calls (sparse.gemv_nm_q4_q8act from
fused.decode_step) would otherwise run stale after an edit.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def _user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qformat" / "numba"


def sources_key(package_dir: Path) -> str:
    """16 hex digits of the SHA-256 of the Python sources of package_dir, of kernels/ above it and
    of the format core (names and contents), and "-portable" under QFORMAT_PORTABLE_KERNELS=1
    (kernels compiled without the AVX-512 paths)."""
    from qformat import schemes

    from .features import PORTABLE

    h = hashlib.sha256()
    for folder in (package_dir, package_dir.parent, Path(schemes.__file__).resolve().parent):
        for path in sorted(folder.glob("*.py")):
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16] + ("-portable" if PORTABLE else "")


def cache_dir(package_dir: Path) -> Path | None:
    """Where numba should cache the kernels: None when the user set NUMBA_CACHE_DIR; else
    package_dir/__pycache__/numba/<sources_key>, or the user cache directory's
    qformat/numba/<sources_key> when the package directory is read-only."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return None
    base = package_dir / "__pycache__" / "numba" if os.access(package_dir, os.W_OK) else _user_cache_dir()
    return base / sources_key(package_dir)


def _choose_cache_dir() -> None:
    path = cache_dir(Path(__file__).resolve().parent)
    if path is None:
        return
    path.mkdir(parents=True, exist_ok=True)
    os.environ["NUMBA_CACHE_DIR"] = str(path)
    import sys
    if "numba" in sys.modules:  # imported before us: tell the already-loaded config as well
        import numba
        numba.config.CACHE_DIR = str(path)


_choose_cache_dir()

# After the cache directory is chosen: these import numba.
from qformat.schemes import FLOAT_KINDS, QUANT_KINDS  # noqa: E402

from ..layouts import A8, DENSE, NM  # noqa: E402
from .dense import DenseOp  # noqa: E402
from .device import CPUOps  # noqa: E402
from .fused import build as build_decoder  # noqa: E402
from .grouped import GroupQuantOp  # noqa: E402
from .int8 import W8A8Op  # noqa: E402
from .sparse import SparseGroupQuantOp  # noqa: E402
from .threads import set_threads  # noqa: E402

LINEAR_OPS = {
    **{(kind, DENSE): DenseOp for kind in FLOAT_KINDS},
    **{(kind, DENSE): GroupQuantOp for kind in QUANT_KINDS},
    **{(kind, NM): SparseGroupQuantOp for kind in QUANT_KINDS},
    **{(kind, A8): W8A8Op for kind in QUANT_KINDS},
}
DEVICE_OPS = CPUOps()

__all__ = ["DEVICE_OPS", "LINEAR_OPS", "build_decoder", "cache_dir", "set_threads", "sources_key"]
