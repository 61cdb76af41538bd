// Decode GEMV, y = W x (batch 1), reading W in the qbin file's own layout (spec §5): no repack.
//
// A row is cut into groups of G columns (G % 8 == 0; the last group may be shorter), each group
// padded to P = round_up(len, 8) codes. 4-bit groups are planar: byte j of a group holds column
// j in its low nibble and column P/2 + j in its high nibble. So one 32-bit code word at byte j
// (j % 4 == 0) is 4 consecutive columns in its low nibbles and 4 more, P/2 further, in its high
// nibbles: both meet 4 int8 activation codes in a dp4a (q4 runs on int8 activations, as the
// CPU's decode does). 8-bit groups: byte j is column j, and meets a float4 of x. Scales are
// float16, one per (row, group); zero points uint8 (affine) or the middle code (symmetric).
//
// One warp per row, ROWS warps per block. A lane reads VEC words (16 bytes when VEC == 4) per
// step, strided by the warp, so each load instruction of the warp covers 512 contiguous bytes.
// The warp's partial sums meet in a shuffle reduction. Not yet tuned on a device (issue 5):
// more loads in flight per lane and split-K for short, wide matrices are the first candidates.
//
// x (q8) is read through float4 loads and xq (q4) through 4-byte loads: the caller passes them
// zero-padded past the last group's padded end (x_padded_len in linear.py; quantize_groups
// writes whole groups), so padding codes meet zeros.
#include "common.cuh"

#define ROWS 4

__device__ __forceinline__ float dot4(float a0, float a1, float a2, float a3, float4 x) {
    return a0 * x.x + a1 * x.y + a2 * x.z + a3 * x.w;
}

// VEC code words of a row from word w0 (one 16-byte load when VEC == 4; launched only when no
// 16-byte chunk straddles two groups).
template <int VEC>
__device__ __forceinline__ void load_words(const u32* __restrict__ crow, int w0, u32 (&words)[VEC]) {
    if (VEC == 4) {
        const uint4 v = *reinterpret_cast<const uint4*>(crow + w0);
        words[0] = v.x; words[1] = v.y; words[2] = v.z; words[3] = v.w;
    } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) words[i] = crow[w0 + i];
    }
}

// Σ (q - z) x over one 8-bit code word: 4 consecutive columns.
__device__ __forceinline__ float q8_word(u32 w, float z, const float* __restrict__ x, int col) {
    const float4 a = *reinterpret_cast<const float4*>(x + col);
    return dot4((float)(w & 255u) - z, (float)((w >> 8) & 255u) - z, (float)((w >> 16) & 255u) - z,
                (float)(w >> 24) - z, a);
}

template <int VEC>
__device__ __forceinline__ void gemv_q8(const u8* __restrict__ codes, const __half* __restrict__ scales,
                                             const u8* __restrict__ zeros, int has_zeros,
                                             const float* __restrict__ x, float* __restrict__ y,
                                             const float* __restrict__ add, int has_add, int rows, int k, int group,
                                             int row_bytes) {
    const int row = blockIdx.x * ROWS + threadIdx.y;
    if (row >= rows) return;
    const int lane = threadIdx.x;
    const GroupedRow r = grouped_row(codes, scales, zeros, row, k, group, row_bytes);
    const int gbytes = group;                        // bytes of a full group (G % 8 == 0: no padding)
    const float mid = 128.0f;
    const int n_words = row_bytes / 4;
    float acc = 0.0f;
    for (int w0 = lane * VEC; w0 < n_words; w0 += 32 * VEC) {
        u32 words[VEC];
        load_words<VEC>(r.words, w0, words);
        const int g = group_of(w0 * 4, gbytes, r.n_full);
        const int j0 = w0 * 4 - g * gbytes;           // byte of the group
        const float s = __half2float(r.scales[g]);
        const float z = has_zeros ? (float)r.zeros[g] : mid;
        const int col0 = g * group;
        float part = 0.0f;
#pragma unroll
        for (int i = 0; i < VEC; ++i) part += q8_word(words[i], z, x, col0 + j0 + 4 * i);
        acc += s * part;
    }
    acc = warp_sum(acc);
    if (lane == 0) store_row(y, add, has_add, row, acc);
}

// The launchable instances, chosen by kernels/cuda/linear.py's gemv_variant.
#define GEMV_INSTANCE(NAME, VEC)                                                                            \
    extern "C" __global__ void NAME(const u8* codes, const __half* scales, const u8* zeros, int has_zeros, \
                                    const float* x, float* y, const float* add, int has_add, int rows, int k, \
                                    int group, int row_bytes) {                                             \
        gemv_q8<VEC>(codes, scales, zeros, has_zeros, x, y, add, has_add, rows, k, group, row_bytes);      \
    }
