"""CPU backend: Numba kernels (parallel, compiled once and cached on disk).

Numba reads its cache location when it is first imported, so it is chosen here, before the
kernels import numba: beside the package when that directory is writable, otherwise in the
user's cache directory, unless the user already set NUMBA_CACHE_DIR. Either way in a folder
named by a hash of this package's sources: numba keys a cached function on its own file only,
so a kernel that another module calls (sparse.gemv_nm_q4_q8act from fused.decode_step) would
otherwise run stale after an edit.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def _user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qformat" / "numba"


def sources_key(package_dir: Path) -> str:
    """16 hex digits of the SHA-256 of the package's Python sources (names and contents), and
    "-portable" under QFORMAT_PORTABLE_KERNELS=1 (kernels compiled without the AVX-512 paths)."""
    from .features import PORTABLE

    h = hashlib.sha256()
    for path in sorted(package_dir.glob("*.py")):
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

from .linear import register_all  # noqa: E402  (after the cache directory is chosen)
from .threads import set_threads  # noqa: E402

register_all()

__all__ = ["cache_dir", "set_threads", "sources_key"]
