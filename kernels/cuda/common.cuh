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
