"""Where numba caches the compiled kernels, and a cache that survives what machines do to it.

Numba reads its cache location when it is first imported, so `setup()` runs before the kernels
import numba: the kernels are cached beside the package when that folder is writable, else in the
user's cache folder, else in a private folder under the temporary directory (a read-only install
and a read-only home), unless the user set NUMBA_CACHE_DIR. Each in a folder named by a hash of
the sources the kernels are compiled from (this package's and the format core's, whose tables
fused.py's constants come from): numba keys a cached function on its own file only, so a kernel
that another module calls (sparse.gemv_nm_q4_q8act from fused.decode_step) would otherwise run
stale after an edit.

Numba's own cache files trust the disk: a truncated or damaged entry is a traceback from pickle
or LLVM at the first call, a full disk while saving one is an OSError out of the compiler, and
two processes compiling different signatures of one function at once can leave an index that
names the other's code. `CheckedCacheFile` replaces numba's IndexDataCacheFile (process-wide,
for every function cached after `setup()`): each entry it writes ends in a trailer that binds
it to its key and its bytes; an entry that is unreadable, damaged or written for another key
is a miss (the kernel compiles again and replaces it), and an entry that cannot be saved is
skipped. The trailer follows the pickle, which ignores trailing bytes, so plain numba still
reads these files.
"""
from __future__ import annotations

import functools
import hashlib
import os
import pickle
import stat
import sys
import tempfile
import uuid
from pathlib import Path

TRAILER_MAGIC = b"QFNBC\x00\x01\x00"
DIGEST = 16
TRAILER_SIZE = len(TRAILER_MAGIC) + 2 * DIGEST


def _user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qformat" / "numba"


def _private_temp_dir() -> Path | None:
    """tempdir/qformat-numba-UID, made private to this user; None if it exists and is not ours
    alone (another user could otherwise plant compiled code in it)."""
    path = Path(tempfile.gettempdir()) / f"qformat-numba-{os.getuid()}"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        st = path.lstat()
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        return None
    return path


def _writable(path: Path) -> bool:
    """Whether a file can be created in `path` (made if missing): tried, not os.access, which
    answers yes to root on a read-only mount."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{uuid.uuid4().hex[:12]}"
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False


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


def cache_candidates(package_dir: Path):
    """The folders the kernels may be cached in, in order of preference (the private temporary
    one is made only when the others are passed over)."""
    key = sources_key(package_dir)
    yield package_dir / "__pycache__" / "numba" / key
    yield _user_cache_dir() / key
    temp = _private_temp_dir()
    if temp is not None:
        yield temp / key


def cache_dir(package_dir: Path) -> Path | None:
    """Where numba should cache the kernels: None when the user set NUMBA_CACHE_DIR; else the
    first writable folder of cache_candidates(package_dir). Raises RuntimeError naming them all
    when none is."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return None
    tried = []
    for path in cache_candidates(package_dir):
        if _writable(path):
            return path
        tried.append(str(path))
    raise RuntimeError(f"qformat: no writable folder for the compiled kernels (tried {', '.join(tried)}); "
                       "set NUMBA_CACHE_DIR to one")


def setup(package_dir: Path) -> None:
    """Choose the kernels' cache folder (before numba is imported, or tell numba's loaded config)
    and make numba's cache files CheckedCacheFile."""
    path = cache_dir(package_dir)
    if path is not None:
        if path.parent.name == f"qformat-numba-{os.getuid()}":  # the last resort: say so
            print(f"qformat: the package folder and {_user_cache_dir()} are read-only; the kernels are cached "
                  f"in {path} until the temporary folder is cleared (or set NUMBA_CACHE_DIR)", file=sys.stderr)
        os.environ["NUMBA_CACHE_DIR"] = str(path)
        if "numba" in sys.modules:
            import numba
            numba.config.CACHE_DIR = str(path)
    from numba.core import caching

    caching.IndexDataCacheFile = checked_cache_file()


def _debug(message: str) -> None:
    """One line on stderr under NUMBA_DEBUG_CACHE=1 (numba's own cache log goes to stdout)."""
    import numba

    if numba.config.DEBUG_CACHE:
        print(f"qformat cache: {message}", file=sys.stderr)


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST).digest()


def seal(payload: bytes, key: object) -> bytes:
    """payload followed by the trailer binding it to `key` (by its repr: numba's keys are tuples
    of types, strings and hashes) and to its own bytes."""
    return payload + TRAILER_MAGIC + _digest(repr(key).encode()) + _digest(payload)


def unseal(data: bytes, key: object) -> bytes | None:
    """The payload of a sealed entry, or None when it is not one, is damaged or is another key's."""
    if len(data) < TRAILER_SIZE:
        return None
    payload, trailer = data[:-TRAILER_SIZE], data[-TRAILER_SIZE:]
    if (trailer[:len(TRAILER_MAGIC)] != TRAILER_MAGIC or trailer[-DIGEST:] != _digest(payload)
            or trailer[len(TRAILER_MAGIC):-DIGEST] != _digest(repr(key).encode())):
        return None
    return payload


@functools.cache
def checked_cache_file() -> type:
    """CheckedCacheFile, a subclass of numba's IndexDataCacheFile (made on first use: importing
    numba must wait until setup() chose the folder)."""
    from numba.core import caching

    class CheckedCacheFile(caching.IndexDataCacheFile):
        """numba's index-and-data cache files, each entry sealed (see the module's docstring)."""

        warned = False

        def save(self, key, data):
            try:
                overloads = self._load_index()
                data_name = overloads.get(key)
                if data_name is None:
                    taken = set(overloads.values())
                    data_name = next(n for n in map(self._data_name, range(1, len(taken) + 2)) if n not in taken)
                    overloads[key] = data_name
                    self._save_index(overloads)
                with self._open_for_write(self._data_path(data_name)) as f:
                    f.write(seal(self._dump(data), key))
                _debug(f"saved entry {self._data_path(data_name)}")
            except OSError as e:
                self._warn(f"cannot save a compiled kernel in {self._cache_path} ({e.strerror or e}); "
                           "it compiles again next time")

        def load(self, key):
            data_name = self._load_index().get(key)
            if data_name is None:
                return None
            path = self._data_path(data_name)
            try:
                with open(path, "rb") as f:
                    payload = unseal(f.read(), key)
                if payload is not None:
                    return pickle.loads(payload)
            except FileNotFoundError:
                return None
            except Exception:  # noqa: BLE001 - any damage is a miss: the kernel compiles again
                pass
            _debug(f"damaged entry {path}")
            return None

        def _save_index(self, overloads):
            payload = self._dump((self._source_stamp, overloads))
            with self._open_for_write(self._index_path) as f:
                pickle.dump(self._version, f, protocol=-1)
                f.write(seal(payload, self._index_name))

        def _load_index(self):
            try:
                with open(self._index_path, "rb") as f:
                    if pickle.load(f) != self._version:
                        return {}
                    payload = unseal(f.read(), self._index_name)
                if payload is not None:
                    stamp, overloads = pickle.loads(payload)
                    return overloads if stamp == self._source_stamp and isinstance(overloads, dict) else {}
            except FileNotFoundError:
                return {}
            except Exception:  # noqa: BLE001 - truncated or damaged: an empty index
                pass
            _debug(f"damaged index {self._index_path}")
            return {}

        @classmethod
        def _warn(cls, message: str) -> None:
            if not cls.warned:
                cls.warned = True
                print(f"qformat: {message}", file=sys.stderr)

    return CheckedCacheFile

