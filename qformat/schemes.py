"""Tensor kinds and quantization schemes: the NumPy reference of every stored layout.

A *kind* (f16, q4, nf4, ...) says how a tensor's arrays are laid out; a *scheme* (int4-g64,
nf4-g64, ...) is what the converter's CLI names: a kind plus a group size and symmetry.
KINDS maps a kind name to the class that validates and dequantizes it; kernels register their
fast versions against the same names in qformat.kernels.
"""
from __future__ import annotations

import dataclasses
import lzma
import re
from dataclasses import dataclass

import numpy as np

from .constants import LOG_SCALE_FRACTIONS, LOG_SCALE_MIN, LOG_SCALE_STEPS, NF4_LEVELS
from .packing import pack_codes, row_nbytes, unpack_codes


# ---------------------------------------------------------------------------- float helpers

def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """Widen bf16 stored as uint16 to float32 (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to bf16 (nearest, ties to even), returned as uint16 bits."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    nan = np.isnan(x)
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    out[nan] = 0x7FC0
    return out


# ---------------------------------------------------------------------------- tensors

@dataclass
class Tensor:
    """One logical tensor: its kind, logical shape, layout parameters and named arrays.

    For quantized kinds `shape` is (out_features, in_features) and arrays hold at least
    "codes" and "scales"; see spec/qbin.md for every optional sidecar.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    arrays: dict[str, np.ndarray]
    group_size: int = 0
    symmetric: bool = False
    sparsity: tuple[int, int] | None = None  # (n, m): n kept of every m input columns
    activation: dict | None = None  # {"bits": 8, "mode": "dynamic" | "static"} for W8A8

    def meta(self) -> dict:
        """Layout parameters as stored in the header (arrays excluded)."""
        out: dict = {"kind": self.kind, "shape": list(self.shape)}
        if self.kind in QUANT_KINDS:
            out["group_size"] = self.group_size
            out["symmetric"] = self.symmetric
            if self.sparsity is not None:
                out["sparsity"] = list(self.sparsity)
            if self.activation is not None:
                out["activation"] = dict(self.activation)
        return out

    def dequantize(self) -> np.ndarray:
        """The tensor as float32, through the NumPy reference of its kind."""
        return KINDS[self.kind].dequantize(self)

    def take_rows(self, ids) -> "Tensor":
        """The tensor of rows `ids` of this 2-D tensor, sidecars included: what an embedding
        lookup dequantizes (spec §6: row arrays are sliced, column arrays kept, the outliers'
        CSR rows gathered)."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        rows, k = self.shape
        arrays = {}
        for role, a in self.arrays.items():
            if role in _ROW_ARRAYS:
                arrays[role] = np.asarray(a)[ids]
            elif role not in _CSR_ARRAYS:
                arrays[role] = a
        if "outlier_rowptr" in self.arrays:
            ptr = np.asarray(self.arrays["outlier_rowptr"], np.int64)
            counts = ptr[ids + 1] - ptr[ids]
            sel = np.concatenate([np.arange(ptr[r], ptr[r + 1]) for r in ids]) if ids.size else np.zeros(0, np.int64)
            arrays["outlier_rowptr"] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
            arrays["outlier_cols"] = np.asarray(self.arrays["outlier_cols"])[sel.astype(np.int64)]
            arrays["outlier_values"] = np.asarray(self.arrays["outlier_values"])[sel.astype(np.int64)]
        return Tensor(self.name, self.kind, (ids.size, k), arrays, self.group_size, self.symmetric,
                      self.sparsity, self.activation)

    def row_range(self, start: int, stop: int, name: str | None = None) -> "Tensor":
        """Rows start..stop-1 of this 2-D tensor as a tensor of its own, its row arrays views of
        this one's (no copy of a memory-mapped file): one expert of a stacked MoE weight."""
        rows, k = self.shape
        if not 0 <= start < stop <= rows:
            raise ValueError(f"{self.name}: rows {start}..{stop} are outside its {rows}")
        arrays = {}
        for role, a in self.arrays.items():
            if role in _ROW_ARRAYS:
                arrays[role] = a[start:stop]
            elif role not in _CSR_ARRAYS:
                arrays[role] = a
        if "outlier_rowptr" in self.arrays:
            ptr = np.asarray(self.arrays["outlier_rowptr"], np.int64)
            lo, hi = int(ptr[start]), int(ptr[stop])
            arrays["outlier_rowptr"] = (ptr[start:stop + 1] - lo).astype(np.int32)
            arrays["outlier_cols"] = self.arrays["outlier_cols"][lo:hi]
            arrays["outlier_values"] = self.arrays["outlier_values"][lo:hi]
        return Tensor(name or self.name, self.kind, (stop - start, k), arrays, self.group_size, self.symmetric,
                      self.sparsity, self.activation)

    @staticmethod
    def stack_rows(name: str, parts: list["Tensor"]) -> "Tensor":
        """One tensor of `parts` (one kind and width) stacked along the rows: row_range's inverse,
        for a mixture's experts quantized one by one. Arrays that are not per row (a permutation,
        16-bit columns' indices) must be the same in every part."""
        first = parts[0]
        arrays = {}
        for role, a in first.arrays.items():
            if role in _ROW_ARRAYS:
                arrays[role] = np.concatenate([np.asarray(p.arrays[role]) for p in parts])
            elif role not in _CSR_ARRAYS:
                if not all(np.array_equal(np.asarray(p.arrays[role]), np.asarray(a)) for p in parts[1:]):
                    raise ValueError(f"{name}: the stacked parts differ in their {role}; they cannot be one tensor")
                arrays[role] = a
        if "outlier_rowptr" in first.arrays:
            ptrs = [np.asarray(p.arrays["outlier_rowptr"], np.int64) for p in parts]
            base = np.cumsum([0] + [int(q[-1]) for q in ptrs[:-1]])
            arrays["outlier_rowptr"] = np.concatenate([[0]] + [q[1:] + b for q, b in zip(ptrs, base)]).astype(np.int32)
            for role in ("outlier_cols", "outlier_values"):
                arrays[role] = np.concatenate([np.asarray(p.arrays[role]) for p in parts])
        rows = sum(p.shape[0] for p in parts)
        return Tensor(name, first.kind, (rows, first.shape[1]), arrays, first.group_size, first.symmetric,
                      first.sparsity, first.activation)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


