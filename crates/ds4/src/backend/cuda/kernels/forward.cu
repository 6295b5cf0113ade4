// ds4 CUDA kernels of the forward pass other than the weight products (model.md §3): token
// embedding, RMSNorm, hyper-connections (pre with Sinkhorn, post, output head mixing), RoPE
// with YaRN frequencies, the FP8/FP4 QAT simulations, the KV compressor, the lightning
// indexer (scores + exact top-k), sink-aware attention, the router and the SwiGLU experts'
// element-wise parts. Appended to quant.cu by compile.rs (same module, same typedefs).
//
// Numerics follow the CPU reference (model/*.rs) operation by operation: f32 everywhere,
// sums of squares for RMSNorm in f64, RoPE angles in f64, and the module is compiled with
// --fmad=false so `a*b + c` rounds twice exactly as Rust does. Reductions across threads run
// in a fixed tree order (no floating-point atomics), so results are bit-identical from run
// to run; they differ from the CPU's sequential sums only by f32 rounding.

#define FWD_MAX_HC 8
#define NEG_INF __int_as_float(0xff800000u)

__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, m));
    return v;
}

// Block-wide sum (blockDim a multiple of 32); every thread gets the result. The leading
// barrier lets callers reuse `sh` back to back.
__device__ double block_sum_d(double v, double* sh) {
    int w = threadIdx.x >> 5, l = threadIdx.x & 31, nw = blockDim.x >> 5;
    v = warp_sum_d(v);
    __syncthreads();
    if (l == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        double r = l < nw ? sh[l] : 0.0;
        r = warp_sum_d(r);
        if (l == 0) sh[32] = r;
    }
    __syncthreads();
    return sh[32];
}

__device__ float block_sum_f(float v, float* sh) {
    int w = threadIdx.x >> 5, l = threadIdx.x & 31, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (l == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        float r = l < nw ? sh[l] : 0.0f;
        r = warp_sum(r);
        if (l == 0) sh[32] = r;
    }
    __syncthreads();
    return sh[32];
}

__device__ float block_max_f(float v, float* sh) {
    int w = threadIdx.x >> 5, l = threadIdx.x & 31, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (l == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        float r = l < nw ? sh[l] : NEG_INF;
        r = warp_max(r);
        if (l == 0) sh[32] = r;
    }
    __syncthreads();
    return sh[32];
}

// Exclusive prefix count of `flag` over the block in thread order; *total gets the sum.
__device__ int block_scan_flag(bool flag, int* sh, int* total) {
    int w = threadIdx.x >> 5, l = threadIdx.x & 31, nw = blockDim.x >> 5;
    unsigned b = __ballot_sync(0xffffffffu, flag);
    int in_warp = __popc(b & ((1u << l) - 1u));
    __syncthreads();
    if (l == 0) sh[w] = __popc(b);
    __syncthreads();
    if (threadIdx.x == 0) {
        int acc = 0;
        for (int i = 0; i < nw; i++) {
            int c = sh[i];
            sh[i] = acc;
            acc += c;
        }
        sh[32] = acc;
    }
    __syncthreads();
    *total = sh[32];
    return sh[w] + in_warp;
}

// `1/sqrt(mean(x²) + eps)` with the sum of squares in f64, as ops::rms_scale.
__device__ float rms_scale_block(const float* x, int n, float eps, double* sh) {
    double ss = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += (double)x[i] * (double)x[i];
    ss = block_sum_d(ss, sh);
    return (float)(1.0 / sqrt(ss / (double)n + (double)eps));
}

__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }

// One RoPE pair (p[0], p[1]) rotated by the angle of cosine cf and sine sf.
__device__ __forceinline__ void rope_pair(float* p, float cf, float sf) {
    float a = p[0], b = p[1];
    p[0] = a * cf - b * sf;
    p[1] = a * sf + b * cf;
}

// RoPE on the last 2·half dims of `x` (len elements) at position pos with the layer's f64
// frequencies; angles in f64 like rope.rs, the rotation in f32. Block-wide; caller syncs.
__device__ void rope_tail(float* x, int len, int half, const double* freqs, long long pos,
                          bool inverse) {
    int off = len - 2 * half;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        double s, c;
        sincos((double)pos * freqs[i], &s, &c);
        float cf = (float)c, sf = (float)s;
        if (inverse) sf = -sf;
        rope_pair(x + off + 2 * i, cf, sf);
    }
}

// The RoPE angles of a prefill chunk, once for all the layer's heads: cs[(t·half + i)·2 ..] =
// ((float)cos, (float)sin) of (p0 + t)·freqs[i] in f64, the values rope_tail computes inline.
// grid (ceil(half / 64), tokens), 64 threads.
extern "C" __global__ void k_rope_cs(const double* __restrict__ freqs,
                                     const long long* __restrict__ p0p, int half,
                                     float* __restrict__ cs) {
    const int t = blockIdx.y, i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= half) return;
    double sn, c;
    sincos((double)(*p0p + t) * freqs[i], &sn, &c);
    *(float2*)(cs + 2 * ((long long)t * half + i)) = make_float2((float)c, (float)sn);
}

// ---------------------------------------------------------------- QAT simulations (qat.rs)

__device__ float pow2_ceil_f(float r) {
    if (isnan(r) || r <= 0.0f || isinf(r)) return r;
    if (r < 1.17549435e-38f) return (float)exp2(ceil(log2((double)r)));
    unsigned bits = __float_as_uint(r);
    unsigned e = bits >> 23;
    return (bits & 0x7fffffu) == 0 ? r : __uint_as_float((e + 1) << 23);
}

__device__ float fp8_e4m3_round(float x) {
    float v = fminf(fmaxf(x, -448.0f), 448.0f);
    float a = fabsf(v);
    int e = (int)(__float_as_uint(a) >> 23) - 127;
    if (e < -6) e = -6;
    float step = __uint_as_float((unsigned)(e - 3 + 127) << 23);
    float q = rintf(a / step) * step;
    return copysignf(q, v);
}

// The nearest E2M1 value {0, 0.5, 1, 1.5, 2, 3, 4, 6} (ties as qat.rs: up at 0.75, 1.75 and
// 3.5, down at 0.25, 1.25, 2.5 and 5), by comparisons and selects: a table indexed by the
// code sat in local memory (every thread stored it, 80-byte stack frames).
__device__ __forceinline__ float e2m1_round(float v) {
    const float a = fabsf(v);
    const float g = a > 5.0f    ? 6.0f
                    : a >= 3.5f ? 4.0f
                    : a > 2.5f  ? 3.0f
                    : a >= 1.75f ? 2.0f
                    : a > 1.25f ? 1.5f
                    : a >= 0.75f ? 1.0f
                    : a > 0.25f ? 0.5f
                                : 0.0f;
    return copysignf(g, v);
}

// e2m1_round's results for v in [−6, 6] (every caller clamps first; NaN cannot reach it) in
// fewer instructions: below 1 the grid is steps of 0.5 (rintf rounds half to even: 0.25 → 0,
// 0.75 → 1); from 1 it is one mantissa bit, rounded half to even by adding 2^21 − 1 plus the
// kept bit and clearing the 22 bits below it (1.25 → 1, 1.75 → 2, 2.5 → 2, 3.5 → 4, 5 → 4).
// The self-test row `e2m1_fast` compares the two on every float.
__device__ __forceinline__ float e2m1_round_fast(float v) {
    const float a = fabsf(v);
    const u32 b = __float_as_uint(a);
    const float hi = __uint_as_float((b + 0x1fffffu + ((b >> 22) & 1u)) & 0xffc00000u);
    return copysignf(a < 1.0f ? rintf(a * 2.0f) * 0.5f : hi, v);
}

// Self-test: e2m1_round_fast against e2m1_round on every float (clamped as the callers do),
// grid-stride over the 2^32 patterns; bad[0] counts the differences, bad[1] the lowest
// pattern that differs (integer atomics: the same result whatever the order).
extern "C" __global__ void k_e2m1_check(unsigned long long* bad) {
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
         i < (1ull << 32); i += stride) {
        const float v = fminf(fmaxf(__uint_as_float((u32)i), -6.0f), 6.0f);
        if (__float_as_uint(e2m1_round(v)) != __float_as_uint(e2m1_round_fast(v))) {
            atomicAdd(bad, 1ull);
            atomicMin(bad + 1, i);
        }
    }
}

// FP8 KV simulation on x[0..n) (n a multiple of 64, at most 2048), block-wide: a thread
// per 64-block finds its scale, then a thread per element rounds (the same operations per
// element as qat.rs). Every thread of the block must call it.
// x[i] = its FP8 rounding at the scale fs[i / 64] (block-wide; ends with a barrier).
__device__ __forceinline__ void fp8sim_apply(float* x, int n, const float* fs) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float sc = fs[i / 64];
        x[i] = fp8_e4m3_round(x[i] / sc) * sc;
    }
    __syncthreads();
}

__device__ void fp8sim_row(float* x, int n) {
    __shared__ float fs[32];
    for (int b = threadIdx.x; b < n / 64; b += blockDim.x) {
        const float* blk = x + 64 * b;
        float amax = 0.0f;
        for (int i = 0; i < 64; i++) amax = fmaxf(amax, fabsf(blk[i]));
        fs[b] = pow2_ceil_f(fmaxf(amax, 1e-4f) / 448.0f);
    }
    __syncthreads();
    fp8sim_apply(x, n, fs);
}

// fp8sim_row with each 64-block's amax found by a warp (two elements a lane, then a
// butterfly of fmaxf: the same maximum, NaNs skipped as the serial loop skips them) instead of
// one thread's 64 dependent loads; the same rounding. blockDim a multiple of 32.
__device__ void fp8sim_row_w(float* x, int n) {
    __shared__ float fs[32];
    const int lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    for (int b = threadIdx.x >> 5; b < n / 64; b += nw) {
        const float* blk = x + 64 * b;
        float amax = fmaxf(0.0f, fmaxf(fabsf(blk[lane]), fabsf(blk[lane + 32])));
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
        if (lane == 0) fs[b] = pow2_ceil_f(fmaxf(amax, 1e-4f) / 448.0f);
    }
    __syncthreads();
    fp8sim_apply(x, n, fs);
}

// Indexer QAT on a power-of-two row of at most 1024 (Hadamard in natural order, then FP4 in
// blocks of 32), block-wide: the butterflies of one stage are independent, so threads share
// each stage and the stages run in the serial order (qat.rs); each element sees exactly the
// serial operations. Every thread of the block must call it.
__device__ void indexer_qat_row(float* x, int n, float inv_sqrt_n) {
    __shared__ float fs[32];
    for (int h = 1; h < n; h *= 2) {
        for (int q = threadIdx.x; q < n / 2; q += blockDim.x) {
            int i = (q / h) * 2 * h + (q % h);
            float u = x[i], v = x[i + h];
            x[i] = u + v;
            x[i + h] = u - v;
        }
        __syncthreads();
    }
    for (int i = threadIdx.x; i < n; i += blockDim.x) x[i] *= inv_sqrt_n;
    __syncthreads();
    for (int b = threadIdx.x; b < n / 32; b += blockDim.x) {
        float amax = 0.0f;
        for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(x[32 * b + i]));
        fs[b] = pow2_ceil_f(fmaxf(amax, 6.0f * 1.17549435e-38f) / 6.0f);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float sc = fs[i / 32];
        x[i] = e2m1_round(fminf(fmaxf(x[i] / sc, -6.0f), 6.0f)) * sc;
    }
    __syncthreads();
}

__device__ __forceinline__ float round_f16(float v) { return h2f(f2h(v)); }

// finish_row (attention.rs): QAT (kind 0 = KV: FP8 on the non-RoPE dims; 1 = indexer) then
// F16 storage rounding in production mode. Block-wide; ends with a barrier.
__device__ void finish_row(float* row, int len, int nope, int kind, int qat, int exact,
                           float inv_sqrt_len) {
    __syncthreads();
    if (qat) {
        if (kind == 0) fp8sim_row(row, nope);
        else indexer_qat_row(row, len, inv_sqrt_len);
    }
    __syncthreads();
    if (!exact)
        for (int i = threadIdx.x; i < len; i += blockDim.x) row[i] = round_f16(row[i]);
    __syncthreads();
}

// ---------------------------------------------------------------- embedding, norms

// x[t] = token_embd[tokens[t]] in all n_hc streams. ty: 0 = F32, 1 = F16, 2 = Q8_0 (GPU
// repacked planes; n_rows = vocab locates the scale plane).
extern "C" __global__ void k_embed(const u8* __restrict__ w, int ty, int n_rows,
                                   const int* __restrict__ tokens, int d, int n_hc,
                                   float* __restrict__ x) {
    int t = blockIdx.x;
    long long tok = tokens[t];
    float* xt = x + (long long)t * n_hc * d;
    for (int e = threadIdx.x; e < d; e += blockDim.x) {
        float v;
        if (ty == 0) v = ((const float*)w)[tok * d + e];
        else if (ty == 1) v = h2f(((const u16*)w)[tok * d + e]);
        else {
            float sc = h2f(((const u16*)(w + (long long)n_rows * d))[tok * (d / 32) + e / 32]);
            v = sc * (float)((const signed char*)w)[tok * d + e];
        }
        for (int j = 0; j < n_hc; j++) xt[j * d + e] = v;
    }
}

// In-place RMSNorm of each `width`-wide row (blockIdx.x = row); w null = unweighted.
extern "C" __global__ void k_rms_norm(float* __restrict__ x, const float* __restrict__ w,
                                      int width, float eps) {
    __shared__ double sh[33];
    float* r = x + (long long)blockIdx.x * width;
    float s = rms_scale_block(r, width, eps, sh);
    for (int i = threadIdx.x; i < width; i += blockDim.x) r[i] = w ? r[i] * s * w[i] : r[i] * s;
}

// k_rms_norm that also writes f16 of the result to y16 (production prefill: the q_a norm's
// output is the input of f16 GEMMs, so they need no conversion pass).
extern "C" __global__ void k_rms_norm_h(float* __restrict__ x, const float* __restrict__ w,
                                        int width, float eps, u16* __restrict__ y16) {
    __shared__ double sh[33];
    float* r = x + (long long)blockIdx.x * width;
    u16* h = y16 + (long long)blockIdx.x * width;
    float s = rms_scale_block(r, width, eps, sh);
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        float v = w ? r[i] * s * w[i] : r[i] * s;
        r[i] = v;
        h[i] = f2h(v);
    }
}

// Query head row r: unweighted RMSNorm then RoPE at `pos`. Block-wide.
__device__ void head_norm_rope_row(float* r, int dh, int half, float eps, const double* freqs,
                                   long long pos, double* sh) {
    float s = rms_scale_block(r, dh, eps, sh);
    for (int i = threadIdx.x; i < dh; i += blockDim.x) r[i] = r[i] * s;
    __syncthreads();
    rope_tail(r, dh, half, freqs, pos, false);
}

// rope_tail with the angles given: cs[2i], cs[2i+1] = (float)cos, (float)sin of pos·freqs[i]
// (rope_tail's values), the same rotation.
__device__ void rope_tail_cs(float* x, int len, int half, const float* cs) {
    int off = len - 2 * half;
    for (int i = threadIdx.x; i < half; i += blockDim.x) rope_pair(x + off + 2 * i, cs[2 * i], cs[2 * i + 1]);
}

// KV row r: RMSNorm(kv_a_norm), RoPE at `pos`, QAT + storage rounding. Block-wide.
__device__ void kv_finish_row(float* r, const float* w, int dh, int half, float eps,
                              const double* freqs, long long pos, int qat, int exact,
                              double* sh) {
    float s = rms_scale_block(r, dh, eps, sh);
    for (int i = threadIdx.x; i < dh; i += blockDim.x) r[i] = r[i] * s * w[i];
    __syncthreads();
    rope_tail(r, dh, half, freqs, pos, false);
    finish_row(r, dh, dh - 2 * half, 0, qat, exact, 0.0f);
}

