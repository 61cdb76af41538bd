"""Streaming qbin writer.

Stages are explicit: OPEN (tensors are added, their bytes streamed to a scratch file), then
FINISHED (header written, file renamed into place) or ABORTED. Only one tensor is in memory at
a time. The destination appears only when the file is complete and flushed: data goes to a
hidden scratch file beside it, the final file is assembled under a temporary name, fsync'd, and
renamed over the destination.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import xxhash

from .constants import ALIGNMENT, DTYPES, KIND_LAYOUTS, MAGIC, PREAMBLE, PREAMBLE_SIZE, VERSION_MAJOR, VERSION_MINOR
from .config import GenerationDefaults, ModelArgs, Provenance, TokenizerInfo
from .layout import check_sidecar_values, check_tensor
from .schemes import Tensor

_DTYPE_NAMES = {"float32": "f32", "float16": "f16", "int8": "i8", "uint8": "u8", "int16": "i16",
                "uint16": "u16", "int32": "i32", "uint32": "u32", "int64": "i64"}


class Stage(enum.Enum):
    OPEN = "open"
    FINISHED = "finished"
    ABORTED = "aborted"


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    return -(-n // alignment) * alignment


class QbinWriter:
    """Write a qbin file: `add_tensor` for each tensor, then `finish` with the metadata.

    Use as a context manager: leaving the block by an exception aborts and removes every
    scratch file, and the destination is never touched.
    """

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = False):
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"{self.path}: already exists; pass overwrite (--force) to replace it")
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"{self.path}: directory {self.path.parent} does not exist")
        self.stage = Stage.OPEN
        fd, scratch = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".data.tmp", dir=self.path.parent)
        self._scratch_path = Path(scratch)
        self._scratch = os.fdopen(fd, "w+b")
        self._final_tmp: Path | None = None
        self._tensors: dict[str, dict] = {}
        self._size = 0

    # -- stage OPEN --------------------------------------------------------
    def add_tensor(self, t: Tensor) -> None:
        """Stream one tensor's arrays to disk and record its directory entry."""
        self._require(Stage.OPEN, "add_tensor")
        if t.name in self._tensors:
            raise ValueError(f"tensor {t.name!r} added twice")
        specs = {}
        for role, arr in t.arrays.items():
            specs[role] = (self._dtype_name(t, role, arr), tuple(arr.shape))
        meta = t.meta()
        meta["layout"] = KIND_LAYOUTS[t.kind]
        check_tensor(t.name, meta, specs)
        check_sidecar_values(t)
        entry = dict(meta)
        entry["arrays"] = {role: self._write_array(np.asarray(arr), specs[role][0]) for role, arr in t.arrays.items()}
        self._tensors[t.name] = entry

    def add_bytes(self, name: str, data: bytes) -> None:
        """Store an opaque byte string as a tensor of kind "bytes" (a tokenizer: `xz_tensor`)."""
        arr = np.frombuffer(data, dtype=np.uint8)
        self.add_tensor(Tensor(name, "bytes", (arr.size,), {"data": arr}))

    @staticmethod
    def _dtype_name(t: Tensor, role: str, arr: np.ndarray) -> str:
        if t.kind == "bf16" and role == "data":
            if arr.dtype != np.uint16:
                raise ValueError(f"tensor {t.name!r}: bf16 data must be given as uint16 bits")
            return "bf16"
        name = _DTYPE_NAMES.get(arr.dtype.name)
        if name is None:
            raise ValueError(f"tensor {t.name!r}.{role}: dtype {arr.dtype} cannot be stored")
        return name

    def _write_array(self, arr: np.ndarray, dtype: str) -> dict:
        offset = align_up(self._size)
        if offset > self._size:
            self._scratch.write(b"\0" * (offset - self._size))
        data = np.ascontiguousarray(arr, dtype=DTYPES[dtype])
        buf = memoryview(data).cast("B") if data.size else memoryview(b"")
        self._scratch.write(buf)
        self._size = offset + data.nbytes
        return _array_entry(dtype, arr.shape, offset, data.nbytes, xxhash.xxh3_64_hexdigest(buf))

    # -- OPEN -> FINISHED --------------------------------------------------
    def finish(self, *, model: ModelArgs, tokenizer: TokenizerInfo | None = None,
               chat_template: str | None = None, generation: GenerationDefaults | None = None,
               provenance: Provenance | None = None) -> Path:
        """Write the header, assemble the file, and move it into place. Returns the path."""
        self._require(Stage.OPEN, "finish")
        if tokenizer is not None and tokenizer.tensor not in self._tensors:
            raise ValueError(f"tokenizer tensor {tokenizer.tensor!r} was not added")
        raw = header_json(self._tensors, model, tokenizer, chat_template, generation, provenance)
        data_offset = align_up(PREAMBLE_SIZE + len(raw))
        file_size = data_offset + self._size
        fd, final_tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self._final_tmp = Path(final_tmp)
        with os.fdopen(fd, "wb") as out:
            out.write(PREAMBLE.pack(MAGIC, VERSION_MAJOR, VERSION_MINOR, len(raw), file_size,
                                    xxhash.xxh3_64_intdigest(raw)))
            out.write(raw)
            out.write(b"\0" * (data_offset - PREAMBLE_SIZE - len(raw)))
            self._scratch.flush()
            self._scratch.seek(0)
            shutil.copyfileobj(self._scratch, out, 16 << 20)
            out.flush()
            os.fsync(out.fileno())
        self._scratch.close()
        self._scratch_path.unlink(missing_ok=True)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self._final_tmp, 0o666 & ~umask)  # mkstemp makes 0600; a model file is for all
        os.replace(self._final_tmp, self.path)
        self._final_tmp = None
        _fsync_dir(self.path.parent)
        self.stage = Stage.FINISHED
        return self.path

    def abort(self) -> None:
        """Drop everything written so far; the destination is left as it was."""
        if self.stage is Stage.FINISHED:
            return
        self.stage = Stage.ABORTED
        try:
            self._scratch.close()  # flushes, so on a full disk it raises again
        except OSError:
            pass
        finally:
            self._scratch_path.unlink(missing_ok=True)
            if self._final_tmp is not None:
                self._final_tmp.unlink(missing_ok=True)

    def _require(self, stage: Stage, what: str) -> None:
        if self.stage is not stage:
            raise RuntimeError(f"{what}() called on a writer that is {self.stage.value}")

    @property
    def data_nbytes(self) -> int:
        """Bytes of tensor data written so far."""
        return self._size

    def __enter__(self) -> "QbinWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.stage is Stage.OPEN:
            self.abort()
            if exc_type is None:
                raise RuntimeError(f"{self.path}: writer closed without finish(); nothing was written")


