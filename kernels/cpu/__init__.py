"""CPU backend: Numba kernels (parallel, compiled once and cached on disk).

Numba reads its cache location when it is first imported, so it is chosen here, before the
kernels import numba: beside the package when that directory is writable (numba's default),
otherwise in the user's cache directory, unless the user already set NUMBA_CACHE_DIR.
"""
from __future__ import annotations

import os
from pathlib import Path


def _user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qformat" / "numba"


def cache_dir(package_dir: Path) -> Path | None:
    """Where numba should cache the kernels: None for numba's default (beside the sources, or the
    user's NUMBA_CACHE_DIR); the user cache directory when the package directory is read-only."""
    if os.environ.get("NUMBA_CACHE_DIR") or os.access(package_dir, os.W_OK):
        return None
    return _user_cache_dir()


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

__all__ = ["cache_dir", "set_threads"]
