// The kernels of kernels/cuda compiled for the host (shim.h). Each kernel K gets an entry point
// host_K(grid, block_x, block_y, K's arguments...) that runs the launch a CuPy launcher would.
#include "shim.h"
#include "gemv.cu"
#include "dequant.cu"
#include "ops.cu"
#include "sidecars.cu"

using emu::launch;

#define GROUPED_PARAMS const u8 *codes, const __half *scales, const u8 *zeros, int has_zeros
#define GROUPED_ARGS codes, scales, zeros, has_zeros

#define HOST_GEMV(K)                                                                                       \
    extern "C" void host_##K(int grid, int bx, int by, GROUPED_PARAMS, const float* x, float* y,          \
                             const float* add, int has_add, int rows, int k, int group, int row_bytes) {   \
        launch(grid, bx, by, [&] { K(GROUPED_ARGS, x, y, add, has_add, rows, k, group, row_bytes); });     \
    }
HOST_GEMV(gemv_q8_v4)
HOST_GEMV(gemv_q8_v1)

#define HOST_GEMV_Q8ACT(K)                                                                                   \
    extern "C" void host_##K(int grid, int bx, int by, GROUPED_PARAMS, const signed char* xq, const float* d, \
                             const int* sums, float* y, const float* add, int has_add, int rows, int k,     \
                             int group, int row_bytes) {                                                     \
        launch(grid, bx, by, [&] { K(GROUPED_ARGS, xq, d, sums, y, add, has_add, rows, k, group, row_bytes); }); \
    }
HOST_GEMV_Q8ACT(gemv_q4_q8act_v4)
HOST_GEMV_Q8ACT(gemv_q4_q8act_v1)

extern "C" void host_quantize_groups(int grid, int bx, int by, const float* x, signed char* xq, float* d, int* sums,
                                     int k, int group) {
    launch(grid, bx, by, [&] { quantize_groups(x, xq, d, sums, k, group); });
}

#define HOST_DEQUANT(K)                                                                                   \
    extern "C" void host_##K(int grid, int bx, int by, GROUPED_PARAMS, __half* out, int row0, int n_rows, \
                             int k, int group, int row_bytes) {                                           \
        launch(grid, bx, by, [&] { K(GROUPED_ARGS, out, row0, n_rows, k, group, row_bytes); });           \
    }
HOST_DEQUANT(dequant_q4_f16)
HOST_DEQUANT(dequant_q8_f16)

extern "C" void host_gemv_f16(int grid, int bx, int by, const __half* w, const float* x, float* y, const float* add,
                              int has_add, int rows, int k) {
    launch(grid, bx, by, [&] { gemv_f16(w, x, y, add, has_add, rows, k); });
}

extern "C" void host_rmsnorm_f32(int grid, int bx, int by, const float* x, const float* w, float* out, int d,
                                 float eps, int add) {
    launch(grid, bx, by, [&] { rmsnorm_f32(x, w, out, d, eps, add); });
}

extern "C" void host_rope_f32(int grid, int bx, int by, float* x, const float* cos_t, const float* sin_t, int n,
                              int heads, int hd, int pos0, int half) {
    launch(grid, bx, by, [&] { rope_f32(x, cos_t, sin_t, n, heads, hd, pos0, half); });
}

extern "C" void host_silu_mul_f32(int grid, int bx, int by, float* gate, const float* up, long long n) {
    launch(grid, bx, by, [&] { silu_mul_f32(gate, up, n); });
}

extern "C" void host_gelu_tanh_mul_f32(int grid, int bx, int by, float* gate, const float* up, long long n) {
    launch(grid, bx, by, [&] { gelu_tanh_mul_f32(gate, up, n); });
}

extern "C" void host_softcap_f32(int grid, int bx, int by, float* x, long long n, float cap) {
    launch(grid, bx, by, [&] { softcap_f32(x, n, cap); });
}

extern "C" void host_sigmoid_gate_add_f32(int grid, int bx, int by, float* dst, const float* src, const float* gate,
                                          long long n, int d) {
    launch(grid, bx, by, [&] { sigmoid_gate_add_f32(dst, src, gate, n, d); });
}

