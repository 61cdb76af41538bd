// Rows of grouped codes (the layout of gemv.cu) to float16, w = s (q - z), in logical column
// order (n_rows, k): the prefill GEMM multiplies them by f16 activations on the tensor cores
// (cuBLAS through cupy.matmul). One thread per 32-bit code word of a row.
#include "common.cuh"

template <int BITS>
__device__ __forceinline__ void dequant_rows(const u8* __restrict__ codes, const __half* __restrict__ scales,
                                             const u8* __restrict__ zeros, int has_zeros, __half* __restrict__ out,
                                             int row0, int n_rows, int k, int group, int row_bytes) {
    const int n_words = row_bytes / 4;
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)n_rows * n_words) return;
    const int i = (int)(t / n_words);
    const int w = (int)(t - (long long)i * n_words);
    const int row = row0 + i;
    const GroupedRow r = grouped_row(codes, scales, zeros, row, k, group, row_bytes);
    const int n_full = r.n_full;
    const int gbytes = group * BITS / 8;
    const int g = group_of(w * 4, gbytes, n_full);
    const int j0 = w * 4 - g * gbytes;
    const u32 word = r.words[w];
    const float s = __half2float(r.scales[g]);
    const float z = has_zeros ? (float)r.zeros[g] : (float)(1 << (BITS - 1));
    __half* orow = out + (size_t)i * k;
    const int col0 = g * group;
    if (BITS == 4) {
        const int tail_plen = ((k - n_full * group) + 7) / 8 * 8;
        const int half = (g < n_full ? group : tail_plen) / 2;
#pragma unroll
        for (int b = 0; b < 4; ++b) {
            const u32 byte = (word >> (8 * b)) & 255u;
            const int lo = col0 + j0 + b, hi = col0 + half + j0 + b;
            if (lo < k) orow[lo] = __float2half(s * ((float)(byte & 15u) - z));
            if (hi < k) orow[hi] = __float2half(s * ((float)(byte >> 4) - z));
        }
    } else {
#pragma unroll
        for (int b = 0; b < 4; ++b) {
            const int col = col0 + j0 + b;
            if (col < k) orow[col] = __float2half(s * ((float)((word >> (8 * b)) & 255u) - z));
        }
    }
}

extern "C" __global__ void dequant_q4_f16(const u8* codes, const __half* scales, const u8* zeros, int has_zeros,
                                          __half* out, int row0, int n_rows, int k, int group, int row_bytes) {
    dequant_rows<4>(codes, scales, zeros, has_zeros, out, row0, n_rows, k, group, row_bytes);
}

extern "C" __global__ void dequant_q8_f16(const u8* codes, const __half* scales, const u8* zeros, int has_zeros,
                                          __half* out, int row0, int n_rows, int k, int group, int row_bytes) {
    dequant_rows<8>(codes, scales, zeros, has_zeros, out, row0, n_rows, k, group, row_bytes);
}

// Any grouped layout (gemv.cu's gemv_generic): rows row0.. to float16 in stored column order,
// one thread per kept value; an n:m row writes its kept columns only (the caller zeroes out).
extern "C" __global__ void dequant_generic_f16(const u8* __restrict__ codes, const __half* __restrict__ scales,
                                               const u8* __restrict__ zeros, int has_zeros,
                                               const u8* __restrict__ index, int index_bytes,
                                               const float* __restrict__ levels, __half* __restrict__ out, int row0,
                                               int n_rows, int k, int group, int row_bytes, int bits, int nf4, int n,
                                               int m) {
    const int kc = m ? k / m * n : k, gc = m ? group / m * n : group;
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)n_rows * kc) return;
    const int i = (int)(t / kc);
    const int c = (int)(t - (long long)i * kc);
    const int row = row0 + i;
    const int n_groups = (k + group - 1) / group;
    const int g = c / gc, e = c - g * gc;
    const int len = min(gc, kc - g * gc), plen = (len + 7) / 8 * 8;
    const int gbytes = (gc + 7) / 8 * 8 * bits / 8;
    const int q = group_code(codes + (size_t)row * row_bytes, g * gbytes, plen, bits, e);
    const float s = __half2float(scales[(size_t)row * n_groups + g]);
    const float z = has_zeros ? (float)zeros[(size_t)row * n_groups + g] : (float)(1 << (bits - 1));
    const float v = nf4 ? s * levels[q] : s * ((float)q - z);
    out[(size_t)i * k + kept_column(index + (size_t)row * index_bytes, c, n, m)] = __float2half(v);
}
