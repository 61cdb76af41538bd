"""Memory-mapped qbin reader: validates everything before use, then hands out zero-copy views."""
from __future__ import annotations

import json
import mmap
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import xxhash

from .config import GenerationDefaults, ModelArgs, Provenance, TokenizerInfo, from_dict
from .constants import ALIGNMENT, DTYPES, MAGIC, MAX_HEADER_BYTES, PREAMBLE, PREAMBLE_SIZE, VERSION_MAJOR
from .errors import QbinError
from .layout import check_array_entry, check_sidecar_values, check_tensor, tensor_stub
from .schemes import KINDS, BytesKind, Tensor, expand_log_scales


class QbinReader:
    """An open qbin file. `reader[name]` is a Tensor whose arrays are read-only views of the map.

    Opening reads and checks only the preamble and header; tensor bytes are touched when used.
    `verify()` (or `verify=True`) additionally checks every tensor's checksum.
    """

    def __init__(self, path: str | os.PathLike, *, verify: bool = False):
        self.path = Path(path)
        self._map: mmap.mmap | None = None
        size = self._stat()
        with open(self.path, "rb") as f:
            preamble = f.read(PREAMBLE_SIZE)
            if len(preamble) < PREAMBLE_SIZE:
                self._fail(f"truncated: {size} bytes, shorter than the {PREAMBLE_SIZE}-byte preamble")
            magic, major, minor, header_len, file_size, header_hash = PREAMBLE.unpack(preamble)
            if magic != MAGIC:
                self._fail(f"not a qbin file (starts with {magic!r}, expected {MAGIC!r})")
            if major != VERSION_MAJOR:
                self._fail(f"qbin version {major}.{minor} is not supported: this qformat reads "
                           f"{VERSION_MAJOR}.x; install a qformat that reads version {major}")
            if header_len > MAX_HEADER_BYTES:
                self._fail(f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit; "
                           "the file is corrupted")
            if file_size != size:
                self._fail(f"size is {size} bytes but the file records {file_size}: "
                           f"{'truncated' if size < file_size else 'trailing bytes or corrupted'}; re-copy or re-convert it")
            if PREAMBLE_SIZE + header_len > size:
                self._fail(f"truncated: header of {header_len} bytes runs past the end of the file")
            raw = f.read(header_len)
        if xxhash.xxh3_64_intdigest(raw) != header_hash:
            self._fail("header checksum mismatch: the header is corrupted; re-copy or re-convert the file")
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            # ValueError covers JSONDecodeError and integers past Python's digit limit;
            # RecursionError a pathologically nested document.
            self._fail(f"malformed header JSON ({type(e).__name__}: {e})")
        if not isinstance(header, dict):
            self._fail("malformed header: not a JSON object")
        self.version = (major, minor)
        self.header: dict = header
        self.file_size = size
        self.header_end = PREAMBLE_SIZE + header_len
        self.data_offset = -(-self.header_end // ALIGNMENT) * ALIGNMENT
        self._entries = self._check_directory()
        self.model: ModelArgs = self._parse(ModelArgs, "model", required=True)
        self.tokenizer: TokenizerInfo | None = self._parse(TokenizerInfo, "tokenizer")
        if self.tokenizer is not None and (not isinstance(self.tokenizer.tensor, str)
                                           or self.tokenizer.tensor not in self._entries):
            self._fail(f"tokenizer tensor {self.tokenizer.tensor!r} is missing from the directory")
        self.generation: GenerationDefaults = self._parse(GenerationDefaults, "generation") or GenerationDefaults()
        self.provenance: Provenance = self._parse(Provenance, "provenance") or Provenance()
        self.chat_template: str | None = header.get("chat_template")
        if self.chat_template is not None and not isinstance(self.chat_template, str):
            self._fail("header field 'chat_template' is not a string or null")
        if size > 0:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._tensors: dict[str, Tensor] = {}
        if verify:
            self.verify()

    # -- validation --------------------------------------------------------
    def _fail(self, problem: str):
        raise QbinError(self.path, problem)

    def _stat(self) -> int:
        if not self.path.exists():
            self._fail("no such file")
        if self.path.is_dir():
            self._fail("is a directory, not a qbin file")
        size = self.path.stat().st_size
        if size == 0:
            self._fail("empty file (0 bytes); re-run the conversion")
        return size

    def _parse(self, cls, key: str, required: bool = False):
        value = self.header.get(key)
        if value is None:
            if required:
                self._fail(f"header has no {key!r} section")
            return None
        if not isinstance(value, dict):
            self._fail(f"header section {key!r} is not an object")
        try:
            return from_dict(cls, value)
        except (TypeError, ValueError, AttributeError) as e:
            self._fail(f"header section {key!r} is invalid: {e}")

    def _check_directory(self) -> dict[str, dict]:
        tensors = self.header.get("tensors")
        if not isinstance(tensors, dict):
            self._fail("header has no 'tensors' directory")
        data_len = self.file_size - self.data_offset
        spans = []
        for name, entry in tensors.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("arrays"), dict):
                self._fail(f"tensor {name!r}: entry has no 'arrays' object")
            specs = {}
            try:
                for role, a in entry["arrays"].items():
                    dtype, shape, offset, nbytes, _ = check_array_entry(name, role, a)
                    if offset % ALIGNMENT:
                        raise ValueError(f"tensor {name!r}.{role}: offset {offset} is not {ALIGNMENT}-byte aligned")
                    if offset + nbytes > data_len:
                        raise ValueError(f"tensor {name!r}.{role}: bytes [{offset}, {offset + nbytes}) run past "
                                         f"the end of the data ({data_len} bytes); the file is truncated or corrupted")
                    specs[role] = (dtype, shape)
                    spans.append((offset, offset + nbytes, f"{name}.{role}"))
                check_tensor(name, {k: v for k, v in entry.items() if k != "arrays"}, specs)
            except ValueError as e:
                self._fail(str(e))
        # Compare each array with the furthest-reaching one before it, not only its neighbour:
        # an empty array between two others must not hide their overlap.
        spans.sort()
        reach, owner = 0, None
        for start, end, label in spans:
            if start < reach and end > start:
                self._fail(f"arrays {owner} and {label} overlap (bytes {start}..{min(reach, end)}); "
                           "the file is corrupted")
            if end > reach:
                reach, owner = end, label
        return tensors

    # -- access ------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return list(self._entries)

    def __getitem__(self, name: str) -> Tensor:
        t = self._tensors.get(name)
        if t is None:
            if name not in self._entries:
                raise KeyError(f"{self.path}: no tensor named {name!r}")
            entry = self._entries[name]
            t = tensor_stub(name, {k: v for k, v in entry.items() if k != "arrays"})
            t.arrays = {role: self._view(a) for role, a in entry["arrays"].items()}
            try:
                check_sidecar_values(t)
            except ValueError as e:
                self._fail(str(e))
            # log-coded scales (spec §4.3) are decoded once, to the float16 every kernel reads
            t = expand_log_scales(t)
            self._tensors[name] = t
        return t

    def get(self, name: str) -> Tensor | None:
        return self[name] if name in self._entries else None

    def _view(self, a: dict) -> np.ndarray:
        dtype = DTYPES[a["dtype"]]
        count = a["nbytes"] // dtype.itemsize
        if count == 0:
            empty = np.zeros(a["shape"], dtype)
            empty.flags.writeable = False  # like every other view of the file
            return empty
        arr = np.frombuffer(self._map, dtype=dtype, count=count, offset=self.data_offset + a["offset"])
        return arr.reshape(a["shape"])

    def raw_bytes(self, name: str) -> bytes:
        """Contents of a "bytes" or "xz" tensor (a tokenizer file), decompressed."""
        t = self[name]
        kind = KINDS[t.kind]
        if not isinstance(kind, BytesKind):
            self._fail(f"tensor {name!r} is of kind {t.kind}, not a stored file (bytes or xz)")
        try:
            return kind.contents(t)
        except ValueError as e:
            self._fail(f"{e}; re-copy or re-convert it")

    def array_entries(self, name: str) -> dict[str, dict]:
        """The directory entries (dtype, shape, offset, nbytes, xxh3) of a tensor's arrays."""
        return self._entries[name]["arrays"]

    # -- integrity ---------------------------------------------------------
    def verify(self) -> int:
        """Check every array against its xxh3 checksum and every padding byte for zero.

        Returns the number of arrays checked.
        """
        self._verify_padding()
        n = 0
        for name, entry in self._entries.items():
            for role, a in entry["arrays"].items():
                start = self.data_offset + a["offset"]
                digest = xxhash.xxh3_64_hexdigest(memoryview(self._map)[start:start + a["nbytes"]])
                if digest != a["xxh3"]:
                    self._fail(f"checksum mismatch in tensor {name!r} array {role!r} "
                               f"(stored {a['xxh3']}, computed {digest}): the data is corrupted")
                n += 1
        return n

    def _verify_padding(self) -> None:
        """The bytes that belong to no array (header padding, gaps, tail) must be zero (spec §1)."""
        spans = sorted((self.data_offset + a["offset"], self.data_offset + a["offset"] + a["nbytes"])
                       for entry in self._entries.values() for a in entry["arrays"].values())
        cursor = self.header_end
        for start, end in spans + [(self.file_size, self.file_size)]:
            if start > cursor:
                gap = np.frombuffer(self._map, np.uint8, count=start - cursor, offset=cursor)
                if gap.any():
                    where = cursor + int(np.flatnonzero(gap)[0])
                    self._fail(f"non-zero padding byte at file offset {where} (outside every array): "
                               "the file is corrupted")
            cursor = max(cursor, end)

    def close(self) -> None:
        """Release the map. Views handed out earlier keep it alive until they are gone."""
        self._tensors.clear()
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # numpy views still reference the map; it is unmapped when they are freed
            self._map = None

    def __enter__(self) -> "QbinReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_qbin(path: str | os.PathLike, *, verify: bool = False) -> QbinReader:
    """Open and validate a qbin file (see QbinReader)."""
    return QbinReader(path, verify=verify)
