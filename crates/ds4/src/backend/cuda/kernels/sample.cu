// ds4 CUDA sampling support (issue 5: "no per-token host round trips except the sampled
// token"). The CPU keeps the sampling rules (sample.rs); the GPU narrows the vocabulary so
// only a few bytes cross the bus: the argmax, and for ds4's default min-p rule the tokens
// that can pass it. Appended to quant.cu by compile.rs (same module, same typedefs).

#define SAMPLE_THREADS 1024

// Is (v, i) a better argmax candidate than (bv, bi)? The CPU scans in index order and keeps
// the first maximum of the non-NaN values (sample::argmax), i.e. the largest value with the
// lowest index; NaN loses to every number, and an all-NaN row answers index 0.
__device__ __forceinline__ bool sample_better(float v, int i, float bv, int bi) {
    if (isnan(v)) return false;
    if (bi < 0 || isnan(bv)) return true;
    return v > bv || (v == bv && i < bi);
}

// Lane 0 ends with the warp's best (value, index); index −1 means none yet.
__device__ __forceinline__ void sample_warp_best(float& bv, int& bi) {
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_down_sync(0xffffffffu, bv, o);
        int oi = __shfl_down_sync(0xffffffffu, bi, o);
        if (oi >= 0 && sample_better(ov, oi, bv, bi)) {
            bv = ov;
            bi = oi;
        }
    }
}

// feed_tok not null: the argmax also becomes the next decode step's input on the device
// (the session's token and position buffers), so a step that takes it copies nothing.
__device__ __forceinline__ void sample_feed(int best, int* feed_tok, long long* feed_pos,
                                            long long next_pos) {
    if (feed_tok) {
        feed_tok[0] = best;
        feed_pos[0] = next_pos;
    }
}

// One block over one logits row of `n`:
//   head[0] = argmax id, head[1] = max value (float bits), head[2] = candidate count;
//   ids/vals[0..count) = every (i, l_i) with (l_i − max)·inv_t ≥ cut, in index order, when
//   count ≤ cap (else only the count). `cut` is ln(min_p) less a margin, so the candidates
//   hold every token the CPU's exact f32 test exp((l − max)·inv_t) ≥ min_p keeps; the CPU
//   applies that test to them again.
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
k_sample_prep(const float* __restrict__ logits, int n, float inv_t, float cut, int cap,
              int* __restrict__ head, int* __restrict__ ids, float* __restrict__ vals,
              int* __restrict__ feed_tok, long long* __restrict__ feed_pos, long long next_pos) {
    __shared__ float sv[SAMPLE_THREADS / 32];
    __shared__ int si[SAMPLE_THREADS / 32];
    __shared__ int scount[SAMPLE_THREADS];
    __shared__ float smax;
    __shared__ int sbest;
    int t = threadIdx.x, lane = t & 31, warp = t >> 5;
    // Contiguous segment per thread, so the compaction below keeps index order.
    int seg = (n + SAMPLE_THREADS - 1) / SAMPLE_THREADS;
    int lo = min(n, t * seg), hi = min(n, lo + seg);
    float bv = 0.0f;
    int bi = -1;
    for (int i = lo; i < hi; i++) {
        float v = logits[i];
        if (sample_better(v, i, bv, bi)) {
            bv = v;
            bi = i;
        }
    }
    sample_warp_best(bv, bi);
    if (lane == 0) {
        sv[warp] = bv;
        si[warp] = bi;
    }
    __syncthreads();
    if (warp == 0) {
        bv = sv[lane];
        bi = si[lane];
        sample_warp_best(bv, bi);
        if (lane == 0) {
            sbest = bi < 0 ? 0 : bi;
            smax = bi < 0 ? logits[0] : bv;
        }
    }
    __syncthreads();
    float mx = smax;
    int c = 0;
    for (int i = lo; i < hi; i++) c += (logits[i] - mx) * inv_t >= cut;
    scount[t] = c;
    __syncthreads();
    // Inclusive scan of the per-thread counts (Hillis–Steele over shared memory).
    for (int o = 1; o < SAMPLE_THREADS; o <<= 1) {
        int add = t >= o ? scount[t - o] : 0;
        __syncthreads();
        scount[t] += add;
        __syncthreads();
    }
    int total = scount[SAMPLE_THREADS - 1];
    if (t == 0) {
        head[0] = sbest;
        head[1] = __float_as_int(mx);
        head[2] = total;
        sample_feed(sbest, feed_tok, feed_pos, next_pos);
    }
    if (total > cap) return;
    int at = scount[t] - c;
    for (int i = lo; i < hi; i++) {
        float v = logits[i];
        if ((v - mx) * inv_t >= cut) {
            ids[at] = i;
            vals[at] = v;
            at++;
        }
    }
}

