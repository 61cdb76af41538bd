// The kernels of kernels/cuda compiled for the host (shim.h), behind C entry points for ctypes.
#include "shim.h"
#include "gemv.cu"
#include "dequant.cu"
#include "ops.cu"

#include <string>

using emu::launch;

// Each entry point takes the launch shape (grid, block x, block y) its CuPy launcher would use.

extern "C" int host_gemv_grouped(const char* name, int grid, int bx, int by, const u8* codes, const __half* scales,
                                 const u8* zeros, int has_zeros, const float* x, float* y, int rows, int k,
                                 int group, int row_bytes) {
    const std::string n(name);
    auto fn = n == "gemv_q4_v4" ? gemv_q4_v4 : n == "gemv_q4_v1" ? gemv_q4_v1
            : n == "gemv_q8_v4" ? gemv_q8_v4 : n == "gemv_q8_v1" ? gemv_q8_v1 : nullptr;
    if (fn == nullptr || bx != 32 || by != ROWS) return 1;
    launch(grid, bx, by, [&] { fn(codes, scales, zeros, has_zeros, x, y, rows, k, group, row_bytes); });
    return 0;
}

extern "C" int host_gemv_f16(int grid, int bx, int by, const __half* w, const float* x, float* y, int rows, int k) {
    if (bx != 32 || by != ROWS) return 1;
    launch(grid, bx, by, [&] { gemv_f16(w, x, y, rows, k); });
    return 0;
}

extern "C" int host_dequant(int bits, int grid, int bx, int by, const u8* codes, const __half* scales,
                            const u8* zeros, int has_zeros, __half* out, int row0, int n_rows, int k, int group,
                            int row_bytes) {
    auto fn = bits == 4 ? dequant_q4_f16 : bits == 8 ? dequant_q8_f16 : nullptr;
    if (fn == nullptr || by != 1) return 1;
    launch(grid, bx, by, [&] { fn(codes, scales, zeros, has_zeros, out, row0, n_rows, k, group, row_bytes); });
    return 0;
}

extern "C" void host_rmsnorm(int rows, int threads, const float* x, const float* w, float* out, int d, float eps) {
    launch(rows, threads, 1, [&] { rmsnorm_f32(x, w, out, d, eps); });
}

extern "C" void host_rope(int grid, int threads, float* x, const float* cos_t, const float* sin_t, int n, int heads,
                          int hd, int pos0) {
    launch(grid, threads, 1, [&] { rope_f32(x, cos_t, sin_t, n, heads, hd, pos0); });
}

extern "C" void host_silu_mul(int grid, int threads, float* gate, const float* up, long long n) {
    launch(grid, threads, 1, [&] { silu_mul_f32(gate, up, n); });
}

extern "C" void host_attn_decode(int threads, const float* q, const __half* k, const __half* v, float* part,
                                 float* out, int n_heads, int n_kv, int hd, int start, int stop, float scale) {
    const int n_splits = (stop - start + CHUNK - 1) / CHUNK;
    launch(n_heads * n_splits, threads, 1,
           [&] { attn_decode_split(q, k, v, part, n_heads, n_kv, hd, start, stop, scale, n_splits); });
    launch(n_heads, threads, 1, [&] { attn_decode_combine(part, out, hd, n_splits); });
}
