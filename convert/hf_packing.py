"""The int32 packings of Hugging Face quantized checkpoints, in NumPy, both ways.

All three formats pack b-bit unsigned codes into little-endian int32 words as one dense bit
stream, element i at bits [i·b, (i+1)·b) of the stream (so with b = 4, word w holds elements
8w .. 8w+7, lowest nibble first); they differ in which axis is packed and in the order of
elements within a word:

- compressed-tensors (`pack-quantized`): weight (R, K) packed along K, signed codes stored
  as code + 2^(b−1); zero-points (R, G) packed along R. b need not divide 32: codes straddle words.
- GPTQ (AutoGPTQ / GPTQModel): qweight is (K, R) packed along K, i.e. the transpose of
  compressed-tensors' weight_packed; qzeros (G, R) packed along R.
- AWQ GEMM: qweight (K, R) and qzeros (G, R) packed along R, the eight nibbles of a word
  holding output columns in the order AWQ_ORDER.
"""
from __future__ import annotations

import numpy as np

AWQ_ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])  # word nibble i holds column 8c + AWQ_ORDER[i]


def pack_int32(values: np.ndarray, bits: int) -> np.ndarray:
    """Rows of unsigned b-bit values (n_rows, n) as the dense little-endian stream of each row,
    (n_rows, ceil(n·b/32)) int32."""
    v = np.asarray(values, np.uint32)
    if v.size and int(v.max()) >> bits:
        raise ValueError(f"a value does not fit in {bits} bits")
    rows, n = v.shape
    words = -(-n * bits // 32)
    if 32 % bits == 0:
        per = 32 // bits
        padded = np.zeros((rows, words * per), np.uint32)
        padded[:, :n] = v
        shifts = (np.arange(per, dtype=np.uint32) * bits)
        out = np.bitwise_or.reduce(padded.reshape(rows, words, per) << shifts, axis=2)
        return out.astype("<u4").view(np.int32)
    stream = ((v[:, :, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8).reshape(rows, n * bits)
    padded = np.zeros((rows, words * 32), np.uint8)
    padded[:, :n * bits] = stream
    return np.packbits(padded, axis=1, bitorder="little").view("<u4").view(np.int32).reshape(rows, words)


def unpack_int32(words: np.ndarray, n: int, bits: int) -> np.ndarray:
    """The inverse of pack_int32: (n_rows, n) uint8 values from (n_rows, ceil(n·b/32)) words."""
    w = np.ascontiguousarray(words).view("<u4")
    rows, count = w.shape
    if count != -(-n * bits // 32):
        raise ValueError(f"{count} int32 words per row do not hold {n} values of {bits} bits")
    if 32 % bits == 0:
        per = 32 // bits
        shifts = np.arange(per, dtype=np.uint32) * bits
        v = (w[:, :, None] >> shifts) & np.uint32((1 << bits) - 1)
        return v.reshape(rows, count * per)[:, :n].astype(np.uint8)
    stream = np.unpackbits(np.ascontiguousarray(w.astype("<u4")).view(np.uint8), axis=1, bitorder="little")
    stream = stream[:, :n * bits].reshape(rows, n, bits).astype(np.uint8)
    return (stream << np.arange(bits, dtype=np.uint8)).sum(axis=2, dtype=np.uint16).astype(np.uint8)


def awq_interleave(columns: np.ndarray) -> np.ndarray:
    """Columns (…, R) in the order AWQ packs them: stream element 8c + i is column 8c + AWQ_ORDER[i]."""
    r = columns.shape[-1]
    if r % 8:
        raise ValueError(f"AWQ packs output features in eights; {r} is not a multiple of 8")
    ids = (np.arange(r).reshape(-1, 8)[:, AWQ_ORDER]).reshape(-1)
    return columns[..., ids]


def awq_deinterleave(stream: np.ndarray) -> np.ndarray:
    """The inverse of awq_interleave."""
    r = stream.shape[-1]
    if r % 8:
        raise ValueError(f"AWQ packs output features in eights; {r} is not a multiple of 8")
    ids = (np.arange(r).reshape(-1, 8)[:, AWQ_ORDER]).reshape(-1)
    out = np.empty_like(stream)
    out[..., ids] = stream
    return out
