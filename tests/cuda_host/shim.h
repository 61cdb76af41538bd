// Host emulation of the CUDA features kernels/cuda/*.cu use, so that their indexing and
// arithmetic run on any CPU (g++ -std=c++20) against the NumPy references. Blocks run one after
// another; the threads of a block run concurrently, one std::thread each, so warp shuffles and
// __syncthreads are real barriers (a thread that returns early drops out of them, as an exited
// thread does on a GPU). float16 is _Float16 (round to nearest even, like __float2half).
// Nothing here checks what only a GPU shows (memory races between blocks, alignment faults,
// occupancy, speed).
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <math.h>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define QFORMAT_HOST_EMULATION 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static

struct Dim { int x = 0, y = 0, z = 0; };
inline Dim blockIdx, blockDim, gridDim;
inline thread_local Dim threadIdx;

struct float4 { float x, y, z, w; };
struct float2 { float x, y; };
struct uint4 { unsigned int x, y, z, w; };
struct __half { uint16_t bits; };
struct __half2 { __half x, y; };

inline float __half2float(__half h) { _Float16 f; std::memcpy(&f, &h.bits, 2); return (float)f; }
inline __half __float2half(float v) { _Float16 f = (_Float16)v; __half h; std::memcpy(&h.bits, &f, 2); return h; }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline float __expf(float v) { return std::exp(v); }
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
// Σ of the 4 signed byte products of a and b, plus c.
inline int __dp4a(int a, int b, int c) {
    for (int i = 0; i < 4; ++i) c += (int)(signed char)(a >> (8 * i)) * (int)(signed char)(b >> (8 * i));
    return c;
}
using std::min;
using std::max;

namespace emu {
struct Block {
    std::barrier<> all;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<uint64_t> lanes;  // one exchange slot per thread
    explicit Block(int n) : all(n), lanes(n) {
        for (int w = 0; w < (n + 31) / 32; ++w) warps.push_back(std::make_unique<std::barrier<>>(std::min(32, n - 32 * w)));
    }
};
inline Block* block = nullptr;
inline int linear_id() { return threadIdx.y * blockDim.x + threadIdx.x; }

template <typename T> T shuffle(T v, int src_lane) {
    const int me = linear_id(), base = me / 32 * 32;
    std::barrier<>& warp = *block->warps[me / 32];
    uint64_t slot = 0;
    std::memcpy(&slot, &v, sizeof(T));
    block->lanes[me] = slot;
    warp.arrive_and_wait();
    T out;
    std::memcpy(&out, &block->lanes[base + src_lane], sizeof(T));
    warp.arrive_and_wait();
    return out;
}

// Runs body for every thread of a grid x (bx, by) launch. The block's threads are made once per
// launch and run every block in turn (thread creation, not the kernels, was the emulation's cost):
// the launching thread sets up each block, releases them through `go` and waits at `done`.
inline void launch(int grid, int bx, int by, const std::function<void()>& body) {
    blockDim = {bx, by, 1};
    gridDim = {grid, 1, 1};
    const int n = bx * by;
    std::barrier<> go(n + 1), done(n + 1);
    std::vector<std::thread> threads;
    for (int y = 0; y < by; ++y)
        for (int x = 0; x < bx; ++x)
            threads.emplace_back([&, x, y] {
                threadIdx = {x, y, 0};
                for (int b = 0; b < grid; ++b) {
                    go.arrive_and_wait();
                    body();
                    const int me = linear_id();
                    block->warps[me / 32]->arrive_and_drop();
                    block->all.arrive_and_drop();
                    done.arrive_and_wait();
                }
            });
    for (int b = 0; b < grid; ++b) {
        blockIdx = {b, 0, 0};
        Block blk(n);
        block = &blk;
        go.arrive_and_wait();
        done.arrive_and_wait();
        block = nullptr;
    }
    for (auto& t : threads) t.join();
}
}  // namespace emu

template <typename T> T __shfl_xor_sync(unsigned, T v, int mask) { return emu::shuffle(v, (emu::linear_id() % 32) ^ mask); }
template <typename T> T __shfl_sync(unsigned, T v, int src) { return emu::shuffle(v, src); }
inline void __syncthreads() { emu::block->all.arrive_and_wait(); }
