"""Checks shared by the reader and the writer: what a tensor entry must look like.

The writer runs them before it emits anything (it never writes what the spec does not define);
the reader runs them before it hands out a view (it never trusts a file).
"""
from __future__ import annotations

import math
import re

import numpy as np

from .constants import DTYPES, KIND_LAYOUTS
from .schemes import KINDS, QUANT_KINDS, GroupQuantKind, Tensor, unpack_nm_index


def check_tensor(name: str, meta: dict, arrays: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """Raise ValueError naming the problem if a tensor entry breaks the spec.

    meta: the entry's layout fields (kind, layout, shape, ...); arrays: role -> (dtype, shape).
    """
    kind_name = meta.get("kind")
    if not isinstance(kind_name, str) or kind_name not in KINDS:
        raise ValueError(f"tensor {name!r} has unknown kind {kind_name!r} (this reader knows "
                         f"{', '.join(KINDS)}); upgrade qformat to read it")
    layout = meta.get("layout")
    if not _is_count(layout) or layout != KIND_LAYOUTS[kind_name]:
        raise ValueError(f"tensor {name!r}: kind {kind_name} layout version {layout!r} is not "
                         f"supported (this reader knows {KIND_LAYOUTS[kind_name]}); upgrade qformat")
    shape = meta.get("shape")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise ValueError(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
    sparsity = meta.get("sparsity")
    if sparsity is not None and not (isinstance(sparsity, list) and len(sparsity) == 2
                                     and all(_is_count(d) for d in sparsity)):
        raise ValueError(f"tensor {name!r}: sparsity {sparsity!r} is not a list [n, m]")
    t = tensor_stub(name, meta)
    kind = KINDS[kind_name]
    if isinstance(kind, GroupQuantKind):
        if "symmetric" not in meta:  # a default would silently change what zeros mean
            raise ValueError(f"tensor {name!r}: grouped kind {kind_name} needs a 'symmetric' field")
        _check_quant_meta(name, t)
    expected = kind.expected_arrays(t)
    for role, (dtype, ashape) in arrays.items():
        if role not in expected:
            raise ValueError(f"tensor {name!r}: array role {role!r} is not defined for kind {kind_name}")
        dtypes, want = expected[role]
        if dtype not in dtypes:
            raise ValueError(f"tensor {name!r}.{role}: dtype {dtype} (expected {' or '.join(dtypes)})")
        if want is not None and tuple(ashape) != tuple(want):
            raise ValueError(f"tensor {name!r}.{role}: shape {list(ashape)} (expected {list(want)})")
    missing = kind.required(t, frozenset(arrays)) - set(arrays)
    if missing:
        raise ValueError(f"tensor {name!r}: missing array(s) {', '.join(sorted(missing))}")
    if isinstance(kind, GroupQuantKind):
        _check_sidecars(name, t, arrays)


_HEX16 = re.compile(r"[0-9a-f]{16}")


def _is_count(value: object) -> bool:
    """A JSON integer >= 0 (JSON true/false parse as bool, a subclass of int: refused)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def tensor_stub(name: str, meta: dict) -> Tensor:
    """A Tensor carrying only the layout fields of `meta` (no arrays)."""
    sparsity = meta.get("sparsity")
    return Tensor(
        name=name,
        kind=meta["kind"],
        shape=tuple(meta["shape"]),
        arrays={},
        group_size=meta.get("group_size", 0),
        symmetric=meta.get("symmetric", False),
        sparsity=tuple(sparsity) if sparsity is not None else None,
        activation=meta.get("activation"),
    )


MAX_GROUP = 1 << 31  # kernels index a group's columns with 32-bit offsets


def _check_quant_meta(name: str, t: Tensor) -> None:
    if len(t.shape) != 2:
        raise ValueError(f"tensor {name!r}: quantized tensors are 2-D (out, in), got shape {list(t.shape)}")
    if not _is_count(t.group_size) or not 0 < t.group_size < MAX_GROUP:
        raise ValueError(f"tensor {name!r}: group_size {t.group_size!r} must be an integer in 1..{MAX_GROUP - 1}")
    if not isinstance(t.symmetric, bool):
        raise ValueError(f"tensor {name!r}: symmetric must be true or false")
    if t.sparsity is not None:
        n, m = t.sparsity
        if (n, m) not in ((2, 4), (4, 8)) or t.shape[1] % m or t.group_size % m:
            raise ValueError(f"tensor {name!r}: sparsity {n}:{m} needs n:m in 2:4, 4:8 and "
                             f"in_features and group_size divisible by {m}")
    if t.activation is not None:
        act = t.activation
        if not isinstance(act, dict) or act.get("bits") != 8 or act.get("mode") not in ("dynamic", "static"):
            raise ValueError(f"tensor {name!r}: activation {act!r} must be 8 bits, dynamic or static")


def _check_sidecars(name: str, t: Tensor, arrays: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    rows, k = t.shape
    outlier = {"outlier_rowptr", "outlier_cols", "outlier_values"}
    present = outlier & set(arrays)
    if present and present != outlier:
        raise ValueError(f"tensor {name!r}: outlier sidecar needs all of {', '.join(sorted(outlier))}")
    if present:
        nnz_c, nnz_v = arrays["outlier_cols"][1], arrays["outlier_values"][1]
        if len(nnz_c) != 1 or tuple(nnz_c) != tuple(nnz_v):
            raise ValueError(f"tensor {name!r}: outlier_cols and outlier_values must be 1-D of equal length")
    fp = {"fp_cols", "fp_weight"} & set(arrays)
    if fp and len(fp) != 2:
        raise ValueError(f"tensor {name!r}: 16-bit columns need both fp_cols and fp_weight")
    if fp:
        (c,) = arrays["fp_cols"][1] if len(arrays["fp_cols"][1]) == 1 else (None,)
        if c is None or tuple(arrays["fp_weight"][1]) != (rows, c):
            raise ValueError(f"tensor {name!r}: fp_cols must be (C,) and fp_weight (rows, C)")
    if ("scale_exp" in arrays) != (arrays.get("scales", ("f16",))[0] == "u8"):
        raise ValueError(f"tensor {name!r}: log-coded scales (u8) and scale_exp go together (spec §4.3)")
    if "offsets" in arrays:
        clash = [label for label, present in (("zeros", "zeros" in arrays), ("n:m sparsity", t.sparsity is not None),
                                              ("int8 activations", t.activation is not None), ("16-bit columns", bool(fp)))
                 if present]
        if clash:
            raise ValueError(f"tensor {name!r}: offsets (a float minimum per group) do not combine with "
                             f"{', '.join(clash)}")
    if "act_scale" in arrays and (t.activation or {}).get("mode") != "static":
        raise ValueError(f"tensor {name!r}: act_scale is only defined for static activation quantization")
    if (t.activation or {}).get("mode") == "static" and "act_scale" not in arrays:
        raise ValueError(f"tensor {name!r}: static activation quantization needs act_scale")


def check_sidecar_values(t: Tensor) -> None:
    """Check the contents of a tensor's index sidecars (the spec's MUSTs that shapes cannot show).

    Reads only the small index arrays (perm, CSR pointers and columns, 16-bit column ids, n:m
    positions), never the codes.
    """
    rows, k = t.shape if len(t.shape) == 2 else (0, 0)
    a = t.arrays
    if "perm" in a and not np.array_equal(np.sort(a["perm"]), np.arange(k)):
        raise ValueError(f"tensor {t.name!r}: perm is not a permutation of 0..{k - 1}")
    if "outlier_rowptr" in a:
        ptr = a["outlier_rowptr"]
        if ptr[0] != 0 or ptr[-1] != a["outlier_cols"].shape[0] or np.any(np.diff(ptr) < 0):
            raise ValueError(f"tensor {t.name!r}: outlier_rowptr must rise from 0 to the number of outliers")
        cols = a["outlier_cols"]
        if cols.size and (int(cols.min()) < 0 or int(cols.max()) >= k):
            raise ValueError(f"tensor {t.name!r}: outlier columns must lie in 0..{k - 1}")
    if "fp_cols" in a and a["fp_cols"].size and (int(a["fp_cols"].min()) < 0 or int(a["fp_cols"].max()) >= k):
        raise ValueError(f"tensor {t.name!r}: fp_cols must lie in 0..{k - 1}")
    if t.sparsity is not None and "sparse_index" in a:
        n, m = t.sparsity
        kept = k * n // m
        pos = unpack_nm_index(a["sparse_index"], kept, m).reshape(rows, -1, n).astype(np.int16)
        if pos.size and (pos.max() >= m or np.any(np.diff(pos, axis=-1) <= 0)):
            raise ValueError(f"tensor {t.name!r}: n:m positions must be < {m} and increase within a block")


def check_array_entry(name: str, role: str, entry: object) -> tuple[str, tuple[int, ...], int, int, str]:
    """Validate one array's directory entry; return (dtype, shape, offset, nbytes, xxh3)."""
    where = f"tensor {name!r}.{role}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: entry is not an object")
    dtype, shape, offset, nbytes, digest = (entry.get(k) for k in ("dtype", "shape", "offset", "nbytes", "xxh3"))
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"{where}: unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise ValueError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    for label, value in (("offset", offset), ("nbytes", nbytes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{where}: {label} {value!r} is not a non-negative integer")
    if math.prod(max(d, 1) for d in shape) * DTYPES[dtype].itemsize >= 1 << 62:
        # numpy cannot even describe such an array, empty or not
        raise ValueError(f"{where}: shape {shape} is too large")
    want = math.prod(shape) * DTYPES[dtype].itemsize
    if nbytes != want:
        raise ValueError(f"{where}: nbytes {nbytes} but dtype {dtype} and shape {shape} need {want}")
    if not (isinstance(digest, str) and _HEX16.fullmatch(digest)):
        raise ValueError(f"{where}: xxh3 {digest!r} is not 16 lowercase hex digits")
    return dtype, tuple(shape), offset, nbytes, digest


__all__ = ["check_tensor", "check_array_entry", "check_sidecar_values", "tensor_stub", "QUANT_KINDS"]