# Arrays with one entry per row (sliced by Tensor.take_rows), and the outliers' CSR triple.
_ROW_ARRAYS = frozenset({"data", "codes", "scales", "zeros", "offsets", "sparse_index", "fp_weight"})
_CSR_ARRAYS = frozenset({"outlier_rowptr", "outlier_cols", "outlier_values"})


# ---------------------------------------------------------------------------- kinds

class Kind:
    """A stored layout: which arrays a tensor of this kind has, and how to read them back."""

    name: str

    def expected_arrays(self, t: Tensor) -> dict[str, tuple[tuple[str, ...], tuple[int, ...] | None]]:
        """role -> (allowed dtypes, exact shape or None when checked elsewhere)."""
        raise NotImplementedError

    def required(self, t: Tensor, present: frozenset[str] = frozenset()) -> set[str]:
        """The roles a tensor must have, given the roles `present` (alternatives: zeros or offsets)."""
        raise NotImplementedError

    def dequantize(self, t: Tensor) -> np.ndarray:
        raise NotImplementedError


class FloatKind(Kind):
    def __init__(self, name: str):
        self.name = name

    def expected_arrays(self, t):
        return {"data": ((self.name,), tuple(t.shape))}

    def required(self, t, present=frozenset()):
        return {"data"}

    def dequantize(self, t):
        data = t.arrays["data"]
        if self.name == "bf16":
            return bf16_to_f32(data).reshape(t.shape)
        return np.asarray(data, dtype=np.float32).reshape(t.shape)


class BytesKind(Kind):
    name = "bytes"

    def expected_arrays(self, t):
        return {"data": (("u8",), tuple(t.shape))}

    def required(self, t, present=frozenset()):
        return {"data"}

    def dequantize(self, t):
        raise TypeError(f"tensor {t.name} holds bytes, not numbers")

    def contents(self, t: Tensor) -> bytes:
        """The file the tensor holds."""
        return np.asarray(t.arrays["data"]).tobytes()


