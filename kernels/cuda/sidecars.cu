// What a quantized weight carries besides its grouped codes (spec §4.2, §6.4, §6.5), for the linear
// ops of kernels/cuda/linear.py: the input in stored column order, the offsets, sparse outliers and
// 16-bit columns added after the dense product, and W8A8's per-token int8 activations. Each
// takes n tokens, so one kernel serves decode (n = 1, inside the CUDA graph) and prefill.
#include "common.cuh"

// xs (n, k) = x (n, k) gathered by src: xs[t, c] = x[t, src[c]], 0 where src[c] < 0 (a 16-bit
// column, zeroed in the dense part's input). One thread per element.
extern "C" __global__ void gather_columns(const float* __restrict__ x, float* __restrict__ xs,
                                          const int* __restrict__ src, int n, int k) {
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)n * k) return;
    const long long token = t / k;
    const int s = src[t - token * k];
    xs[t] = s < 0 ? 0.0f : x[token * k + s];
}

// y (n, rows) += outliers · x + fp_weight · x[fp_cols], x (n, k) in logical column order:
// CSR outliers (rowptr (rows + 1), cols, float16 values; n_rowptr = 0 when none) and n_fp 16-bit
// columns (fp_weight (rows, n_fp) float16). One block per row, a warp per token, lanes over the
// row's entries.
extern "C" __global__ void add_sidecars(const float* __restrict__ x, float* __restrict__ y, int n, int rows, int k,
                                        const int* __restrict__ rowptr, int n_rowptr, const int* __restrict__ cols,
                                        const __half* __restrict__ vals, const int* __restrict__ fp_cols,
                                        const __half* __restrict__ fp_weight, int n_fp) {
    const int row = blockIdx.x;
    const int lane = threadIdx.x;
    const int begin = n_rowptr ? rowptr[row] : 0, end = n_rowptr ? rowptr[row + 1] : 0;
    for (int t = threadIdx.y; t < n; t += blockDim.y) {
        const float* xt = x + (size_t)t * k;
        float acc = 0.0f;
        for (int e = begin + lane; e < end; e += 32) acc += __half2float(vals[e]) * xt[cols[e]];
        for (int j = lane; j < n_fp; j += 32) acc += __half2float(fp_weight[(size_t)row * n_fp + j]) * xt[fp_cols[j]];
        acc = warp_sum(acc);
        if (lane == 0) y[(size_t)t * rows + row] += acc;
    }
}

// sums (n, n_groups) = the sums of xs (n, k) over each group of `group` columns (the last may be
// partial): the float group sums the offsets (spec §4.2) multiply. One thread per (token, group).
extern "C" __global__ void group_sums(const float* __restrict__ xs, float* __restrict__ sums, int n, int k,
                                      int group, int n_groups) {
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)n * n_groups) return;
    const long long token = t / n_groups;
    const int g = (int)(t - token * n_groups);
    const float* x = xs + token * k;
    float acc = 0.0f;
    for (int c = g * group; c < min(k, (g + 1) * group); ++c) acc += x[c];
    sums[t] = acc;
}

// y (n, rows) += offsets (rows, n_groups, float16) · sums (n, n_groups). One block per row, a
// warp per token, lanes over the groups.
extern "C" __global__ void add_offsets(const float* __restrict__ sums, float* __restrict__ y, int n, int rows,
                                       const __half* __restrict__ offsets, int n_groups) {
    const int row = blockIdx.x;
    const int lane = threadIdx.x;
    for (int t = threadIdx.y; t < n; t += blockDim.y) {
        float acc = 0.0f;
        for (int g = lane; g < n_groups; g += 32)
            acc += __half2float(offsets[(size_t)row * n_groups + g]) * sums[(size_t)t * n_groups + g];
        acc = warp_sum(acc);
        if (lane == 0) y[(size_t)t * rows + row] += acc;
    }
}

#define TOKEN_THREADS 256

// W8A8's inputs (spec §6.5), one block of TOKEN_THREADS per token: x1 = x * inv_scale (x where
// has_scale == 0), the input of the float sidecars; xa = the int8 quantization of x1 with the
// 16-bit columns (fp_mask) zeroed, dequantized: round-half-even(x1 / d) clamped to ±127, times d,
// where d = max|x1| / 127 (dynamic) or act_scale (static_mode), and 0 for an all-zero token.
// The dense part then multiplies xa through its own kernel, as the CPU's W8A8Op does.
extern "C" __global__ void w8a8_inputs(const float* __restrict__ x, const float* __restrict__ inv_scale,
                                       int has_scale, const u8* __restrict__ fp_mask, int has_fp,
                                       float* __restrict__ x1, float* __restrict__ xa, int k, int static_mode,
                                       float act_scale) {
    __shared__ float warp_amax[TOKEN_THREADS / 32];
    const size_t base = (size_t)blockIdx.x * k;
    float amax = 0.0f;
    for (int c = threadIdx.x; c < k; c += blockDim.x) {
        const float v = has_scale ? x[base + c] * inv_scale[c] : x[base + c];
        x1[base + c] = v;
        if (!(has_fp && fp_mask[c])) amax = fmaxf(amax, fabsf(v));
    }
    amax = warp_max(amax);
    if (threadIdx.x % 32 == 0) warp_amax[threadIdx.x / 32] = amax;
    __syncthreads();
    amax = 0.0f;
    for (int w = 0; w < (int)blockDim.x / 32; ++w) amax = fmaxf(amax, warp_amax[w]);
    const float d = static_mode ? act_scale : amax / 127.0f;
    for (int c = threadIdx.x; c < k; c += blockDim.x) {
        float q = 0.0f;
        if (d > 0.0f && !(has_fp && fp_mask[c])) q = fminf(127.0f, fmaxf(-127.0f, rintf(x1[base + c] / d)));
        xa[base + c] = q * d;
    }
}
