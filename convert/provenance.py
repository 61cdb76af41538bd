"""What every conversion records of where a file came from: the converter, input hashes, time."""
from __future__ import annotations

import hashlib
import os
from datetime import datetime, timezone
from pathlib import Path

import qformat

from .plan import ConvertError

CONVERTER = f"qformat.convert {qformat.__version__}"


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class SourceFiles:
    """A conversion's input files: what stat said of each when the conversion began, and their
    SHA-256 for the provenance. `check_unchanged` before the output is committed catches a file
    edited, truncated or replaced in the meantime, which would leave a file whose tensors and
    recorded hashes describe different inputs."""

    def __init__(self, root: Path, files: list[Path], others: dict[str, Path] | None = None):
        """files: inputs inside root (named relative to it); others: inputs elsewhere, by name."""
        self.names = {str(p.relative_to(root)): p for p in sorted(set(files))} | dict(others or {})
        self.files = list(self.names.values())
        self.stamps = {p: self._stamp(p) for p in self.files}

    @staticmethod
    def _stamp(path: Path) -> tuple[int, ...] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns

    def sha256(self) -> dict[str, str]:
        """File name -> hex SHA-256."""
        return {name: file_sha256(p) for name, p in self.names.items()}

    def check_unchanged(self) -> None:
        """Raise ConvertError naming the first input that changed since the conversion began."""
        for path in self.files:
            if self._stamp(path) != self.stamps[path]:
                raise ConvertError(f"{path}: changed while it was being converted (edited, truncated or replaced); "
                                   "nothing was written; convert again once the model folder is complete")


def created_timestamp() -> str:
    """UTC ISO 8601 now, or SOURCE_DATE_EPOCH when set (reproducible builds convention)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        try:
            when = datetime.fromtimestamp(int(epoch), tz=timezone.utc)
        except ValueError:
            raise ConvertError(f"SOURCE_DATE_EPOCH={epoch!r} is not an integer number of seconds") from None
    else:
        when = datetime.now(timezone.utc)
    return when.replace(microsecond=0).isoformat().replace("+00:00", "Z")
