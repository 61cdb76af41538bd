"""Bit packing of quantization codes (spec/qbin.md, "Packed codes").

A row of K codes is cut into groups of G along the input dimension; the last group may be
shorter. Each group is padded with zero codes to a multiple of GROUP_PAD elements and packed
on its own, so that group g of every row starts at the same byte offset.

Within a padded group of P elements and a width of b bits (b in 1, 2, 4, 8), the group is cut
into 8/b equal slices of S = P*b/8 elements; byte j holds element j of slice i in bits
[i*b, (i+1)*b). Unpacking slice i of a group is one shift and one mask over S contiguous
bytes, which vectorizes on a CPU and gives a GPU thread contiguous elements. Other widths are
stored as planes of those widths, widest first, each holding the next bits of every code
(`planes`: 3 = 2+1, 5 = 4+1, 6 = 4+2, 7 = 4+2+1): b*P/8 bytes per group, no code crosses a byte.
"""
from __future__ import annotations

import numpy as np

from .constants import GROUP_PAD


def padded_len(length: int) -> int:
    """Stored element count of a group of `length` codes."""
    return -(-length // GROUP_PAD) * GROUP_PAD


def group_lengths(k: int, group_size: int) -> list[int]:
    """Lengths of the groups of a row of k elements (the last one may be partial)."""
    full, tail = divmod(k, group_size)
    return [group_size] * full + ([tail] if tail else [])


def group_nbytes(length: int, bits: int) -> int:
    """Bytes one packed group of `length` codes takes."""
    return padded_len(length) * bits // 8


def row_nbytes(k: int, group_size: int, bits: int) -> int:
    """Bytes one packed row of k codes takes."""
    full, tail = divmod(k, group_size)
    return full * group_nbytes(group_size, bits) + (group_nbytes(tail, bits) if tail else 0)


def planes(bits: int) -> tuple[int, ...]:
    """Widths of the planes b-bit codes are stored in, in storage order (low bits first): one
    plane for 1, 2, 4, 8 bits, else the binary decomposition of b, widest plane first."""
    if bits in (1, 2, 4, 8):
        return (bits,)
    if not 1 <= bits < 8:
        raise ValueError(f"{bits}-bit codes are not defined (1 to 8 bits)")
    return tuple(w for w in (4, 2, 1) if bits & w)


def _pack_planar(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes: (n, g, P) uint8, P a multiple of 8/bits -> (n, g, P*bits/8) uint8."""
    per_byte = 8 // bits
    n, g, p = codes.shape
    sliced = codes.reshape(n, g, per_byte, p // per_byte)
    out = np.zeros((n, g, p // per_byte), dtype=np.uint8)
    for i in range(per_byte):
        out |= sliced[:, :, i, :] << np.uint8(i * bits)
    return out


def _unpack_planar(packed: np.ndarray, bits: int) -> np.ndarray:
    """packed: (n, g, B) uint8 -> (n, g, B*8/bits) uint8."""
    per_byte = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    slices = [(packed >> np.uint8(i * bits)) & mask for i in range(per_byte)]
    return np.concatenate(slices, axis=-1)


def _pack_groups(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes: (n, g, P) -> (n, g * group bytes)."""
    n, g, p = codes.shape
    parts, shift = [], 0
    for width in planes(bits):
        parts.append(_pack_planar((codes >> np.uint8(shift)) & np.uint8((1 << width) - 1), width))
        shift += width
    return np.concatenate(parts, axis=-1).reshape(n, -1)


def _unpack_groups(packed: np.ndarray, n_groups: int, bits: int) -> np.ndarray:
    """packed: (n, n_groups * group bytes) -> (n, n_groups, P)."""
    n = packed.shape[0]
    per_group = packed.reshape(n, n_groups, -1)
    p = per_group.shape[-1] * 8 // bits
    out = np.zeros((n, n_groups, p), np.uint8)
    start = shift = 0
    for width in planes(bits):
        nbytes = p * width // 8
        out |= _unpack_planar(per_group[:, :, start:start + nbytes], width) << np.uint8(shift)
        start += nbytes
        shift += width
    return out


def pack_codes(codes: np.ndarray, group_size: int, bits: int) -> np.ndarray:
    """Pack (n, k) codes (each < 2**bits) into (n, row_nbytes) bytes, group by group."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    n, k = codes.shape
    full, tail = divmod(k, group_size)
    parts = []
    for start, count, length in ((0, full, group_size), (full * group_size, 1 if tail else 0, tail)):
        if count == 0:
            continue
        block = codes[:, start : start + count * length].reshape(n, count, length)
        pad = padded_len(length) - length
        if pad:
            block = np.concatenate([block, np.zeros((n, count, pad), np.uint8)], axis=-1)
        parts.append(_pack_groups(block, bits))
    if not parts:
        return np.zeros((n, 0), np.uint8)
    return np.ascontiguousarray(np.concatenate(parts, axis=1))


def unpack_codes(packed: np.ndarray, k: int, group_size: int, bits: int) -> np.ndarray:
    """Inverse of pack_codes: (n, row_nbytes) bytes -> (n, k) uint8 codes."""
    n = packed.shape[0]
    full, tail = divmod(k, group_size)
    split = full * group_nbytes(group_size, bits)
    parts = []
    if full:
        parts.append(_unpack_groups(packed[:, :split], full, bits)[:, :, :group_size].reshape(n, -1))
    if tail:
        parts.append(_unpack_groups(packed[:, split:], 1, bits)[:, 0, :tail])
    if not parts:
        return np.zeros((n, 0), np.uint8)
    return np.ascontiguousarray(np.concatenate(parts, axis=1))
