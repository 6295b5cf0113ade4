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
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_down_sync(0xffffffffu, bv, o);
        int oi = __shfl_down_sync(0xffffffffu, bi, o);
        if (oi >= 0 && sample_better(ov, oi, bv, bi)) {
            bv = ov;
            bi = oi;
        }
    }
    if (lane == 0) {
        sv[warp] = bv;
        si[warp] = bi;
    }
    __syncthreads();
    if (warp == 0) {
        bv = sv[lane];
        bi = si[lane];
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_down_sync(0xffffffffu, bv, o);
            int oi = __shfl_down_sync(0xffffffffu, bi, o);
            if (oi >= 0 && sample_better(ov, oi, bv, bi)) {
                bv = ov;
                bi = oi;
            }
        }
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