class XzKind(BytesKind):
    """A file compressed with xz (LZMA2); the logical shape is its length once decompressed."""

    name = "xz"

    def expected_arrays(self, t):
        return {"data": (("u8",), None)}

    def contents(self, t: Tensor) -> bytes:
        if len(t.shape) != 1:
            raise ValueError(f"tensor {t.name!r}: an xz tensor's shape is [length], not {list(t.shape)}")
        n = int(t.shape[0])
        if n > MAX_XZ_BYTES:  # a fuzzer's find: a length past ssize_t overflowed the decoder
            raise ValueError(f"tensor {t.name!r}: an xz tensor of {n} bytes is past the {MAX_XZ_BYTES}-byte limit")
        # the logical length bounds the output, so a corrupted stream cannot make us allocate more
        decoder = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        try:
            out = decoder.decompress(np.asarray(t.arrays["data"]).tobytes(), max_length=n + 1)
        except lzma.LZMAError as e:
            raise ValueError(f"tensor {t.name!r}: corrupted xz stream ({e})") from None
        if len(out) != n or not decoder.eof:
            raise ValueError(f"tensor {t.name!r}: xz stream decodes to {'more' if len(out) > n else 'less'} "
                             f"than the {n} bytes its shape records; the file is corrupted")
        return out


MAX_XZ_BYTES = 1 << 30  # a stored file (a tokenizer) decompressed; real ones are a few MB


def xz_tensor(name: str, data: bytes) -> Tensor:
    """A tensor of kind "xz" holding `data` compressed (a tokenizer file shrinks about 6x)."""
    packed = lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE)
    return Tensor(name, "xz", (len(data),), {"data": np.frombuffer(packed, np.uint8)})