// Query heads: unweighted RMSNorm then RoPE at the token's position (blockIdx.x = t·H + h).
extern "C" __global__ void k_head_norm_rope(float* __restrict__ q, int n_head, int dh, int half,
                                            float eps, const double* __restrict__ freqs,
                                            const long long* __restrict__ p0p) {
    const long long p0 = *p0p;
    __shared__ double sh[33];
    head_norm_rope_row(q + (long long)blockIdx.x * dh, dh, half, eps, freqs,
                       p0 + blockIdx.x / n_head, sh);
}

// KV rows: RMSNorm(kv_a_norm), RoPE, QAT + storage rounding (blockIdx.x = t).
extern "C" __global__ void k_kv_finish(float* __restrict__ kv, const float* __restrict__ w,
                                       int dh, int half, float eps,
                                       const double* __restrict__ freqs, const long long* __restrict__ p0p, int qat,
                                       int exact) {
    const long long p0 = *p0p;
    __shared__ double sh[33];
    kv_finish_row(kv + (long long)blockIdx.x * dh, w, dh, half, eps, freqs, p0 + blockIdx.x, qat,
                  exact, sh);
}

// Decode (one token): k_head_norm_rope's n_head blocks and k_kv_finish's block in one launch
// (blockIdx.x < n_head: query head; = n_head: the KV row). Same row functions.
// exact bit 1 (a comparison switch): the RoPE angles computed before the PDL wait into shared
// memory (the position is a host copy, the frequencies weights); the same values.
extern "C" __global__ void k_qkv_finish1(float* __restrict__ q, float* __restrict__ kv,
                                         const float* __restrict__ w, int n_head, int dh, int half,
                                         float eps, const double* __restrict__ freqs,
                                         const long long* __restrict__ p0p, int qat, int exact) {
    PROBE(2, 0);
    __shared__ double sh[33];
    if ((exact & 2) && half <= 256) {  // cs holds 256 angle pairs
        __shared__ float cs[2 * 256];
        pdl_trigger();
        const long long p0 = *p0p;
        for (int i = threadIdx.x; i < half; i += blockDim.x) {
            double sn, c;
            sincos((double)p0 * freqs[i], &sn, &c);
            cs[2 * i] = (float)c;
            cs[2 * i + 1] = (float)sn;
        }
        pdl_wait();
        PROBE(2, 1);
        float* r = (int)blockIdx.x < n_head ? q + (long long)blockIdx.x * dh : kv;
        const bool isq = (int)blockIdx.x < n_head;
        // rms_scale_block's barriers also publish cs.
        float s = rms_scale_block(r, dh, eps, sh);
        for (int i = threadIdx.x; i < dh; i += blockDim.x) r[i] = isq ? r[i] * s : r[i] * s * w[i];
        __syncthreads();
        rope_tail_cs(r, dh, half, cs);
        if (!isq) {
            // finish_row (kind 0) with the warp amax.
            __syncthreads();
            if (qat) fp8sim_row_w(r, dh - 2 * half);
            __syncthreads();
            if (!(exact & 1))
                for (int i = threadIdx.x; i < dh; i += blockDim.x) r[i] = round_f16(r[i]);
        }
        PROBE(2, 7);
        return;
    }
    pdl_enter();
    PROBE(2, 1);
    const long long p0 = *p0p;
    if ((int)blockIdx.x < n_head)
        head_norm_rope_row(q + (long long)blockIdx.x * dh, dh, half, eps, freqs, p0, sh);
    else
        kv_finish_row(kv, w, dh, half, eps, freqs, p0, qat, exact & 1, sh);
    PROBE(2, 7);
}

// Indexer query heads: RoPE at the token's position, then the indexer QAT (blockIdx.x =
// t·iH + h).
// q16 (may be null; id even then): also the finished row as bf16 (round to nearest even;
// exact for the fp4sim values QAT leaves), for k_idx_scores_tc.
extern "C" __global__ void k_idx_q_finish(float* __restrict__ q, int n_head, int id, int half,
                                          const double* __restrict__ freqs, const long long* __restrict__ p0p,
                                          int qat, float inv_sqrt_id, u16* __restrict__ q16) {
    const long long p0 = *p0p;
    float* r = q + (long long)blockIdx.x * id;
    rope_tail(r, id, half, freqs, p0 + blockIdx.x / n_head, false);
    __syncthreads();
    if (qat) indexer_qat_row(r, id, inv_sqrt_id);
    if (q16) {
        __syncthreads();
        u16* o = q16 + (long long)blockIdx.x * id;
        for (int i = 2 * threadIdx.x; i < id; i += 2 * blockDim.x)
            *(u32*)(o + i) = pack_bf2(r[i], r[i + 1]);
    }
}

// Warp form of k_idx_q_finish for id = 32·E (E = 2, 4, 8): warp w of block (t, y) takes heads
// 8·hpw·y + w + 8i (i < hpw, which is 1 or IQF_HPW) of token t, lane l its elements E·l..E·l+E−1 in
// registers (16-byte loads and stores: a warp's accesses are whole sectors). The token's RoPE
// angles are computed once per block (threads < half; rope_tail's double sincos and float casts)
// into shared memory instead of once per head, or read by each lane from k_rope_cs's table (cs_tab
// not null; no barrier then). Each element then sees exactly the operations of rope_tail and
// indexer_qat_row: the rotation; each Hadamard butterfly u+v to the lower and u−v to the upper
// element (stages h < E inside a lane, the others between lanes l and l ^ (h/E) by shuffles); the
// 1/sqrt(id) scale; the FP4 rounding with its 32-element block's amax (a max, gathered from the
// block's 32/E lanes in any order). So the rows are bit for bit k_idx_q_finish's (self-test
// `idx_q_finish_w`), without its per-stage barriers and global round trips. grid (tokens,
// ceil(n_head / (8·hpw))), 256 threads; half ≤ 128. keep32 = 0 (q16 set): only the bf16 rows
// are written (the tensor-core scores read nothing else), q is left as the q_b product.
#define IQF_HPW 4

// One head's finish in k_idx_q_finish_w: the lane's E elements x of a row, written to qo (keep32)
// and ho (bf16, not null).
template <int E>
__device__ __forceinline__ void idx_q_finish_head(float (&x)[E], float* __restrict__ qo,
                                                  u16* __restrict__ ho, int lane, int half,
                                                  const float* __restrict__ cst, int qat,
                                                  float inv_sqrt_id, int keep32, bool store) {
    constexpr int ID = 32 * E;
    const int off = ID - 2 * half;
#pragma unroll
    for (int k = 0; k < E; k += 2) {
        const int e = E * lane + k;
        if (e >= off) {
            const float2 c2 = *(const float2*)(cst + e - off);
            const float cf = c2.x, sf = c2.y;
            const float a = x[k], b = x[k + 1];
            x[k] = a * cf - b * sf;
            x[k + 1] = a * sf + b * cf;
        }
    }
    if (qat) {
#pragma unroll
        for (int hs = 1; hs < ID; hs *= 2) {
            if (hs < E) {
#pragma unroll
                for (int k = 0; k < E; k++)
                    if ((k & hs) == 0) {
                        const float u = x[k], v = x[k + hs];
                        x[k] = u + v;
                        x[k + hs] = u - v;
                    }
            } else {
                // The upper lane takes o − x, the lower x + o: one fma by ±1 (exact
                // products, one rounding: the same bits as the subtraction or addition).
                const int m = hs / E;
                const float sg = (lane & m) != 0 ? -1.0f : 1.0f;
#pragma unroll
                for (int k = 0; k < E; k++) {
                    const float o = __shfl_xor_sync(0xffffffffu, x[k], m);
                    x[k] = fmaf(sg, x[k], o);
                }
            }
        }
        float amax = 0.0f;
#pragma unroll
        for (int k = 0; k < E; k++) {
            x[k] *= inv_sqrt_id;
            amax = fmaxf(amax, fabsf(x[k]));
        }
#pragma unroll
        for (int m = 1; m < 32 / E; m *= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, m));
        const float sc = pow2_ceil_f(fmaxf(amax, 6.0f * 1.17549435e-38f) / 6.0f);
        // sc is a power of two in the normal range (or inf), so x · (1/sc) is x / sc exactly.
        const float rs = 1.0f / sc;
#pragma unroll
        for (int k = 0; k < E; k++) x[k] = e2m1_round_fast(fminf(fmaxf(x[k] * rs, -6.0f), 6.0f)) * sc;
    }
    if constexpr (E % 4 == 0) {
#pragma unroll
        for (int k = 0; k < E; k += 4) {
            if (keep32)
                *(float4*)(qo + k) = make_float4(x[k], x[k + 1], x[k + 2], x[k + 3]);
            if (ho && store)
                *(uint2*)(ho + k) =
                    make_uint2(pack_bf2(x[k], x[k + 1]), pack_bf2(x[k + 2], x[k + 3]));
        }
    } else {
#pragma unroll
        for (int k = 0; k < E; k += 2) {
            if (keep32) *(float2*)(qo + k) = make_float2(x[k], x[k + 1]);
            if (ho && store) *(u32*)(ho + k) = pack_bf2(x[k], x[k + 1]);
        }
    }
}

template <int E, int HPW>
__device__ __forceinline__ void idx_q_finish_w(float* __restrict__ q, int n_head, int half,
                                               const double* __restrict__ freqs, long long p0,
                                               const float* __restrict__ cs_tab, int qat,
                                               float inv_sqrt_id, u16* __restrict__ q16,
                                               int keep32, bool waited) {
    constexpr int ID = 32 * E;
    __shared__ float cs[2 * 128];
    const int t = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    // With the chunk's table the lanes read their angles from it (L1 hits after the first
    // warp), so no warp waits at a barrier for another's load; else one sincos per pair.
    const float* cst = cs_tab ? cs_tab + 2 * (long long)t * half : cs;
    if (!cs_tab) {
        for (int i = threadIdx.x; i < half; i += blockDim.x) {
            double sn, c;
            sincos((double)(p0 + t) * freqs[i], &sn, &c);
            cs[2 * i] = (float)c;
            cs[2 * i + 1] = (float)sn;
        }
    }
    // The angles need only the position (a host copy) and the frequencies: computed before
    // the wait when the caller has not waited yet.
    if (!waited) pdl_wait();
    PROBE(1, 1);
    if (!cs_tab) __syncthreads();
    // This warp's heads h0 + 8i (i < HPW): all their loads are in flight before the first
    // head's work (in prefill chunks, one 512-byte row a warp left each warp waiting on its
    // load alone; decode keeps one head a warp, for more warps on its one token). A head past
    // the last is worked as the last one and not stored: no branch around the shuffles, whose
    // warp-uniform guards the compiler could not prove and wrapped in convergence code.
    const int h0 = blockIdx.y * 8 * HPW + warp;
    float x[HPW][E];
#pragma unroll
    for (int i = 0; i < HPW; i++) {
        const int h = min(h0 + 8 * i, n_head - 1);
        const long long base = ((long long)t * n_head + h) * ID + E * lane;
        // The lane's E elements in 16-byte pieces (8-byte for E = 2): whole sectors per warp.
        if constexpr (E % 4 == 0) {
#pragma unroll
            for (int k = 0; k < E; k += 4) {
                float4 v = *(const float4*)(q + base + k);
                x[i][k] = v.x, x[i][k + 1] = v.y, x[i][k + 2] = v.z, x[i][k + 3] = v.w;
            }
        } else {
#pragma unroll
            for (int k = 0; k < E; k += 2) {
                float2 v = *(const float2*)(q + base + k);
                x[i][k] = v.x;
                x[i][k + 1] = v.y;
            }
        }
    }
#pragma unroll
    for (int i = 0; i < HPW; i++) {
        const int h = h0 + 8 * i;
        const bool store = h < n_head;
        const long long base = ((long long)t * n_head + min(h, n_head - 1)) * ID + E * lane;
        idx_q_finish_head<E>(x[i], q + base, q16 ? q16 + base : nullptr, lane, half, cst, qat,
                             inv_sqrt_id, keep32 && store, store);
    }
}

#define DS4_IDX_Q_FINISH_W(E)                                                                    \
    extern "C" __global__ void __launch_bounds__(256)                                            \
        k_idx_q_finish_w##E(float* __restrict__ q, int n_head, int half,                         \
                            const double* __restrict__ freqs, const long long* __restrict__ p0p, \
                            const float* __restrict__ cs_tab, int qat, float inv_sqrt_id,        \
                            u16* __restrict__ q16, int keep32, int hpw) {                        \
        PROBE(1, 0);                                                                             \
        pdl_trigger();                                                                           \
        const bool waited = !(hpw & 16);                                                         \
        if (waited) pdl_wait();                                                                  \
        if ((hpw & 15) == IQF_HPW)                                                               \
            idx_q_finish_w<E, IQF_HPW>(q, n_head, half, freqs, *p0p, cs_tab, qat, inv_sqrt_id, q16, \
                                       keep32, waited);                                          \
        else                                                                                     \
            idx_q_finish_w<E, 1>(q, n_head, half, freqs, *p0p, cs_tab, qat, inv_sqrt_id, q16,     \
                                 keep32, waited);                                                \
        PROBE(1, 7);                                                                             \
    }
DS4_IDX_Q_FINISH_W(2)
DS4_IDX_Q_FINISH_W(4)
DS4_IDX_Q_FINISH_W(8)

// ---------------------------------------------------------------- hyper-connections (hc.rs)

// Sinkhorn normalisation of the n×n matrix c (shared memory) by one warp, lane i owning
// elements i, i+32, ... Every sum runs over the same elements in the same order as the
// serial loops of hc.rs, and each element is written only by its lane
// after all lanes have read what they need, so the result is bit-identical to it.
__device__ void sinkhorn_warp(float* c, float* e, int n, int iters, float eps) {
    int lane = threadIdx.x & 31, nn = n * n;
    for (int i = lane; i < nn; i += 32) {
        int j = i / n;
        float m = NEG_INF;
        for (int k = 0; k < n; k++) m = fmaxf(m, c[j * n + k]);
        e[i] = expf(c[i] - m);
    }
    __syncwarp();
    for (int i = lane; i < nn; i += 32) {
        int j = i / n;
        float s = 0.0f;
        for (int k = 0; k < n; k++) s += e[j * n + k];
        c[i] = e[i] / s + eps;
    }
    __syncwarp();
    // The first column normalisation runs even with iters = 0, as in hc.rs.
    for (int it = 0; it < (iters > 1 ? iters : 1); it++) {
        if (it > 0) {
            float sv[2];
            for (int i = lane, q = 0; i < nn; i += 32, q++) {
                int j = i / n;
                float s = 0.0f;
                for (int k = 0; k < n; k++) s += c[j * n + k];
                sv[q] = s;
            }
            __syncwarp();
            for (int i = lane, q = 0; i < nn; i += 32, q++) c[i] /= sv[q] + eps;
            __syncwarp();
        }
        float sv[2];
        for (int i = lane, q = 0; i < nn; i += 32, q++) {
            int k = i % n;
            float s = 0.0f;
            for (int j = 0; j < n; j++) s += c[j * n + k];
            sv[q] = s;
        }
        __syncwarp();
        for (int i = lane, q = 0; i < nn; i += 32, q++) c[i] /= sv[q] + eps;
        __syncwarp();
    }
}