GEMV_INSTANCE(gemv_q8_v4, 4)
GEMV_INSTANCE(gemv_q8_v1, 1)

// float16 rows: 8 columns (16 bytes) per lane step when k % 8 == 0, else one column.
extern "C" __global__ void gemv_f16(const __half* w, const float* x, float* y, const float* add, int has_add, int rows,
                                    int k) {
    const int row = blockIdx.x * ROWS + threadIdx.y;
    if (row >= rows) return;
    const int lane = threadIdx.x;
    const __half* wrow = w + (size_t)row * k;
    float acc = 0.0f;
    if (k % 8 == 0) {
        for (int c = lane * 8; c < k; c += 32 * 8) {
            const uint4 v = *reinterpret_cast<const uint4*>(wrow + c);
            const __half2* h = reinterpret_cast<const __half2*>(&v);
            const float4 a = *reinterpret_cast<const float4*>(x + c);
            const float4 b = *reinterpret_cast<const float4*>(x + c + 4);
            const float2 h0 = __half22float2(h[0]), h1 = __half22float2(h[1]);
            const float2 h2 = __half22float2(h[2]), h3 = __half22float2(h[3]);
            acc += h0.x * a.x + h0.y * a.y + h1.x * a.z + h1.y * a.w
                 + h2.x * b.x + h2.y * b.y + h3.x * b.z + h3.y * b.w;
        }
    } else {
        for (int c = lane; c < k; c += 32) acc += __half2float(wrow[c]) * x[c];
    }
    acc = warp_sum(acc);
    if (lane == 0) store_row(y, add, has_add, row, acc);
}

// ---- q4 on int8 activations: the CPU's decode numerics (kernels/cpu/quant.py, reference
// gemv_q8act_reference), so that GPU and CPU logits agree beyond float rounding order.

// x (k,) -> xq (n_groups * group) int8, d (n_groups,), sums (n_groups,): per group d = max|x| / 127,
// code = round-half-even(x / d) (IEEE division, as NumPy), 0 for an all-zero group; columns past
// k stay 0. One warp per group.
extern "C" __global__ void quantize_groups(const float* __restrict__ x, signed char* __restrict__ xq,
                                           float* __restrict__ d, int* __restrict__ sums, int k, int group) {
    const int g = blockIdx.x;
    const int lane = threadIdx.x;
    const int start = g * group;
    const int stop = min(k, start + group);
    float amax = 0.0f;
    for (int e = start + lane; e < stop; e += 32) amax = fmaxf(amax, fabsf(x[e]));
    amax = warp_max(amax);
    const float dg = amax / 127.0f;
    int total = 0;
    for (int e = start + lane; e < start + group; e += 32) {
        int q = 0;
        if (e < stop && amax > 0.0f) q = (int)fminf(127.0f, fmaxf(-127.0f, rintf(x[e] / dg)));
        xq[e] = (signed char)q;
        total += q;
    }
    total = (int)warp_sum((float)total);  // |total| <= 127 * group: exact in float
    if (lane == 0) {
        d[g] = amax > 0.0f ? dg : 0.0f;
        sums[g] = total;
    }
}

// y = Σ_g s_g d_g (Σ_j q_j a_j − z_g Σ_j a_j): one 32-bit code word (4 low nibbles = 4 columns, 4
// high = 4 columns half a group further) meets two 4-byte activation words in two dp4a. Each
// lane adds the dot products of its words scaled by s_g d_g, and the zero-point terms of the
// groups lane, lane + 32, ...
template <int VEC>
__device__ __forceinline__ void gemv_q4_int8act(const u8* __restrict__ codes, const __half* __restrict__ scales,
                                                const u8* __restrict__ zeros, int has_zeros,
                                                const signed char* __restrict__ xq, const float* __restrict__ d,
                                                const int* __restrict__ sums, float* __restrict__ y,
                                                const float* __restrict__ add, int has_add, int rows, int k,
                                                int group, int row_bytes) {
    const int row = blockIdx.x * ROWS + threadIdx.y;
    if (row >= rows) return;
    const int lane = threadIdx.x;
    const GroupedRow r = grouped_row(codes, scales, zeros, row, k, group, row_bytes);
    const int n_groups = r.n_groups, n_full = r.n_full;
    const int gbytes = group / 2;
    const int tail_plen = ((k - n_full * group) + 7) / 8 * 8;
    const int n_words = row_bytes / 4;
    float acc = 0.0f;
    for (int w0 = lane * VEC; w0 < n_words; w0 += 32 * VEC) {
        u32 words[VEC];
        load_words<VEC>(r.words, w0, words);
        const int g = group_of(w0 * 4, gbytes, n_full);
        const int j0 = w0 * 4 - g * gbytes;
        const int col0 = g * group;
        const int half = (g < n_full ? group : tail_plen) / 2;
        int dot = 0;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
            const int lo = *reinterpret_cast<const int*>(xq + col0 + j0 + 4 * i);
            const int hi = *reinterpret_cast<const int*>(xq + col0 + half + j0 + 4 * i);
            dot = __dp4a((int)(words[i] & 0x0F0F0F0Fu), lo, dot);
            dot = __dp4a((int)((words[i] >> 4) & 0x0F0F0F0Fu), hi, dot);
        }
        acc += __half2float(r.scales[g]) * d[g] * (float)dot;
    }
    for (int g = lane; g < n_groups; g += 32) {
        const float z = has_zeros ? (float)r.zeros[g] : 8.0f;
        acc -= __half2float(r.scales[g]) * d[g] * z * (float)sums[g];
    }
    acc = warp_sum(acc);
    if (lane == 0) store_row(y, add, has_add, row, acc);
}

