"""Constants of the qbin v1 format. Each one is defined in spec/qbin.md; the two change together."""
from __future__ import annotations

import struct

import numpy as np

MAGIC = b"QBIN"
VERSION_MAJOR = 1
VERSION_MINOR = 0

# magic, major, minor, header length, file size, xxh3-64 of the header bytes (all little-endian)
PREAMBLE = struct.Struct("<4sHHQQQ")
PREAMBLE_SIZE = PREAMBLE.size  # 32

# Every array starts on a 64-byte boundary: numpy views need at most 8, AVX-512 loads and cache
# lines want 64, and GPU uploads of page-aligned mmap regions stay on 64-byte boundaries too.
ALIGNMENT = 64

# A header larger than this is refused before it is parsed (a corrupted length must not make
# the reader allocate gigabytes).
MAX_HEADER_BYTES = 64 << 20

# Stored element types: name in the header -> numpy dtype used to view the bytes.
# bf16 has no numpy type; it is viewed as uint16 and widened by qformat.schemes.bf16_to_f32.
DTYPES: dict[str, np.dtype] = {
    "f32": np.dtype("<f4"),
    "f16": np.dtype("<f2"),
    "bf16": np.dtype("<u2"),
    "i8": np.dtype("i1"),
    "u8": np.dtype("u1"),
    "i16": np.dtype("<i2"),
    "u16": np.dtype("<u2"),
    "i32": np.dtype("<i4"),
    "u32": np.dtype("<u4"),
    "i64": np.dtype("<i8"),
}

# Tensor kinds and their current layout versions. A kind's name is never reused; a change to a
# kind's layout bumps its version, and readers refuse versions they do not know.
KIND_LAYOUTS: dict[str, int] = {
    "f32": 1,
    "f16": 1,
    "bf16": 1,
    "bytes": 1,
    "xz": 1,
    "q8": 1,
    "q6": 1,
    "q5": 1,
    "q4": 1,
    "q3": 1,
    "q2": 1,
    "nf4": 1,
}

# Packed codes: every group's stored length is its length rounded up to this many elements.
GROUP_PAD = 8

# Log-coded scales (spec §4.3): s = 2^(e − c/16) for the code c (u8) and the tensor's exponent e,
# computed as ldexp(LOG_SCALE_FRACTIONS[c mod 16], e − c div 16) in float32, then rounded to float16.
LOG_SCALE_STEPS = 16
LOG_SCALE_FRACTIONS = np.array([2.0 ** (-b / LOG_SCALE_STEPS) for b in range(LOG_SCALE_STEPS)], dtype=np.float32)
# The smallest log-coded scale a quantizer picks: float16's smallest normal number, so that every
# stored scale decodes to a distinct float16 (subnormals have too few digits for the grid).
LOG_SCALE_MIN = 2.0 ** -14

# QLoRA's NormalFloat4 levels (Dettmers et al. 2023, bitsandbytes' table), in code order 0..15.
NF4_LEVELS = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)
