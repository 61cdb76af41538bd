// Shared by the .cu files of this folder: types and warp reductions.
#pragma once
#ifndef QFORMAT_HOST_EMULATION  // tests/cuda_host/shim.h runs these kernels on the CPU
#include <cuda_fp16.h>
#endif

typedef unsigned int u32;
typedef unsigned char u8;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// y[row] = acc, plus add[row] where the caller passes a residual (has_add): the residual add of
// a decode step fused into the projection that feeds it (add may be y itself).
__device__ __forceinline__ void store_row(float* y, const float* add, int has_add, int row, float acc) {
    y[row] = has_add ? acc + add[row] : acc;
}

// One row of a grouped weight (spec §5): its code words, float16 scales and zero points.
struct GroupedRow {
    const u32* words;
    const __half* scales;
    const u8* zeros;
    int n_groups, n_full;  // groups, and full ones (the last may be partial)
};

__device__ __forceinline__ GroupedRow grouped_row(const u8* codes, const __half* scales, const u8* zeros, int row,
                                                  int k, int group, int row_bytes) {
    const int n_groups = (k + group - 1) / group;
    return {reinterpret_cast<const u32*>(codes + (size_t)row * row_bytes), scales + (size_t)row * n_groups,
            zeros + (size_t)row * n_groups, n_groups, k / group};
}

// The group holding byte `byte0` of a row (full groups of gbytes bytes, then the tail group).
__device__ __forceinline__ int group_of(int byte0, int gbytes, int n_full) {
    return byte0 < n_full * gbytes ? byte0 / gbytes : n_full;
}

// ---- any grouped layout, one code at a time (the generic kernels: q6, q5, q3, q2, nf4, n:m
// sparsity, groups that are not whole 32-bit words)

// Code e of a packed group of plen (padded) codes that starts at byte `base` of `row`: planar
// slices of plen * w / 8 bytes per plane of width w; 1, 2, 4 and 8 bits are one plane, other
// widths the planes of their binary decomposition, widest (lowest bits) first (spec §5).
__device__ __forceinline__ int group_code(const u8* __restrict__ row, int base, int plen, int bits, int e) {
    if (bits == 8) return row[base + e];
    int code = 0, shift = 0;
#pragma unroll
    for (int w = 4; w >= 1; w >>= 1) {
        if (!(bits & w)) continue;
        const int s = plen * w / 8;
        code |= ((row[base + e % s] >> (w * (e / s))) & ((1 << w) - 1)) << shift;
        base += s;
        shift += w;
    }
    return code;
}

// Stored column of kept value c of an n:m sparse row (spec §6.3: 2-bit positions for m <= 4,
// 4-bit for m = 8, least significant first), or c itself when m == 0 (dense).
__device__ __forceinline__ int kept_column(const u8* __restrict__ index_row, int c, int n, int m) {
    if (m == 0) return c;
    const int bits = m <= 4 ? 2 : 4, per_byte = 8 / bits;
    const int pos = (index_row[c / per_byte] >> (bits * (c % per_byte))) & ((1 << bits) - 1);
    return (c / n) * m + pos;
}