// Sinkhorn of an n×n matrix (n·n ≤ 32) held in registers, lane i owning element i (row
// i/n, column i%n; lanes ≥ n·n compute throw-away values). Row and column sums gather the
// elements with shuffles and add them in the serial order of hc.rs (from 0, k or j
// ascending), then divide exactly as sinkhorn_warp: the same operations on the same values,
// so the result is bit-identical to it, without its shared-memory round trips, integer
// divisions and local arrays in the 2·iters dependent steps. All 32 lanes must call it.
// NC > 0: n = NC known at compile time (the shuffles of absent columns and the divisions
// by n go away; the same additions in the same order remain).
template <int NC>
__device__ __forceinline__ float sinkhorn_reg_t(float cv, int nr, int iters, float eps) {
    constexpr int NQ = NC > 0 ? NC : FWD_MAX_HC;
    const int n = NC > 0 ? NC : nr;
    const int lane = threadIdx.x & 31;
    const int j = lane / n, k = lane - (lane / n) * n;
    const int rb = min(j, n - 1) * n;
    float m = NEG_INF;
#pragma unroll
    for (int q = 0; q < NQ; q++) {
        float o = __shfl_sync(0xffffffffu, cv, (rb + q) & 31);
        if (q < n) m = fmaxf(m, o);
    }
    float e = expf(cv - m);
    float s = 0.0f;
#pragma unroll
    for (int q = 0; q < NQ; q++) {
        float o = __shfl_sync(0xffffffffu, e, (rb + q) & 31);
        if (q < n) s += o;
    }
    cv = e / s + eps;
    for (int it = 0; it < (iters > 1 ? iters : 1); it++) {
        if (it > 0) {
            float r = 0.0f;
#pragma unroll
            for (int q = 0; q < NQ; q++) {
                float o = __shfl_sync(0xffffffffu, cv, (rb + q) & 31);
                if (q < n) r += o;
            }
            cv /= r + eps;
        }
        float cs = 0.0f;
#pragma unroll
        for (int q = 0; q < NQ; q++) {
            float o = __shfl_sync(0xffffffffu, cv, (q * n + k) & 31);
            if (q < n) cs += o;
        }
        cv /= cs + eps;
    }
    return cv;
}

__device__ float sinkhorn_reg(float cv, int n, int iters, float eps) {
    return n == 4 ? sinkhorn_reg_t<4>(cv, 4, iters, eps) : sinkhorn_reg_t<0>(cv, n, iters, eps);
}

// hc_pre for token blockIdx.x: mix (= fn·flat, unscaled) times the state's RMS scale, the
// stream weights P_j (warp 0), post weights Q_k (warp 0), Sinkhorn-normalised M (warp 1),
// and y = Σ_j P_j·X_j, then (norm not null) the site's RMSNorm of y in place, which the
// CPU runs next (forward.rs), fused here to save a launch and a pass. y16 (not null:
// production prefill) also receives f16(y), the input the site's f16 GEMMs and the grouped
// experts read, so they need no conversion pass. Any block size of 64..1024 threads (a
// multiple of 32): the f64 sums of squares change order with it, not their f32 results in
// practice (prefill launches 256 threads, several blocks an SM; exact mode 1024).
extern "C" __global__ void k_hc_pre(const float* __restrict__ x, const float* __restrict__ mix,
                                    int n, int d, float rms_eps, float hc_eps, int iters,
                                    const float* __restrict__ scale3,
                                    const float* __restrict__ base, float* __restrict__ y,
                                    float* __restrict__ post, float* __restrict__ comb,
                                    const float* __restrict__ norm, u16* __restrict__ y16) {
    __shared__ double sh[33];
    __shared__ float m[(2 + FWD_MAX_HC) * FWD_MAX_HC];
    __shared__ float pj[FWD_MAX_HC];
    __shared__ float c[FWD_MAX_HC * FWD_MAX_HC];
    __shared__ float ex[FWD_MAX_HC * FWD_MAX_HC];
    int t = blockIdx.x, w = (2 + n) * n;
    const float* xt = x + (long long)t * n * d;
    float s = rms_scale_block(xt, n * d, rms_eps, sh);
    for (int i = threadIdx.x; i < w; i += blockDim.x) m[i] = mix[(long long)t * w + i] * s;
    __syncthreads();
    if (threadIdx.x < 32) {
        int l = threadIdx.x;
        if (l < n) pj[l] = sigmoidf_(m[l] * scale3[0] + base[l]) + hc_eps;
        else if (l >= 16 && l - 16 < n)
            post[t * n + l - 16] = 2.0f * sigmoidf_(m[n + l - 16] * scale3[1] + base[n + l - 16]);
    } else if (threadIdx.x < 64) {
        int l = threadIdx.x - 32;
        if (n * n <= 32) {
            float cv = l < n * n ? m[2 * n + l] * scale3[2] + base[2 * n + l] : 0.0f;
            cv = sinkhorn_reg(cv, n, iters, hc_eps);
            if (l < n * n) comb[(long long)t * n * n + l] = cv;
        } else {
            for (int i = l; i < n * n; i += 32) c[i] = m[2 * n + i] * scale3[2] + base[2 * n + i];
            __syncwarp();
            sinkhorn_warp(c, ex, n, iters, hc_eps);
            for (int i = l; i < n * n; i += 32) comb[(long long)t * n * n + i] = c[i];
        }
    }
    __syncthreads();
    float* yt = y + (long long)t * d;
    u16* yh = y16 ? y16 + (long long)t * d : nullptr;
    for (int e = threadIdx.x; e < d; e += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < n; j++) acc += pj[j] * xt[j * d + e];
        yt[e] = acc;
        if (yh && !norm) yh[e] = f2h(acc);
    }
    if (norm) {
        // Each thread reads back only the elements it wrote.
        float s2 = rms_scale_block(yt, d, rms_eps, sh);
        for (int e = threadIdx.x; e < d; e += blockDim.x) {
            float v = yt[e] * s2 * norm[e];
            yt[e] = v;
            if (yh) yh[e] = f2h(v);
        }
    }
}

// ---- production prefill form of k_hc_pre (n = 4 streams): the state is read once into
// registers (thread i owns columns 4(i + T·c).. of every stream, T = blockDim.x = d/(4C)),
// y is formed and normalized from registers and written as f32 and f16; the Sinkhorn of the
// combination matrix, a serial chain of ~40 dependent steps that left the block's other warps
// waiting at a barrier, moves to k_hc_comb (a warp per token), which reads the token's RMS
// scale from sc. Same operations per element as k_hc_pre; the f64 sums of squares add in
// another order (their f32 results do not change in practice; the self-test compares).
template <int N, int C>
__device__ __forceinline__ void hc_pre_pf_body(const float* __restrict__ x,
                                               const float* __restrict__ mix, int d,
                                               float rms_eps, float hc_eps,
                                               const float* __restrict__ scale3,
                                               const float* __restrict__ base,
                                               float* __restrict__ y, u16* __restrict__ y16,
                                               u16* __restrict__ y16p,
                                               float* __restrict__ post,
                                               const float* __restrict__ norm,
                                               float* __restrict__ sc, u16* __restrict__ x3,
                                               float x3s, long long plane, int y32) {
    __shared__ double sh[33];
    __shared__ float pj[N];
    const int t = blockIdx.x, T = blockDim.x, w = (2 + N) * N;
    const float* xt = x + (long long)t * N * d;
    float4 xv[N][C];
    double ss = 0.0;
#pragma unroll
    for (int j = 0; j < N; j++)
#pragma unroll
        for (int c = 0; c < C; c++)
            xv[j][c] = *(const float4*)(xt + (long long)j * d + 4 * (threadIdx.x + T * c));
#pragma unroll
    for (int j = 0; j < N; j++)
#pragma unroll
        for (int c = 0; c < C; c++) {
            float4 v = xv[j][c];
            ss += (double)v.x * (double)v.x;
            ss += (double)v.y * (double)v.y;
            ss += (double)v.z * (double)v.z;
            ss += (double)v.w * (double)v.w;
        }
    ss = block_sum_d(ss, sh);
    const float s = (float)(1.0 / sqrt(ss / (double)(N * d) + (double)rms_eps));
    if (threadIdx.x < N) {
        int l = threadIdx.x;
        pj[l] = sigmoidf_(mix[(long long)t * w + l] * s * scale3[0] + base[l]) + hc_eps;
    } else if (threadIdx.x < 2 * N) {
        int l = threadIdx.x - N;
        post[t * N + l] =
            2.0f * sigmoidf_(mix[(long long)t * w + N + l] * s * scale3[1] + base[N + l]);
    } else if (threadIdx.x == 2 * N) {
        sc[t] = s;
    }
    __syncthreads();
    float4 yv[C];
    double s2s = 0.0;
#pragma unroll
    for (int c = 0; c < C; c++) {
        float a[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int j = 0; j < N; j++) {
            a[0] += pj[j] * xv[j][c].x;
            a[1] += pj[j] * xv[j][c].y;
            a[2] += pj[j] * xv[j][c].z;
            a[3] += pj[j] * xv[j][c].w;
        }
        yv[c] = make_float4(a[0], a[1], a[2], a[3]);
        s2s += (double)a[0] * (double)a[0];
        s2s += (double)a[1] * (double)a[1];
        s2s += (double)a[2] * (double)a[2];
        s2s += (double)a[3] * (double)a[3];
    }
    float s2 = 1.0f;
    if (norm) {
        s2s = block_sum_d(s2s, sh);
        s2 = (float)(1.0 / sqrt(s2s / (double)d + (double)rms_eps));
    }
    float* yt = y + (long long)t * d;
    u16* yh = y16 + (long long)t * d;
#pragma unroll
    for (int c = 0; c < C; c++) {
        int e = 4 * (threadIdx.x + T * c);
        float4 v = yv[c];
        if (norm) {
            float4 g = *(const float4*)(norm + e);
            v = make_float4(v.x * s2 * g.x, v.y * s2 * g.y, v.z * s2 * g.z, v.w * s2 * g.w);
        }
        if (y32) *(float4*)(yt + e) = v;
        if (x3) {
            // f32_split3_f16 of the f32 values (the router's product on tensor cores).
            u16 hi[4], mi[4], lo[4];
            split3_one(v.x, x3s, hi[0], mi[0], lo[0]);
            split3_one(v.y, x3s, hi[1], mi[1], lo[1]);
            split3_one(v.z, x3s, hi[2], mi[2], lo[2]);
            split3_one(v.w, x3s, hi[3], mi[3], lo[3]);
            u16* xp = x3 + (long long)t * d + e;
            *(uint2*)xp = make_uint2((u32)hi[0] | ((u32)hi[1] << 16), (u32)hi[2] | ((u32)hi[3] << 16));
            *(uint2*)(xp + plane) =
                make_uint2((u32)mi[0] | ((u32)mi[1] << 16), (u32)mi[2] | ((u32)mi[3] << 16));
            *(uint2*)(xp + 2 * plane) =
                make_uint2((u32)lo[0] | ((u32)lo[1] << 16), (u32)lo[2] | ((u32)lo[3] << 16));
        }
        uint2 h;
        h.x = (u32)f2h(v.x) | ((u32)f2h(v.y) << 16);
        h.y = (u32)f2h(v.z) | ((u32)f2h(v.w) << 16);
        *(uint2*)(yh + e) = h;
        if (y16p) {
            // The column order pf_mxw reads (px_pos; pairs stay together), so the routed
            // experts' gate|up reads the token's row here instead of a gathered copy.
            u16* yp = y16p + (long long)t * d;
            *(u32*)(yp + px_pos(e)) = h.x;
            *(u32*)(yp + px_pos(e + 2)) = h.y;
        }
    }
}

// grid: tokens; block T = d/(4C) threads (a multiple of 32, at most 256 or 512, below), C in
// {1, 2, 4}; n = 4. y16p (null or, d % 32 == 0, the f16 rows in px_pos order) as hc_pre_pf_body.
// x3 (null or n_tok·d·3 halves): y·x3s as f32_split3_f16's three planes, `plane` (= n_tok·d)
// apart; y32 = 0: y's f32 form is not written (no reader of this site needs it).
// Entries by block size: k_hc_pre_pf (up to 256 threads, C = 4, 2 or 1) and k_hc_pre_pf512 (up
// to 512, C = 2 or 1), each compiled for only the C its blocks take, so that its register
// count is that C's. A block is one token whose two f64 block sums and scale chains run one
// after the other, so the kernel is bound by how many blocks an SM holds, not by memory:
// at d = 4096, 256 threads of 4 columns hold 96 registers (two blocks an SM, 16 warps) and
// took 53 / 68 µs a 2048-token chunk (attention / FFN site, H200 ncu), 512 threads of 2
// columns 64 registers (two blocks, 32 warps) 47 / 58 µs; 1024 threads of 1 column (one
// block, 32 warps) 71 / 90 µs; a persistent block an SM with the next tokens' state copied
// ahead into shared memory 69 / 85 µs (bench/RESULTS.md, twenty-third session). The f64
// sums add in another order for each block size; their f32 results are the same (the
// self-test compares every output bit).
#define HC_PRE_PF_ARGS \
    (x, mix, d, rms_eps, hc_eps, scale3, base, y, y16, y16p, post, norm, sc, x3, x3s, plane, y32)
#define HC_PRE_PF_PARAMS                                                                         \
    const float* __restrict__ x, const float* __restrict__ mix, int d, int cols, float rms_eps, \
        float hc_eps, const float* __restrict__ scale3, const float* __restrict__ base,          \
        float* __restrict__ y, u16* __restrict__ y16, u16* __restrict__ y16p,                   \
        float* __restrict__ post, const float* __restrict__ norm, float* __restrict__ sc,       \
        u16* __restrict__ x3, float x3s, long long plane, int y32
extern "C" __global__ void __launch_bounds__(256) k_hc_pre_pf(HC_PRE_PF_PARAMS) {
    if (cols == 4)
        hc_pre_pf_body<4, 4> HC_PRE_PF_ARGS;
    else if (cols == 2)
        hc_pre_pf_body<4, 2> HC_PRE_PF_ARGS;
    else
        hc_pre_pf_body<4, 1> HC_PRE_PF_ARGS;
}
extern "C" __global__ void __launch_bounds__(512, 2) k_hc_pre_pf512(HC_PRE_PF_PARAMS) {
    if (cols == 2)
        hc_pre_pf_body<4, 2> HC_PRE_PF_ARGS;
    else
        hc_pre_pf_body<4, 1> HC_PRE_PF_ARGS;
}
#undef HC_PRE_PF_ARGS
#undef HC_PRE_PF_PARAMS

// The Sinkhorn-normalised combination matrix of k_hc_pre_pf's tokens: a warp per token
// (8 a block), from the mix and the token's RMS scale sc[t], with k_hc_pre's operations
// (sinkhorn_reg; n·n <= 32).
extern "C" __global__ void k_hc_comb(const float* __restrict__ mix, const float* __restrict__ sc,
                                     int n, int iters, float hc_eps,
                                     const float* __restrict__ scale3,
                                     const float* __restrict__ base, float* __restrict__ comb,
                                     int n_tok) {
    const int t = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (t >= n_tok) return;
    const int l = threadIdx.x & 31, w = (2 + n) * n;
    const float s = sc[t];
    float cv = l < n * n ? mix[(long long)t * w + 2 * n + l] * s * scale3[2] + base[2 * n + l]
                         : 0.0f;
    cv = sinkhorn_reg(cv, n, iters, hc_eps);
    if (l < n * n) comb[(long long)t * n * n + l] = cv;
}

// ---- decode (one token) forms of hc_pre, spread over blocks, with the input quantization
// of the next products fused.

