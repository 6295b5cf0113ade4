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

// One block over one logits row of `n`:
//   head[0] = argmax id, head[1] = max value (float bits), head[2] = candidate count;
//   ids/vals[0..count) = every (i, l_i) with (l_i − max)·inv_t ≥ cut, in index order, when
//   count ≤ cap (else only the count). `cut` is ln(min_p) less a margin, so the candidates
//   hold every token the CPU's exact f32 test exp((l − max)·inv_t) ≥ min_p keeps; the CPU
//   applies that test to them again.
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
k_sample_prep(const float* __restrict__ logits, int n, float inv_t, float cut, int cap,
              int* __restrict__ head, int* __restrict__ ids, float* __restrict__ vals) {
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
// The same results as k_sample_prep (which stays for comparisons), over many blocks: the
// one-block kernel read the 129,280-float row on one SM (67 µs on an H100). Two launches:
//   k_sample_part: block b takes elements [b·SP_CHUNK, (b+1)·SP_CHUNK) and stores its best
//     (value bits, index) — the argmax order is total (value, then lowest index; NaN never
//     wins), so combining the blocks' bests in any order gives k_sample_prep's answer.
//   k_sample_fin: every block combines the partials into the row's (argmax, max), tests its
//     own elements in id order and stages its candidates at b·SP_CHUNK; the last block to
//     finish (an integer ticket, so no result depends on the order) adds the blocks' counts
//     in block order, writes the head and copies the staged lists to their offsets.
// Scratch `wk` (i32): [0, G) best values' bits, [G, 2G) best ids, [2G, 3G) counts, [3G]
// the ticket (0 between calls; the last block resets it), then G·SP_CHUNK staged ids;
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

extern "C" __global__ void __launch_bounds__(SP_THREADS)
k_sample_part(const float* __restrict__ logits, int n, int* __restrict__ wk) {
    __shared__ float sv[SP_THREADS / 32];
    __shared__ int si[SP_THREADS / 32];
    const int G = gridDim.x, b = blockIdx.x;
    float bv = 0.0f;
    int bi = -1;
#pragma unroll
    for (int j = 0; j < SP_CHUNK / SP_THREADS; j++) {
        int i = b * SP_CHUNK + j * SP_THREADS + threadIdx.x;
        if (i < n) {
            float v = logits[i];
            if (sample_better(v, i, bv, bi)) {
                bv = v;
                bi = i;
            }
        }
    }
    sample_block_best(bv, bi, sv, si);
    if (threadIdx.x == 0) {
        wk[b] = __float_as_int(bv);
        wk[G + b] = bi;
    }
}

extern "C" __global__ void __launch_bounds__(SP_THREADS)
k_sample_fin(const float* __restrict__ logits, int n, float inv_t, float cut, int cap,
             int* __restrict__ wk, float* __restrict__ wv, int* __restrict__ head,
             int* __restrict__ ids, float* __restrict__ vals) {
    __shared__ float sv[SP_THREADS / 32];
    __shared__ int si[SP_THREADS / 32];
    __shared__ int wc[SP_THREADS / 32];
    __shared__ int s_last;
    __shared__ int s_off[SP_THREADS];
    const int G = gridDim.x, b = blockIdx.x, t = threadIdx.x;
    const int lane = t & 31, warp = t >> 5;
    int* sids = wk + 3 * G + 1;
    // The row's best from the blocks' bests (every block gets the same answer).
    float bv = 0.0f;
    int bi = -1;
    for (int g = t; g < G; g += SP_THREADS) {
        float v = __int_as_float(__ldcg(wk + g));
        int i = __ldcg(wk + G + g);
        if (i >= 0 && sample_better(v, i, bv, bi)) {
            bv = v;
            bi = i;
        }
    }
    sample_block_best(bv, bi, sv, si);
    const int best = bi < 0 ? 0 : bi;
    const float mx = bi < 0 ? logits[0] : bv;
    // This block's candidates in id order: SP_CHUNK / SP_THREADS rounds of 256 consecutive
    // ids, compacted by warp ballots and the warps' counts in warp order.
    int base = 0;  // candidates staged so far by this block
#pragma unroll 1
    for (int j = 0; j < SP_CHUNK / SP_THREADS; j++) {
        int i = b * SP_CHUNK + j * SP_THREADS + t;
        float v = i < n ? logits[i] : 0.0f;
        bool pass = i < n && (v - mx) * inv_t >= cut;
        unsigned m = __ballot_sync(0xffffffffu, pass);
        __syncthreads();  // wc of the previous round has been read
        if (lane == 0) wc[warp] = __popc(m);
        __syncthreads();
        int before = 0, total = 0;
        for (int w = 0; w < SP_THREADS / 32; w++) {
            before += w < warp ? wc[w] : 0;
            total += wc[w];
        }
        if (pass) {
            int at = b * SP_CHUNK + base + before + __popc(m & ((1u << lane) - 1u));
            sids[at] = i;
            wv[at] = v;
        }
        base += total;
    }
    // Every thread's staged entries, then the count, are visible device-wide before the
    // ticket is drawn.
    __threadfence();
    __syncthreads();
    if (t == 0) {
        wk[2 * G + b] = base;
        __threadfence();
        s_last = atomicAdd(wk + 3 * G, 1) == G - 1;
    }
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    // Last block: the blocks' lists go to offsets that add the counts in block order,
    // SP_THREADS blocks at a time (one round for a 129,280-token row); a list is copied only
    // up to `cap` entries (the caller ignores the candidates when the total passes it).
    int carry = 0;
    for (int g0 = 0; g0 < G; g0 += SP_THREADS) {
        int c = g0 + t < G ? __ldcg(wk + 2 * G + g0 + t) : 0;
        int x = c;  // inclusive warp scan
        for (int o = 1; o < 32; o <<= 1) {
            int y = __shfl_up_sync(0xffffffffu, x, o);
            if (lane >= o) x += y;
        }
        __syncthreads();  // wc and s_off of the previous round are no longer read
        if (lane == 31) wc[warp] = x;
        s_off[t] = x - c;
        __syncthreads();
        int before = 0, total = 0;
        for (int w = 0; w < SP_THREADS / 32; w++) {
            before += w < warp ? wc[w] : 0;
            total += wc[w];
        }
        __syncthreads();
        s_off[t] += carry + before;
        __syncthreads();
        // A warp per block of this round copies its staged list.
        for (int gl = warp; gl < SP_THREADS && g0 + gl < G; gl += SP_THREADS / 32) {
            int g = g0 + gl;
            int cg = __ldcg(wk + 2 * G + g), off = s_off[gl];
            for (int k = lane; k < cg && off + k < cap; k += 32) {
                ids[off + k] = __ldcg(sids + (long long)g * SP_CHUNK + k);
                vals[off + k] = __ldcg(wv + (long long)g * SP_CHUNK + k);
            }
        }
        carry += total;
    }
    if (t == 0) {
        head[0] = best;
        head[1] = __float_as_int(mx);
        head[2] = carry;
        wk[3 * G] = 0;  // the ticket, ready for the next call
    }
}
