// The per-token operations of a decoder layer on the GPU: RMSNorm, RoPE, the gated activations
// (SiLU, tanh-approximated GELU), soft caps, and decode attention over the KV cache split across the sequence (flash-decoding). Activations are
// float32; the KV cache is a float16 pool of slots, (n_slots, n_kv_heads, head_dim) per layer, and a
// sequence's position p lives in slot slots[p] (its slot map, runtime/kvcache.py). References:
// qformat.kernels.reference (rmsnorm, rope, silu_mul, attention).
#include "common.cuh"

// Keys per attention split: one block's scores stay in shared memory.
#define CHUNK 256
#define NEG_BIG (-3.0e38f)

// Sum (or max) over the block, returned to every thread; blockDim.x a multiple of 32, y == 1.
__device__ float block_reduce(float v, bool is_max) {
    __shared__ float part[32];
    v = is_max ? warp_max(v) : warp_sum(v);
    if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = v;
    __syncthreads();
    float total = part[0];
    for (int i = 1; i < (int)blockDim.x / 32; ++i) total = is_max ? fmaxf(total, part[i]) : total + part[i];
    __syncthreads();  // part is reused by the next call
    return total;
}

// out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w (add != 0: out[r] += that, a post-norm's residual),
// one block per row of d columns. out may be x (in place: each element is read, then written, by
// one thread, after the reduction).
extern "C" __global__ void rmsnorm_f32(const float* x, const float* __restrict__ w, float* out, int d, float eps,
                                       int add) {
    const float* xr = x + (size_t)blockIdx.x * d;
    float* orow = out + (size_t)blockIdx.x * d;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) ss += xr[i] * xr[i];
    const float inv = rsqrtf(block_reduce(ss, false) / (float)d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) orow[i] = (add ? orow[i] : 0.0f) + xr[i] * inv * w[i];
}

// Rotate-half RoPE in place over the first 2·half dims of each head (half = hd/2, or a partial
// rotary's): x (n, heads, hd) at positions pos0.., tables (positions, half).
extern "C" __global__ void rope_f32(float* __restrict__ x, const float* __restrict__ cos_t,
                                    const float* __restrict__ sin_t, int n, int heads, int hd, int pos0, int half) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)n * heads * half) return;
    const int j = (int)(i % half);
    const long long th = i / half;  // token * heads + head
    const int t = (int)(th / heads);
    float* v = x + th * hd;
    const float c = cos_t[(size_t)(pos0 + t) * half + j], s = sin_t[(size_t)(pos0 + t) * half + j];
    const float a = v[j], b = v[half + j];
    v[j] = a * c - b * s;
    v[half + j] = b * c + a * s;
}

// gate <- silu(gate) * up over n elements.
extern "C" __global__ void silu_mul_f32(float* __restrict__ gate, const float* __restrict__ up, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float g = gate[i];
    gate[i] = g / (1.0f + __expf(-g)) * up[i];
}

// gate <- gelu(gate) * up over n elements, GELU's tanh approximation.
extern "C" __global__ void gelu_tanh_mul_f32(float* __restrict__ gate, const float* __restrict__ up, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float g = gate[i];
    gate[i] = 0.5f * g * (1.0f + tanhf(0.7978845608f * (g + 0.044715f * g * g * g))) * up[i];
}

// dst += sigmoid(gate[row]) * src over n rows of d (a shared expert's output under its gate).
extern "C" __global__ void sigmoid_gate_add_f32(float* __restrict__ dst, const float* __restrict__ src,
                                                const float* __restrict__ gate, long long n, int d) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * d) return;
    dst[i] += src[i] / (1.0f + __expf(-gate[i / d]));
}

// x <- cap * tanh(x / cap) over n elements (the final logits' soft cap).
extern "C" __global__ void softcap_f32(float* __restrict__ x, long long n, float cap) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    x[i] = cap * tanhf(x[i] / cap);
}

// One decode token at the position *pos (device memory: a captured decode step reads the
// position of each replay): RoPE on q (n_heads, hd) in place, and on k (n_kv, hd) on its way
// into slot slots[*pos] of the layer's float16 cache, with v beside it. RoPE rotates pairs
// (j, j + rot) for j < rot (rot = hd/2, or a partial rotary's half, the tables' width); one
// thread per j < hd/2 of each head: it rotates pair j (j < rot), or (k only) copies the two
// unrotated dims rot·2 + 2(j − rot) and the next; v's dims j and j + hd/2.
__device__ __forceinline__ void rotate(float a, float b, float c, float s, float& ra, float& rb) {
    ra = a * c - b * s;
    rb = b * c + a * s;
}

extern "C" __global__ void rope_store_at(float* __restrict__ q, const float* __restrict__ k,
                                         const float* __restrict__ v, const float* __restrict__ cos_t,
                                         const float* __restrict__ sin_t, __half* __restrict__ k_cache,
                                         __half* __restrict__ v_cache, int n_heads, int n_kv, int hd,
                                         const int* __restrict__ slots, const int* __restrict__ pos, int rot) {
    const int half = hd / 2;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (n_heads + n_kv) * half) return;
    const int j = i % half;
    const float c = j < rot ? cos_t[(size_t)(*pos) * rot + j] : 1.0f;
    const float s = j < rot ? sin_t[(size_t)(*pos) * rot + j] : 0.0f;
    if (i < n_heads * half) {
        float* x = q + (size_t)(i / half) * hd;
        if (j < rot) rotate(x[j], x[rot + j], c, s, x[j], x[rot + j]);
        return;
    }
    i -= n_heads * half;
    const size_t head = (size_t)(i / half) * hd;  // this head's first element in the token's (n_kv, hd)
    const size_t row = (size_t)slots[*pos] * n_kv * hd;
    // k: a rotated pair, or two dims past the rotated ones
    const size_t a = head + (j < rot ? j : 2 * j), b = head + (j < rot ? rot + j : 2 * j + 1);
    float ra = k[a], rb = k[b];
    if (j < rot) rotate(k[a], k[b], c, s, ra, rb);
    k_cache[row + a] = __float2half(ra);
    k_cache[row + b] = __float2half(rb);
    v_cache[row + head + j] = __float2half(v[head + j]);
    v_cache[row + head + j + half] = __float2half(v[head + j + half]);
}