#define FWD_MAX_MIX ((2 + FWD_MAX_HC) * FWD_MAX_HC)
// Eight consecutive floats (16-byte aligned) into v: two 16-byte loads.
__device__ __forceinline__ void ld8f(const float* p, float (&v)[8]) {
    const float4 a = ((const float4*)p)[0], b = ((const float4*)p)[1];
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
    v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
// Most streams the decode hc_pre kernels hold in registers (k_hc_pre1, k_hc_post_mix).
#define HC_PRE1_MAX_HC 4
// Most sublayer outputs k_hc_post_mix loads at once (the FFN site's routed experts; more take
// the loop).
#define HC_POST_MAX_KX 8

// The new state of stream k at one element (hc_post): Q_k·fv + Σ_j M[j][k]·X_j, xs[j] = X_j
// there, j in order; n ≤ M. Every decode and chunk form of hc_post computes each element with
// these operations (the module is built without FMA contraction).
template <int M>
__device__ __forceinline__ float hc_post_val(const float* xs, float fv, const float* q,
                                             const float* mm, int n, int k) {
    float o = q[k] * fv;
#pragma unroll
    for (int j = 0; j < M; j++)
        if (j < n) o += mm[j * n + k] * xs[j];
    return o;
}

// hc_pre's control product for one token: block (b, g) takes elements 512b..512b+511 of
// the flat state (`width` = n·d, a multiple of 512; thread t: 8t..8t+7, one 16-byte F16 or
// two F32 loads per row) and fn rows 8g..8g+7, and writes the partial dots
// part[b·rows + r] (each thread's 8 products in order, then lanes, then the 2 warps, in a
// fixed order); blocks (b, 0) also write the state's partial sum of squares in f64 (ss[b]).
// k_hc_pre1 adds the partials in b order. wty: 0 = F32, 1 = F16 fn (row-major). 64 threads.
//
// POST (k_hc_post_mix, decode): the previous site's hc_post fused in. The state the dots
// read is formed here from the old state x (all n ≤ HC_PRE1_MAX_HC streams at the thread's
// elements, d a multiple of 512 so they lie in one stream k) with hc_post_val, and blocks
// (b, 0) store it into xn, not x: the other row groups' blocks still read x. So xn, part and
// ss equal hc_post followed by k_hc_mix_part bit for bit. The sublayer output there: kx = 0,
// f[e] (the attention site's out_b product); kx > 0, Σ_j f[j·d + e] + sh[e] in
// k_hc_post_moe's order (the FFN site's routed and shared experts). ring not null: the
// attention site's ring push (k_hc_post_ring's copy), spread over the grid.
template <bool POST>
__device__ __forceinline__ void hc_mix_body(const float* __restrict__ x, const u8* __restrict__ w,
                                            int wty, int rows, int width,
                                            float* __restrict__ part, double* __restrict__ ss,
                                            float* __restrict__ xn, const float* __restrict__ f,
                                            const float* __restrict__ sh, int kx,
                                            const float* __restrict__ post,
                                            const float* __restrict__ comb, int n, int d,
                                            const float* __restrict__ kv, float* __restrict__ ring,
                                            const long long* __restrict__ p0p, int swa, int dh) {
    // The fn rows are loaded before the wait (pdl_trigger), the state x after it.
    pdl_trigger();
    __shared__ float red[8][2];
    __shared__ double shd[33];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int e0 = blockIdx.x * 512 + 8 * threadIdx.x, r0 = blockIdx.y * 8;
    float acc[8];
    uint4 q[8];
    float4 qa[8], qb[8];
    if (wty == 1) {
#pragma unroll
        for (int k = 0; k < 8; k++)
            if (r0 + k < rows) q[k] = *(const uint4*)(w + ((i64)(r0 + k) * width + e0) * 2);
    } else {
#pragma unroll
        for (int k = 0; k < 8; k++)
            if (r0 + k < rows) {
                const float4* pw = (const float4*)(w + ((i64)(r0 + k) * width + e0) * 4);
                qa[k] = pw[0];
                qb[k] = pw[1];
            }
    }
    pdl_wait();
    float xs[8];
    if constexpr (POST) {
        // The ring push's first element a thread: its position and value are loaded here but
        // stored at the end, so no thread waits for them before its state loads (the
        // position's use, a 64-bit modulo, would stall every thread of the grid on it).
        const int nt = gridDim.x * gridDim.y * blockDim.x;
        const int gi = (blockIdx.y * gridDim.x + blockIdx.x) * blockDim.x + threadIdx.x;
        const bool push = ring && gi < dh;
        long long ppos = 0;
        float kv0 = 0.0f;
        if (push) {
            ppos = *p0p;
            kv0 = kv[gi];
        }
        const int sk = e0 / d, e = e0 - sk * d;
        float4 xa[HC_PRE1_MAX_HC], xb[HC_PRE1_MAX_HC];
#pragma unroll
        for (int j = 0; j < HC_PRE1_MAX_HC; j++)
            if (j < n) {
                const float4* px = (const float4*)(x + (i64)j * d + e);
                xa[j] = px[0];
                xb[j] = px[1];
            }
        float fv[8];
        if (kx == 0) {
            const float4* pf = (const float4*)(f + e);
            float4 fa = pf[0], fb = pf[1];
            fv[0] = fa.x, fv[1] = fa.y, fv[2] = fa.z, fv[3] = fa.w;
            fv[4] = fb.x, fv[5] = fb.y, fv[6] = fb.z, fv[7] = fb.w;
        } else {
#pragma unroll
            for (int i = 0; i < 8; i++) fv[i] = 0.0f;
            const float4* ps = (const float4*)(sh + e);
            if (kx <= HC_POST_MAX_KX) {
                // Every expert's output (and the shared expert's) loaded before the first sum:
                // one round trip to L2 instead of one per unrolled pair. The same adds in the
                // same order as the loop below.
                float4 fa[HC_POST_MAX_KX], fb[HC_POST_MAX_KX];
#pragma unroll
                for (int j = 0; j < HC_POST_MAX_KX; j++)
                    if (j < kx) {
                        const float4* pf = (const float4*)(f + (i64)j * d + e);
                        fa[j] = pf[0];
                        fb[j] = pf[1];
                    }
                const float4 sa = ps[0], sb = ps[1];
#pragma unroll
                for (int j = 0; j < HC_POST_MAX_KX; j++)
                    if (j < kx) {
                        fv[0] += fa[j].x, fv[1] += fa[j].y, fv[2] += fa[j].z, fv[3] += fa[j].w;
                        fv[4] += fb[j].x, fv[5] += fb[j].y, fv[6] += fb[j].z, fv[7] += fb[j].w;
                    }
                fv[0] += sa.x, fv[1] += sa.y, fv[2] += sa.z, fv[3] += sa.w;
                fv[4] += sb.x, fv[5] += sb.y, fv[6] += sb.z, fv[7] += sb.w;
            } else {
                for (int j = 0; j < kx; j++) {
                    const float4* pf = (const float4*)(f + (i64)j * d + e);
                    float4 fa = pf[0], fb = pf[1];
                    fv[0] += fa.x, fv[1] += fa.y, fv[2] += fa.z, fv[3] += fa.w;
                    fv[4] += fb.x, fv[5] += fb.y, fv[6] += fb.z, fv[7] += fb.w;
                }
                float4 sa = ps[0], sb = ps[1];
                fv[0] += sa.x, fv[1] += sa.y, fv[2] += sa.z, fv[3] += sa.w;
                fv[4] += sb.x, fv[5] += sb.y, fv[6] += sb.z, fv[7] += sb.w;
            }
        }
#pragma unroll
        for (int i = 0; i < 8; i++) {
            float xj[HC_PRE1_MAX_HC];
#pragma unroll
            for (int j = 0; j < HC_PRE1_MAX_HC; j++) {
                const float4& v = i < 4 ? xa[j] : xb[j];
                const int c = i & 3;
                xj[j] = c == 0 ? v.x : c == 1 ? v.y : c == 2 ? v.z : v.w;
            }
            xs[i] = hc_post_val<HC_PRE1_MAX_HC>(xj, fv[i], post, comb, n, sk);
        }
        if (blockIdx.y == 0) {
            float4* po = (float4*)(xn + e0);
            po[0] = make_float4(xs[0], xs[1], xs[2], xs[3]);
            po[1] = make_float4(xs[4], xs[5], xs[6], xs[7]);
        }
        if (push) {
            const long long slot = ppos % swa;
            ring[slot * dh + gi] = kv0;
            for (int i = gi + nt; i < dh; i += nt) ring[slot * dh + i] = kv[i];
        }
    } else {
        const float4* px = (const float4*)(x + e0);
        float4 xa = px[0], xb = px[1];
        xs[0] = xa.x, xs[1] = xa.y, xs[2] = xa.z, xs[3] = xa.w;
        xs[4] = xb.x, xs[5] = xb.y, xs[6] = xb.z, xs[7] = xb.w;
    }
    if (wty == 1) {
#pragma unroll
        for (int k = 0; k < 8; k++) {
            float a = 0.0f;
            if (r0 + k < rows) {
                u32 h[4] = {q[k].x, q[k].y, q[k].z, q[k].w};
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    a += h2f((u16)(h[i] & 0xffff)) * xs[2 * i];
                    a += h2f((u16)(h[i] >> 16)) * xs[2 * i + 1];
                }
            }
            acc[k] = a;
        }
    } else {
#pragma unroll
        for (int k = 0; k < 8; k++) {
            float a = 0.0f;
            if (r0 + k < rows) {
                float ws[8] = {qa[k].x, qa[k].y, qa[k].z, qa[k].w, qb[k].x, qb[k].y, qb[k].z, qb[k].w};
#pragma unroll
                for (int i = 0; i < 8; i++) a += ws[i] * xs[i];
            }
            acc[k] = a;
        }
    }
#pragma unroll
    for (int k = 0; k < 8; k++) {
        float v = warp_sum(acc[k]);
        if (lane == 0) red[k][warp] = v;
    }
    double q2 = 0.0;
#pragma unroll
    for (int i = 0; i < 8; i++) q2 += (double)xs[i] * (double)xs[i];
    // block_sum_d's barriers also publish `red`.
    q2 = block_sum_d(q2, shd);
    if (blockIdx.y == 0 && threadIdx.x == 0) ss[blockIdx.x] = q2;
    if (threadIdx.x < 8 && r0 + threadIdx.x < rows)
        part[(i64)blockIdx.x * rows + r0 + threadIdx.x] = red[threadIdx.x][0] + red[threadIdx.x][1];
}

extern "C" __global__ void __launch_bounds__(64)
    k_hc_mix_part(const float* __restrict__ x, const u8* __restrict__ w, int wty, int rows,
                  int width, float* __restrict__ part, double* __restrict__ ss) {
    hc_mix_body<false>(x, w, wty, rows, width, part, ss, nullptr, nullptr, nullptr, 0, nullptr,
                       nullptr, 0, 0, nullptr, nullptr, nullptr, 0, 0);
}

extern "C" __global__ void __launch_bounds__(64)
    k_hc_post_mix(const float* __restrict__ x, const u8* __restrict__ w, int wty, int rows,
                  int width, float* __restrict__ part, double* __restrict__ ss,
                  float* __restrict__ xn, const float* __restrict__ f,
                  const float* __restrict__ sh, int kx, const float* __restrict__ post,
                  const float* __restrict__ comb, int n, int d, const float* __restrict__ kv,
                  float* __restrict__ ring, const long long* __restrict__ p0p, int swa, int dh) {
    hc_mix_body<true>(x, w, wty, rows, width, part, ss, xn, f, sh, kx, post, comb, n, d, kv, ring,
                      p0p, swa, dh);
}

// hc_pre for one token from k_hc_mix_part's nb partials: mix and the state's RMS scale
// (the partials added in block order), then the same P_j / Q_k / Sinkhorn steps as
// k_hc_pre, y = Σ_j P_j·X_j (j in order, as hc.rs), the site's RMSNorm (norm not null), and
// the int8 forms of y the next products read (q0/d0: Q8_0 per 32, qk/dk: Q8_K per 256; null:
// skipped) from the same registers that are stored, with the qa_* kernels' functions, so the
// codes equal quantizing the stored y. n ≤ HC_PRE1_MAX_HC (the streams stay in registers);
// d must be a multiple of 256 and at most 8·(HC_PRE1_THREADS − 32): lane l of warp w < 16 holds elements 256w + 8l..+7 (the qa_*
// kernels' layout) in registers from the first load to the stores; the norm weights are
// loaded before the PDL wait and the state together with the partials, so the kernel makes
// one round trip to memory. The last warp runs Sinkhorn (only hc_post needs it; with clog
// it only stores the logits, for k_sinkhorn1) and leaves:
// the y warps meet at named barrier 1, without it. HC_PRE1_THREADS threads. lean
// (DS4_CUDA_HCP1_LEAN): the weights P_j and the norm's total formed in every warp instead of
// published through shared memory, two block barriers fewer on the kernel's path. head: the
// output head's mixing (§3.5) instead of a site's: the partials hold n rows (the weights w_j,
// formed as P_j is), and there is no post or combination to form; y is then h.
#define HC_PRE1_THREADS 544
__device__ __forceinline__ void hc_pre1_body(const float* __restrict__ x, const float* __restrict__ part,
                                             const double* __restrict__ ss, int nb, int n, int d,
                                             float rms_eps, float hc_eps, int iters,
                                             const float* __restrict__ scale3,
                                             const float* __restrict__ base, float* __restrict__ y,
                                             float* __restrict__ post, float* __restrict__ comb,
                                             const float* __restrict__ norm, signed char* __restrict__ q0,
                                             float* __restrict__ d0, signed char* __restrict__ qk,
                                             float* __restrict__ dk, float* __restrict__ clog,
                                             int hoist, int lean, int head) {
    __shared__ double sh[33];
    __shared__ double ssum;
    __shared__ float mx[FWD_MAX_MIX];
    __shared__ float pj[FWD_MAX_HC];
    const int w = head ? n : (2 + n) * n, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int nw = blockDim.x >> 5, ny = blockDim.x - 32;
    const int e0 = 8 * threadIdx.x;
    const bool on = warp < nw - 1 && e0 < d;
    float nv[8];
    if (on && norm) ld8f(norm + e0, nv);
    PROBE(5, 0);
    pdl_wait();
    PROBE(5, 1);
    float4 xa[HC_PRE1_MAX_HC], xb[HC_PRE1_MAX_HC];
    if (on) {
#pragma unroll
        for (int j = 0; j < HC_PRE1_MAX_HC; j++)
            if (j < n) {
                const float4* px = (const float4*)(x + (i64)j * d + e0);
                xa[j] = px[0];
                xb[j] = px[1];
            }
    }
    if (hoist && nb <= 32 && w < 2 * nw) {
        // One partial a lane (decode: n·d / 512 = 32 blocks) and at most two rows a warp
        // (warp, warp + nw; row w is the sum of squares): both rows' partials are loaded
        // before either sum, so the block waits for one round trip to L2 instead of two.
        // Each sum is the loop's below (+0.0, then the lane's partial; the same butterfly):
        // the same bits.
        const int r1 = warp, r2 = warp + nw;
        const bool on_b = lane < nb;
        float p1 = 0.0f, p2 = 0.0f;
        double q = 0.0;
        if (on_b) {
            if (r1 < w) p1 = part[(i64)lane * w + r1];
            if (r2 < w) p2 = part[(i64)lane * w + r2];
            if (r1 == w || r2 == w) q = ss[lane];
        }
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const int r = i == 0 ? r1 : r2;
            if (r < w) {
                float a = 0.0f;
                if (on_b) a += i == 0 ? p1 : p2;
                a = warp_sum(a);
                if (lane == 0) mx[r] = a;
            } else if (r == w) {
                double a = 0.0;
                if (on_b) a += q;
                a = warp_sum_d(a);
                if (lane == 0) ssum = a;
            }
        }
    } else {
        for (int r = warp; r <= w; r += nw) {
            if (r < w) {
                float a = 0.0f;
                for (int b = lane; b < nb; b += 32) a += part[(i64)b * w + r];
                a = warp_sum(a);
                if (lane == 0) mx[r] = a;
            } else {
                double a = 0.0;
                for (int b = lane; b < nb; b += 32) a += ss[b];
                a = warp_sum_d(a);
                if (lane == 0) ssum = a;
            }
        }
    }
    __syncthreads();
    PROBE(5, 2);
    float s = (float)(1.0 / sqrt(ssum / (double)(n * d) + (double)rms_eps));
    // lean: every warp forms the n weights P_j itself (the same expression in lanes j < n, read
    // by shuffles), so no block barrier publishes them; warp 0 still stores post.
    float pl = 0.0f;
    if (lean) {
        if (lane < n) pl = sigmoidf_(mx[lane] * s * scale3[0] + base[lane]) + hc_eps;
        if (!head && warp == 0 && lane >= 16 && lane - 16 < n)
            post[lane - 16] = 2.0f * sigmoidf_(mx[n + lane - 16] * s * scale3[1] + base[n + lane - 16]);
    } else {
        if (threadIdx.x < 32) {
            int l = threadIdx.x;
            if (l < n) pj[l] = sigmoidf_(mx[l] * s * scale3[0] + base[l]) + hc_eps;
            else if (!head && l >= 16 && l - 16 < n)
                post[l - 16] = 2.0f * sigmoidf_(mx[n + l - 16] * s * scale3[1] + base[n + l - 16]);
        }
        __syncthreads();
    }
    if (warp == nw - 1) {
        if (head) return;
        // n·n ≤ 16: the matrix fits one warp's registers. clog not null: its logits go to
        // k_sinkhorn1 (launched beside the site's first products), so this kernel, which
        // the next products wait for, does not wait for Sinkhorn's 2·iters steps.
        float cv = lane < n * n ? mx[2 * n + lane] * s * scale3[2] + base[2 * n + lane] : 0.0f;
        if (clog) {
            if (lane < n * n) clog[lane] = cv;
            return;
        }
        cv = sinkhorn_reg(cv, n, iters, hc_eps);
        if (lane < n * n) comb[lane] = cv;
        return;
    }
    float v[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    double acc2 = 0.0;
    if (on) {
#pragma unroll
        for (int j = 0; j < HC_PRE1_MAX_HC; j++)
            if (j < n) {
                float xs[8] = {xa[j].x, xa[j].y, xa[j].z, xa[j].w, xb[j].x, xb[j].y, xb[j].z, xb[j].w};
                float p = lean ? __shfl_sync(0xffffffffu, pl, j) : pj[j];
#pragma unroll
                for (int k = 0; k < 8; k++) v[k] += p * xs[k];
            }
#pragma unroll
        for (int k = 0; k < 8; k++) acc2 += (double)v[k] * (double)v[k];
    }
    float s2 = 1.0f;
    if (norm) {
        // block_sum_d's order over the y warps (the Sinkhorn warp's share was +0.0).
        acc2 = warp_sum_d(acc2);
        if (lane == 0) sh[warp] = acc2;
        asm volatile("bar.sync 1, %0;" ::"r"(ny) : "memory");
        double tot;
        if (lean) {
            // Every y warp adds the warp sums itself, as warp 0 does below (the same
            // butterfly, the same bits): no second barrier to publish the total.
            tot = warp_sum_d(lane < (ny >> 5) ? sh[lane] : 0.0);
        } else {
            if (warp == 0) {
                double r = lane < (ny >> 5) ? sh[lane] : 0.0;
                r = warp_sum_d(r);
                if (lane == 0) sh[32] = r;
            }
            asm volatile("bar.sync 1, %0;" ::"r"(ny) : "memory");
            tot = sh[32];
        }
        s2 = (float)(1.0 / sqrt(tot / (double)d + (double)rms_eps));
    }
    PROBE(5, 3);
    if (!on) return;
    if (norm) {
#pragma unroll
        for (int k = 0; k < 8; k++) v[k] = v[k] * s2 * nv[k];
    }
    float4* py = (float4*)(y + e0);
    py[0] = make_float4(v[0], v[1], v[2], v[3]);
    py[1] = make_float4(v[4], v[5], v[6], v[7]);
    u32 w0, w1;
    if (q0) {
        float dd = q8_0_lane(v, &w0, &w1);
        *(uint2*)(q0 + e0) = make_uint2(w0, w1);
        if ((lane & 3) == 0) d0[e0 >> 5] = dd;
    }
    if (qk) {
        float dd = q8k_lane(v, lane, &w0, &w1);
        *(uint2*)(qk + e0) = make_uint2(w0, w1);
        if (lane == 0) dk[e0 >> 8] = dd;
    }
    PROBE(5, 7);
}