// ---------------------------------------------------------------- multi-block narrowing
// The same results as k_sample_prep (kept for comparisons) in one launch over many blocks:
// the one-block kernel read the 129,280-float row on one SM (67 µs on an H100).
// Block b takes ids [b·SP_CHUNK, (b+1)·SP_CHUNK), thread t the 4 consecutive ids 4t..4t+3 of
// it. The block stores its best (value bits, id) and stages, in id order, every id that
// passes the test against the *block's* maximum m_b. The row's maximum M ≥ m_b and rounding is
// monotone, so (l − M)·inv_t ≥ cut implies (l − m_b)·inv_t ≥ cut: the staged lists hold every
// candidate. The last block to finish (an integer ticket; which block it is changes
// nothing) combines the bests — the argmax order is total (value, then lowest id; NaN never
// wins), so any combining order gives k_sample_prep's answer —, then keeps the staged ids
// that pass against M, block by block in order, so the candidates come out in id order.
// Scratch `wk` (i32): [0, G) best values' bits, [G, 2G) best ids, [2G, 3G) staged counts,
// [3G] the ticket (0 between calls; the last block resets it), then G·SP_CHUNK staged ids;
// `wv`: G·SP_CHUNK staged values.

#define SP_CHUNK 1024
#define SP_THREADS 256

// Block-wide best of (bv, bi) into every thread's bv, bi (index −1: none).
__device__ __forceinline__ void sample_block_best(float& bv, int& bi, float* sv, int* si) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    sample_warp_best(bv, bi);
    __syncthreads();
    if (lane == 0) {
        sv[warp] = bv;
        si[warp] = bi;
    }
    __syncthreads();
    bv = 0.0f;
    bi = -1;
    for (int w = 0; w < SP_THREADS / 32; w++) {
        if (si[w] >= 0 && sample_better(sv[w], si[w], bv, bi)) {
            bv = sv[w];
            bi = si[w];
        }
    }
}

// Exclusive block-wide prefix of c (threads in order) and the block's total.
__device__ __forceinline__ int sample_block_scan(int c, int* wc, int& total) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int x = c;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        int y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    __syncthreads();  // wc of an earlier scan has been read
    if (lane == 31) wc[warp] = x;
    __syncthreads();
    int before = 0;
    total = 0;
#pragma unroll
    for (int w = 0; w < SP_THREADS / 32; w++) {
        before += w < warp ? wc[w] : 0;
        total += wc[w];
    }
    return before + x - c;
}