def _array_entry(dtype: str, shape, offset: int, nbytes: int, digest: str) -> dict:
    return {"dtype": dtype, "shape": list(shape), "offset": offset, "nbytes": nbytes, "xxh3": digest}


def header_json(tensors: dict[str, dict], model: ModelArgs, tokenizer: TokenizerInfo | None = None,
                chat_template: str | None = None, generation: GenerationDefaults | None = None,
                provenance: Provenance | None = None) -> bytes:
    """The header a file with these directory entries and metadata has (spec §2), as bytes."""
    header = {
        "model": dataclasses.asdict(model),
        "tokenizer": dataclasses.asdict(tokenizer) if tokenizer else None,
        "chat_template": chat_template,
        "generation": dataclasses.asdict(generation or GenerationDefaults()),
        "provenance": dataclasses.asdict(provenance or Provenance()),
        "tensors": tensors,
    }
    return json.dumps(header, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


class QbinSizer:
    """The exact size of a file before it is written: the writer's directory, built from each
    tensor's layout and its arrays' (role, dtype, shape) alone (digests are fixed-length).
    Add tensors in the order the writer will receive them."""

    def __init__(self):
        self._tensors: dict[str, dict] = {}
        self._size = 0

    def add(self, t: Tensor, arrays: list[tuple[str, str, tuple[int, ...]]]) -> None:
        """A tensor `t` (its layout fields; its arrays are ignored) with these arrays."""
        entry = t.meta()
        entry["layout"] = KIND_LAYOUTS[t.kind]
        entry["arrays"] = {}
        for role, dtype, shape in arrays:
            offset = align_up(self._size)
            nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
            entry["arrays"][role] = _array_entry(dtype, shape, offset, nbytes, "0" * 16)
            self._size = offset + nbytes
        self._tensors[t.name] = entry

    def add_stored(self, t: Tensor) -> None:
        """A tensor whose arrays are already built (a tokenizer file)."""
        self.add(t, [(role, _DTYPE_NAMES[a.dtype.name], a.shape) for role, a in t.arrays.items()])

    def file_size(self, **metadata) -> int:
        """Bytes of the file, given finish()'s keyword arguments."""
        return align_up(PREAMBLE_SIZE + len(header_json(self._tensors, **metadata))) + self._size


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