extern "C" __global__ void __launch_bounds__(HC_PRE1_THREADS, 1)
    k_hc_pre1(const float* __restrict__ x, const float* __restrict__ part,
              const double* __restrict__ ss, int nb, int n, int d, float rms_eps, float hc_eps,
              int iters, const float* __restrict__ scale3, const float* __restrict__ base,
              float* __restrict__ y, float* __restrict__ post, float* __restrict__ comb,
              const float* __restrict__ norm, signed char* __restrict__ q0,
              float* __restrict__ d0, signed char* __restrict__ qk, float* __restrict__ dk,
              float* __restrict__ clog, int hoist, int lean, int head) {
    pdl_trigger();
    hc_pre1_body(x, part, ss, nb, n, d, rms_eps, hc_eps, iters, scale3, base, y, post, comb, norm,
                 q0, d0, qk, dk, clog, hoist, lean, head);
}

// The Sinkhorn k_hc_pre1 left (clog: the n·n scaled logits): comb = sinkhorn_reg(clog), the
// same function on the same values. One warp.
extern "C" __global__ void k_sinkhorn1(const float* __restrict__ clog, int n, int iters,
                                       float hc_eps, float* __restrict__ comb) {
    const int lane = threadIdx.x & 31;
    float cv = lane < n * n ? clog[lane] : 0.0f;
    cv = sinkhorn_reg(cv, n, iters, hc_eps);
    if (lane < n * n) comb[lane] = cv;
}

// k_rms_norm of one row (decode) plus its Q8_0 codes/scales for the next product (q8_0_lane,
// as qa_q8_0 on the stored values). width a multiple of 256; lane layout as k_hc_pre1.
// one (width ≤ 8·blockDim): the row stays in registers from its one load to its store and
// the norm weights are loaded with it (written before the PDL wait, as no kernel writes them;
// ptxas may issue them after it, beside the row's loads), so nothing is loaded after the
// reduction (the loop form loads both the row again and the weights there: one more round trip
// to memory on the decode path). The same operations on the same values.
extern "C" __global__ void k_rms_norm_q8(float* __restrict__ x, const float* __restrict__ w,
                                         int width, float eps, signed char* __restrict__ q0,
                                         float* __restrict__ d0, int one) {
    PROBE(3, 0);
    pdl_trigger();
    __shared__ double sh[33];
    int lane = threadIdx.x & 31;
    if (one && width <= 8 * (int)blockDim.x) {
        const int e0 = 8 * threadIdx.x;
        const bool on = e0 < width;
        float wv[8];
        if (on && w) ld8f(w + e0, wv);
        pdl_wait();
        PROBE(3, 1);
        float v[8];
        double a2 = 0.0;
        if (on) {
            ld8f(x + e0, v);
#pragma unroll
            for (int k = 0; k < 8; k++) a2 += (double)v[k] * (double)v[k];
        }
        float s = (float)(1.0 / sqrt(block_sum_d(a2, sh) / (double)width + (double)eps));
        PROBE(3, 2);
        if (!on) return;
#pragma unroll
        for (int k = 0; k < 8; k++) v[k] = w ? v[k] * s * wv[k] : v[k] * s;
        float4* px = (float4*)(x + e0);
        px[0] = make_float4(v[0], v[1], v[2], v[3]);
        px[1] = make_float4(v[4], v[5], v[6], v[7]);
        u32 w0, w1;
        float dd = q8_0_lane(v, &w0, &w1);
        *(uint2*)(q0 + e0) = make_uint2(w0, w1);
        if ((lane & 3) == 0) d0[e0 >> 5] = dd;
        PROBE(3, 7);
        return;
    }
    pdl_wait();
    double a2 = 0.0;
    for (int e0 = 8 * threadIdx.x; e0 < width; e0 += 8 * blockDim.x) {
        const float4* px = (const float4*)(x + e0);
        float4 a = px[0], b = px[1];
        float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
        for (int k = 0; k < 8; k++) a2 += (double)v[k] * (double)v[k];
    }
    float s = (float)(1.0 / sqrt(block_sum_d(a2, sh) / (double)width + (double)eps));
    for (int e0 = 8 * threadIdx.x; e0 < width; e0 += 8 * blockDim.x) {
        float4* px = (float4*)(x + e0);
        float4 a = px[0], b = px[1];
        float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
        for (int k = 0; k < 8; k++) v[k] = w ? v[k] * s * w[e0 + k] : v[k] * s;
        px[0] = make_float4(v[0], v[1], v[2], v[3]);
        px[1] = make_float4(v[4], v[5], v[6], v[7]);
        u32 w0, w1;
        float dd = q8_0_lane(v, &w0, &w1);
        *(uint2*)(q0 + e0) = make_uint2(w0, w1);
        if ((lane & 3) == 0) d0[e0 >> 5] = dd;
    }
}

// hc_post of element e of token t given the sublayer output fv there:
// X_k ← Q_k·fv + Σ_j M[j][k]·X_j, in place (the per-element operations of every decode form).
// NC > 0: n = NC known at compile time, so the loops unroll and xs/out stay in registers
// (with a run-time n they live in local memory: ~26 local loads/stores on the decode path's
// dependent chain). Same operations in the same order either way.
template <int NC>
__device__ __forceinline__ void hc_post_elem_t(float* __restrict__ x, float fv,
                                               const float* __restrict__ post,
                                               const float* __restrict__ comb, int nr, int d,
                                               int t, int e) {
    const int n = NC > 0 ? NC : nr;
    float* xt = x + (long long)t * n * d;
    const float* q = post + t * n;
    const float* mm = comb + (long long)t * n * n;
    float xs[FWD_MAX_HC], out[FWD_MAX_HC];
#pragma unroll
    for (int j = 0; j < n; j++) xs[j] = xt[j * d + e];
#pragma unroll
    for (int k = 0; k < n; k++) out[k] = hc_post_val<(NC > 0 ? NC : FWD_MAX_HC)>(xs, fv, q, mm, n, k);
#pragma unroll
    for (int k = 0; k < n; k++) xt[k * d + e] = out[k];
}

__device__ __forceinline__ void hc_post_elem(float* __restrict__ x, float fv,
                                             const float* __restrict__ post,
                                             const float* __restrict__ comb, int n, int d, int t,
                                             int e) {
    if (n == 4) hc_post_elem_t<4>(x, fv, post, comb, n, d, t, e);
    else hc_post_elem_t<0>(x, fv, post, comb, n, d, t, e);
}

// hc_post in place: X_k ← Q_k·F + Σ_j M[j][k]·X_j (grid: x = element blocks, y = token).
extern "C" __global__ void k_hc_post(float* __restrict__ x, const float* __restrict__ f,
                                     const float* __restrict__ post,
                                     const float* __restrict__ comb, int n, int d) {
    pdl_enter();
    int t = blockIdx.y, e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= d) return;
    hc_post_elem(x, f[(long long)t * d + e], post, comb, n, d, t, e);
}

// Decode attention site: k_ring_push of the token's KV row (n = 1: ring slot pos % swa, done
// by block (0, 0)) and k_hc_post in one launch; the same copies and the same per-element
// operations as the two kernels, in the same place in the stream (after attention has read
// the ring).
extern "C" __global__ void k_hc_post_ring(float* __restrict__ x, const float* __restrict__ f,
                                          const float* __restrict__ post,
                                          const float* __restrict__ comb, int n, int d,
                                          const float* __restrict__ kv, float* __restrict__ ring,
                                          const long long* __restrict__ p0p, int swa, int dh) {
    pdl_enter();
    if (blockIdx.x == 0 && blockIdx.y == 0) {
        long long slot = *p0p % swa;
        for (int e = threadIdx.x; e < dh; e += blockDim.x) ring[slot * dh + e] = kv[e];
    }
    int t = blockIdx.y, e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= d) return;
    hc_post_elem(x, f[(long long)t * d + e], post, comb, n, d, t, e);
}

// Decode FFN site: k_moe_sum then k_hc_post in one pass (t = blockIdx.y): the sublayer
// output f = Σ_j dn[t·k + j] + sh[t] is formed per element with k_moe_sum's operations and
// used directly (f is not stored), then X_k ← Q_k·f + Σ_j M[j][k]·X_j as k_hc_post.
extern "C" __global__ void k_hc_post_moe(float* __restrict__ x, const float* __restrict__ dn,
                                         const float* __restrict__ sh, int kx,
                                         const float* __restrict__ post,
                                         const float* __restrict__ comb, int n, int d) {
    pdl_enter();
    int t = blockIdx.y, e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= d) return;
    float fv = 0.0f;
    for (int j = 0; j < kx; j++) fv += dn[((long long)t * kx + j) * d + e];
    fv += sh[(long long)t * d + e];
    hc_post_elem(x, fv, post, comb, n, d, t, e);
}

// ---- prefill (n > 1 tokens) forms of hc_post: 4 consecutive elements a thread (16-byte
// loads and stores; d % 4 == 0), each element with exactly k_hc_post's operations. NC > 0:
// n = NC known at compile time (the loops unroll, the arrays stay in registers).
// x16 (not null): f16 of the new state times HC_X16_SCALE too, the input of the next site's
// HC `fn` GEMM (which multiplies back by 1/HC_X16_SCALE in its alpha).
#define HC_X16_SCALE 0.0625f
template <int NC>
__device__ __forceinline__ void hc_post4_t(float* xt, const float* fv, const float* q,
                                           const float* mm, int nr, int d, int e, u16* x16) {
    const int n = NC > 0 ? NC : nr;
    float xs[FWD_MAX_HC][4];
#pragma unroll
    for (int j = 0; j < n; j++) {
        float4 v = *(const float4*)(xt + (long long)j * d + e);
        xs[j][0] = v.x;
        xs[j][1] = v.y;
        xs[j][2] = v.z;
        xs[j][3] = v.w;
    }
#pragma unroll
    for (int k = 0; k < n; k++) {
        float o[4];
#pragma unroll
        for (int c = 0; c < 4; c++) {
            o[c] = q[k] * fv[c];
#pragma unroll
            for (int j = 0; j < n; j++) o[c] += mm[j * n + k] * xs[j][c];
        }
        *(float4*)(xt + (long long)k * d + e) = make_float4(o[0], o[1], o[2], o[3]);
        if (x16) {
            uint2 h;
            h.x = (u32)f2h(o[0] * HC_X16_SCALE) | ((u32)f2h(o[1] * HC_X16_SCALE) << 16);
            h.y = (u32)f2h(o[2] * HC_X16_SCALE) | ((u32)f2h(o[3] * HC_X16_SCALE) << 16);
            *(uint2*)(x16 + (long long)k * d + e) = h;
        }
    }
}

__device__ __forceinline__ void hc_post4(float* xt, const float* fv, const float* q,
                                         const float* mm, int n, int d, int e, u16* x16) {
    if (n == 4) hc_post4_t<4>(xt, fv, q, mm, n, d, e, x16);
    else hc_post4_t<0>(xt, fv, q, mm, n, d, e, x16);
}

// k_hc_post, 4 elements a thread (x16: also f16 of the new state). grid (d/4/256, tokens).
extern "C" __global__ void k_hc_post4(float* __restrict__ x, const float* __restrict__ f,
                                      const float* __restrict__ post,
                                      const float* __restrict__ comb, int n, int d,
                                      u16* __restrict__ x16) {
    int t = blockIdx.y, e = 4 * (blockIdx.x * blockDim.x + threadIdx.x);
    if (e >= d) return;
    float4 f4 = *(const float4*)(f + (long long)t * d + e);
    float fv[4] = {f4.x, f4.y, f4.z, f4.w};
    hc_post4(x + (long long)t * n * d, fv, post + t * n, comb + (long long)t * n * n, n, d, e,
             x16 ? x16 + (long long)t * n * d : nullptr);
}

// Prefill FFN site: pf_scatter + k_moe_sum + k_hc_post in one pass. The routed rows are read
// where the grouped expert product left them (sorted row inv[t·k + j] of dns), so the slot-
// order copy dn is never written; f = Σ_j dns[inv[t·k + j]] + sh[t] in k_moe_sum's order,
// then hc_post as k_hc_post. grid (d/4/256, tokens).
extern "C" __global__ void k_hc_post_moe_pf(float* __restrict__ x, const float* __restrict__ dns,
                                            const int* __restrict__ inv,
                                            const float* __restrict__ sh, int kx,
                                            const float* __restrict__ post,
                                            const float* __restrict__ comb, int n, int d,
                                            u16* __restrict__ x16) {
    int t = blockIdx.y, e = 4 * (blockIdx.x * blockDim.x + threadIdx.x);
    if (e >= d) return;
    float fv[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int j = 0; j < kx; j++) {
        float4 v = *(const float4*)(dns + (long long)inv[t * kx + j] * d + e);
        fv[0] += v.x;
        fv[1] += v.y;
        fv[2] += v.z;
        fv[3] += v.w;
    }
    float4 s4 = *(const float4*)(sh + (long long)t * d + e);
    fv[0] += s4.x;
    fv[1] += s4.y;
    fv[2] += s4.z;
    fv[3] += s4.w;
    hc_post4(x + (long long)t * n * d, fv, post + t * n, comb + (long long)t * n * n, n, d, e,
             x16 ? x16 + (long long)t * n * d : nullptr);
}

