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