extern "C" void host_attn_decode_split(int grid, int bx, int by, const float* q, const __half* k, const __half* v,
                                       const int* slots, float* part, int n_heads, int n_kv, int hd, int start,
                                       int stop, float scale, float softcap, int n_splits) {
    launch(grid, bx, by, [&] {
        attn_decode_split(q, k, v, slots, part, n_heads, n_kv, hd, start, stop, scale, softcap, n_splits);
    });
}

extern "C" void host_attn_decode_combine(int grid, int bx, int by, const float* part, float* out, int hd,
                                         int n_splits) {
    launch(grid, bx, by, [&] { attn_decode_combine(part, out, hd, n_splits); });
}

extern "C" void host_rope_store_at(int grid, int bx, int by, float* q, const float* k, const float* v, const float* cos_t,
                                   const float* sin_t, __half* k_cache, __half* v_cache, int n_heads, int n_kv, int hd,
                                   const int* slots, const int* pos, int rot) {
    launch(grid, bx, by, [&] { rope_store_at(q, k, v, cos_t, sin_t, k_cache, v_cache, n_heads, n_kv, hd, slots, pos, rot); });
}

extern "C" void host_attn_decode_split_at(int grid, int bx, int by, const float* q, const __half* k, const __half* v,
                                          const int* slots, float* part, int n_heads, int n_kv, int hd, const int* pos,
                                          int window, float scale, float softcap, int n_splits) {
    launch(grid, bx, by, [&] {
        attn_decode_split_at(q, k, v, slots, part, n_heads, n_kv, hd, pos, window, scale, softcap, n_splits);
    });
}

extern "C" void host_gemv_generic(int grid, int bx, int by, GROUPED_PARAMS, const u8* index, int index_bytes,
                                  const float* levels, const float* x, const signed char* xq, const float* d, float* y,
                                  const float* add, int has_add, int rows, int k, int group, int row_bytes, int bits,
                                  int nf4, int n, int m, int q8act) {
    launch(grid, bx, by, [&] {
        gemv_generic(GROUPED_ARGS, index, index_bytes, levels, x, xq, d, y, add, has_add, rows, k, group, row_bytes, bits,
                     nf4, n, m, q8act);
    });
}

extern "C" void host_dequant_generic_f16(int grid, int bx, int by, GROUPED_PARAMS, const u8* index, int index_bytes,
                                         const float* levels, __half* out, int row0, int n_rows, int k, int group,
                                         int row_bytes, int bits, int nf4, int n, int m) {
    launch(grid, bx, by, [&] {
        dequant_generic_f16(GROUPED_ARGS, index, index_bytes, levels, out, row0, n_rows, k, group, row_bytes, bits, nf4,
                            n, m);
    });
}

extern "C" void host_gather_columns(int grid, int bx, int by, const float* x, float* xs, const int* src, int n, int k) {
    launch(grid, bx, by, [&] { gather_columns(x, xs, src, n, k); });
}

extern "C" void host_add_sidecars(int grid, int bx, int by, const float* x, float* y, int n, int rows, int k,
                                  const int* rowptr, int n_rowptr, const int* cols, const __half* vals,
                                  const int* fp_cols, const __half* fp_weight, int n_fp) {
    launch(grid, bx, by, [&] { add_sidecars(x, y, n, rows, k, rowptr, n_rowptr, cols, vals, fp_cols, fp_weight, n_fp); });
}

extern "C" void host_group_sums(int grid, int bx, int by, const float* xs, float* sums, int n, int k, int group,
                                int n_groups) {
    launch(grid, bx, by, [&] { group_sums(xs, sums, n, k, group, n_groups); });
}

extern "C" void host_add_offsets(int grid, int bx, int by, const float* sums, float* y, int n, int rows,
                                 const __half* offsets, int n_groups) {
    launch(grid, bx, by, [&] { add_offsets(sums, y, n, rows, offsets, n_groups); });
}

extern "C" void host_w8a8_inputs(int grid, int bx, int by, const float* x, const float* inv_scale, int has_scale,
                                 const u8* fp_mask, int has_fp, float* x1, float* xa, int k, int static_mode,
                                 float act_scale) {
    launch(grid, bx, by, [&] { w8a8_inputs(x, inv_scale, has_scale, fp_mask, has_fp, x1, xa, k, static_mode, act_scale); });
}