// Decode attention, pass 1: block (head h, split s) over positions [start + s*CHUNK, ...) < stop,
// position t's key and value in slot slots[t].
// Writes part[(h * n_splits + s) * (hd + 2) + ...] = (max score m, Σ exp(score - m), then the
// hd unnormalized outputs Σ exp(score - m) v). GQA: head h reads KV head h / (n_heads / n_kv).
// A split past stop is empty: m = NEG_BIG, l = 0, o = 0, which the combine pass weighs 0.
// softcap > 0: scores become softcap * tanh(score / softcap) (Gemma 2).
__device__ void attn_split(const float* __restrict__ q, const __half* __restrict__ k, const __half* __restrict__ v,
                           const int* __restrict__ slots, float* __restrict__ part, int n_heads, int n_kv, int hd,
                           int start, int stop, float scale, float softcap, int n_splits) {
    __shared__ float score[CHUNK];
    __shared__ float qs[256];  // hd <= 256
    const int h = blockIdx.x / n_splits, s = blockIdx.x % n_splits;
    const int kvh = h / (n_heads / n_kv);
    const int t0 = start + s * CHUNK;
    const int t1 = min(stop, t0 + CHUNK);
    for (int d = threadIdx.x; d < hd; d += blockDim.x) qs[d] = q[(size_t)h * hd + d] * scale;
    __syncthreads();
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
    for (int t = t0 + warp; t < t1; t += n_warps) {  // one warp per key, lanes over the head dim
        const __half* kr = k + ((size_t)slots[t] * n_kv + kvh) * hd;
        float acc = 0.0f;
        for (int d = lane; d < hd; d += 32) acc += qs[d] * __half2float(kr[d]);
        acc = warp_sum(acc);
        if (softcap > 0.0f) acc = softcap * tanhf(acc / softcap);
        if (lane == 0) score[t - t0] = acc;
    }
    __syncthreads();
    float m = NEG_BIG;
    for (int i = threadIdx.x; i < t1 - t0; i += blockDim.x) m = fmaxf(m, score[i]);
    m = block_reduce(m, true);
    float l = 0.0f;
    for (int i = threadIdx.x; i < t1 - t0; i += blockDim.x) {
        const float e = __expf(score[i] - m);
        score[i] = e;
        l += e;
    }
    l = block_reduce(l, false);  // its barriers also publish the exponentials
    float* out = part + (size_t)blockIdx.x * (hd + 2);
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {  // threads over the head dim: rows of V coalesced
        float o = 0.0f;
        for (int t = t0; t < t1; ++t) o += score[t - t0] * __half2float(v[((size_t)slots[t] * n_kv + kvh) * hd + d]);
        out[2 + d] = o;
    }
    if (threadIdx.x == 0) {
        out[0] = m;
        out[1] = l;
    }
}

extern "C" __global__ void attn_decode_split(const float* q, const __half* k, const __half* v, const int* slots,
                                             float* part, int n_heads, int n_kv, int hd, int start, int stop,
                                             float scale, float softcap, int n_splits) {
    attn_split(q, k, v, slots, part, n_heads, n_kv, hd, start, stop, scale, softcap, n_splits);
}

// The same for the query at position *pos (device memory), over keys [max(0, pos + 1 - window),
// pos + 1) (window <= 0: no window); n_splits covers the whole context, later splits are empty.
extern "C" __global__ void attn_decode_split_at(const float* q, const __half* k, const __half* v, const int* slots,
                                                float* part, int n_heads, int n_kv, int hd, const int* pos,
                                                int window, float scale, float softcap, int n_splits) {
    const int stop = *pos + 1;
    const int start = window > 0 ? max(0, stop - window) : 0;
    attn_split(q, k, v, slots, part, n_heads, n_kv, hd, start, stop, scale, softcap, n_splits);
}

// Decode attention, pass 2: one block per head merges its splits: out (n_heads, hd).
extern "C" __global__ void attn_decode_combine(const float* __restrict__ part, float* __restrict__ out, int hd,
                                               int n_splits) {
    const float* p = part + (size_t)blockIdx.x * n_splits * (hd + 2);
    float big = NEG_BIG;
    for (int s = 0; s < n_splits; ++s) big = fmaxf(big, p[s * (hd + 2)]);
    float total = 0.0f;
    for (int s = 0; s < n_splits; ++s) total += __expf(p[s * (hd + 2)] - big) * p[s * (hd + 2) + 1];
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float o = 0.0f;
        for (int s = 0; s < n_splits; ++s) o += __expf(p[s * (hd + 2)] - big) * p[s * (hd + 2) + 2 + d];
        out[(size_t)blockIdx.x * hd + d] = o / total;
    }
}
