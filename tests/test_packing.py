"""Packed-code layout (spec/qbin.md §5): property round trips and hand-made byte examples.

The expected bytes are written out by hand or computed by the reference in qbin_testutil
(written from the spec), so any change of the stored layout fails here.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qbin_testutil import ref_pack_row, ref_unpack_row
from qformat.packing import pack_codes, row_nbytes, unpack_codes

WIDTHS = (2, 3, 4, 8)


@st.composite
def code_matrices(draw):
    bits = draw(st.sampled_from(WIDTHS))
    # group sizes: multiples of 8 and not, from 1 to well past k so that k < G happens often
    group = draw(st.one_of(st.sampled_from([8, 16, 32, 64, 128]), st.integers(1, 150)))
    rows = draw(st.integers(1, 4))
    k = draw(st.integers(1, 300))
    seed = draw(st.integers(0, 2**32 - 1))
    codes = np.random.default_rng(seed).integers(0, 1 << bits, (rows, k), dtype=np.uint8)
    return bits, group, codes


@settings(max_examples=300, deadline=None)
@given(code_matrices())
def test_pack_unpack_round_trip(case):
    bits, group, codes = case
    rows, k = codes.shape
    packed = pack_codes(codes, group, bits)
    assert packed.dtype == np.uint8 and packed.shape == (rows, row_nbytes(k, group, bits))
    np.testing.assert_array_equal(unpack_codes(packed, k, group, bits), codes)


@settings(max_examples=200, deadline=None)
@given(code_matrices())
def test_pack_matches_the_spec_reference(case):
    """Byte-exact agreement with the reference packer written from the spec, padding included."""
    bits, group, codes = case
    packed = pack_codes(codes, group, bits)
    for r in range(codes.shape[0]):
        np.testing.assert_array_equal(packed[r], ref_pack_row(codes[r], group, bits))
        np.testing.assert_array_equal(ref_unpack_row(packed[r], codes.shape[1], group, bits), codes[r])


def test_int4_g64_nibbles():
    """int4, G = 64: byte j = code j | code j+32 << 4."""
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 16, (3, 64), dtype=np.uint8)
    packed = pack_codes(codes, 64, 4)
    assert packed.shape == (3, 32)
    for j in range(32):
        np.testing.assert_array_equal(packed[:, j], codes[:, j] | (codes[:, j + 32] << 4))


def test_int4_literal_bytes():
    codes = np.array([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0]], np.uint8)
    # G=16: S=8; byte j = c[j] | c[j+8] << 4
    assert pack_codes(codes, 16, 4).tolist() == [[0x91, 0xA2, 0xB3, 0xC4, 0xD5, 0xE6, 0xF7, 0x08]]


def test_int2_four_slices():
    # G=16, S=4: slice i = codes[4i:4i+4] sits in bits [2i, 2i+2) of bytes 0..3
    codes = np.array([[0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]], np.uint8)
    assert pack_codes(codes, 16, 2).tolist() == [[0xE4] * 4]
    codes = np.array([[0, 1, 2, 3] * 4], np.uint8)
    assert pack_codes(codes, 16, 2).tolist() == [[0x00, 0x55, 0xAA, 0xFF]]


def test_int3_planes():
    # G=8: low plane (q & 3) as 2-bit codes (2 bytes), then high plane (q >> 2) as 1-bit (1 byte)
    codes = np.array([[0, 1, 2, 3, 4, 5, 6, 7]], np.uint8)
    # low = 0 1 2 3 0 1 2 3 -> slices [0,1] [2,3] [0,1] [2,3]: byte0 = 0|2<<2|0<<4|2<<6, byte1 = 1|3<<2|1<<4|3<<6
    # high = 0 0 0 0 1 1 1 1 -> one byte, bit i = code i's high bit
    assert pack_codes(codes, 8, 3).tolist() == [[0x88, 0xDD, 0xF0]]
    assert row_nbytes(8, 8, 3) == 3


def test_int3_two_groups_keep_planes_per_group():
    codes = np.array([[7] * 8 + [0] * 8], np.uint8)
    assert pack_codes(codes, 8, 3).tolist() == [[0xFF, 0xFF, 0xFF, 0x00, 0x00, 0x00]]


def test_int8_is_identity():
    codes = np.arange(200, dtype=np.uint8).reshape(2, 100)
    np.testing.assert_array_equal(pack_codes(codes, 32, 8), np.concatenate(
        [codes[:, :96], codes[:, 96:], np.zeros((2, 4), np.uint8)], axis=1))


def test_partial_last_group_is_zero_padded():
    # k=12, G=8, int4: group 0 (8 codes) -> 4 bytes; group 1 (4 codes padded to 8) -> 4 bytes
    codes = np.array([[1] * 8 + [15, 14, 13, 12]], np.uint8)
    packed = pack_codes(codes, 8, 4)
    assert packed.tolist() == [[0x11] * 4 + [0x0F, 0x0E, 0x0D, 0x0C]]


def test_k_smaller_than_group():
    codes = np.array([[3, 2, 1, 0, 3]], np.uint8)
    packed = pack_codes(codes, 64, 2)  # one group of 5 padded to 8: S = 2 bytes
    assert packed.tolist() == [[0x03 | 0x01 << 2 | 0x03 << 4, 0x02]]
    np.testing.assert_array_equal(unpack_codes(packed, 5, 64, 2), codes)


@pytest.mark.parametrize(("k", "group", "bits", "expected"), [
    (4096, 64, 4, 2048), (4096, 128, 2, 1024), (4096, 64, 3, 1536), (576, 576, 8, 576),
    (100, 64, 3, 24 + 15), (5, 64, 4, 4), (1536, 128, 3, 576), (12, 8, 4, 8), (1, 1, 2, 2),
])
def test_row_nbytes(k, group, bits, expected):
    assert row_nbytes(k, group, bits) == expected


def test_full_groups_start_at_fixed_offsets():
    """Every full group g starts at byte g·G·b/8 of its row (spec §5)."""
    rng = np.random.default_rng(2)
    for bits in WIDTHS:
        codes = rng.integers(0, 1 << bits, (1, 200), dtype=np.uint8)
        packed = pack_codes(codes, 64, bits)
        per_group = 64 * bits // 8
        for g in range(3):
            alone = pack_codes(codes[:, g * 64:(g + 1) * 64], 64, bits)
            np.testing.assert_array_equal(packed[:, g * per_group:(g + 1) * per_group], alone)