// ---------------------------------------------------------------------------------------------
// k_hc_post4_fn / k_hc_post_moe_fn (production prefill, n = 4 streams): k_hc_post4 /
// k_hc_post_moe_pf with the next site's HC `fn` product fused in place of the f16 copy of the
// new state. That product (mix[t] = fn · X_t over the N·D = 16384 values of a token's state,
// 24 outputs) used to be a cuBLAS GEMM reading x16, the f16 copy of X·HC_X16_SCALE that the
// post kernel wrote: 67 MB written and read back a site, plus the GEMM's split-K reduction.
// Here a block owns HPF_TT tokens and all of their state, walked in chunks of HPF_DC dims of
// every stream: each thread forms 4 dims of one token's 4 new streams (k_hc_post4's
// operations, so X is bit-identical to it), stores them, and puts f16(X·HC_X16_SCALE) (x16's
// values) into a shared tile [token][stream·DC + dim]; then the 16 warps multiply the chunk's
// 512 columns with the fn rows on mma.sync m16n8k16 (prefill.cu's mma16816: tokens = M,
// outputs = N in 3 n8 tiles, f32 accumulation; the fn fragments are loaded from global memory
// before the chunk's state), and at the end the warps' partial sums are added in warp order
// and scaled back by 1/HC_X16_SCALE (exact). The same f16 operands as the GEMM; only the
// order of the f32 additions differs (deterministic). Needs d % HPF_DC == 0, fn: F16
// [nmix ≤ 24][4·d]. 128 blocks for a 2048-token chunk, one an SM (126 / 128 registers):
// k_hc_post4_fn 90 µs against k_hc_post4's 88 plus the GEMM's 25, k_hc_post_moe_fn 126
// against 145 + 25 (H200 ncu; bench/RESULTS.md, twentieth session). Loading the next chunk's
// inputs a chunk ahead (k_hc_post4_fn) changed nothing.
// grid: ceil(n_tok / HPF_TT), 512 threads; thread tid: token tid / 32 of the block, dims
// 4·(tid % 32) of each chunk.
// ---------------------------------------------------------------------------------------------
#define HPF_TT 16
#define HPF_DC 128
#define HPF_KS (4 * HPF_DC + 8)  // tile row stride in halves (+8: ldmatrix rows on other banks)
#define HPF_MAXK 6               // routed rows a token (k_hc_post_moe_fn)

template <bool MOE>
__device__ __forceinline__ void hpf_body(float* __restrict__ x, const float* __restrict__ f,
                                         const float* __restrict__ dns,
                                         const int* __restrict__ inv,
                                         const float* __restrict__ sh, int kx,
                                         const float* __restrict__ post,
                                         const float* __restrict__ comb, int n_tok, int d,
                                         const u16* __restrict__ fnw, int nmix,
                                         float* __restrict__ mix) {
    __shared__ __align__(16) u16 xs[2][HPF_TT * HPF_KS];
    static_assert(16 * HPF_TT * 25 * 4 <= sizeof(xs), "the partial sums reuse the tiles");
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int t = blockIdx.x * HPF_TT + warp;  // this thread's token (warp = its row)
    const bool tv = t < n_tok;
    const int eo = 4 * lane, ncol = 4 * d;
    float q[4], mm[16];
    int rows[HPF_MAXK];
    if (tv) {
#pragma unroll
        for (int k = 0; k < 4; k++) q[k] = post[t * 4 + k];
#pragma unroll
        for (int i = 0; i < 16; i++) mm[i] = comb[(long long)t * 16 + i];
        if (MOE) {
#pragma unroll
            for (int j = 0; j < HPF_MAXK; j++) rows[j] = j < kx ? inv[t * kx + j] : 0;
        }
    }
    // fn rows of this thread's B fragments: outputs 8·nt + g (rows past nmix read row 0; their
    // sums are not stored).
    const u16* wr[3];
#pragma unroll
    for (int nt = 0; nt < 3; nt++) {
        int o = 8 * nt + g;
        wr[nt] = fnw + (long long)(o < nmix ? o : 0) * ncol + 2 * t4;
    }
    float acc[3][4];
#pragma unroll
    for (int nt = 0; nt < 3; nt++) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
    // ldmatrix: lane l gives row l % 16, columns 8·(l / 16) of the k16 step.
    const int lr = lane & 15, lc = 8 * (lane >> 4);
    float* xt = x + (long long)t * 4 * d;
    const int nch = d / HPF_DC;
    for (int c = 0; c < nch; c++) {
        u16* xb = xs[c & 1];
        // This warp's 2 k16 steps of the chunk's 512 columns (stream kk / 128): their fn
        // fragments, in flight while the state is formed.
        u32 bf[2][3][2];
#pragma unroll
        for (int s = 0; s < 2; s++) {
            int kk = 32 * warp + 16 * s;
            long long col = (long long)(kk / HPF_DC) * d + c * HPF_DC + kk % HPF_DC;
#pragma unroll
            for (int nt = 0; nt < 3; nt++) {
                bf[s][nt][0] = *(const u32*)(wr[nt] + col);
                bf[s][nt][1] = *(const u32*)(wr[nt] + col + 8);
            }
        }
        const int e = c * HPF_DC + eo;
        uint2 h[4] = {make_uint2(0u, 0u), make_uint2(0u, 0u), make_uint2(0u, 0u),
                      make_uint2(0u, 0u)};
        if (tv) {
            float xv[4][4], fv[4];
#pragma unroll
            for (int j = 0; j < 4; j++) {
                float4 v = *(const float4*)(xt + (long long)j * d + e);
                xv[j][0] = v.x;
                xv[j][1] = v.y;
                xv[j][2] = v.z;
                xv[j][3] = v.w;
            }
            if (MOE) {
                float4 r[HPF_MAXK];
#pragma unroll
                for (int j = 0; j < HPF_MAXK; j++)
                    if (j < kx) r[j] = *(const float4*)(dns + (long long)rows[j] * d + e);
                float4 s4 = *(const float4*)(sh + (long long)t * d + e);
                fv[0] = fv[1] = fv[2] = fv[3] = 0.0f;
#pragma unroll
                for (int j = 0; j < HPF_MAXK; j++)
                    if (j < kx) {
                        fv[0] += r[j].x;
                        fv[1] += r[j].y;
                        fv[2] += r[j].z;
                        fv[3] += r[j].w;
                    }
                fv[0] += s4.x;
                fv[1] += s4.y;
                fv[2] += s4.z;
                fv[3] += s4.w;
            } else {
                float4 f4 = *(const float4*)(f + (long long)t * d + e);
                fv[0] = f4.x;
                fv[1] = f4.y;
                fv[2] = f4.z;
                fv[3] = f4.w;
            }
            // hc_post4_t<4>'s operations, in its order.
#pragma unroll
            for (int k = 0; k < 4; k++) {
                float o[4];
#pragma unroll
                for (int cc = 0; cc < 4; cc++) {
                    o[cc] = q[k] * fv[cc];
#pragma unroll
                    for (int j = 0; j < 4; j++) o[cc] += mm[j * 4 + k] * xv[j][cc];
                }
                *(float4*)(xt + (long long)k * d + e) = make_float4(o[0], o[1], o[2], o[3]);
                h[k].x = (u32)f2h(o[0] * HC_X16_SCALE) | ((u32)f2h(o[1] * HC_X16_SCALE) << 16);
                h[k].y = (u32)f2h(o[2] * HC_X16_SCALE) | ((u32)f2h(o[3] * HC_X16_SCALE) << 16);
            }
        }
#pragma unroll
        for (int k = 0; k < 4; k++) *(uint2*)(xb + warp * HPF_KS + k * HPF_DC + eo) = h[k];
        // The chunk's tile is complete; the buffer written next (chunk c + 1's) was last read
        // by chunk c − 1's products, which every warp finished before this barrier.
        __syncthreads();
#pragma unroll
        for (int s = 0; s < 2; s++) {
            u32 a[4];
            pf_ldsm4(a, xb + lr * HPF_KS + 32 * warp + 16 * s + lc);
#pragma unroll
            for (int nt = 0; nt < 3; nt++) mma16816(acc[nt], a, bf[s][nt]);
        }
    }
    // The warps' partial sums [warp][token][25] over the tiles (every warp is past its last
    // products after this barrier). acc[nt][0..1]: token g, outputs 8nt + 2t4 (+1); [2..3]:
    // token g + 8.
    __syncthreads();
    float* red = (float*)xs[0];
#pragma unroll
    for (int nt = 0; nt < 3; nt++) {
        int o = 8 * nt + 2 * t4;
        red[(warp * HPF_TT + g) * 25 + o] = acc[nt][0];
        red[(warp * HPF_TT + g) * 25 + o + 1] = acc[nt][1];
        red[(warp * HPF_TT + g + 8) * 25 + o] = acc[nt][2];
        red[(warp * HPF_TT + g + 8) * 25 + o + 1] = acc[nt][3];
    }
    __syncthreads();
    if (tid < HPF_TT * 24) {
        int tt = tid / 24, o = tid % 24, tk = blockIdx.x * HPF_TT + tt;
        if (o < nmix && tk < n_tok) {
            float s = 0.0f;
            for (int w = 0; w < 16; w++) s += red[(w * HPF_TT + tt) * 25 + o];
            mix[(long long)tk * nmix + o] = s * (1.0f / HC_X16_SCALE);
        }
    }
}

extern "C" __global__ void __launch_bounds__(512, 1)
    k_hc_post4_fn(float* __restrict__ x, const float* __restrict__ f,
                  const float* __restrict__ post, const float* __restrict__ comb, int n_tok,
                  int d, const u16* __restrict__ fnw, int nmix, float* __restrict__ mix) {
    hpf_body<false>(x, f, nullptr, nullptr, nullptr, 0, post, comb, n_tok, d, fnw, nmix, mix);
}

extern "C" __global__ void __launch_bounds__(512, 1)
    k_hc_post_moe_fn(float* __restrict__ x, const float* __restrict__ dns,
                     const int* __restrict__ inv, const float* __restrict__ sh, int kx,
                     const float* __restrict__ post, const float* __restrict__ comb, int n_tok,
                     int d, const u16* __restrict__ fnw, int nmix, float* __restrict__ mix) {
    hpf_body<true>(x, nullptr, dns, inv, sh, kx, post, comb, n_tok, d, fnw, nmix, mix);
}

// Output head (§3.5): h = Σ_j w_j·X_j with w_j = sigmoid(m_j·s·scale + base_j) + eps, then
// RMSNorm(h; output_norm). blockIdx.x = token.
extern "C" __global__ void k_hc_head(const float* __restrict__ x, const float* __restrict__ mix,
                                     int n, int d, float rms_eps, float hc_eps, float scale,
                                     const float* __restrict__ base,
                                     const float* __restrict__ norm, float* __restrict__ h) {
    __shared__ double sh[33];
    __shared__ float wj[FWD_MAX_HC];
    int t = blockIdx.x;
    const float* xt = x + (long long)t * n * d;
    float s = rms_scale_block(xt, n * d, rms_eps, sh);
    if (threadIdx.x < n)
        wj[threadIdx.x] = sigmoidf_(mix[t * n + threadIdx.x] * s * scale + base[threadIdx.x]) + hc_eps;
    __syncthreads();
    float* ht = h + (long long)t * d;
    for (int e = threadIdx.x; e < d; e += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < n; j++) acc += wj[j] * xt[j * d + e];
        ht[e] = acc;
    }
    float s2 = rms_scale_block(ht, d, rms_eps, sh);
    for (int e = threadIdx.x; e < d; e += blockDim.x) ht[e] = ht[e] * s2 * norm[e];
}

// ---------------------------------------------------------------- compressor (cache.rs)

// k_comp_pool / k_comp_state in attn.cu.

// ---------------------------------------------------------------- indexer (attention.rs select)

// Exact mode (the reference order: a warp per row, lane-strided dots, butterfly sums, heads
// in order); production mode uses the tiled k_idx_scores of attn.cu.
// score[t][row] = Σ_h w_h·max(0, q_h·K_row) for rows visible to token t (one warp per row;
// grid: x = row blocks of 8, y = token).
extern "C" __global__ void k_idx_scores_ref(const float* __restrict__ q, const float* __restrict__ w,
                                        float wscale, const float* __restrict__ krows, int n_head, int id,
                                        const long long* __restrict__ p0p, int r, float* __restrict__ scores,
                                        int ld) {
    const long long p0 = *p0p;
    int t = blockIdx.y;
    int row = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    long long vis = (p0 + t + 1) / r;
    if (row >= vis) return;
    const float* k = krows + (long long)row * id;
    const float* qt = q + (long long)t * n_head * id;
    float acc = 0.0f;
    for (int h = 0; h < n_head; h++) {
        float dsum = 0.0f;
        for (int e = lane; e < id; e += 32) dsum += qt[h * id + e] * k[e];
        dsum = warp_sum(dsum);
        acc += w[t * n_head + h] * wscale * fmaxf(dsum, 0.0f);
    }
    if (lane == 0) scores[(long long)t * ld + row] = acc;
}

// Float as an unsigned key whose order is f32::total_cmp's order.
__device__ __forceinline__ unsigned okey(float f) {
    unsigned u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Radix select of the k-th largest key, 8 bits a pass from the top. topk_count adds one key
// to the pass's 256-bin histogram when it matches the digits chosen so far; scores are
// concentrated in few digits (the first pass sees the exponent), so the lanes of a warp that
// share a bin add their count with one atomic (same counts). Every thread of the block calls it.
__device__ __forceinline__ void topk_count(unsigned* hist, unsigned key, bool valid,
                                           unsigned mask, unsigned prefix, int shift) {
    bool hit = valid && (key & mask) == prefix;
    unsigned act = __ballot_sync(0xffffffffu, hit);
    if (hit) {
        unsigned bin = (key >> shift) & 255u;
        unsigned m = __match_any_sync(act, bin);
        if ((m & ((1u << (threadIdx.x & 31)) - 1u)) == 0) atomicAdd(&hist[bin], __popc(m));
    }
}

// The digit holding the rem-th largest key of the pass's histogram `hist` (shared memory,
// complete): the one bin whose suffix count (keys with this digit or a higher one) reaches rem
// while the bins above it do not. A thread per bin takes its suffix count from a warp scan
// plus the warps above. Updates prefix/rem/mask for the next pass; block-wide, needs >= 256
// threads, ends with a barrier.
__device__ __forceinline__ void topk_pick(const unsigned* hist, int shift, unsigned* wsum,
                                          unsigned* sh_pr, unsigned& prefix, unsigned& rem,
                                          unsigned& mask) {
    unsigned hv = 0, suf = 0;
    if (threadIdx.x < 256) {
        int l = threadIdx.x & 31;
        hv = hist[threadIdx.x];
        suf = hv;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            unsigned u = __shfl_down_sync(0xffffffffu, suf, o);
            if (l + o < 32) suf += u;
        }
        if (l == 0) wsum[threadIdx.x >> 5] = suf;
    }
    __syncthreads();
    if (threadIdx.x < 256) {
        for (int w2 = (threadIdx.x >> 5) + 1; w2 < 8; w2++) suf += wsum[w2];
        if (suf >= rem && suf - hv < rem) {
            sh_pr[0] = prefix | ((unsigned)threadIdx.x << shift);
            sh_pr[1] = rem - (suf - hv);
        }
    }
    __syncthreads();
    prefix = sh_pr[0];
    rem = sh_pr[1];
    mask |= 255u << shift;
    __syncthreads();
}

// Writes rows lo..hi-1 of s that are taken (key > prefix, or key == prefix with an equal-key
// rank below rem, ranks counted in row order from eq_seen) to out[base..] in ascending order.
__device__ __forceinline__ void topk_emit(const float* s, int lo, int hi, unsigned prefix,
                                          unsigned rem, int base, int eq_seen, int* shs,
                                          int* out) {
    for (int c0 = lo; c0 < hi; c0 += blockDim.x) {
        int i = c0 + threadIdx.x;
        unsigned key = i < hi ? okey(s[i]) : 0u;
        bool gt = i < hi && key > prefix, eq = i < hi && key == prefix;
        int eq_tot, take_tot;
        int eq_rank = block_scan_flag(eq, shs, &eq_tot) + eq_seen;
        bool take = gt || (eq && eq_rank < (int)rem);
        int at = block_scan_flag(take, shs, &take_tot) + base;
        if (take) out[at] = i;
        base += take_tot;
        eq_seen += eq_tot;
    }
}

