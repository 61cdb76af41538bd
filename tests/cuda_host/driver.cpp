// The kernels of kernels/cuda compiled for the host (shim.h), behind C entry points for ctypes.
#include "shim.h"
#include "gemv.cu"
#include "dequant.cu"

#include <functional>
#include <string>

namespace {
void launch(int grid, int bx, int by, const std::function<void()>& body) {
    blockDim = {bx, by, 1};
    for (int b = 0; b < grid; ++b) {
        blockIdx = {b, 0, 0};
        for (int y = 0; y < by; ++y) {
            warp_total = 0.0f;
            for (int x = bx - 1; x >= 0; --x) {
                threadIdx = {x, y, 0};
                body();
            }
        }
    }
}
}  // namespace

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