#define GEMV_Q8ACT_INSTANCE(NAME, VEC)                                                                          \
    extern "C" __global__ void NAME(const u8* codes, const __half* scales, const u8* zeros, int has_zeros,     \
                                    const signed char* xq, const float* d, const int* sums, float* y,           \
                                    const float* add, int has_add, int rows, int k, int group, int row_bytes) { \
        gemv_q4_int8act<VEC>(codes, scales, zeros, has_zeros, xq, d, sums, y, add, has_add, rows, k, group,     \
                             row_bytes);                                                                        \
    }
GEMV_Q8ACT_INSTANCE(gemv_q4_q8act_v4, 4)
GEMV_Q8ACT_INSTANCE(gemv_q4_q8act_v1, 1)

// ---- every other grouped layout: q6, q5, q3, q2, nf4, n:m sparse rows, groups that are not whole
// 32-bit words. One warp per row, group by group, one code per lane step (common.cuh's
// group_code and kept_column): correct for any layout the spec allows, and untuned; the dense
// q4 and q8 rows the converter writes by default take the word kernels above.
// q8act (q4, as the CPU computes it): the activations arrive as quantize_groups' codes xq and
// scales d, and each lane's (q - z) a products are summed exactly in integers per group; else
// float x. nf4: the value of code q is levels[q] (qformat.constants.NF4_LEVELS, passed in).
extern "C" __global__ void gemv_generic(const u8* __restrict__ codes, const __half* __restrict__ scales,
                                        const u8* __restrict__ zeros, int has_zeros, const u8* __restrict__ index,
                                        int index_bytes, const float* __restrict__ levels,
                                        const float* __restrict__ x, const signed char* __restrict__ xq,
                                        const float* __restrict__ d, float* __restrict__ y,
                                        const float* __restrict__ add, int has_add, int rows, int k, int group,
                                        int row_bytes, int bits, int nf4, int n, int m, int q8act) {
    const int row = blockIdx.x * ROWS + threadIdx.y;
    if (row >= rows) return;
    const int lane = threadIdx.x;
    const int kc = m ? k / m * n : k, gc = m ? group / m * n : group;  // kept values per row, per group
    const int n_groups = (k + group - 1) / group;
    const int gbytes = (gc + 7) / 8 * 8 * bits / 8;  // bytes of a full (padded) group
    const u8* crow = codes + (size_t)row * row_bytes;
    const u8* irow = index + (size_t)row * index_bytes;
    const __half* srow = scales + (size_t)row * n_groups;
    const u8* zrow = zeros + (size_t)row * n_groups;
    const int zsym = 1 << (bits - 1);
    float acc = 0.0f;
    for (int g = 0; g < n_groups; ++g) {
        const int c0 = g * gc, len = min(gc, kc - c0), plen = (len + 7) / 8 * 8;
        const float s = __half2float(srow[g]);
        const int z = has_zeros ? (int)zrow[g] : zsym;
        if (q8act) {
            int dot = 0;
            for (int e = lane; e < len; e += 32)
                dot += (group_code(crow, g * gbytes, plen, bits, e) - z) * (int)xq[kept_column(irow, c0 + e, n, m)];
            acc += s * d[g] * (float)dot;
        } else {
            float part = 0.0f;
            for (int e = lane; e < len; e += 32) {
                const int q = group_code(crow, g * gbytes, plen, bits, e);
                part += (nf4 ? levels[q] : (float)(q - z)) * x[kept_column(irow, c0 + e, n, m)];
            }
            acc += s * part;
        }
    }
    acc = warp_sum(acc);
    if (lane == 0) store_row(y, add, has_add, row, acc);
}