// The compressed rows token blockIdx.x attends to (ratio-4 layers): all visible rows when
// there are at most k, else the k best scores (ties to the lower row) by an exact radix
// select; written in ascending row order (as the CPU sorts them). 1024 threads.
extern "C" __global__ void k_topk_rows(const float* __restrict__ scores, int ld, const long long* __restrict__ p0p,
                                       int r, int k, int* __restrict__ sel,
                                       int* __restrict__ cnt) {
    const long long p0 = *p0p;
    __shared__ unsigned hist[256];
    __shared__ unsigned sh_pr[2];
    __shared__ unsigned wsum[8];
    __shared__ int shs[33];
    int t = blockIdx.x;
    int n_t = (int)((p0 + t + 1) / r);
    int* out = sel + (long long)t * k;
    if (n_t <= k) {
        for (int i = threadIdx.x; i < n_t; i += blockDim.x) out[i] = i;
        if (threadIdx.x == 0) cnt[t] = n_t;
        return;
    }
    const float* s = scores + (long long)t * ld;
    unsigned prefix = 0, mask = 0, rem = k;
    for (int pass = 0; pass < 4; pass++) {
        int shift = 24 - 8 * pass;
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        for (int c0 = 0; c0 < n_t; c0 += blockDim.x) {
            int i = c0 + threadIdx.x;
            topk_count(hist, i < n_t ? okey(s[i]) : 0u, i < n_t, mask, prefix, shift);
        }
        __syncthreads();
        topk_pick(hist, shift, wsum, sh_pr, prefix, rem, mask);
    }
    // prefix = the k-th largest key; take every larger key and the first `rem` equal ones.
    topk_emit(s, 0, n_t, prefix, rem, 0, 0, shs, out);
    if (threadIdx.x == 0) cnt[t] = k;
}

// Barrier of all blocks of a k_topk_mb launch (bar[0]: arrivals, bar[1]: generation). The
// host sizes the grid to at most one block per SM, and a block arrives only after all of them
// started (they are resident together; nothing they wait for depends on them).
__device__ __forceinline__ void topk_grid_sync(unsigned* bar) {
    __syncthreads();
    if (threadIdx.x == 0) {
        volatile unsigned* gen = bar + 1;
        unsigned g = *gen;
        __threadfence();
        if (atomicAdd(bar, 1u) == gridDim.x - 1) {
            atomicExch(bar, 0u);
            __threadfence();
            atomicAdd(bar + 1, 1u);
        } else {
            while (*gen == g) __nanosleep(64);
        }
        __threadfence();
    }
    __syncthreads();
}

// k_topk_rows for one token (decode) spread over the grid's blocks: block b counts rows
// b·per.. of the visible ones into its shared histogram and adds it to the pass's global one
// (integer atomics: the same counts in any order), a grid barrier, then every block picks the
// same digit from the complete histogram. After the 4 passes each block counts its keys above
// and equal to the k-th, a barrier, and writes its taken rows at the offset of the blocks
// before it. Same selection as k_topk_rows. `work`: TOPK_MB_WORDS u32, zero before the first
// launch; each launch leaves the histograms zero and the barrier reusable. 512 threads,
// grid <= TOPK_MB_MAXG blocks.
#define TOPK_MB_MAXG 64
extern "C" __global__ void __launch_bounds__(512)
    k_topk_mb(const float* __restrict__ s, const long long* __restrict__ p0p, int r, int k,
              int* __restrict__ out, int* __restrict__ cnt, unsigned* __restrict__ work) {
    __shared__ unsigned hist[256];
    __shared__ unsigned sh_pr[2];
    __shared__ unsigned wsum[8];
    __shared__ int shs[33];
    __shared__ int sh_base[2];
    unsigned* ghist = work;                    // 4 passes x 256 bins
    unsigned* part = work + 1024;              // (above, equal) per block
    unsigned* bar = work + 1024 + 2 * TOPK_MB_MAXG;
    const int n_t = (int)((*p0p + 1) / r);
    if (n_t <= k) {  // uniform over the grid: no block reaches a barrier
        if (blockIdx.x == 0) {
            for (int i = threadIdx.x; i < n_t; i += blockDim.x) out[i] = i;
            if (threadIdx.x == 0) cnt[0] = n_t;
        }
        return;
    }
    const int per = (n_t + gridDim.x - 1) / gridDim.x;
    const int lo = min(n_t, (int)blockIdx.x * per), hi = min(n_t, lo + per);
    unsigned prefix = 0, mask = 0, rem = k;
    for (int pass = 0; pass < 4; pass++) {
        int shift = 24 - 8 * pass;
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        for (int c0 = lo; c0 < hi; c0 += blockDim.x) {
            int i = c0 + threadIdx.x;
            topk_count(hist, i < hi ? okey(s[i]) : 0u, i < hi, mask, prefix, shift);
        }
        __syncthreads();
        for (int i = threadIdx.x; i < 256; i += blockDim.x)
            if (hist[i]) atomicAdd(&ghist[256 * pass + i], hist[i]);
        topk_grid_sync(bar);
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = __ldcg(&ghist[256 * pass + i]);
        __syncthreads();
        topk_pick(hist, shift, wsum, sh_pr, prefix, rem, mask);
    }
    // This block's keys above and equal to the k-th.
    int above = 0, equal = 0;
    for (int i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        unsigned key = okey(s[i]);
        above += key > prefix;
        equal += key == prefix;
    }
    above = __reduce_add_sync(0xffffffffu, above);
    equal = __reduce_add_sync(0xffffffffu, equal);
    if (threadIdx.x < 2) hist[threadIdx.x] = 0;  // free: topk_pick ended with a barrier
    __syncthreads();
    if ((threadIdx.x & 31) == 0) {
        atomicAdd(&hist[0], (unsigned)above);
        atomicAdd(&hist[1], (unsigned)equal);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        part[2 * blockIdx.x] = hist[0];
        part[2 * blockIdx.x + 1] = hist[1];
    }
    topk_grid_sync(bar);
    // Every block has read every pass's histogram: block 0 clears them for the next launch.
    if (blockIdx.x == 0)
        for (int i = threadIdx.x; i < 1024; i += blockDim.x) ghist[i] = 0;
    if (threadIdx.x == 0) {
        int base = 0, eq_seen = 0;
        for (int b = 0; b < (int)blockIdx.x; b++) {
            int ab = (int)__ldcg(&part[2 * b]), eb = (int)__ldcg(&part[2 * b + 1]);
            base += ab + max(0, min(eb, (int)rem - eq_seen));
            eq_seen += eb;
        }
        sh_base[0] = base;
        sh_base[1] = eq_seen;
    }
    __syncthreads();
    topk_emit(s, lo, hi, prefix, rem, sh_base[0], sh_base[1], shs, out);
    if (blockIdx.x == 0 && threadIdx.x == 0) cnt[0] = k;
}

// k_topk_rows for one token a block (blockIdx.x = t: scores row t·ld, output t·k, count t;
// a decode step's one token or a prefill chunk's), every key read once into registers: thread
// t holds rows KPT·t .. KPT·t + KPT − 1 (contiguous, so the output's row order is one block
// scan of per-thread counts). The 4 radix passes count into per-warp 256-bin histograms:
// scores share few exponents, so in one block-wide histogram every warp's (already
// warp-aggregated) atomic hits the same one or two bins and they serialize; per warp, one
// lane a bin adds its group's count with a plain store per key slot. The 32 warps' counts of
// a bin, added by thread `bin` (threads 0..255), give the pass's histogram. A pass ends the search once the
// boundary bin holds exactly the keys still wanted (all of them are taken). The selection is
// k_topk_rows's: every key above the k-th largest, and the equal ones in row order until k
// (ties to the lower row), written ascending. 1024 threads; n_t ≤ 1024·KPT and ld a multiple
// of 4 (host).
#define TOPK1_THREADS 1024
template <int KPT>
__device__ __forceinline__ void topk1(const float* __restrict__ s, int ld,
                                      const long long* __restrict__ p0p, int r, int k,
                                      int* __restrict__ out, int* __restrict__ cnt) {
    constexpr int NW = TOPK1_THREADS / 32;
    __shared__ unsigned whist[NW][256];
    __shared__ unsigned wsum[NW];
    __shared__ unsigned sh_pr[3];
    PROBE(4, 0);
    pdl_enter();
    PROBE(4, 1);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, t = blockIdx.x;
    const long long p0 = *p0p;
    s += (long long)t * ld;
    out += (long long)t * k;
    cnt += t;
    // The thread's scores are loaded beside the position, before the visible count is known
    // (one round trip to memory instead of two): the row has ld ≥ n_t entries, and those past
    // n_t are never used.
    const int r0 = tid * KPT;
    float sv[KPT];
    if (KPT >= 4 && r0 + KPT <= ld) {
#pragma unroll
        for (int j = 0; j < KPT; j += 4) {
            float4 v = *(const float4*)(s + r0 + j);
            sv[j] = v.x, sv[j + 1] = v.y, sv[j + 2] = v.z, sv[j + 3] = v.w;
        }
    } else {
#pragma unroll
        for (int j = 0; j < KPT; j++) sv[j] = r0 + j < ld ? s[r0 + j] : 0.0f;
    }
    const int n_t = (int)((p0 + t + 1) / r);
    if (n_t <= k) {
        for (int i = tid; i < n_t; i += TOPK1_THREADS) out[i] = i;
        if (tid == 0) *cnt = n_t;
        return;
    }
    unsigned key[KPT];
#pragma unroll
    for (int j = 0; j < KPT; j++) key[j] = r0 + j < n_t ? okey(sv[j]) : 0u;
    PROBE(4, 2);
    const int nv = max(0, min(KPT, n_t - r0));  // valid keys of this thread
    const unsigned lt = (1u << lane) - 1u;
    unsigned prefix = 0, mask = 0, rem = (unsigned)k;
    for (int pass = 0; pass < 4; pass++) {
        const int shift = 24 - 8 * pass;
        unsigned* h = whist[warp];
        // This warp's histogram: every reader of the previous pass is past its barriers.
        *(uint4*)(h + 8 * lane) = make_uint4(0u, 0u, 0u, 0u);
        *(uint4*)(h + 8 * lane + 4) = make_uint4(0u, 0u, 0u, 0u);
        __syncwarp();
#pragma unroll
        for (int j = 0; j < KPT; j++) {
            const bool hit = j < nv && (key[j] & mask) == prefix;
            const unsigned act = __ballot_sync(0xffffffffu, hit);
            if (hit) {
                const unsigned bin = (key[j] >> shift) & 255u;
                const unsigned m = __match_any_sync(act, bin);
                if ((m & lt) == 0) h[bin] += __popc(m);  // one lane a bin: no atomic needed
            }
            __syncwarp();
        }
        __syncthreads();
        // Bin `tid` (threads 0..255): the warps' counts, then the suffix count (this bin
        // and all above) by a warp scan plus the warps above.
        unsigned hv = 0, suf = 0;
        if (tid < 256) {
#pragma unroll 8
            for (int w = 0; w < NW; w++) hv += whist[w][tid];
            suf = hv;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const unsigned u = __shfl_down_sync(0xffffffffu, suf, o);
                if (lane + o < 32) suf += u;
            }
            if (lane == 0) wsum[warp] = suf;
        }
        __syncthreads();
        if (tid < 256) {
            for (int w2 = warp + 1; w2 < 8; w2++) suf += wsum[w2];
            if (suf >= rem && suf - hv < rem) {
                sh_pr[0] = prefix | ((unsigned)tid << shift);
                sh_pr[1] = rem - (suf - hv);
                sh_pr[2] = hv;
            }
        }
        __syncthreads();
        prefix = sh_pr[0];
        rem = sh_pr[1];
        mask |= 255u << shift;
        // The same value in every thread. (sh_pr, wsum and the histograms are rewritten
        // only after the next pass's first barrier: every reader is past this pass's.)
        if (sh_pr[2] == rem) break;
    }
    PROBE(4, 3);
    // Taken: key above the boundary, or in it and among its first `rem` in row order.
    unsigned gt = 0, eq = 0;
#pragma unroll
    for (int j = 0; j < KPT; j++) {
        const unsigned m = key[j] & mask;
        gt += j < nv && m > prefix;
        eq += j < nv && m == prefix;
    }
    // Exclusive block scan of (eq << 16 | gt): counts stay below 2^16 (n_t ≤ 16,384).
    const unsigned v = (eq << 16) | gt;
    unsigned inc = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const unsigned u = __shfl_up_sync(0xffffffffu, inc, o);
        if (lane >= o) inc += u;
    }
    if (lane == 31) wsum[warp] = inc;  // the last pass's readers are past its barriers
    __syncthreads();
    unsigned before = inc - v;
    for (int w = 0; w < warp; w++) before += wsum[w];
    unsigned eq_seen = before >> 16;
    int at = (int)(before & 0xffffu) + (int)min(eq_seen, rem);
#pragma unroll
    for (int j = 0; j < KPT; j++) {
        if (j < nv) {
            const unsigned m = key[j] & mask;
            const bool e = m == prefix;
            if (m > prefix || (e && eq_seen < rem)) out[at++] = r0 + j;
            eq_seen += e;
        }
    }
    if (tid == 0) *cnt = k;
    PROBE(4, 7);
}
#define DS4_TOPK1(KPT)                                                                           \
    extern "C" __global__ void __launch_bounds__(TOPK1_THREADS)                                 \
        k_topk1_##KPT(const float* __restrict__ s, int ld, const long long* __restrict__ p0p,    \
                      int r, int k, int* __restrict__ out, int* __restrict__ cnt) {              \
        topk1<KPT>(s, ld, p0p, r, k, out, cnt);                                                  \
    }
DS4_TOPK1(1)
DS4_TOPK1(2)
DS4_TOPK1(4)
DS4_TOPK1(8)
DS4_TOPK1(16)

// k_topk1's selection for prefill chunks whose tokens see at most 32·KPL rows: one warp a
// token (8 a block), lane l holding rows l + 32j (j < KPL) as order keys in registers.
// k_topk1 spends a block of 1,024 threads and ~4 block barriers a radix pass on a token's
// ~1,000 keys (about one a thread), and a first version of this kernel (k_topk1's per-warp
// histograms) waited on its shared-memory counts; here the k-th largest key T is found bit by
// bit from the top, every step one count of the keys at or above a candidate (each lane its
// KPL compares, then one warp sum): T is the largest value that at least k keys reach. The
// emit walks the rows in order (j, then lane): every key above T, and keys equal to T in row
// order until k: k_topk1's rows, in its ascending order. Rows past n_t hold key 0, which no
// candidate (bit b set) reaches and the emit skips.
template <int KPL>
__device__ __forceinline__ void topk_w(const float* __restrict__ s, int ld,
                                       const long long* __restrict__ p0p, int r, int k,
                                       int n_tok, int* __restrict__ out,
                                       int* __restrict__ cnt) {
    pdl_enter();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int t = blockIdx.x * 8 + warp;
    if (t >= n_tok) return;
    const int n_t = (int)((*p0p + t + 1) / r);
    s += (long long)t * ld;
    out += (long long)t * k;
    if (n_t <= k) {
        for (int i = lane; i < n_t; i += 32) out[i] = i;
        if (lane == 0) cnt[t] = n_t;
        return;
    }
    unsigned key[KPL];
#pragma unroll
    for (int j = 0; j < KPL; j++) key[j] = lane + 32 * j < n_t ? okey(s[lane + 32 * j]) : 0u;
    unsigned T = 0;
    for (int b = 31; b >= 0; b--) {
        const unsigned c = T | (1u << b);
        unsigned n = 0;
#pragma unroll
        for (int j = 0; j < KPL; j++) n += key[j] >= c ? 1u : 0u;
        if (__reduce_add_sync(0xffffffffu, n) >= (unsigned)k) T = c;
    }
    unsigned above = 0;
#pragma unroll
    for (int j = 0; j < KPL; j++) above += key[j] > T ? 1u : 0u;
    const unsigned rem = (unsigned)k - __reduce_add_sync(0xffffffffu, above);
    const unsigned lt = (1u << lane) - 1u;
    unsigned eq_seen = 0, taken = 0;
#pragma unroll
    for (int j = 0; j < KPL; j++) {
        const bool e = lane + 32 * j < n_t && key[j] == T;
        const unsigned eb = __ballot_sync(0xffffffffu, e);
        const bool take = key[j] > T || (e && eq_seen + __popc(eb & lt) < rem);
        const unsigned tb = __ballot_sync(0xffffffffu, take);
        if (take) out[taken + __popc(tb & lt)] = lane + 32 * j;
        taken += __popc(tb);
        eq_seen += __popc(eb);
    }
    if (lane == 0) cnt[t] = k;
}
#define DS4_TOPK_W(KPL)                                                                          \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        k_topk_w_##KPL(const float* __restrict__ s, int ld, const long long* __restrict__ p0p,   \
                       int r, int k, int n_tok, int* __restrict__ out, int* __restrict__ cnt) {  \
        topk_w<KPL>(s, ld, p0p, r, k, n_tok, out, cnt);                                          \
    }
