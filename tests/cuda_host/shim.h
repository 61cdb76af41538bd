// Host emulation of the few CUDA features kernels/cuda/*.cu use, so that their indexing and
// arithmetic run on any CPU (g++) against the NumPy references: blocks and threads are loops,
// float16 is _Float16 (round to nearest even, like __float2half), and a warp's lanes run one
// after another, lane 31 first, so that warp_sum (accumulated across them) hands lane 0 the
// total. Nothing here checks what only a GPU shows (races, alignment faults, occupancy).
#pragma once
#include <cstdint>
#include <cstring>

#define QFORMAT_HOST_EMULATION 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict

struct Dim { int x = 0, y = 0, z = 0; };
inline Dim blockIdx, threadIdx, blockDim;

struct float4 { float x, y, z, w; };
struct float2 { float x, y; };
struct uint4 { unsigned int x, y, z, w; };
struct __half { uint16_t bits; };
struct __half2 { __half x, y; };

inline float __half2float(__half h) { _Float16 f; std::memcpy(&f, &h.bits, 2); return (float)f; }
inline __half __float2half(float v) { _Float16 f = (_Float16)v; __half h; std::memcpy(&h.bits, &f, 2); return h; }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }

inline float warp_total;  // reset before each warp's lanes run
inline float warp_sum(float v) { warp_total += v; return warp_total; }
