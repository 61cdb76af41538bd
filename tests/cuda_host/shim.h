// Host emulation of the CUDA features kernels/cuda/*.cu use, so that their indexing and
// arithmetic run on any CPU (g++ -std=c++20) against the NumPy references. Blocks run one after
// another; the threads of a block are cooperative fibers (ucontext) on the calling thread: each
// runs until a warp shuffle or __syncthreads, where it waits until every thread of its warp or
// block has arrived, so both are real barriers (a thread that returns early drops out of them, as
// an exited thread does on a GPU). The fibers run in order of their thread index between
// barriers, so a read of another thread's shared memory that lacks a barrier sees the value from
// before the write and fails its test every time, not by chance. float16 is _Float16 (round to
// nearest even, like __float2half). Nothing here checks what only a GPU shows (memory races
// between blocks, alignment faults, occupancy, speed).
#pragma once
#include <algorithm>
#include <cmath>
#include <math.h>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <ucontext.h>
#include <vector>

#define QFORMAT_HOST_EMULATION 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static

struct Dim { int x = 0, y = 0, z = 0; };
inline Dim blockIdx, blockDim, gridDim;
inline Dim threadIdx;  // the running fiber's, set by the scheduler

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
// Switching fibers is the emulation's inner loop (twice per thread at every barrier): on x86-64 a
// switch of the stack and the callee-saved registers, without ucontext's signal-mask system call
// (which made swapcontext most of the emulation's time); elsewhere, or with
// -DQFORMAT_EMU_UCONTEXT, ucontext.
#if defined(__x86_64__) && !defined(QFORMAT_EMU_UCONTEXT)
extern "C" void qformat_emu_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .globl qformat_emu_switch
    .hidden qformat_emu_switch
    .type qformat_emu_switch, @function
qformat_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
)");
struct Context {
    void* sp = nullptr;
    // A fresh stack whose first switch "returns" into entry, aligned as if entry had been called.
    void make(char* stack, size_t size, void (*entry)()) {
        auto top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t(15);
        auto* slot = reinterpret_cast<void**>(top - 16);
        slot[0] = reinterpret_cast<void*>(entry);
        slot[1] = nullptr;
        sp = slot - 6;
        std::memset(sp, 0, 6 * sizeof(void*));
    }
};
inline void switch_context(Context& from, Context& to) { qformat_emu_switch(&from.sp, to.sp); }
#else
struct Context {
    ucontext_t uc;
    void make(char* stack, size_t size, void (*entry)()) {
        getcontext(&uc);
        uc.uc_stack.ss_sp = stack;
        uc.uc_stack.ss_size = size;
        uc.uc_link = nullptr;
        makecontext(&uc, entry, 0);
    }
};
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

struct Fiber {
    Context context;
    Dim index;
    bool waiting = false, done = false;
    int parity = 0;  // which of the block's two exchange slots its next shuffle writes
};
inline Context scheduler;
inline std::vector<Fiber> fibers;
inline int current = -1;

inline void wait_here() {
    fibers[current].waiting = true;
    switch_context(fibers[current].context, scheduler);
}

// std::barrier's arrive_and_wait / arrive_and_drop between the fibers of one block.
struct Barrier {
    int expected;
    std::vector<int> waiters;
    explicit Barrier(int n) : expected(n) {}
    void release() {
        for (int f : waiters) fibers[f].waiting = false;
        waiters.clear();
    }
    void arrive_and_wait() {
        if ((int)waiters.size() + 1 == expected) return release();
        waiters.push_back(current);
        wait_here();
    }
    void arrive_and_drop() {
        if (--expected > 0 && (int)waiters.size() == expected) release();
    }
};

struct Block {
    Barrier all;
    std::vector<Barrier> warps;
    std::vector<uint64_t> lanes[2];  // two exchange slots per thread, used in turn
    explicit Block(int n) : all(n), lanes{std::vector<uint64_t>(n), std::vector<uint64_t>(n)} {
        for (int w = 0; w < (n + 31) / 32; ++w) warps.emplace_back(std::min(32, n - 32 * w));
    }
};
inline Block* block = nullptr;
inline int linear_id() { return threadIdx.y * blockDim.x + threadIdx.x; }

// One barrier per shuffle: a lane writes its slot of the turn, waits for its warp, reads. It can
// write that slot again only two shuffles later, after every lane has passed the next barrier and
// so has read this one.
template <typename T> T shuffle(T v, int src_lane) {
    const int me = linear_id(), base = me / 32 * 32;
    int& parity = fibers[current].parity;
    std::vector<uint64_t>& lanes = block->lanes[parity];
    parity ^= 1;
    uint64_t slot = 0;
    std::memcpy(&slot, &v, sizeof(T));
    lanes[me] = slot;
    block->warps[me / 32].arrive_and_wait();
    T out;
    std::memcpy(&out, &lanes[base + src_lane], sizeof(T));
    return out;
}

inline const std::function<void()>* body_of_launch = nullptr;

[[noreturn]] inline void run_fiber() {
    (*body_of_launch)();
    const int me = linear_id();
    block->warps[me / 32].arrive_and_drop();
    block->all.arrive_and_drop();
    fibers[current].done = true;
    switch_context(fibers[current].context, scheduler);
    std::abort();  // a finished fiber is never resumed
}

// Runs body for every thread of a grid x (bx, by) launch: per block, one fiber per thread on
// stacks kept between launches, resumed in turn until all have returned.
inline void launch(int grid, int bx, int by, const std::function<void()>& body) {
    constexpr size_t STACK = 256 * 1024;
    static std::vector<std::unique_ptr<char[]>> stacks;
    blockDim = {bx, by, 1};
    gridDim = {grid, 1, 1};
    const int n = bx * by;
    while ((int)stacks.size() < n) stacks.emplace_back(new char[STACK]);
    body_of_launch = &body;
    for (int b = 0; b < grid; ++b) {
        blockIdx = {b, 0, 0};
        Block blk(n);
        block = &blk;
        fibers.assign(n, Fiber{});
        for (int i = 0; i < n; ++i) {
            fibers[i].index = {i % bx, i / bx, 0};
            fibers[i].context.make(stacks[i].get(), STACK, run_fiber);
        }
        for (int live = n; live > 0;) {
            bool ran = false;
            for (int i = 0; i < n; ++i) {
                Fiber& f = fibers[i];
                if (f.done || f.waiting) continue;
                current = i;
                threadIdx = f.index;
                switch_context(scheduler, f.context);
                ran = true;
                live -= f.done;
            }
            if (!ran) {
                std::fprintf(stderr, "host emulation: every live thread of block %d waits at a barrier\n", b);
                std::abort();
            }
        }
        block = nullptr;
    }
    current = -1;
}
}  // namespace emu

template <typename T> T __shfl_xor_sync(unsigned, T v, int mask) { return emu::shuffle(v, (emu::linear_id() % 32) ^ mask); }
template <typename T> T __shfl_sync(unsigned, T v, int src) { return emu::shuffle(v, src); }
inline void __syncthreads() { emu::block->all.arrive_and_wait(); }