DS4_TOPK_W(32)
DS4_TOPK_W(64)

// ---------------------------------------------------------------- attention (§3.3 steps 5-6)

// Exact mode (kept for its summation order: the QAT fixture's FP8 rounding amplifies any
// other order; see bench/RESULTS.md, branch pa); production mode uses attn.cu's tiled passes.
// One block per (token, head): scores over the token's raw window (this chunk's rows from
// `ckv`, older ones from the ring) and its compressed rows (the selection for ratio 4, all
// visible for ratio 128), sink-aware softmax, weighted sum of the rows (K = V), then the
// inverse RoPE of the output tail. Both passes spread rows over the warps (a warp per row,
// the lane's query elements in registers), so a token's many rows are read in parallel;
// the per-warp partial sums of the output are combined in warp order (deterministic).
// Dynamic shared memory: `rows_cap` scores, then one Dh-wide partial per warp.
#define ATT_MAXJ 16
extern "C" __global__ void __launch_bounds__(512)
    k_attend(const float* __restrict__ q, const float* __restrict__ ckv,
             const float* __restrict__ ring, const float* __restrict__ comp,
             const int* __restrict__ sel, const int* __restrict__ cnt, int sel_ld, int ratio,
             const long long* __restrict__ p0p, int swa, int dh, int n_head, const float* __restrict__ sinks,
             float scale, int half, const double* __restrict__ freqs, float* __restrict__ o,
             int rows_cap) {
    const long long p0 = *p0p;
    extern __shared__ float sm[];
    __shared__ float shf[33];
    float* sc = sm;
    float* part = sm + rows_cap;
    int t = blockIdx.x / n_head, h = blockIdx.x % n_head;
    long long p = p0 + t;
    long long lo = p + 1 - swa > 0 ? p + 1 - swa : 0;
    int n_raw = (int)(p - lo + 1);
    int n_comp = ratio == 0 ? 0 : (ratio == 4 ? cnt[t] : (int)((p + 1) / ratio));
    int n_rows = n_raw + n_comp;
    const float* qh = q + (long long)blockIdx.x * dh;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
#define ROW_PTR(rr)                                                                              \
    ((rr) < n_raw ? ((lo + (rr)) >= p0 ? ckv + (lo + (rr) - p0) * dh                             \
                                       : ring + ((lo + (rr)) % swa) * dh)                        \
                  : (ratio == 4 ? comp + (long long)sel[(long long)t * sel_ld + (rr) - n_raw] * dh \
                                : comp + (long long)((rr) - n_raw) * dh))
    float qv[ATT_MAXJ];
#pragma unroll
    for (int j = 0; j < ATT_MAXJ; j++) qv[j] = lane + 32 * j < dh ? qh[lane + 32 * j] : 0.0f;
    for (int rr = warp; rr < n_rows; rr += nw) {
        const float* k = ROW_PTR(rr);
        float acc = 0.0f;
#pragma unroll
        for (int j = 0; j < ATT_MAXJ; j++)
            if (lane + 32 * j < dh) acc += qv[j] * k[lane + 32 * j];
        acc = warp_sum(acc);
        if (lane == 0) sc[rr] = acc * scale;
    }
    __syncthreads();
    float sink = sinks[h];
    float m = NEG_INF;
    for (int rr = threadIdx.x; rr < n_rows; rr += blockDim.x) m = fmaxf(m, sc[rr]);
    m = fmaxf(block_max_f(m, shf), sink);
    float pe = 0.0f;
    for (int rr = threadIdx.x; rr < n_rows; rr += blockDim.x) {
        float e = expf(sc[rr] - m);
        sc[rr] = e;
        pe += e;
    }
    float den = expf(sink - m) + block_sum_f(pe, shf);
    float inv = 1.0f / den;
    float ov[ATT_MAXJ];
#pragma unroll
    for (int j = 0; j < ATT_MAXJ; j++) ov[j] = 0.0f;
    for (int rr = warp; rr < n_rows; rr += nw) {
        const float* k = ROW_PTR(rr);
        float pr = sc[rr];
#pragma unroll
        for (int j = 0; j < ATT_MAXJ; j++)
            if (lane + 32 * j < dh) ov[j] += pr * k[lane + 32 * j];
    }
#undef ROW_PTR
#pragma unroll
    for (int j = 0; j < ATT_MAXJ; j++)
        if (lane + 32 * j < dh) part[warp * dh + lane + 32 * j] = ov[j];
    __syncthreads();
    float* oh = o + (long long)blockIdx.x * dh;
    for (int e = threadIdx.x; e < dh; e += blockDim.x) {
        float acc = 0.0f;
        for (int w = 0; w < nw; w++) acc += part[w * dh + e];
        oh[e] = acc * inv;
    }
    __syncthreads();
    rope_tail(oh, dh, half, freqs, p, true);
}

// Stores the last min(n, swa) rows of this chunk in the ring (after attention read it).
extern "C" __global__ void k_ring_push(const float* __restrict__ ckv, float* __restrict__ ring,
                                       int n, const long long* __restrict__ p0p, int swa, int dh) {
    const long long p0 = *p0p;
    int t = n - 1 - blockIdx.x;  // blockIdx.x < min(n, swa)
    long long slot = (p0 + t) % swa;
    for (int e = threadIdx.x; e < dh; e += blockDim.x)
        ring[slot * dh + e] = ckv[(long long)t * dh + e];
}

// ---------------------------------------------------------------- MoE (moe.rs)

__device__ __forceinline__ float softplusf_(float x) {
    return x > 20.0f ? x : (x < -20.0f ? expf(x) : log1pf(expf(x)));
}

// Keys a lane of k_route's register top-k holds (n_exp ≤ 32·ROUTE_KPL; more take the
// shared-memory rounds).
#define ROUTE_KPL 8

// Router for token blockIdx.x: s_e = sqrt(softplus(logit_e)); selection by the hash table
// row of the token or top-k of s + bias (ties to the lower id); weights s / Σs · scale.
// The k slots are then ordered by expert id (stable), the order the CPU sums them in.
// Top-k in one pass: expert e's key (score, then the lower id first) is unique, so its rank
// (how many keys are larger) is its place in the selection order; ranks < k are chosen.
// Shared memory: n_exp scores (rounded up to even), then n_exp u64 keys. nsplit > 1: the
// logits come as nsplit partial sums sstride floats apart (dense_sgemm's split product),
// added here in part order.
extern "C" __global__ void k_route(const float* __restrict__ logits, int n_exp, int k,
                                   const int* __restrict__ tokens,
                                   const int* __restrict__ tid2eid,
                                   const float* __restrict__ bias, int norm_on, float wscale,
                                   int* __restrict__ ids, float* __restrict__ wts, int nsplit,
                                   long long sstride, int warp_fin, int reg_topk, int bpre) {
    // Launched with PDL (decode, DS4_CUDA_ROUTE_PDL): resident while the router's product
    // runs, waiting here. It never triggers its dependents: the routed experts launch when it
    // ends (an early trigger left their blocks idle on the SMs the shared expert needed;
    // bench/RESULTS.md, ninth session). A plain launch returns from the wait at once. The
    // logits (the router product's output) are read by ld.global.cg, never non-coherent:
    // ptxas may issue a non-coherent load ahead of the wait (bench/pdl_audit.py).
    // bpre: the thread's first bias (a weight) loaded before the wait, so that its round trip
    // to memory is not taken after the logits' (ptxas issued it after the score's sqrt).
    const float b0 = bpre && bias && (int)threadIdx.x < n_exp ? bias[threadIdx.x] : 0.0f;
    pdl_wait();
    extern __shared__ float s_e[];
    __shared__ int ch[64];
    unsigned long long* keys = (unsigned long long*)(s_e + ((n_exp + 1) & ~1));
    int t = blockIdx.x;
    for (int e = threadIdx.x; e < n_exp; e += blockDim.x) {
        const float* lp = logits + (long long)t * n_exp + e;
        float lg = __ldcg(lp);
        for (int j = 1; j < nsplit; j++) lg += __ldcg(lp + j * sstride);
        float s = sqrtf(softplusf_(lg));
        s_e[e] = s;
        float v = bias ? s + (bpre && e == (int)threadIdx.x ? b0 : bias[e]) : s;
        keys[e] = ((unsigned long long)okey(v) << 32) | (unsigned long long)(0xffffffffu - (unsigned)e);
    }
    __syncthreads();
    if (tid2eid) {
        if (threadIdx.x < k) ch[threadIdx.x] = tid2eid[(long long)tokens[t] * k + threadIdx.x];
    } else if (threadIdx.x < 32 && reg_topk && n_exp <= 32 * ROUTE_KPL) {
        // The same k rounds with each lane's keys (e = lane + 32i) in registers: a round is
        // the lane's maximum, then two warp reductions (redux.sync): the largest high word
        // (the score's order key), then among the lanes holding it the largest low word
        // (~e: the lower id). That pair is the largest 64-bit key, the one the shared-memory
        // form below takes; its lane (e & 31) zeroes it. No shared loads or shuffles a round.
        const int lane = threadIdx.x;
        unsigned long long kr[ROUTE_KPL];
#pragma unroll
        for (int i = 0; i < ROUTE_KPL; i++) {
            const int e = lane + 32 * i;
            kr[i] = e < n_exp ? keys[e] : 0ull;
        }
        for (int j = 0; j < k; j++) {
            unsigned long long m = kr[0];
#pragma unroll
            for (int i = 1; i < ROUTE_KPL; i++) m = max(m, kr[i]);
            const unsigned hmax = __reduce_max_sync(0xffffffffu, (unsigned)(m >> 32));
            const unsigned lmax =
                __reduce_max_sync(0xffffffffu, (unsigned)(m >> 32) == hmax ? (unsigned)m : 0u);
            const int e = (int)(0xffffffffu - lmax);
            if (lane == (e & 31)) {
#pragma unroll
                for (int i = 0; i < ROUTE_KPL; i++)
                    if (kr[i] == m) kr[i] = 0ull;
            }
            if (lane == 0) ch[j] = e;
        }
    } else if (threadIdx.x < 32) {
        // The k largest keys, largest first (rank order): k rounds of a warp maximum, each
        // taking its winner out (0 is below every key: the low word holds ~e). Keys are
        // distinct, so this is the order of ranks; one warp and ~k·n_exp/32 shared loads a
        // lane, where counting every key's rank took n_exp loads a thread (H200 ncu, a
        // 2048-token chunk's learned routing: 48 -> 20 us).
        const int lane = threadIdx.x;
        for (int j = 0; j < k; j++) {
            unsigned long long best = 0;
            for (int e = lane; e < n_exp; e += 32) best = max(best, keys[e]);
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) best = max(best, __shfl_xor_sync(0xffffffffu, best, o));
            const int e = (int)(0xffffffffu - (unsigned)(best & 0xffffffffu));
            if (lane == (e & 31)) keys[e] = 0;
            if (lane == 0) ch[j] = e;
            __syncwarp();
        }
    }
    __syncthreads();
    if (warp_fin && k <= 32) {
        // Warp 0, lane j < k: slot j of the selection order. The sum, the scale and each
        // weight are thread 0's below (the scores added in selection order from +0.0, one
        // rounding a product), and lane j's place in the id order is the number of slots
        // before it there (a lower id, or the same id earlier: the stable insertion sort's
        // place), so the same outputs without thread 0's serial loops over local memory.
        if (threadIdx.x >= 32) return;
        const int lane = threadIdx.x;
        const int e = lane < k ? ch[lane] : 0;
        const float se = lane < k ? s_e[e] : 0.0f;
        float sum = 0.0f;
        int pos = 0;
        for (int j = 0; j < k; j++) {
            sum += __shfl_sync(0xffffffffu, se, j);
            const int ej = __shfl_sync(0xffffffffu, e, j);
            pos += ej < e || (ej == e && j < lane);
        }
        float nrm = norm_on ? 1.0f / fmaxf(sum, 1.0f / 16384.0f) : 1.0f;
        if (lane < k) {
            ids[t * k + pos] = e;
            wts[t * k + pos] = se * nrm * wscale;
        }
        return;
    }
    if (threadIdx.x == 0) {
        float sum = 0.0f;
        for (int j = 0; j < k; j++) sum += s_e[ch[j]];
        float nrm = norm_on ? 1.0f / fmaxf(sum, 1.0f / 16384.0f) : 1.0f;
        float w[64];
        int id[64];
        for (int j = 0; j < k; j++) {
            w[j] = s_e[ch[j]] * nrm * wscale;
            id[j] = ch[j];
        }
        // Insertion sort by id (stable; k is small).
        for (int a = 1; a < k; a++) {
            int ia = id[a];
            float wa = w[a];
            int b = a - 1;
            while (b >= 0 && id[b] > ia) {
                id[b + 1] = id[b];
                w[b + 1] = w[b];
                b--;
            }
            id[b + 1] = ia;
            w[b + 1] = wa;
        }
        for (int j = 0; j < k; j++) {
            ids[t * k + j] = id[j];
            wts[t * k + j] = w[j];
        }
    }
}

// zk[s] = z[s / k] (each token's input repeated for its k expert slots).
extern "C" __global__ void k_expand(const float* __restrict__ z, int k, int d,
                                    float* __restrict__ zk) {
    int s = blockIdx.y;
    int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e < d) zk[(long long)s * d + e] = z[(long long)(s / k) * d + e];
}

// act[s][i] = silu(min(g, c))·clamp(u, ±c)·w_s (w null: 1), in place over g.
// g16 not null: also f16(result) there (round to nearest even, as f32_to_f16), the f16
// input of a product that follows on tensor cores.
extern "C" __global__ void k_swiglu(float* __restrict__ g, const float* __restrict__ u,
                                    const float* __restrict__ w, int f, float c,
                                    u16* __restrict__ g16) {
    int s = blockIdx.y;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= f) return;
    long long at = (long long)s * f + i;
    float gv = fminf(g[at], c);
    float sil = gv * (1.0f / (1.0f + expf(-gv)));
    float uv = fminf(fmaxf(u[at], -c), c);
    float r = sil * uv;
    if (w) r = r * w[s];
    g[at] = r;
    if (g16) g16[at] = f2h(r);
}

// out[t] = Σ_j dn[t·k + j] (slots in expert order) + shared[t].
extern "C" __global__ void k_moe_sum(const float* __restrict__ dn, const float* __restrict__ sh,
                                     int k, int d, float* __restrict__ out) {
    int t = blockIdx.y;
    int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= d) return;
    float acc = 0.0f;
    for (int j = 0; j < k; j++) acc += dn[((long long)t * k + j) * d + e];
    acc += sh[(long long)t * d + e];
    out[(long long)t * d + e] = acc;
}

// Fills n floats with v (compressor score frontiers start at -inf).
extern "C" __global__ void k_fill(float* __restrict__ x, float v, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = v;
}