extern "C" __global__ void __launch_bounds__(SP_THREADS)
k_sample_mb(const float* __restrict__ logits, int n, float inv_t, float cut, int cap,
            int* __restrict__ wk, float* __restrict__ wv, int* __restrict__ head,
            int* __restrict__ ids, float* __restrict__ vals, int* __restrict__ feed_tok,
            long long* __restrict__ feed_pos, long long next_pos) {
    __shared__ float sv[SP_THREADS / 32];
    __shared__ int si[SP_THREADS / 32];
    __shared__ int wc[SP_THREADS / 32];
    __shared__ int s_last;
    __shared__ int s_n[SP_THREADS];
    __shared__ int s_c[SP_THREADS];
    const int G = gridDim.x, b = blockIdx.x, t = threadIdx.x;
    const int lane = t & 31, warp = t >> 5;
    int* sids = wk + 3 * G + 1;
    const int i0 = b * SP_CHUNK + 4 * t;
    float v[4];
#pragma unroll
    for (int j = 0; j < 4; j++) v[j] = i0 + j < n ? logits[i0 + j] : 0.0f;
    float bv = 0.0f;
    int bi = -1;
#pragma unroll
    for (int j = 0; j < 4; j++) {
        if (i0 + j < n && sample_better(v[j], i0 + j, bv, bi)) {
            bv = v[j];
            bi = i0 + j;
        }
    }
    sample_block_best(bv, bi, sv, si);
    // Stage the ids passing against the block's maximum (none when the block is all NaN).
    // A cut of −∞ is the one case where the implication above fails (an all −∞ block: −∞ −
    // −∞ is NaN locally, −∞ − M is −∞ globally): then every id is staged.
    const bool every = isinf(cut) && cut < 0.0f;
    bool pass[4];
    int c = 0;
#pragma unroll
    for (int j = 0; j < 4; j++) {
        pass[j] = i0 + j < n && (every || (bi >= 0 && (v[j] - bv) * inv_t >= cut));
        c += pass[j];
    }
    int total;
    int at = b * SP_CHUNK + sample_block_scan(c, wc, total);
#pragma unroll
    for (int j = 0; j < 4; j++) {
        if (pass[j]) {
            sids[at] = i0 + j;
            wv[at] = v[j];
            at++;
        }
    }
    // Every thread's staged entries, then the block's results, are visible device-wide
    // before the ticket is drawn.
    __threadfence();
    __syncthreads();
    if (t == 0) {
        wk[b] = __float_as_int(bv);
        wk[G + b] = bi;
        wk[2 * G + b] = total;
        __threadfence();
        s_last = atomicAdd(wk + 3 * G, 1) == G - 1;
    }
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    // Last block: the row's best from the blocks' bests (the first round's staged counts
    // are loaded alongside).
    const int c_first = t < G ? __ldcg(wk + 2 * G + t) : 0;
    bv = 0.0f;
    bi = -1;
    for (int g = t; g < G; g += SP_THREADS) {
        float x = __int_as_float(__ldcg(wk + g));
        int i = __ldcg(wk + G + g);
        if (i >= 0 && sample_better(x, i, bv, bi)) {
            bv = x;
            bi = i;
        }
    }
    sample_block_best(bv, bi, sv, si);
    const int best = bi < 0 ? 0 : bi;
    const float mx = bi < 0 ? logits[0] : bv;
    // Keep the staged ids that pass against mx, SP_THREADS blocks a round: a warp per block
    // counts them, a scan over the round's blocks gives offsets, the warp writes them in
    // order (only the first `cap`; the caller ignores the list when the count passes it).
    // The round's staged counts are read once, in parallel, into shared memory (a warp
    // walking its blocks' counts from global memory would wait one latency per block).
    int carry = 0;
    for (int g0 = 0; g0 < G; g0 += SP_THREADS) {
        s_c[t] = g0 == 0 ? c_first : g0 + t < G ? __ldcg(wk + 2 * G + g0 + t) : 0;
        __syncthreads();
        for (int gl = warp; gl < SP_THREADS; gl += SP_THREADS / 32) {
            int g = g0 + gl, k = 0;
            int cg = s_c[gl];
            for (int e0 = 0; e0 < cg; e0 += 32) {
                int e = e0 + lane;
                bool ok = e < cg && (__ldcg(wv + (long long)g * SP_CHUNK + e) - mx) * inv_t >= cut;
                k += __popc(__ballot_sync(0xffffffffu, ok));
            }
            if (lane == 0) s_n[gl] = k;
        }
        __syncthreads();
        int rt;
        int off0 = carry + sample_block_scan(s_n[t], wc, rt);
        __syncthreads();  // every s_n has been read
        s_n[t] = off0;
        __syncthreads();
        for (int gl = warp; gl < SP_THREADS; gl += SP_THREADS / 32) {
            int g = g0 + gl, off = s_n[gl];
            int cg = s_c[gl];
            for (int e0 = 0; e0 < cg; e0 += 32) {
                int e = e0 + lane;
                float x = e < cg ? __ldcg(wv + (long long)g * SP_CHUNK + e) : 0.0f;
                bool ok = e < cg && (x - mx) * inv_t >= cut;
                unsigned m = __ballot_sync(0xffffffffu, ok);
                int o = off + __popc(m & ((1u << lane) - 1u));
                if (ok && o < cap) {
                    ids[o] = __ldcg(sids + (long long)g * SP_CHUNK + e);
                    vals[o] = x;
                }
                off += __popc(m);
            }
        }
        carry += rt;
        __syncthreads();  // s_n and s_c are rewritten by the next round
    }
    if (t == 0) {
        head[0] = best;
        head[1] = __float_as_int(mx);
        head[2] = carry;
        wk[3 * G] = 0;  // the ticket, ready for the next call
        sample_feed(best, feed_tok, feed_pos, next_pos);
    }
}