class GroupQuantKind(Kind):
    """Codes packed per group, a float16 scale per group, and optional sidecars.

    x̂ = s·(q − z) for affine kinds (z stored per group, or 2**(bits-1) when symmetric);
    x̂ = s·NF4[q] for nf4. Outliers and 16-bit columns are added on top (spec/qbin.md).
    """

    def __init__(self, name: str, bits: int, nf4: bool = False):
        self.name = name
        self.bits = bits
        self.nf4 = nf4

    # geometry ------------------------------------------------------------
    @staticmethod
    def stored_columns(t: Tensor) -> tuple[int, int]:
        """(stored columns per row, stored group size): n:m sparsity keeps n of every m."""
        k = t.shape[1]
        if t.sparsity is None:
            return k, t.group_size
        n, m = t.sparsity
        return k * n // m, t.group_size * n // m

    def n_groups(self, t: Tensor) -> int:
        return -(-t.shape[1] // t.group_size)

    def expected_arrays(self, t):
        rows, k = t.shape
        kc, gc = self.stored_columns(t)
        g = self.n_groups(t)
        out = {
            "codes": (("u8",), (rows, row_nbytes(kc, gc, self.bits))),
            "scales": (("f16", "u8"), (rows, g)),  # u8: log-coded (§4.3), with scale_exp
            "scale_exp": (("i32",), (1,)),
            "zeros": (("u8",), (rows, g)),
            "offsets": (("f16",), (rows, g)),
            "perm": (("i32",), (k,)),
            "outlier_rowptr": (("i32",), (rows + 1,)),
            "outlier_cols": (("u16", "i32"), None),
            "outlier_values": (("f16",), None),
            "fp_cols": (("i32",), None),
            "fp_weight": (("f16",), None),
            "input_scale": (("f32",), (k,)),
            "act_scale": (("f32",), (1,)),
        }
        if t.symmetric or self.nf4:
            del out["zeros"]  # the zero-point is implied (2**(bits-1)) or unused (nf4)
            del out["offsets"]
        if t.sparsity is not None:
            n, m = t.sparsity
            out["sparse_index"] = (("u8",), (rows, -(-kc * _index_bits(m) // 8)))
        return out

    def required(self, t, present=frozenset()):
        req = {"codes", "scales"}
        if not t.symmetric and not self.nf4:
            req.add("offsets" if "offsets" in present else "zeros")
        if t.sparsity is not None:
            req.add("sparse_index")
        return req

    # reference -----------------------------------------------------------
    def dequantize_dense(self, t: Tensor) -> np.ndarray:
        """The quantized part alone, in stored column order, as float32 (rows, stored cols)."""
        rows, _ = t.shape
        kc, gc = self.stored_columns(t)
        q = unpack_codes(t.arrays["codes"], kc, gc, self.bits)
        s = np.repeat(group_scales(t).astype(np.float32), gc, axis=1)[:, :kc]
        if self.nf4:
            return NF4_LEVELS[q] * s
        if "offsets" in t.arrays:
            o = np.repeat(t.arrays["offsets"].astype(np.float32), gc, axis=1)[:, :kc]
            return q.astype(np.float32) * s + o
        if "zeros" in t.arrays:
            z = np.repeat(t.arrays["zeros"].astype(np.float32), gc, axis=1)[:, :kc]
        else:
            z = np.float32(1 << (self.bits - 1))
        return (q.astype(np.float32) - z) * s

    def dequantize(self, t):
        rows, k = t.shape
        w = self.dequantize_dense(t)
        if t.sparsity is not None:
            w = scatter_nm(w, t.arrays["sparse_index"], k, *t.sparsity)
        if "perm" in t.arrays:
            out = np.empty_like(w)
            out[:, t.arrays["perm"]] = w
            w = out
        if "outlier_rowptr" in t.arrays:
            ptr = t.arrays["outlier_rowptr"]
            row_of = np.repeat(np.arange(rows), np.diff(ptr))
            np.add.at(w, (row_of, t.arrays["outlier_cols"].astype(np.int64)),
                      t.arrays["outlier_values"].astype(np.float32))
        if "fp_cols" in t.arrays:
            w[:, t.arrays["fp_cols"]] += t.arrays["fp_weight"].astype(np.float32)
        return w


def _index_bits(m: int) -> int:
    """Bits per kept-position index of n:m sparsity: 2 for m=4, 4 for m=8 (one nibble)."""
    return 2 if m <= 4 else 4


def pack_nm_index(positions: np.ndarray, m: int) -> np.ndarray:
    """positions (rows, kept) in [0, m) -> (rows, bytes), little end of each byte first."""
    bits = _index_bits(m)
    per_byte = 8 // bits
    rows, kept = positions.shape
    pad = (-kept) % per_byte
    p = np.concatenate([positions.astype(np.uint8), np.zeros((rows, pad), np.uint8)], axis=1)
    p = p.reshape(rows, -1, per_byte)
    out = np.zeros(p.shape[:2], np.uint8)
    for i in range(per_byte):
        out |= p[:, :, i] << np.uint8(i * bits)
    return out


def unpack_nm_index(packed: np.ndarray, kept: int, m: int) -> np.ndarray:
    bits = _index_bits(m)
    per_byte = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    parts = [(packed >> np.uint8(i * bits)) & mask for i in range(per_byte)]
    return np.stack(parts, axis=-1).reshape(packed.shape[0], -1)[:, :kept]


def compress_nm(w: np.ndarray, mask: np.ndarray, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The kept values (rows, k*n/m) and packed positions (spec §6.3) of an n:m pruned weight.

    mask (rows, k) bool marks the kept weights: exactly n in every block of m columns (a kept
    weight may itself be zero, so the mask, not the values, says what is kept).
    """
    rows, k = w.shape
    if k % m:
        raise ValueError(f"{n}:{m} sparsity needs in_features divisible by {m}, got {k}")
    blocks = np.asarray(mask, bool).reshape(rows, k // m, m)
    if not (blocks.sum(axis=2) == n).all():
        raise ValueError(f"mask does not keep exactly {n} of every {m} columns")
    # positions of the kept entries of each block, increasing (argsort of ~mask is stable)
    pos = np.argsort(~blocks, axis=2, kind="stable")[:, :, :n]
    values = np.take_along_axis(np.asarray(w, np.float32).reshape(rows, k // m, m), pos, axis=2)
    return values.reshape(rows, -1), pack_nm_index(pos.reshape(rows, -1), m)


def scatter_nm(values: np.ndarray, packed_index: np.ndarray, k: int, n: int, m: int) -> np.ndarray:
    """Densify n:m compressed rows: value j of block b goes to column b*m + index."""
    rows, kept = values.shape
    pos = unpack_nm_index(packed_index, kept, m).astype(np.int64)
    cols = (np.arange(kept) // n) * m + pos
    out = np.zeros((rows, k), np.float32)
    np.put_along_axis(out, cols, values, axis=1)
    return out


KINDS: dict[str, Kind] = {
    "f32": FloatKind("f32"),
    "f16": FloatKind("f16"),
    "bf16": FloatKind("bf16"),
    "bytes": BytesKind(),
    "xz": XzKind(),
    "q8": GroupQuantKind("q8", 8),
    "q6": GroupQuantKind("q6", 6),
    "q5": GroupQuantKind("q5", 5),
    "q4": GroupQuantKind("q4", 4),
    "q3": GroupQuantKind("q3", 3),
    "q2": GroupQuantKind("q2", 2),
    "nf4": GroupQuantKind("nf4", 4, nf4=True),
}
QUANT_KINDS = frozenset(k for k, v in KINDS.items() if isinstance(v, GroupQuantKind))
# Kinds that hold a file (the tokenizer), not weights.
FILE_KINDS = frozenset(k for k, v in KINDS.items() if isinstance(v, BytesKind))
FLOAT_KINDS = frozenset(k for k, v in KINDS.items() if isinstance(v, FloatKind))


# ---------------------------------------------------------------------------- schemes

_SCHEME_RE = re.compile(
    r"^(?:(?P<float>f16|bf16|f32)|(?P<q>int[2-68]|nf4)(?:-g(?P<g>\d+))?(?P<sym>-sym|-asym)?(?P<dq>-dq)?)$")
_INT_KIND = {"int8": "q8", "int6": "q6", "int5": "q5", "int4": "q4", "int3": "q3", "int2": "q2", "nf4": "nf4"}
SCHEME_NAMES = (
    "f16", "bf16", "int8", "int8-g128", "int6-g64", "int5-g64", "int4-g128", "int4-g64", "int4-g32",
    "int3-g128", "int3-g64", "int2-g64", "nf4-g64", "w8a8",
)
# W8A8 (SmoothQuant): int8 per-channel symmetric weights whose inputs are quantized to int8 too
W8A8 = "w8a8"


@dataclass(frozen=True)
class Scheme:
    """A quantization scheme as the CLI names it. group_size 0 means one group per row."""

    name: str
    kind: str
    group_size: int = 0
    symmetric: bool = False
    act_bits: int = 0  # 8: the layer's inputs are quantized to int8 as well (W8A8); 0: weights only
    log_scales: bool = False  # "-dq": scales stored as 8-bit codes on a log grid (spec §4.3)

    @property
    def bits(self) -> int:
        k = KINDS[self.kind]
        return k.bits if isinstance(k, GroupQuantKind) else {"f32": 32, "f16": 16, "bf16": 16}[self.kind]

    @property
    def quantized(self) -> bool:
        return self.kind in QUANT_KINDS

    def group_for(self, in_features: int) -> int:
        """The group size used for a layer with `in_features` columns."""
        return in_features if self.group_size == 0 else self.group_size

    def quantize(self, name: str, w: np.ndarray, clip: np.ndarray | float = 1.0) -> Tensor:
        """Round-to-nearest of a float (rows, cols) weight; `clip` shrinks each group's range.

        clip is a scalar or an array of shape (rows, n_groups) of ratios in (0, 1].
        Codes are computed against the float16-rounded scale, so dequantization reproduces
        exactly what the quantizer measured.
        """
        w = np.asarray(w, dtype=np.float32)
        if not self.quantized:
            return float_tensor(name, w, self.kind)
        return quantize_rtn(name, w, KINDS[self.kind], self.group_for(w.shape[1]), self.symmetric, clip,
                            self.log_scales)


    def quantize_nm(self, name: str, w: np.ndarray, mask: np.ndarray, n: int, m: int,
                    clip: np.ndarray | float = 1.0) -> Tensor:
        """Round-to-nearest of the kept weights of an n:m pruned (rows, k) weight, stored in the
        compressed form of spec §6.3 (groups of G·n/m kept values; clip is per kept group)."""
        rows, k = w.shape
        group = self.group_for(k)
        if not self.quantized:
            raise ValueError(f"{self.name}: n:m compressed storage needs a quantized scheme")
        if group % m:
            raise ValueError(f"{n}:{m} sparsity needs a group size divisible by {m}, got {group}")
        values, index = compress_nm(w, mask, n, m)
        dense = quantize_rtn(name, values, KINDS[self.kind], group * n // m, self.symmetric, clip,
                             self.log_scales)
        return Tensor(name, self.kind, (rows, k), dict(dense.arrays, sparse_index=index), group,
                      dense.symmetric, sparsity=(n, m))


def parse_scheme(name: str) -> Scheme:
    """Parse a scheme name such as "int4-g64", "int4-g64-sym", "int4-g64-dq" (log-coded 8-bit
    scales, spec §4.3), "nf4-g64", "int8", "f16", "w8a8" (= int8 per channel, symmetric, with
    int8 activations)."""
    if name.strip().lower() == W8A8:
        return Scheme(W8A8, "q8", 0, True, act_bits=8)
    m = _SCHEME_RE.match(name.strip().lower())
    if m is None:
        raise ValueError(f"unknown scheme {name!r}; known: {', '.join(SCHEME_NAMES)} "
                         "(any intN-gG with N in 2,3,4,5,6,8, optional -sym/-asym, then optional -dq)")
    if m["float"]:
        return Scheme(m["float"], m["float"])
    base = m["q"]
    group = int(m["g"]) if m["g"] else 0
    if m["g"] and (group <= 0 or group % 8):
        raise ValueError(f"group size in {name!r} must be a positive multiple of 8")
    if base == "nf4":
        if m["sym"]:
            raise ValueError(f"{name!r}: nf4 is symmetric by construction; drop the suffix")
        return Scheme(name, "nf4", group, True, log_scales=bool(m["dq"]))
    # int8 defaults to symmetric (per channel, as the CLI documents); narrower widths to affine.
    symmetric = m["sym"] == "-sym" if m["sym"] else base == "int8"
    return Scheme(name, _INT_KIND[base], group, symmetric, log_scales=bool(m["dq"]))


def float_tensor(name: str, w: np.ndarray, kind: str) -> Tensor:
    """Store a float array as f32, f16 or bf16."""
    if kind == "bf16":
        data = f32_to_bf16(w)
    else:
        data = np.asarray(w, dtype={"f32": np.float32, "f16": np.float16}[kind])
    return Tensor(name, kind, tuple(w.shape), {"data": np.ascontiguousarray(data)})


def _grouped(w: np.ndarray, group: int) -> np.ndarray:
    """(rows, k) -> (rows, n_groups, group) padded with NaN past the end of the row."""
    rows, k = w.shape
    n_groups = -(-k // group)
    padded = np.full((rows, n_groups * group), np.nan, np.float32)
    padded[:, :k] = w
    return padded.reshape(rows, n_groups, group)


def quantize_rtn(name: str, w: np.ndarray, kind: GroupQuantKind, group: int, symmetric: bool,
                 clip: np.ndarray | float = 1.0, log_scales: bool = False) -> Tensor:
    """Round-to-nearest quantization of w (rows, k) into `kind` with the given group size;
    log_scales: scales on the log grid of spec §4.3, stored as 8-bit codes."""
    rows, k = w.shape
    g = _grouped(w, group)
    clip = np.asarray(clip, dtype=np.float32)
    arrays: dict[str, np.ndarray] = {}
    if kind.nf4:
        amax = np.nanmax(np.abs(g), axis=2) * clip
        scale = round_scale(amax, log_scales)
        x = g / scale.astype(np.float32)[:, :, None]
        # nearest level: the levels are sorted, so compare against the midpoints between them
        codes = np.searchsorted(_NF4_MIDPOINTS, np.nan_to_num(x)).astype(np.uint8)
    else:
        qmax = (1 << kind.bits) - 1
        if symmetric:
            amax = np.nanmax(np.abs(g), axis=2) * clip
            scale = round_scale(2.0 * amax / qmax, log_scales)
            zero = np.full(scale.shape, 1 << (kind.bits - 1), np.float32)
        else:
            lo = np.minimum(np.nanmin(g, axis=2), 0.0) * clip
            hi = np.maximum(np.nanmax(g, axis=2), 0.0) * clip
            scale = round_scale((hi - lo) / qmax, log_scales)
            zero = np.clip(np.round(-lo / scale.astype(np.float32)), 0, qmax)
            arrays["zeros"] = zero.astype(np.uint8)
        x = np.round(g / scale.astype(np.float32)[:, :, None]) + zero[:, :, None]
        codes = np.clip(np.nan_to_num(x), 0, qmax).astype(np.uint8)
    codes = codes.reshape(rows, -1)[:, :k]
    arrays["codes"] = pack_codes(codes, group, kind.bits)
    if log_scales:
        arrays["scales"], arrays["scale_exp"] = encode_log_scales(scale)
    else:
        arrays["scales"] = scale.astype(np.float16)
    return Tensor(name, kind.name, (rows, k), _ordered(arrays), group, symmetric or kind.nf4)


_NF4_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
_F16_TINY = np.float32(2.0**-24)  # smallest positive float16 (subnormal)


def f16_scale(scale: np.ndarray) -> np.ndarray:
    """Scales as float16, never zero: a zero or tiny range gets the smallest positive scale."""
    s = np.nan_to_num(np.asarray(scale, dtype=np.float32))
    return np.clip(s, _F16_TINY, 65504.0).astype(np.float16)


def log_grid(m: np.ndarray) -> np.ndarray:
    """float16(2^(m/16)) for integer m, as spec §4.3 computes it (exact float32 ldexp, then one
    rounding to float16)."""
    m = np.asarray(m, np.int64)
    up = -(-m // LOG_SCALE_STEPS)  # ceil(m / 16)
    return np.ldexp(LOG_SCALE_FRACTIONS[up * LOG_SCALE_STEPS - m], up.astype(np.int32)).astype(np.float16)


def log_scale(scale: np.ndarray) -> np.ndarray:
    """Scales rounded to the nearest point of the log grid (spec §4.3) in the log domain, as
    float16; never below LOG_SCALE_MIN (float16's smallest normal number)."""
    s = np.clip(np.nan_to_num(np.asarray(scale, np.float64)), LOG_SCALE_MIN, 65504.0)
    m = np.round(np.log2(s) * LOG_SCALE_STEPS).astype(np.int64)
    return log_grid(np.minimum(m, 15 * LOG_SCALE_STEPS))  # 2^15 < float16's largest number


def round_scale(scale: np.ndarray, log_scales: bool = False) -> np.ndarray:
    """Scales as a quantizer stores them, as float16: f16_scale, or log_scale for "-dq" schemes."""
    return log_scale(scale) if log_scales else f16_scale(scale)


def encode_log_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(u8 codes, i32 (1,) exponent e) of scales on the log grid: s = 2^(e − c/16), e the least
    integer above every scale. A scale more than 2^(255/16) below the largest is raised to the
    smallest code's (a group whose weights are below float16's resolution of the largest)."""
    s = np.asarray(scales, np.float64)
    m = np.round(np.log2(np.maximum(s, LOG_SCALE_MIN)) * LOG_SCALE_STEPS).astype(np.int64)
    e = -(-int(m.max()) // LOG_SCALE_STEPS) if m.size else 0
    codes = np.clip(e * LOG_SCALE_STEPS - m, 0, 255).astype(np.uint8)
    return codes, np.array([e], np.int32)


def decode_log_scales(codes: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    """float16 scales of log-coded ones (spec §4.3): 2^(e − c/16)."""
    e = int(np.asarray(exponent).reshape(-1)[0])
    return log_grid(e * LOG_SCALE_STEPS - np.asarray(codes, np.int64))


def group_scales(t: Tensor) -> np.ndarray:
    """A grouped tensor's scales (rows, n_groups) as float16, log-coded ones decoded."""
    a = t.arrays
    if "scale_exp" in a:
        return decode_log_scales(a["scales"], a["scale_exp"])
    return np.asarray(a["scales"])


def expand_log_scales(t: Tensor) -> Tensor:
    """The same tensor with log-coded scales (spec §4.3) decoded to float16, the form every
    kernel reads; other tensors are returned as they are."""
    if "scale_exp" not in t.arrays:
        return t
    arrays = {role: a for role, a in t.arrays.items() if role != "scale_exp"}
    arrays["scales"] = group_scales(t)
    return dataclasses.replace(t, arrays=arrays)


def code_log_scales(t: Tensor) -> Tensor:
    """The inverse of expand_log_scales: a tensor whose float16 scales lie on the log grid, with
    them stored as codes under one exponent (e.g. row blocks quantized apart, then joined)."""
    codes, exponent = encode_log_scales(t.arrays["scales"])
    return dataclasses.replace(t, arrays=dict(t.arrays, scales=codes, scale_exp=exponent))


def _ordered(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    order = ("codes", "scales", "scale_exp", "zeros")
    return {k: arrays[k] for k in order if k in arrays}
