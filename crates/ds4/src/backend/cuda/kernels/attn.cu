// ds4 CUDA kernels of the attention side (model.md §3.3): sink-aware attention as three
// tiled passes (scores, softmax, weighted sum + inverse RoPE), the lightning indexer's
// scores as a tiled product, and the KV compressor parallel over windows. Appended after
// forward.cu by compile.rs (same module; uses its helpers).
//
// Attention: every row a token attends to is one shared Dh-wide K = V row (MQA-like), so a
// block computes a tile of 32 heads × 32 rows (scores) or 32 heads × 32 dims (output) and
// stages the rows in shared memory once for all 32 heads, instead of every head re-reading
// them. Arithmetic is f32 (`fmaf` dots); only the summation order differs from the CPU's
// (each dot or row sum is split in four fixed parts added in a fixed order: deterministic).

#define AT_T 32  // tile edge (heads, rows, dims)
#define AT_P 33  // padded shared row

// The rows token t attends to, as in attention.rs RowSource: raw positions lo..=p (this
// chunk's from `ckv`, older ones from the ring), then the compressed rows (the selection for
// ratio 4, all visible for other ratios).
struct AttRows {
    const float* ckv;
    const float* ring;
    const float* comp;
    const int* sel;
    long long p0, lo;
    int n_raw, n_rows, ratio, swa, dh;
};

__device__ __forceinline__ AttRows att_rows(const float* ckv, const float* ring,
                                            const float* comp, const int* sel,
                                            const int* cnt, int sel_ld, int ratio,
                                            long long p0, int t, int swa, int dh) {
    AttRows a;
    long long p = p0 + t;
    a.ckv = ckv;
    a.ring = ring;
    a.comp = comp;
    a.sel = sel + (long long)t * sel_ld;
    a.p0 = p0;
    a.lo = p + 1 - swa > 0 ? p + 1 - swa : 0;
    a.n_raw = (int)(p - a.lo + 1);
    // The count and the selection by ld.global.cg: a non-coherent load may be issued ahead
    // of a PDL wait (k_att_fdtc's wait_first).
    int n_comp = ratio == 0 ? 0 : (ratio == 4 ? __ldcg(cnt + t) : (int)((p + 1) / ratio));
    a.n_rows = a.n_raw + n_comp;
    a.ratio = ratio;
    a.swa = swa;
    a.dh = dh;
    return a;
}

__device__ __forceinline__ const float* att_row(const AttRows& a, int rr) {
    if (rr < a.n_raw) {
        long long q = a.lo + rr;
        return q >= a.p0 ? a.ckv + (q - a.p0) * a.dh : a.ring + (q % a.swa) * a.dh;
    }
    long long c = a.ratio == 4 ? (long long)a.sel[rr - a.n_raw] : (long long)(rr - a.n_raw);
    return a.comp + c * a.dh;
}

// Pass 1: sc[s][(t·H + h)·ld + r] = q_{t,h}·K_r over the s-th of `nsplit` ranges of the
// dims (pass 2 adds the ranges in order and scales), for the token's rows. grid: x = row
// tiles, y = head tiles, z = token·nsplit + s; 256 threads = 4 groups (32-dim chunks of the
// range round robin) of 64 threads (4 heads × 4 rows each). nsplit > 1 gives a decode step
// more blocks with shorter chains.
extern "C" __global__ void __launch_bounds__(256)
    k_att_scores(const float* __restrict__ q, const float* __restrict__ ckv,
                 const float* __restrict__ ring, const float* __restrict__ comp,
                 const int* __restrict__ sel, const int* __restrict__ cnt, int sel_ld,
                 int ratio, const long long* __restrict__ p0p, int swa, int dh, int n_head,
                 float* __restrict__ sc, int ld, int nsplit) {
    __shared__ float sm[4 * 2 * AT_T * AT_P];
    const int t = blockIdx.z / nsplit, sp = blockIdx.z % nsplit;
    const int n = gridDim.z / nsplit, r0 = blockIdx.x * AT_T, h0 = blockIdx.y * AT_T;
    AttRows a = att_rows(ckv, ring, comp, sel, cnt, sel_ld, ratio, *p0p, t, swa, dh);
    if (r0 >= a.n_rows) return;
    sc += (long long)sp * n * n_head * ld;
    const int g = threadIdx.x >> 6, lt = threadIdx.x & 63;
    const int ty = lt >> 3, tx = lt & 7;
    float* qs = sm + g * 2 * AT_T * AT_P;
    float* ks = qs + AT_T * AT_P;
    // Each of the group's threads loads rows lt/8 + 8i, float4 column lt%8 of a chunk.
    const float* qrow[4];
    const float* krow[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int hh = h0 + ty + 8 * i, rr = r0 + ty + 8 * i;
        qrow[i] = hh < n_head ? q + ((long long)t * n_head + hh) * dh : nullptr;
        krow[i] = rr < a.n_rows ? att_row(a, rr) : nullptr;
    }
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;
    const int nch = dh / AT_T;
    const int c_lo = sp * nch / nsplit, c_hi = (sp + 1) * nch / nsplit;
    for (int it = 0; it < (c_hi - c_lo + 3) / 4; it++) {
        int ch = c_lo + it * 4 + g;
        __syncthreads();
#pragma unroll
        for (int i = 0; i < 4; i++) {
            float4 qv = make_float4(0.f, 0.f, 0.f, 0.f), kv = qv;
            if (ch < c_hi) {
                if (qrow[i]) qv = *(const float4*)(qrow[i] + ch * AT_T + 4 * tx);
                if (krow[i]) kv = *(const float4*)(krow[i] + ch * AT_T + 4 * tx);
            }
            float* qd = qs + (ty + 8 * i) * AT_P + 4 * tx;
            float* kd = ks + (ty + 8 * i) * AT_P + 4 * tx;
            qd[0] = qv.x, qd[1] = qv.y, qd[2] = qv.z, qd[3] = qv.w;
            kd[0] = kv.x, kd[1] = kv.y, kd[2] = kv.z, kd[3] = kv.w;
        }
        __syncthreads();
#pragma unroll 8
        for (int e = 0; e < AT_T; e++) {
            float av[4], bv[4];
#pragma unroll
            for (int i = 0; i < 4; i++) av[i] = qs[(ty + 8 * i) * AT_P + e];
#pragma unroll
            for (int j = 0; j < 4; j++) bv[j] = ks[(tx + 8 * j) * AT_P + e];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
    }
    __syncthreads();
    float* red = sm;  // 4 × 32 × 32 partials
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
            red[g * AT_T * AT_T + (ty + 8 * i) * AT_T + tx + 8 * j] = acc[i][j];
    __syncthreads();
    for (int o = threadIdx.x; o < AT_T * AT_T; o += blockDim.x) {
        int hh = h0 + o / AT_T, rr = r0 + o % AT_T;
        if (hh >= n_head || rr >= a.n_rows) continue;
        float v = ((red[o] + red[AT_T * AT_T + o]) + red[2 * AT_T * AT_T + o]) +
                  red[3 * AT_T * AT_T + o];
        sc[((long long)t * n_head + hh) * ld + rr] = v;
    }
}

// Pass 2, a block per (token, head): s_r = scale · Σ_split partial_r (the pass-1 dim ranges
// in order), m = max(sink, max_r s_r), s_r ← e^{s_r−m} in place (split 0's buffer),
// inv[t·H + h] = 1 / (e^{sink−m} + Σ_r e^{s_r−m}). Fixed-tree block reductions.
extern "C" __global__ void k_att_softmax(float* __restrict__ sc, float* __restrict__ inv,
                                         const int* __restrict__ cnt, int ratio,
                                         const long long* __restrict__ p0p, int swa,
                                         int n_head, int n, const float* __restrict__ sinks,
                                         int ld, float scale, int ssplit) {
    __shared__ float shf[33];
    const long long p0 = *p0p;
    const int th = blockIdx.x, t = th / n_head, h = th % n_head;
    long long p = p0 + t;
    long long lo = p + 1 - swa > 0 ? p + 1 - swa : 0;
    int n_comp = ratio == 0 ? 0 : (ratio == 4 ? cnt[t] : (int)((p + 1) / ratio));
    int n_rows = (int)(p - lo + 1) + n_comp;
    float* s = sc + (long long)th * ld;
    const long long stride = (long long)n * n_head * ld;
    float sink = sinks[h];
    float m = NEG_INF;
    for (int r = threadIdx.x; r < n_rows; r += blockDim.x) {
        float v = s[r];
        for (int k = 1; k < ssplit; k++) v += s[k * stride + r];
        v = v * scale;
        s[r] = v;
        m = fmaxf(m, v);
    }
    m = fmaxf(block_max_f(m, shf), sink);
    float sum = 0.0f;
    for (int r = threadIdx.x; r < n_rows; r += blockDim.x) {
        float e = expf(s[r] - m);
        s[r] = e;
        sum += e;
    }
    sum = block_sum_f(sum, shf);
    if (threadIdx.x == 0) inv[th] = 1.0f / (expf(sink - m) + sum);
}

// Pass 3: o[t][h][e] = inv_{t,h} · Σ_r w_{t,h,r}·K_r[e] (weights from pass 2), then the
// inverse RoPE of the tail at the token's position. grid: x = dim tiles, y = head tiles, z =
// token·nsplit + s; 256 threads = 4 groups (32-row chunks of the s-th of nsplit row ranges,
// round robin) of 64 threads (4 heads × 4 dims each). nsplit > 1 (decode): the block stores
// its range's sum in `part` and k_att_combine finishes.
extern "C" __global__ void __launch_bounds__(256)
    k_att_out(const float* __restrict__ sc, const float* __restrict__ inv,
              const float* __restrict__ ckv, const float* __restrict__ ring,
              const float* __restrict__ comp, const int* __restrict__ sel,
              const int* __restrict__ cnt, int sel_ld, int ratio,
              const long long* __restrict__ p0p, int swa, int dh, int n_head, int half,
              const double* __restrict__ freqs, float* __restrict__ o, int ld, int nsplit,
              float* __restrict__ part) {
    __shared__ float sm[4 * 2 * AT_T * AT_P];
    __shared__ float rc[AT_T / 2], rs[AT_T / 2];
    const int t = blockIdx.z / nsplit, sp = blockIdx.z % nsplit, n = gridDim.z / nsplit;
    const int d0 = blockIdx.x * AT_T, h0 = blockIdx.y * AT_T;
    const long long p0 = *p0p;
    AttRows a = att_rows(ckv, ring, comp, sel, cnt, sel_ld, ratio, p0, t, swa, dh);
    const int g = threadIdx.x >> 6, lt = threadIdx.x & 63;
    const int ty = lt >> 3, tx = lt & 7;
    float* ps = sm + g * 2 * AT_T * AT_P;
    float* ks = ps + AT_T * AT_P;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;
    const int nall = (a.n_rows + AT_T - 1) / AT_T;
    const int c_lo = sp * nall / nsplit, nch = (sp + 1) * nall / nsplit;
    for (int it = 0; it < (nch - c_lo + 3) / 4; it++) {
        int ch = c_lo + it * 4 + g;
        __syncthreads();
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int row = ty + 8 * i;  // head (weights) / row (K) inside the tile
            int rr = ch * AT_T + row;
            float4 kv = make_float4(0.f, 0.f, 0.f, 0.f);
            if (ch < nch && rr < a.n_rows) kv = *(const float4*)(att_row(a, rr) + d0 + 4 * tx);
            float* kd = ks + row * AT_P + 4 * tx;
            kd[0] = kv.x, kd[1] = kv.y, kd[2] = kv.z, kd[3] = kv.w;
            int hh = h0 + row;
            float* pd = ps + row * AT_P + 4 * tx;
#pragma unroll
            for (int k = 0; k < 4; k++) {
                int r2 = ch * AT_T + 4 * tx + k;
                pd[k] = (ch < nch && hh < n_head && r2 < a.n_rows)
                            ? sc[((long long)t * n_head + hh) * ld + r2]
                            : 0.0f;
            }
        }
        __syncthreads();
#pragma unroll 8
        for (int r = 0; r < AT_T; r++) {
            float av[4], bv[4];
#pragma unroll
            for (int i = 0; i < 4; i++) av[i] = ps[(ty + 8 * i) * AT_P + r];
#pragma unroll
            for (int j = 0; j < 4; j++) bv[j] = ks[r * AT_P + tx + 8 * j];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
    }
    __syncthreads();
    float* red = sm;
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
            red[g * AT_T * AT_T + (ty + 8 * i) * AT_T + tx + 8 * j] = acc[i][j];
    if (nsplit > 1) {
        __syncthreads();
        for (int x = threadIdx.x; x < AT_T * AT_T; x += blockDim.x) {
            int hh = h0 + x / AT_T;
            if (hh >= n_head) continue;
            float v = ((red[x] + red[AT_T * AT_T + x]) + red[2 * AT_T * AT_T + x]) +
                      red[3 * AT_T * AT_T + x];
            part[(((long long)sp * n + t) * n_head + hh) * dh + d0 + x % AT_T] = v;
        }
        return;
    }
    // Rotation of the tail pairs inside this tile (the tail starts at an even dim and
    // tiles are 32-aligned, so no pair straddles two tiles).
    const int off = dh - 2 * half;
    if (threadIdx.x < AT_T / 2) {
        int e = d0 + 2 * threadIdx.x;
        if (e >= off) {
            double s, c;
            sincos((double)(p0 + t) * freqs[(e - off) / 2], &s, &c);
            rc[threadIdx.x] = (float)c;
            rs[threadIdx.x] = -(float)s;
        }
    }
    __syncthreads();
    float* fin = sm + 4 * AT_T * AT_T;
    for (int x = threadIdx.x; x < AT_T * AT_T; x += blockDim.x) {
        int hh = h0 + x / AT_T;
        float v = ((red[x] + red[AT_T * AT_T + x]) + red[2 * AT_T * AT_T + x]) +
                  red[3 * AT_T * AT_T + x];
        fin[x] = hh < n_head ? v * inv[(long long)t * n_head + hh] : 0.0f;
    }
    __syncthreads();
    for (int x = threadIdx.x; x < AT_T * AT_T / 2; x += blockDim.x) {
        int hl = x / (AT_T / 2), pr = x % (AT_T / 2);
        int hh = h0 + hl, e = d0 + 2 * pr;
        if (hh >= n_head) continue;
        float va = fin[hl * AT_T + 2 * pr], vb = fin[hl * AT_T + 2 * pr + 1];
        if (e >= off) {
            float cf = rc[pr], sf = rs[pr];
            float na = va * cf - vb * sf;
            float nb = va * sf + vb * cf;
            va = na;
            vb = nb;
        }
        float* oh = o + ((long long)t * n_head + hh) * dh + e;
        oh[0] = va;
        oh[1] = vb;
    }
}

// Finishes a split pass 3: o = inv · Σ_split part (in split order), then the inverse RoPE
// of the tail. blockIdx.x = t·H + h; a thread per pair of dims.
extern "C" __global__ void k_att_combine(const float* __restrict__ part,
                                         const float* __restrict__ inv, int n, int n_head,
                                         int dh, int nsplit, int half,
                                         const double* __restrict__ freqs,
                                         const long long* __restrict__ p0p,
                                         float* __restrict__ o) {
    const int th = blockIdx.x, t = th / n_head;
    const long long stride = (long long)n * n_head * dh;
    const float iv = inv[th];
    const int off = dh - 2 * half;
    for (int pr = threadIdx.x; pr < dh / 2; pr += blockDim.x) {
        int e = 2 * pr;
        const float* pp = part + (long long)th * dh + e;
        float va = pp[0], vb = pp[1];
        for (int k = 1; k < nsplit; k++) {
            va += pp[k * stride];
            vb += pp[k * stride + 1];
        }
        va = va * iv;
        vb = vb * iv;
        if (e >= off) {
            double s, c;
            sincos((double)(*p0p + t) * freqs[(e - off) / 2], &s, &c);
            float cf = (float)c, sf = -(float)s;
            float na = va * cf - vb * sf;
            float nb = va * sf + vb * cf;
            va = na;
            vb = nb;
        }
        o[(long long)th * dh + e] = va;
        o[(long long)th * dh + e + 1] = vb;
    }
}

// ---- Decode attention as split-rows flash decoding (production decode steps).
// k_att_fd (H = 8) / k_att_fd4 (H = 4): a block per (row block b, group of H heads, token).
// The block walks its rows in tiles of FD_R, staged once in shared memory for both products
// (K = V): scores by register tiles (warp w: the tile's rows 4w..4w+3 for all H heads; lane:
// dims 4·lane + 128k; its 4H partial dots are added over the lanes by a fixed butterfly that
// leaves lane l with entry l), an online softmax started from the sink (m = sink, l = 0: the
// sink's own e^{sink−m} is added once, by the combine), and the weighted sum (thread: dims
// 4·tid..+3 of every head). It stores the unnormalized partial output and (m, l) per (block,
// token, head); k_att_fd_combine rescales the blocks' partials to the common max in block
// order, divides and applies the inverse RoPE. One pass over the rows instead of four
// launches with the scores through global memory. Small blocks (H heads × 16 rows, 4 warps):
// a block has one warp per scheduler and runs at the pace of its dependent FMA and shuffle
// chains (H200 ncu, H = 8: 254 registers, ~3,000 instructions a warp at ~3.8 cycles each,
// stalls mostly fixed-latency waits), so H = 4 halves a block's chain and doubles the
// blocks (decode default; the same rows, a different order of the score butterfly).
#define FD_R 16        // rows a tile
#define FD_THREADS 128
#define FD_MAXB 32     // most row blocks (attn.rs picks the tiles per block to stay below)

// One butterfly step of the score reduction: of the 2·O values s[0..2O), lanes with bit O
// set keep the upper half, the others the lower half, each adding its partner's copy.
// Constant indices after inlining (a template), so s stays in registers.
// att_row with 32-bit index arithmetic (positions and row numbers fit in 31 bits; att_row's
// 64-bit modulo is a long instruction sequence, and this kernel forms 16 row addresses a
// thread a tile).
__device__ __forceinline__ const float* fd_row(const AttRows& a, int rr) {
    if (rr < a.n_raw) {
        unsigned q = (unsigned)(a.lo + rr), p0 = (unsigned)a.p0;
        return q >= p0 ? a.ckv + (long long)(q - p0) * a.dh
                       : a.ring + (long long)(q % (unsigned)a.swa) * a.dh;
    }
    unsigned c = a.ratio == 4 ? (unsigned)__ldcg(a.sel + rr - a.n_raw) : (unsigned)(rr - a.n_raw);
    return a.comp + (long long)c * a.dh;
}

template <int O, int N>
__device__ __forceinline__ void fd_fold(float (&s)[N], int lane) {
    const bool up = (lane & O) != 0;
#pragma unroll
    for (int j = 0; j < O; j++) {
        float send = up ? s[j] : s[j + O];
        float keep = up ? s[j + O] : s[j];
        s[j] = keep + __shfl_xor_sync(0xffffffffu, send, O);
    }
}

// The parameters of every split-rows row-block kernel (k_att_fd*, k_att_fdtc*), their device
// functions (att_fd, att_fdtc), and their names in that order.
#define ATT_FD_PARAMS                                                                             \
    const float *__restrict__ q, const float *__restrict__ ckv, const float *__restrict__ ring,   \
        const float *__restrict__ comp, const int *__restrict__ sel, const int *__restrict__ cnt, \
        int sel_ld, int ratio, const long long *__restrict__ p0p, int swa, int dh, int n_head,    \
        const float *__restrict__ sinks, float scale, int tpb, float *__restrict__ part,          \
        float *__restrict__ ml, int wait_first
#define ATT_FD_ARGS q, ckv, ring, comp, sel, cnt, sel_ld, ratio, p0p, swa, dh, n_head, sinks, scale, tpb, part, ml, wait_first

template <int H>
__device__ __forceinline__ void att_fd(ATT_FD_PARAMS) {
    extern __shared__ __align__(16) float fd_sm[];
    const int b = blockIdx.x, h0 = blockIdx.y * H, t = blockIdx.z, n = gridDim.z;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int c4 = dh >> 2, rstep = FD_THREADS / c4, col = tid % c4, rl0 = tid / c4;
    const float4 z4 = make_float4(0.f, 0.f, 0.f, 0.f);
    // Every global load of a batch is issued before the batch's shared-memory stores (the
    // compiler does not move loads across those stores, so a load-store loop would pay one
    // memory latency per iteration). The queries come first: they depend on nothing else.
    float4 qv4[H];
#pragma unroll
    for (int i = 0; i < H; i++) {
        int hl = rl0 + i * rstep, hh = h0 + hl;
        qv4[i] = hl < H && hh < n_head
                     ? ((const float4*)(q + ((long long)t * n_head + hh) * dh))[col]
                     : z4;
    }
    AttRows a = att_rows(ckv, ring, comp, sel, cnt, sel_ld, ratio, *p0p, t, swa, dh);
    const int r_lo = b * tpb * FD_R;
    if (r_lo >= a.n_rows) return;
    const int r_hi = min(a.n_rows, r_lo + tpb * FD_R);
    float* qs = fd_sm;                   // H × dh queries
    float* ks = qs + H * dh;          // FD_R × dh rows
    float* ss = ks + FD_R * dh;          // H × (FD_R + 1) scores
    float* ws = ss + H * (FD_R + 1);  // FD_R × H weights (a row's heads contiguous)
    float* fac = ws + FD_R * H;       // H rescale factors of the tile
#pragma unroll
    for (int i = 0; i < H; i++) {
        int hl = rl0 + i * rstep;
        if (hl < H) ((float4*)qs)[hl * c4 + col] = qv4[i];
    }
    // Softmax: warp w, half-warp g holds head 2w + g, a lane per row of the tile.
    const int sh = 2 * warp + (lane >> 4), sr = lane & 15;
    float m_run = h0 + sh < n_head ? sinks[h0 + sh] : 0.0f, l_run = 0.0f;
    float acc[H][4];
#pragma unroll
    for (int h = 0; h < H; h++) acc[h][0] = acc[h][1] = acc[h][2] = acc[h][3] = 0.0f;
    const int nk = dh >> 7;  // float4 columns a lane takes in the score products
    const bool out_lane = 4 * tid < dh;
    // The tile's rows go through registers: the next tile's loads are issued before this
    // tile's products, so their latency overlaps them.
    float4 kv4[FD_R];
#pragma unroll
    for (int i = 0; i < FD_R; i++) {
        int rl = rl0 + i * rstep, rr = r_lo + rl;
        kv4[i] = rl < FD_R && rr < r_hi ? ((const float4*)fd_row(a, rr))[col] : z4;
    }
    for (int r0 = r_lo; r0 < r_hi; r0 += FD_R) {
        __syncthreads();  // the previous tile's rows and weights are consumed
#pragma unroll
        for (int i = 0; i < FD_R; i++) {
            int rl = rl0 + i * rstep;
            if (rl < FD_R) ((float4*)ks)[rl * c4 + col] = kv4[i];
        }
        __syncthreads();
        if (r0 + FD_R < r_hi) {
#pragma unroll
            for (int i = 0; i < FD_R; i++) {
                int rl = rl0 + i * rstep, rr = r0 + FD_R + rl;
                kv4[i] = rl < FD_R && rr < r_hi ? ((const float4*)fd_row(a, rr))[col] : z4;
            }
        }
        float s[4 * H];  // [head h][row 4w + i] at 4h + i
#pragma unroll
        for (int x = 0; x < 4 * H; x++) s[x] = 0.0f;
        for (int k = 0; k < nk; k++) {
            const int c = lane + 32 * k;
            float4 kr[4];
#pragma unroll
            for (int i = 0; i < 4; i++) kr[i] = ((const float4*)ks)[(4 * warp + i) * c4 + c];
#pragma unroll
            for (int h = 0; h < H; h++) {
                float4 qv = ((const float4*)qs)[h * c4 + c];
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    float v = s[h * 4 + i];
                    v = fmaf(qv.x, kr[i].x, v);
                    v = fmaf(qv.y, kr[i].y, v);
                    v = fmaf(qv.z, kr[i].z, v);
                    v = fmaf(qv.w, kr[i].w, v);
                    s[h * 4 + i] = v;
                }
            }
        }
        if constexpr (H == 8) fd_fold<16>(s, lane);
        fd_fold<8>(s, lane);
        fd_fold<4>(s, lane);
        fd_fold<2>(s, lane);
        fd_fold<1>(s, lane);
        // H = 4: lanes l and l + 16 hold halves of entry l % 16.
        if constexpr (H == 4) s[0] += __shfl_xor_sync(0xffffffffu, s[0], 16);
        // Lane l < 4H holds entry l: head l/4, row 4w + l%4.
        if (lane < 4 * H) ss[(lane >> 2) * (FD_R + 1) + 4 * warp + (lane & 3)] = s[0] * scale;
        __syncthreads();
        {
            const bool ok = r0 + sr < r_hi;
            float x = ok && sh < H ? ss[sh * (FD_R + 1) + sr] : NEG_INF;
            float mt = x;
#pragma unroll
            for (int o = 8; o > 0; o >>= 1) mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, o));
            float mn = fmaxf(m_run, mt);
            float f = expf(m_run - mn);
            float w = ok ? expf(x - mn) : 0.0f;
            float sum = w;
#pragma unroll
            for (int o = 8; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
            l_run = l_run * f + sum;
            m_run = mn;
            if (sh < H) {
                ws[sr * H + sh] = w;
                if (sr == 0) fac[sh] = f;
            }
        }
        __syncthreads();
        if (out_lane) {
#pragma unroll
            for (int h = 0; h < H; h++) {
                float f = fac[h];
                acc[h][0] *= f;
                acc[h][1] *= f;
                acc[h][2] *= f;
                acc[h][3] *= f;
            }
#pragma unroll 4
            for (int r = 0; r < FD_R; r++) {
                float4 kv = ((const float4*)ks)[r * c4 + tid];
                float wr[H];
#pragma unroll
                for (int j = 0; j < H / 4; j++) {
                    float4 w4 = ((const float4*)ws)[r * (H / 4) + j];
                    wr[4 * j] = w4.x, wr[4 * j + 1] = w4.y, wr[4 * j + 2] = w4.z, wr[4 * j + 3] = w4.w;
                }
#pragma unroll
                for (int h = 0; h < H; h++) {
                    acc[h][0] = fmaf(wr[h], kv.x, acc[h][0]);
                    acc[h][1] = fmaf(wr[h], kv.y, acc[h][1]);
                    acc[h][2] = fmaf(wr[h], kv.z, acc[h][2]);
                    acc[h][3] = fmaf(wr[h], kv.w, acc[h][3]);
                }
            }
        }
    }
    const long long base = ((long long)b * n + t) * n_head;
    if (out_lane) {
#pragma unroll
        for (int h = 0; h < H; h++) {
            if (h0 + h < n_head)
                *(float4*)(part + (base + h0 + h) * dh + 4 * tid) =
                    make_float4(acc[h][0], acc[h][1], acc[h][2], acc[h][3]);
        }
    }
    if (sr == 0 && sh < H && h0 + sh < n_head) {
        ml[(base + h0 + sh) * 2] = m_run;
        ml[(base + h0 + sh) * 2 + 1] = l_run;
    }
}

// The entry points: k_att_fd (8 heads a block), k_att_fd4 (4).
#define DS4_ATT_FD(NAME, H)                                                                       \
    extern "C" __global__ void __launch_bounds__(FD_THREADS) NAME(ATT_FD_PARAMS) {                \
        att_fd<H>(ATT_FD_ARGS);                                                                   \
    }
DS4_ATT_FD(k_att_fd, 8)
DS4_ATT_FD(k_att_fd4, 4)

// Finishes k_att_fd: M = max(sink, m_b), o = Σ_b e^{m_b−M}·part_b / (e^{sink−M} + Σ_b
// e^{m_b−M}·l_b), the blocks' terms in block order (the denominator's by a fixed butterfly),
// then the inverse RoPE of the tail. A block per (token, head) of 128 threads, 4 dims each.
// q0 not null (dh a multiple of 32): also o's Q8_0 codes and scales for the output product
// (q8_0_lane4, equal to qa_q8_0 on the stored o).
template <int PRE>
__device__ __forceinline__ void att_fd_combine(
    const float* __restrict__ part, const float* __restrict__ ml, const int* __restrict__ cnt,
    int ratio, const long long* __restrict__ p0p, int swa, int n_head, int dh, int tpb, int nbmax,
    const float* __restrict__ sinks, int half, const double* __restrict__ freqs,
    float* __restrict__ o, signed char* __restrict__ q0, float* __restrict__ d0, int early) {
    // early: the output product (launched with PDL after this) may start now, so that its
    // first wave's blocks load their weights while the attention finishes.
    PROBE(7, 0);
    if (early) pdl_trigger();
    __shared__ float fb[FD_MAXB];
    __shared__ float s_iv;
    const int th = blockIdx.x, t = th / n_head, h = th % n_head, n = gridDim.x / n_head;
    const int tid = threadIdx.x;
    const long long stride = (long long)n * n_head;  // (token, head) entries a row block
    const bool on = 4 * tid < dh;
    // Before the PDL wait (launched programmatically after the row blocks, which trigger at
    // their start), only what no kernel of this step writes or what was complete before the
    // row blocks began: the position (a host copy), the selection's count (the indexer's,
    // joined before the row blocks), the sinks and the RoPE angles of this thread's tail
    // pairs (f64 sincos of the position, the same values as computed after it).
    const float sink = sinks[h];
    const long long p0 = *p0p, p = p0 + t;
    const long long lo = p + 1 - swa > 0 ? p + 1 - swa : 0;
    const int n_comp = ratio == 0 ? 0 : (ratio == 4 ? cnt[t] : (int)((p + 1) / ratio));
    const int n_rows = (int)(p - lo + 1) + n_comp;
    const int nb = (n_rows + tpb * FD_R - 1) / (tpb * FD_R);
    const int off = dh - 2 * half;
    float cf[2] = {1.0f, 1.0f}, sf[2] = {0.0f, 0.0f};
#pragma unroll
    for (int j = 0; j < 2; j++) {
        int e = 4 * tid + 2 * j;
        if (on && e >= off) {
            double sn, cs;
            sincos((double)p * freqs[(e - off) / 2], &sn, &cs);
            cf[j] = (float)cs;
            sf[j] = -(float)sn;
        }
    }
    pdl_wait();
    PROBE(7, 1);
    // The first PRE blocks' partials and the (m, l) of all, by ld.global.cg (a non-coherent
    // load may be issued ahead of the wait). Blocks past the count (≤ nbmax, the launch's
    // grid) hold stale values that are never used.
    float4 pv[PRE];
#pragma unroll
    for (int i = 0; i < PRE; i++)
        pv[i] = on && i < nbmax ? __ldcg((const float4*)(part + (i * stride + th) * dh + 4 * tid))
                                : make_float4(0.f, 0.f, 0.f, 0.f);
    float mb = NEG_INF, lb = 0.0f;
    if (tid < nbmax) {
        mb = __ldcg(ml + (tid * stride + th) * 2);
        lb = __ldcg(ml + (tid * stride + th) * 2 + 1);
    }
    if (tid < 32) {
        if (tid >= nb) mb = NEG_INF, lb = 0.0f;
        float mx = fmaxf(mb, sink);
#pragma unroll
        for (int off2 = 16; off2 > 0; off2 >>= 1)
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off2));
        float f = tid < nb ? expf(mb - mx) : 0.0f;
        float d = f * lb;
#pragma unroll
        for (int off2 = 16; off2 > 0; off2 >>= 1) d += __shfl_xor_sync(0xffffffffu, d, off2);
        fb[tid] = f;
        if (tid == 0) s_iv = 1.0f / (expf(sink - mx) + d);
    }
    __syncthreads();
    // Threads past dh stay (no early return) for q8_0_lane4's shuffles; their groups of 8
    // are wholly past it.
    const float iv = s_iv;
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int i = 0; i < PRE; i++) {
        if (i < nb) {
            float f = fb[i];
            v.x = fmaf(f, pv[i].x, v.x);
            v.y = fmaf(f, pv[i].y, v.y);
            v.z = fmaf(f, pv[i].z, v.z);
            v.w = fmaf(f, pv[i].w, v.w);
        }
    }
#pragma unroll 8
    for (int bb = PRE; bb < nb && on; bb++) {
        float4 x = __ldcg((const float4*)(part + (bb * stride + th) * dh + 4 * tid));
        float f = fb[bb];
        v.x = fmaf(f, x.x, v.x);
        v.y = fmaf(f, x.y, v.y);
        v.z = fmaf(f, x.z, v.z);
        v.w = fmaf(f, x.w, v.w);
    }
    float r[4] = {v.x * iv, v.y * iv, v.z * iv, v.w * iv};
#pragma unroll
    for (int j = 0; j < 2; j++) {
        int e = 4 * tid + 2 * j;
        if (on && e >= off) {
            float va = r[2 * j], vb = r[2 * j + 1];
            r[2 * j] = va * cf[j] - vb * sf[j];
            r[2 * j + 1] = va * sf[j] + vb * cf[j];
        }
    }
    const long long e0 = (long long)th * dh + 4 * tid;
    if (on) *(float4*)(o + e0) = make_float4(r[0], r[1], r[2], r[3]);
    if (q0) {
        u32 w;
        float dd = q8_0_lane4(r, &w);
        if (on) {
            *(u32*)(q0 + e0) = w;
            if ((tid & 7) == 0) d0[e0 >> 5] = dd;
        }
    }
    PROBE(7, 7);
}

// The entry points: PRE = 8 (k_att_fd_combine) keeps 48 registers for the short rows of
// small contexts; PRE = FD_MAXB (k_att_fd_combine32, 156 registers) loads every block's
// partial at once, so long contexts (up to FD_MAXB row blocks) pay one memory latency
// instead of up to four (H100 ncu at 32k / 64k: 7.42 / 7.23 -> 5.66 / 5.50 us).
#define DS4_ATT_FD_COMBINE(NAME, PRE)                                                             \
    extern "C" __global__ void __launch_bounds__(128)                                             \
        NAME(const float* __restrict__ part, const float* __restrict__ ml,                        \
             const int* __restrict__ cnt, int ratio, const long long* __restrict__ p0p, int swa,  \
             int n_head, int dh, int tpb, int nbmax, const float* __restrict__ sinks, int half,   \
             const double* __restrict__ freqs, float* __restrict__ o,                             \
             signed char* __restrict__ q0, float* __restrict__ d0, int early) {                   \
        att_fd_combine<PRE>(part, ml, cnt, ratio, p0p, swa, n_head, dh, tpb, nbmax, sinks, half,  \
                            freqs, o, q0, d0, early);                                             \
    }
DS4_ATT_FD_COMBINE(k_att_fd_combine, 8)
DS4_ATT_FD_COMBINE(k_att_fd_combine32, FD_MAXB)

// Lightning indexer: score[t][row] = Σ_h w_{t,h}·max(0, q_{t,h}·K_row) for the rows visible
// to token t, the head sum in head order (as the CPU's iterator sum, from −0.0), with
// w_{t,h} = w[t][h]·wscale (the weights' scale, one f32 product as the CPU's). grid: x =
// row tiles of 64, y = token; 256 threads, each 4 heads × 4 rows of a 64-head × 64-row tile
// (more heads loop over head tiles).
#define IX_T 64
extern "C" __global__ void __launch_bounds__(256)
    k_idx_scores(const float* __restrict__ q, const float* __restrict__ w, float wscale,
                 const float* __restrict__ krows, int n_head, int id,
                 const long long* __restrict__ p0p, int r, float* __restrict__ scores,
                 int ld) {
    __shared__ float sm[2 * IX_T * AT_P];
    float* qs = sm;
    float* ks = sm + IX_T * AT_P;
    float* vs = sm;  // after the products: [head][row], IX_T + 1 apart
    const long long p0 = *p0p;
    const int t = blockIdx.y, r0 = blockIdx.x * IX_T;
    const int vis = (int)((p0 + t + 1) / r);
    if (r0 >= vis) return;
    const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
    float tot = -0.0f;  // threads < 64: row r0 + threadIdx.x
    for (int hb = 0; hb < n_head; hb += IX_T) {
        float acc[4][4];
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;
        for (int ch = 0; ch < id / AT_T; ch++) {
            __syncthreads();
            // 64 head rows and 64 K rows of a 32-float chunk: 512 float4 each.
#pragma unroll
            for (int k = 0; k < 2; k++) {
                int f = threadIdx.x + 256 * k, row = f >> 3, c4 = f & 7;
                int hh = hb + row, rr = r0 + row;
                float4 v = make_float4(0.f, 0.f, 0.f, 0.f), u = v;
                if (hh < n_head)
                    v = *(const float4*)(q + ((long long)t * n_head + hh) * id + ch * AT_T + 4 * c4);
                if (rr < vis) u = *(const float4*)(krows + (long long)rr * id + ch * AT_T + 4 * c4);
                float* d = qs + row * AT_P + 4 * c4;
                d[0] = v.x, d[1] = v.y, d[2] = v.z, d[3] = v.w;
                d = ks + row * AT_P + 4 * c4;
                d[0] = u.x, d[1] = u.y, d[2] = u.z, d[3] = u.w;
            }
            __syncthreads();
#pragma unroll 8
            for (int e = 0; e < AT_T; e++) {
                float av[4], bv[4];
#pragma unroll
                for (int i = 0; i < 4; i++) av[i] = qs[(ty + 16 * i) * AT_P + e];
#pragma unroll
                for (int j = 0; j < 4; j++) bv[j] = ks[(tx + 16 * j) * AT_P + e];
#pragma unroll
                for (int i = 0; i < 4; i++)
#pragma unroll
                    for (int j = 0; j < 4; j++) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
            }
        }
        __syncthreads();
        // Weighted ReLU terms into vs as [head][row], then a thread per row sums them.
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int hh = hb + ty + 16 * i;
            float wh = hh < n_head ? w[(long long)t * n_head + hh] * wscale : 0.0f;
#pragma unroll
            for (int j = 0; j < 4; j++)
                vs[(ty + 16 * i) * (IX_T + 1) + tx + 16 * j] = wh * fmaxf(acc[i][j], 0.0f);
        }
        __syncthreads();
        if (threadIdx.x < IX_T) {
            int hn = n_head - hb < IX_T ? n_head - hb : IX_T;
            for (int hl = 0; hl < hn; hl++) tot += vs[hl * (IX_T + 1) + threadIdx.x];
        }
    }
    if (threadIdx.x < IX_T && r0 + threadIdx.x < vis)
        scores[(long long)t * ld + r0 + threadIdx.x] = tot;
}

// ---------------------------------------------------------------- compressor (cache.rs)

// Pools every window closing in this chunk (block b: the b-th one at or after p0), each as
// cache.rs Compressor::push does (max, then Σe·v and Σe over the candidates in order), then
// RMSNorm, RoPE at the window's first position, the row finishing, and stores the row. Reads
// the frontier as it was at the chunk's start (k_comp_state updates it afterwards), so the
// windows are independent and every value is bit-identical to the sequential walk.
// Candidate c is position q = P + 1 − coff·r + c: this chunk's projections (score + position
// bias) when q ≥ p0, else the frontier (the window p0/r in progress at the chunk's start in
// the current lane rows, the one before it in rows 0..r). A table in shared memory holds
// each candidate's source; a thread per output dim (blockDim ≥ d or striding).
#define COMP_MAX_CAND 256
// Candidates c0 .. c0 + B − 1 of k_comp_pool's output dim i: their scores (a chunk row's
// projection + the position bias, or the frontier's stored score) into sv and, with V, their
// values into vv. The rows are picked by selects, not branches, so the loads of the whole
// batch are issued before anything uses them.
template <int B, bool V>
__device__ __forceinline__ void comp_batch(int c0, int i, const int* src, const int* aro, int r,
                                           int d, int coff, int wd, const float* __restrict__ scp,
                                           const float* __restrict__ ape,
                                           const float* __restrict__ ssc,
                                           const float* __restrict__ kvp,
                                           const float* __restrict__ skv, float* sv, float* vv) {
#pragma unroll
    for (int j = 0; j < B; j++) {
        const int c = c0 + j;
        const int col = (coff == 2 && c >= r) ? d + i : i;
        const int sr = src[c];
        const bool ch = sr >= 0;
        const long long ro = (long long)(ch ? sr : -1 - sr) * wd + col;
        sv[j] = (ch ? scp : ssc)[ro];
        if (ch) sv[j] += ape[aro[c] * wd + col];
        if (V) vv[j] = (ch ? kvp : skv)[ro];
    }
}

// B: candidates loaded at once (n_cand a multiple of it): 8 for the ratio-4 windows (8
// candidates, 513 blocks a 2048-token chunk), 32 for the ratio-128 ones (128 candidates, 17
// blocks: each thread's chain of dependent loads is the kernel's time, 61 µs with 8).
template <int B>
__device__ __forceinline__ void comp_pool_body(const float* __restrict__ kvp,
                                               const float* __restrict__ scp,
                                               const float* __restrict__ ape,
                                               const float* __restrict__ skv,
                                               const float* __restrict__ ssc,
                                               float* __restrict__ rows,
                                               const float* __restrict__ norm,
                                               const double* __restrict__ freqs, int n,
                                               const long long* __restrict__ p0p, int r, int d,
                                               int coff, int half, float eps, int kind, int qat,
                                               int exact, float inv_sqrt_d) {
    pdl_enter();
    const long long p0 = *p0p;
    __shared__ double sh[33];
    __shared__ float pooled[1024];
    // src >= 0: chunk token (ape row in aro); src < 0: frontier row −1 − src.
    __shared__ int src[COMP_MAX_CAND], aro[COMP_MAX_CAND];
    const long long first = ((p0 + r) / r) * r - 1;  // first P >= p0 with (P+1) % r == 0
    const long long P = first + (long long)blockIdx.x * r;
    if (P >= p0 + n) return;
    const int wd = coff * d, n_cand = coff * r;
    const long long q0 = P + 1 - (long long)n_cand;
    const long long w0 = p0 / r;
    for (int c = threadIdx.x; c < n_cand; c += blockDim.x) {
        long long q = q0 + c;
        int slot = (int)(((q % r) + r) % r);
        if (q >= p0) {
            src[c] = (int)(q - p0);
            aro[c] = slot;
        } else {
            src[c] = -1 - (q >= w0 * r ? (coff - 1) * r + slot : slot);
            aro[c] = 0;
        }
    }
    __syncthreads();
    // Both loops load a batch of B candidates into registers (comp_batch) before the
    // in-order max / sums consume them (a ratio-128 chunk has 17 windows, one block each: the
    // loads' latency is the kernel's time). n_cand is a multiple of B (host).
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float m = NEG_INF;
        for (int c0 = 0; c0 < n_cand; c0 += B) {
            float sv[B];
            comp_batch<B, false>(c0, i, src, aro, r, d, coff, wd, scp, ape, ssc, nullptr, nullptr,
                                 sv, nullptr);
#pragma unroll
            for (int j = 0; j < B; j++) m = fmaxf(m, sv[j]);
        }
        float num = 0.0f, den = 0.0f;
        for (int c0 = 0; c0 < n_cand; c0 += B) {
            float sv[B], vv[B];
            comp_batch<B, true>(c0, i, src, aro, r, d, coff, wd, scp, ape, ssc, kvp, skv, sv, vv);
#pragma unroll
            for (int j = 0; j < B; j++) {
                float e = expf(sv[j] - m);
                den += e;
                num += e * vv[j];
            }
        }
        pooled[i] = num / den;
    }
    __syncthreads();
    float sc = rms_scale_block(pooled, d, eps, sh);
    for (int i = threadIdx.x; i < d; i += blockDim.x) pooled[i] = pooled[i] * sc * norm[i];
    __syncthreads();
    rope_tail(pooled, d, half, freqs, P + 1 - r, false);
    finish_row(pooled, d, d - 2 * half, kind, qat, exact, inv_sqrt_d);
    long long row = (P + 1) / r - 1;
    for (int i = threadIdx.x; i < d; i += blockDim.x) rows[row * d + i] = pooled[i];
}

#define DS4_COMP_POOL(NAME, B)                                                                      \
    extern "C" __global__ void NAME(                                                                \
        const float* __restrict__ kvp, const float* __restrict__ scp,                               \
        const float* __restrict__ ape, const float* __restrict__ skv,                               \
        const float* __restrict__ ssc, float* __restrict__ rows, const float* __restrict__ norm,    \
        const double* __restrict__ freqs, int n, const long long* __restrict__ p0p, int r, int d,   \
        int coff, int half, float eps, int kind, int qat, int exact, float inv_sqrt_d) {            \
        comp_pool_body<B>(kvp, scp, ape, skv, ssc, rows, norm, freqs, n, p0p, r, d, coff, half,     \
                          eps, kind, qat, exact, inv_sqrt_d);                                       \
    }
DS4_COMP_POOL(k_comp_pool, 8)
DS4_COMP_POOL(k_comp_pool32, 32)

// The frontier after this chunk's tokens (after k_comp_pool read it): slot s of the current
// lane rows holds the chunk's last position ≡ s (mod r), if any; for ratio 4 (coff 2) rows
// 0..r hold the current rows as they were when the chunk's last window closed. blockIdx.x =
// slot s; threads over the W columns.
extern "C" __global__ void k_comp_state(const float* __restrict__ kvp, const float* __restrict__ scp,
                                        const float* __restrict__ ape, float* __restrict__ skv,
                                        float* __restrict__ ssc, int n,
                                        const long long* __restrict__ p0p, int r, int d,
                                        int coff) {
    pdl_enter();
    const long long p0 = *p0p;
    const int s = blockIdx.x, wd = coff * d;
    const long long end = p0 + n;  // exclusive
    // Last position < end that is ≡ s (mod r).
    long long ql = end - 1 - (((end - 1 - s) % r) + r) % r;
    bool cur = ql >= p0;
    // Last window close in the chunk, and the position its slot s held.
    long long pl = (end / r) * r - 1;
    bool shift = coff == 2 && pl >= p0;
    long long qs = pl + 1 - r + s;
    if (!cur && !shift) return;
    const int crow = (coff - 1) * r + s;
    for (int col = threadIdx.x; col < wd; col += blockDim.x) {
        float old_s = ssc[(long long)crow * wd + col], old_v = skv[(long long)crow * wd + col];
        if (shift) {
            float ns = old_s, nv = old_v;
            if (qs >= p0) {
                long long t = qs - p0;
                ns = scp[t * wd + col] + ape[(long long)s * wd + col];
                nv = kvp[t * wd + col];
            }
            ssc[(long long)s * wd + col] = ns;
            skv[(long long)s * wd + col] = nv;
        }
        if (cur) {
            long long t = ql - p0;
            ssc[(long long)crow * wd + col] = scp[t * wd + col] + ape[(long long)s * wd + col];
            skv[(long long)crow * wd + col] = kvp[t * wd + col];
        }
    }
}

// ------------------------------------------------- production prefill attention, tensor cores

// One block per token runs its whole attention on tensor cores (production mode, chunks of
// more than 8 tokens): the token's (up to) 64 heads are the M dimension of mma.sync m16n8k16
// (f16 operands, f32 accumulation), its rows are staged as f16 in shared memory 32 at a time
// and used for both products (K = V), with an online softmax started at the sink (m = sink,
// l = e^0 = 1), so no score ever leaves the block. Rounding versus the f32 passes: the
// queries and the weights e^{s−m} are rounded to f16 (the rows are F16-exact in production,
// storage rounding); the weights' sum l adds the rounded values, so numerator and denominator
// see the same weights. Needs n_head ≤ 64, dh % 64 == 0, dh ≤ 512, half ≤ 64 (host checks).
// 16 warps: warp w handles heads 16(w/4).. and dims (w%4)·dh/4.. (the score partials over
// those dims for all the tile's rows, then the output over those dims: 64 f32 accumulators a
// thread at dh = 512). The next tile's rows are copied (cp.async) while the current one is
// used. (A first version staging through registers, every warp scoring 8 rows over all the
// dims, measured the same; branch pt, bench/RESULTS.md.)
#define TC_BR 32   // rows per tile
#define TC_SP 40   // f32 score row stride (float2 stores, float4 loads: no bank conflicts)
#define TC_PP 40   // f16 weight row stride

__device__ __forceinline__ void at_mma(float* c, const u32* a, const u32* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Two f32 -> one f16x2 word (lo in the low half), round to nearest even.
__device__ __forceinline__ u32 at_h2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ float at_f(u32 w, int hi) {
    unsigned short h = (unsigned short)(hi ? (w >> 16) : (w & 0xffffu));
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u32 at_smem(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// Four 8×8 f16 matrices at shared address a (A operand, or B from rows stored as [n][k]).
__device__ __forceinline__ void at_ldm_x4(u32* r, u32 a) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a)
                 : "memory");
}

// The same, transposed (the B operand of P·V from row-major rows).
__device__ __forceinline__ void at_ldm_x4t(u32* r, u32 a) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a)
                 : "memory");
}

// acc[j] += P·V over KR rows for the first nq n8 tiles (of NJ) of a warp's output dims: the
// weights by ldmatrix at pa (A, k along the rows), the rows by ldmatrix.trans at vb (B, two
// n8 tiles a load), kst halves apart.
template <int KR, int NJ>
__device__ __forceinline__ void at_pv(float (&acc)[NJ][4], u32 pa, u32 vb, int kst, int nq) {
#pragma unroll
    for (int k0 = 0; k0 < KR; k0 += 16) {
        u32 af[4];
        at_ldm_x4(af, pa + 2 * k0);
#pragma unroll
        for (int j = 0; j < NJ; j += 2) {
            if (j < nq) {
                u32 b[4];
                at_ldm_x4t(b, vb + 2 * (k0 * kst + 8 * j));
                at_mma(acc[j], af, b);
                at_mma(acc[j + 1], af, b + 2);
            }
        }
    }
}

#define TC_PF 4  // 16-byte pieces of a tile a thread moves (TC_BR · 512 / 8 / 512)

// Asks L2 for `bytes` (a multiple of 16, 16-aligned) at `p` in one bulk prefetch (sm_90; a
// no-op elsewhere): nothing waits on it.
__device__ __forceinline__ void at_l2_prefetch(const void* p, u32 bytes) {
#if __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
#endif
}

// ---- k_att_tc: the rows come as f16 copies (k_att_rows16, the same rounding the kernel
// once applied to f32 rows itself) and are copied by cp.async straight into the tile buffer
// the products read (rows past the token's last zero-filled); the scores split the dims over
// the 4 warps of a head group (each warp: 16 heads × all TC_BR rows × dh/4 dims, so every
// query and row value is read from shared memory once per tile), and the softmax adds the 4
// partials in order. A thread's pieces of a tile are fixed: 8 halves at column 8·(tid %
// (dh/8)) of the tile rows tid / (dh/8) + i·512/(dh/8), so their addresses are set up once;
// the window's ring slot is (lo mod swa + r) − swa·[≥ swa] in 32-bit arithmetic (r < swa).
// The tile buffers alternate: tile i+1 is copied into the buffer of tile i−1 once every warp
// has passed tile i's first barrier (so is done with tile i−1's output products), and the
// score partials have their own area, so a tile needs one block barrier (copied) and two of
// each head group's 4 warps (scored, weighted).
// The operands of both products are read with ldmatrix. Copying f16 rows halves the L2
// traffic of the gather (ratio-4 layers read 640 rows a token) and drops a conversion pass.
#define TC_SEL 1024  // ratio-4 selections up to this many are read from shared memory

// Barrier of head group hg's 4 warps (4hg..4hg+3: each SM sub-partition holds one warp of every
// group, so a group in its softmax leaves the tensor pipes to the others). The score partials,
// weights and m / l / corr of a group's heads are written and read by its warps only.
__device__ __forceinline__ void tc_group_sync(int hg) {
    asm volatile("bar.sync %0, 128;" ::"r"(hg + 1) : "memory");
}

// The queries' f16 form: float4 x of the [64][dh/4] grid into row x / nd4 of Qs.
__device__ __forceinline__ void tc_put(float4 v, unsigned short* ks, int kst, int nd4, int x) {
    u32* d = (u32*)(ks + (x / nd4) * kst + 4 * (x % nd4));
    d[0] = at_h2(v.x, v.y);
    d[1] = at_h2(v.z, v.w);
}

// Row rr of the token (att_row with the ring slot from rb = lo mod swa and the chunk offset
// lp = lo − p0, both fit in 32 bits), in the f16 copies.
__device__ __forceinline__ const unsigned short* tc_row(const AttRows& a, const unsigned short* ckv,
                                                        const unsigned short* ring,
                                                        const unsigned short* comp, int rr,
                                                        int rb, int lp) {
    if (rr < a.n_raw) {
        int d = lp + rr;
        if (d >= 0) return ckv + (long long)d * a.dh;
        int s = rb + rr;
        if (s >= a.swa) s -= a.swa;
        return ring + (long long)s * a.dh;
    }
    int c = a.ratio == 4 ? a.sel[rr - a.n_raw] : rr - a.n_raw;
    return comp + (long long)c * a.dh;
}

// Copies of tile `tile` into `dst` (TC_BR rows, kst halves apart): this thread's rows
// pr + i·rstep (< TC_BR), 8 halves at column 8·pc.
__device__ __forceinline__ void tc_issue(unsigned short* dst, const AttRows& a,
                                         const unsigned short* ckv, const unsigned short* ring,
                                         const unsigned short* comp, int tile, int pr, int rstep,
                                         int pc, int kst, int rb, int lp) {
#pragma unroll
    for (int i = 0; i < TC_PF; i++) {
        int r = pr + i * rstep;
        if (r < TC_BR) {
            int rr = tile * TC_BR + r;
            bool ok = rr < a.n_rows;
            const unsigned short* src = ok ? tc_row(a, ckv, ring, comp, rr, rb, lp) + 8 * pc : ckv;
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(
                             at_smem(dst + r * kst + 8 * pc)),
                         "l"(src), "r"(ok ? 16 : 0)
                         : "memory");
        }
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
}

// The row pointers of tile `tile` (lane = row; null past the token's last row), written by one
// warp into a TC_BR-entry table that tc_issue_tab reads: each row's source (ring, chunk or
// compressed, through the selection) is worked out once instead of by each of the 64 threads
// that copy a piece of it (the branches and 64-bit arithmetic of tc_row were a fifth of a
// ratio-4 layer's time).
__device__ __forceinline__ void tc_tab(const unsigned short** tab, const AttRows& a,
                                       const unsigned short* ckv, const unsigned short* ring,
                                       const unsigned short* comp, int tile, int lane, int rb,
                                       int lp) {
    const int rr = tile * TC_BR + lane;
    tab[lane] = rr < a.n_rows ? tc_row(a, ckv, ring, comp, rr, rb, lp) : nullptr;
}

// tc_issue with the rows from a tc_tab table (rows past the end zero-filled).
__device__ __forceinline__ void tc_issue_tab(unsigned short* dst, const unsigned short* const* tab,
                                             const unsigned short* ckv, int pr, int rstep, int pc,
                                             int kst) {
#pragma unroll
    for (int i = 0; i < TC_PF; i++) {
        int r = pr + i * rstep;
        if (r < TC_BR) {
            const unsigned short* row = tab[r];
            bool ok = row != nullptr;
            const unsigned short* src = ok ? row + 8 * pc : ckv;
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(
                             at_smem(dst + r * kst + 8 * pc)),
                         "l"(src), "r"(ok ? 16 : 0)
                         : "memory");
        }
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
}

// f16 copies (round to nearest even, as at_h2) of the rows k_att_tc reads: the ring (n0
// rows), the chunk's raw rows (n1) and the compressed rows (n2), each dh wide (a multiple of
// 4), packed in that order into out. 4 elements a thread, grid-stride.
extern "C" __global__ void k_att_rows16(const float* __restrict__ ring,
                                        const float* __restrict__ ckv,
                                        const float* __restrict__ comp, long long n0,
                                        long long n1, long long n2, int dh,
                                        unsigned short* __restrict__ out) {
    const long long m0 = n0 * dh, m1 = m0 + n1 * dh, m2 = m1 + n2 * dh;
    for (long long e = 4 * ((long long)blockIdx.x * blockDim.x + threadIdx.x); e < m2;
         e += 4LL * gridDim.x * blockDim.x) {
        const float* src = e < m0 ? ring + e : (e < m1 ? ckv + (e - m0) : comp + (e - m1));
        float4 v = *(const float4*)src;
        *(uint2*)(out + e) = make_uint2(at_h2(v.x, v.y), at_h2(v.z, v.w));
    }
}

// Query heads w, w + 16, .., w + 16(NH − 1) of k_att_tc (warp w), from the q_b product to their
// f16 rows in Qs: the unweighted RMSNorm and the RoPE of k_head_norm_rope with the same
// operations in the same order, so the halves are those of rounding its output (dh a
// multiple of 128, at most 512). That kernel's block has 128 threads, thread i summing the
// squares of elements i + 128k (k < dh/128) in f64, then block_sum_d; here lane l plays
// threads l + 32m of its 4 warps m, each warp's sum is the same butterfly (warp_sum_d's
// steps, the 4·NH sums of the NH heads side by side), and the last step puts warp m's sum on
// lane m as block_sum_d's warp 0 does. The rotation pairs (e, e+1) are lanes (l, l^1)
// (rope_tail's operations; the pair exchange only where a warp-wide group of 32 elements
// reaches the tail); the angles come from the chunk's table (k_rope_cs: rope_tail's values).
// Heads past n_head are zeros. T: float, or unsigned short for f16 queries (the q_b product
// written as f16 by its GEMM, read as f32 of those halves).
__device__ __forceinline__ float tc_qval(const float* p) { return *p; }
__device__ __forceinline__ float tc_qval(const unsigned short* p) { return h2f(*p); }

// One step of tc_qnorm's reduce-scatter: lanes x apart exchange halves of their first 2H sums
// (a lane with bit x keeps the upper half), each kept sum adding the partner's.
template <int H>
__device__ __forceinline__ void tc_rs_step(double (&sq)[16], int lane, int x) {
    const bool up = (lane & x) != 0;
#pragma unroll
    for (int j = 0; j < H; j++) {
        const double keep = up ? sq[j + H] : sq[j];
        const double give = up ? sq[j] : sq[j + H];
        sq[j] = keep + __shfl_xor_sync(0xffffffffu, give, x);
    }
}

template <int NH, class T>
__device__ __forceinline__ void tc_qnorm(const T* __restrict__ q, const float* __restrict__ cs_tab,
                                         unsigned short* Qs, int kst, int t, int w, int n_head,
                                         int dh, int half, float eps, int lane) {
    const int nk = dh >> 7, off = dh - 2 * half;
    float v[NH][4][4];  // [head i][m][k]: element lane + 32m + 128k of head w + 16i
#pragma unroll
    for (int i = 0; i < NH; i++) {
        const int hh = w + 16 * i;
        const T* src = q + ((long long)t * n_head + hh) * dh;
#pragma unroll
        for (int m = 0; m < 4; m++)
#pragma unroll
            for (int k = 0; k < 4; k++)
                v[i][m][k] = k < nk && hh < n_head ? tc_qval(src + lane + 32 * m + 128 * k) : 0.0f;
    }
    // sq[4i + m]: this lane's f64 sum of squares of head w + 16i's elements lane + 32m + 128k.
    static_assert(NH == 4, "the reduce-scatter below takes 16 sums a lane");
    double sq[16];
#pragma unroll
    for (int i = 0; i < NH; i++)
#pragma unroll
        for (int m = 0; m < 4; m++) {
            sq[4 * i + m] = 0.0;
#pragma unroll
            for (int k = 0; k < 4; k++)
                if (k < nk) sq[4 * i + m] += (double)v[i][m][k] * (double)v[i][m][k];
        }
    // warp_sum_d's butterfly (x = 16, 8, 4, 2, 1: each lane adds its partner's value) as a
    // reduce-scatter: at step x a lane keeps the half of its sums whose index bit is its lane
    // bit x and sends the other half, so every surviving sum is added in the butterfly's pairs
    // (its bits) for 16 f64 exchanges a lane instead of 80. Then lane l holds sum sq[(l/2)%16]
    // (head i = l/8, m = (l/2)%4); block_sum_d's last step over the 4 sums of a head (m, m^2,
    // then pairs: (s0 + s2) + (s1 + s3)) is two more exchanges, and each lane works out its own
    // head's scale (one f64 division chain a warp instead of four), read by the others below.
    tc_rs_step<8>(sq, lane, 16);
    tc_rs_step<4>(sq, lane, 8);
    tc_rs_step<2>(sq, lane, 4);
    tc_rs_step<1>(sq, lane, 2);
    double r = sq[0] + __shfl_xor_sync(0xffffffffu, sq[0], 1);
    r += __shfl_xor_sync(0xffffffffu, r, 4);
    r += __shfl_xor_sync(0xffffffffu, r, 2);
    // Rows past n_head stay zero (0 · s with s finite; the rotation of zeros).
    const float sl = (float)(1.0 / sqrt(r / (double)dh + (double)eps));
    float sh[NH];
#pragma unroll
    for (int i = 0; i < NH; i++) sh[i] = __shfl_sync(0xffffffffu, sl, 8 * i);
    const float* cs = cs_tab + 2LL * t * half;
#pragma unroll
    for (int i = 0; i < NH; i++) {
        unsigned short* qrow = Qs + (w + 16 * i) * kst;
        const float s = sh[i];
#pragma unroll
        for (int m = 0; m < 4; m++) {
#pragma unroll
            for (int k = 0; k < 4; k++) {
                if (k >= nk) continue;
                const int e = lane + 32 * m + 128 * k;
                float a = v[i][m][k] * s;
                if (32 * m + 128 * k + 31 >= off) {
                    float pa = __shfl_xor_sync(0xffffffffu, a, 1);
                    if (e >= off) {
                        float2 c2 = *(const float2*)(cs + 2 * ((e - off) >> 1));
                        a = ((e - off) & 1) == 0 ? a * c2.x - pa * c2.y : pa * c2.y + a * c2.x;
                    }
                }
                qrow[e] = f2h(a);
            }
        }
    }
}

// Dynamic shared memory: Qs [64][dh+8] f16 | two tile buffers [TC_BR][dh+8] f16 | score
// partials [4][64][TC_SP] f32 | Ps [64][TC_PP] f16 | two row tables [TC_BR] pointers |
// selection [TC_SEL] i32 | m, l, corr [64] f32 | cos, −sin [half] f32 (attn.rs: tc_smem).
// ckv, ring, comp: k_att_rows16's copies.
extern "C" __global__ void __launch_bounds__(512, 1)
    k_att_tc(const float* __restrict__ q, const unsigned short* __restrict__ ckv,
             const unsigned short* __restrict__ ring, const unsigned short* __restrict__ comp,
             const int* __restrict__ sel, const int* __restrict__ cnt, int sel_ld, int ratio,
             const long long* __restrict__ p0p, int swa, int dh, int n_head,
             const float* __restrict__ sinks, float scale, int half,
             const double* __restrict__ freqs, float* __restrict__ o,
             unsigned short* __restrict__ o16, const float* __restrict__ cs_tab, float qeps,
             int q16, int q_ahead) {
    extern __shared__ __align__(16) unsigned char tc_sm[];
    const int kst = dh + 8;
    const int kbw = TC_BR * kst;  // one tile buffer, in halves
    unsigned short* Qs = (unsigned short*)tc_sm;
    unsigned short* KB = Qs + 64 * kst;
    float* Sp = (float*)(KB + 2 * kbw);
    unsigned short* Ps = (unsigned short*)(Sp + 4 * 64 * TC_SP);
    const unsigned short** tabS = (const unsigned short**)(Ps + 64 * TC_PP);
    int* selS = (int*)(tabS + 2 * TC_BR);
    float* mrow = (float*)(selS + TC_SEL);
    float* lrow = mrow + 64;
    float* corr = lrow + 64;
    float* rc = corr + 64;
    float* rs = rc + half;
    const int t = blockIdx.x, tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int gid = lane >> 2, tig = lane & 3;
    const int hg = warp >> 2, sub = warp & 3;
    const long long p0 = *p0p;
    AttRows a = att_rows(nullptr, nullptr, nullptr, sel, cnt, sel_ld, ratio, p0, t, swa, dh);
    const int nd4 = dh / 4, nd8 = dh / 8;
    const int pc = tid % nd8, pr = tid / nd8, rstep = 512 / nd8;
    const int rb = (int)(a.lo % (long long)swa), lp = (int)(a.lo - p0);
    const int ntile = (a.n_rows + TC_BR - 1) / TC_BR;
    // Production prefill: the queries of token t + q_ahead (the block that takes this SM's
    // place about when this one ends, with one block an SM) are asked into L2 now, so that
    // block's first loads, the longest wait of a block's fixed part, come from L2.
    if (cs_tab && q_ahead > 0 && tid == 0 && t + q_ahead < (int)gridDim.x)
        at_l2_prefetch(q16 ? (const void*)((const unsigned short*)q + (long long)(t + q_ahead) * n_head * dh)
                           : (const void*)(q + (long long)(t + q_ahead) * n_head * dh),
                       (u32)(n_head * dh) * (q16 ? 2u : 4u));
    // The first tile's copies are in flight while the queries are converted.
    tc_issue(KB, a, ckv, ring, comp, 0, pr, rstep, pc, kst, rb, lp);
    // Tile 1's row table (tile t's is table t % 2), from the selection in global memory; tile
    // t + 2's is written during tile t (below), after every thread has read table t % 2.
    if (warp == 0) tc_tab(tabS + TC_BR, a, ckv, ring, comp, 1, lane, rb, lp);
    if (ratio == 4 && a.n_rows - a.n_raw <= TC_SEL) {
        for (int i = tid; i < a.n_rows - a.n_raw; i += 512) selS[i] = a.sel[i];
        a.sel = selS;
    }
    if (cs_tab) {
        // Production prefill: q holds the q_b product; each warp normalizes and rotates its 4
        // heads into Qs in one pass, all 64 loads a lane in flight together (k_head_norm_rope's
        // values rounded to f16). Two passes of 2 heads (the second's lines prefetched into
        // L2) took 2% longer; this pass spills 20 bytes, outside the tile loop.
        if (q16)
            tc_qnorm<4>((const unsigned short*)q, cs_tab, Qs, kst, t, warp, n_head, dh, half, qeps, lane);
        else
            tc_qnorm<4>(q, cs_tab, Qs, kst, t, warp, n_head, dh, half, qeps, lane);
    } else {
#pragma unroll 8
        for (int x = tid; x < 64 * nd4; x += 512) {
            int hh = x / nd4;
            float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
            if (hh < n_head)
                v = *(const float4*)(q + ((long long)t * n_head + hh) * dh + 4 * (x % nd4));
            tc_put(v, Qs, kst, nd4, x);
        }
    }
    if (tid < 64) {
        mrow[tid] = tid < n_head ? sinks[tid] : 0.0f;
        lrow[tid] = 1.0f;
    }
    if (tid < half) {
        double s, c;
        sincos((double)(p0 + t) * freqs[tid], &s, &c);
        rc[tid] = (float)c;
        rs[tid] = -(float)s;
    }
    float acc[16][4];
#pragma unroll
    for (int j = 0; j < 16; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    const int nq = dh / 32;  // n8 tiles of this warp's output dims (dh/4 wide)
    const int dq0 = sub * (dh / 4);
    // ldmatrix row addresses (bytes, shared space): A operands (queries, weights) take
    // rows lane%8 + 8·((lane/8)%2), columns 8·(lane/16); the score B operand (rows as
    // [n][k]) takes rows lane%8 + 8·(lane/16), columns 8·((lane/8)%2); the output B operand
    // (rows as [k][n], transposed) rows lane%8 + 8·((lane/8)%2), columns 8·(lane/16).
    const int ar = (lane & 7) + ((lane >> 3) & 1) * 8, ac = (lane >> 4) * 8;
    const u32 qa = at_smem(Qs + (16 * hg + ar) * kst + dq0 + ac);
    const u32 pa = at_smem(Ps + (16 * hg + ar) * TC_PP + ac);
    const u32 kb0 = at_smem(KB + ((lane & 7) + (lane >> 4) * 8) * kst + dq0 + ((lane >> 3) & 1) * 8);
    const u32 vb0 = at_smem(KB + ar * kst + dq0 + ac);
    for (int it = 0; it < ntile; it++) {
        const int cur = it & 1;
        const u32 kbo = 2u * (u32)(cur * kbw);  // byte offset of the current buffer
        asm volatile("cp.async.wait_all;" ::: "memory");
        __syncthreads();  // tile it (and, the first time, Qs, the selection, m, l, cos/sin)
        if (it + 1 < ntile)
            tc_issue_tab(KB + (cur ^ 1) * kbw, tabS + (cur ^ 1) * TC_BR, ckv, pr, rstep, pc, kst);
        // Tile it + 2's table (read after the next tile's first barrier), by a warp that
        // changes from tile to tile.
        if (warp == (it & 15) && it + 2 < ntile)
            tc_tab(tabS + cur * TC_BR, a, ckv, ring, comp, it + 2, lane, rb, lp);
        // Score partials: heads 16hg.., rows 0..TC_BR (4 n8 tiles), dims dq0..dq0+dh/4.
        {
            float s[4][4];
#pragma unroll
            for (int n = 0; n < 4; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
            const u32 kb = kb0 + kbo;
#pragma unroll 4
            for (int k0 = 0; k0 < dh / 4; k0 += 16) {
                u32 af[4], b01[4], b23[4];
                at_ldm_x4(af, qa + 2 * k0);
                at_ldm_x4(b01, kb + 2 * k0);
                at_ldm_x4(b23, kb + 2 * (k0 + 16 * kst));
                at_mma(s[0], af, b01);
                at_mma(s[1], af, b01 + 2);
                at_mma(s[2], af, b23);
                at_mma(s[3], af, b23 + 2);
            }
            float* sp = Sp + sub * 64 * TC_SP;
            int h = 16 * hg + gid;
#pragma unroll
            for (int n = 0; n < 4; n++) {
                int r = 8 * n + 2 * tig;
                *(float2*)(sp + h * TC_SP + r) = make_float2(s[n][0], s[n][1]);
                *(float2*)(sp + (h + 8) * TC_SP + r) = make_float2(s[n][2], s[n][3]);
            }
        }
        tc_group_sync(hg);  // the head group's score partials
        // Online softmax: 8 threads per head, 4 rows each; the partials added in dim order.
        {
            int h = tid >> 3, j = tid & 7;
            float v[4], mt = NEG_INF;
            const float* sx = Sp + h * TC_SP + 4 * j;
            float4 p0v = *(const float4*)sx, p1v = *(const float4*)(sx + 64 * TC_SP);
            float4 p2v = *(const float4*)(sx + 2 * 64 * TC_SP);
            float4 p3v = *(const float4*)(sx + 3 * 64 * TC_SP);
            v[0] = ((p0v.x + p1v.x) + p2v.x) + p3v.x;
            v[1] = ((p0v.y + p1v.y) + p2v.y) + p3v.y;
            v[2] = ((p0v.z + p1v.z) + p2v.z) + p3v.z;
            v[3] = ((p0v.w + p1v.w) + p2v.w) + p3v.w;
#pragma unroll
            for (int k = 0; k < 4; k++) {
                v[k] = it * TC_BR + 4 * j + k < a.n_rows ? v[k] * scale : NEG_INF;
                mt = fmaxf(mt, v[k]);
            }
            mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 1));
            mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 2));
            mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 4));
            float mo = mrow[h];
            float mn = fmaxf(mo, mt);
            u32 w0 = at_h2(expf(v[0] - mn), expf(v[1] - mn));
            u32 w1 = at_h2(expf(v[2] - mn), expf(v[3] - mn));
            *(u32*)(Ps + h * TC_PP + 4 * j) = w0;
            *(u32*)(Ps + h * TC_PP + 4 * j + 2) = w1;
            float sum = (at_f(w0, 0) + at_f(w0, 1)) + (at_f(w1, 0) + at_f(w1, 1));
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            sum += __shfl_xor_sync(0xffffffffu, sum, 4);
            if (j == 0) {
                float c = expf(mo - mn);
                corr[h] = c;
                lrow[h] = lrow[h] * c + sum;
                mrow[h] = mn;
            }
        }
        tc_group_sync(hg);  // its weights, m, l and corr
        // Output: heads 16hg.., dims dq0.. (nq n8 tiles, two per ldmatrix). No barrier
        // after it: the copies into this buffer (tile it + 2) start after the next tile's
        // first barrier, and so do the next scores' writes into the partials.
        {
            float c0 = corr[16 * hg + gid], c1 = corr[16 * hg + gid + 8];
            // Skipped when no head of the warp has a new maximum (·1 changes no bits).
            if (__any_sync(0xffffffffu, c0 != 1.0f || c1 != 1.0f)) {
#pragma unroll
                for (int j = 0; j < 16; j++) {
                    acc[j][0] *= c0;
                    acc[j][1] *= c0;
                    acc[j][2] *= c1;
                    acc[j][3] *= c1;
                }
            }
            at_pv<TC_BR>(acc, pa, vb0 + kbo, kst, nq);
        }
    }
    // o = acc / l, then the inverse RoPE of the tail (pairs (e, e+1) sit in one thread).
    // o16 (production prefill): f16 only, the input of attn_output_a's GEMM (at_h2 rounds as
    // f32_to_f16 does), so o is neither written nor converted; the rows are staged in the tile
    // buffers (free once every warp is past its last products) and leave in 16-byte stores,
    // consecutive threads on consecutive pieces (the 4-byte stores straight from the
    // accumulators cost a fifth of a ratio-0 layer's time).
    const int off = dh - 2 * half;
    if (o16) __syncthreads();
#pragma unroll
    for (int hi = 0; hi < 2; hi++) {
        int h = 16 * hg + gid + 8 * hi;
        if (h >= n_head) continue;
        float il = 1.0f / lrow[h];
        const long long ob = ((long long)t * n_head + h) * dh;
#pragma unroll
        for (int j = 0; j < 16; j++) {
            if (j < nq) {
                int e = dq0 + 8 * j + 2 * tig;
                float va = acc[j][2 * hi] * il, vb = acc[j][2 * hi + 1] * il;
                if (e >= off) {
                    float cf = rc[(e - off) / 2], sf = rs[(e - off) / 2];
                    float na = va * cf - vb * sf;
                    float nb = va * sf + vb * cf;
                    va = na;
                    vb = nb;
                }
                if (o16)
                    *(u32*)(KB + h * kst + e) = at_h2(va, vb);
                else
                    *(float2*)(o + ob + e) = make_float2(va, vb);
            }
        }
    }
    if (o16) {
        __syncthreads();
        for (int x = tid; x < n_head * nd8; x += 512) {
            const int h = x / nd8, c = x - h * nd8;
            *(uint4*)(o16 + ((long long)t * n_head + h) * dh + 8 * c) =
                *(const uint4*)(KB + h * kst + 8 * c);
        }
    }
}

// ---- k_att_fdtc16 / k_att_fdtc32: split-rows decode attention (k_att_fd's contract: the same
// row blocks of tpb·FD_R rows, the same unnormalized partials and (m, l) from the sink, so
// k_att_fd_combine finishes it) on tensor cores, with k_att_tc's rounding: the queries and the
// weights e^{s−m} rounded to f16, the rows too (F16-exact in production), f32 accumulation,
// l the sum of the rounded weights. A block: 16 heads (the M of m16n8k16) × its row block in
// tiles of RT rows (16: one tile a block where tpb = 1; 32 otherwise), 8 warps splitting the
// dims (scores: dh/8 of the k dimension each, partials added in warp order; output: dh/8
// columns each). k_att_fd ran ~3,000 dependent FMA / shuffle instructions a warp at one warp
// per scheduler; here a warp issues 4 k-steps × RT/8 n8 tiles of scores and RT/16 × 8 of
// output. The queries go straight from global memory into A fragments; the rows are loaded
// as f32 (their addresses from a per-tile table, one lookup a row), converted and stored in
// shared memory, since the two products read them in transposed layouts (ldmatrix / .trans).
#define FDTC_THREADS 256
#define FDTC_W 8

template <int RT>
__device__ __forceinline__ void att_fdtc(ATT_FD_PARAMS) {
    extern __shared__ __align__(16) unsigned char fdtc_sm[];
    const int b = blockIdx.x, h0 = blockIdx.y * 16, t = blockIdx.z, n = gridDim.z;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int gid = lane >> 2, tig = lane & 3;
    // wait_first (a PDL launch, DS4_CUDA_ROWS_PDL): nothing but the position is read before
    // the wait. A PDL graph node's dependencies are all programmatic, the side branches'
    // joins included, and griddepcontrol.wait waits for every prerequisite grid, so each read
    // below sees the compressors' and the indexer's writes (the waits further down return at
    // once). The combine may start after that (it reads the indexer's count before its own
    // wait): the trigger follows the wait. A plain launch triggers at once.
    PROBE(6, 0);
    if (wait_first) pdl_wait();
    pdl_trigger();
    PROBE(6, 1);
    const int kst = dh + 8;        // f16 row stride of the tile (ldmatrix rows on other banks)
    const int dw = dh / FDTC_W;    // this warp's dims: dw·warp ..
    const int ksteps = dw / 16;    // ≤ 4 (dh ≤ 512)
    unsigned short* Ks = (unsigned short*)fdtc_sm;                   // RT × kst
    float* Sp = (float*)(Ks + RT * kst);                             // W × 16 × (RT + 4)
    unsigned short* Ps = (unsigned short*)(Sp + FDTC_W * 16 * (RT + 4));  // 16 × (RT + 8)
    float* corr = (float*)(Ps + 16 * (RT + 8));                      // 16
    const float** tab = (const float**)(corr + 16);                  // RT row addresses
    // In a plain launch (wait_first 0) the wait at the first tile returns at once: the loads
    // before it (the position, the selection and its count, the ring's older rows, the
    // compressed rows) read what was complete before the kernel started, the queries and this
    // chunk's rows (`ckv`) come after it by ld.global.cg. With PDL every read follows the wait
    // at the top (bench/RESULTS.md, twenty-eighth to thirtieth sessions).
    u32 qa[4][4];
    // The position, then (ratio 4) the first tile's selected-row indices and the count side
    // by side: the indices' addresses need only the position (an index past the count is
    // read within the selection's row and never used). Computed here, not from att_rows'
    // n_raw: ptxas then issued the index load only after n_rows had used the count.
    const long long p0v = *p0p;
    const int r_lo = b * tpb * FD_R;
    int c_first = 0;
    if (ratio == 4 && tid < RT) {
        const long long pp = p0v + t, lo = pp + 1 - swa > 0 ? pp + 1 - swa : 0;
        const int i = r_lo + tid - (int)(pp - lo + 1);
        if (i >= 0) c_first = __ldcg(sel + (long long)t * sel_ld + min(i, sel_ld - 1));
    }
    AttRows a = att_rows(ckv, ring, comp, sel, cnt, sel_ld, ratio, p0v, t, swa, dh);
    if (r_lo >= a.n_rows) return;
    const int r_hi = min(a.n_rows, r_lo + tpb * FD_R);
    // Softmax threads: head sh = tid / 16, rows E·sj .. + E − 1 of a tile (E = RT / 16); m and
    // l of the head are kept (the same values) by its 16 threads.
    constexpr int E = RT / 16;
    const int sh = tid >> 4, sj = tid & 15;
    float m_run = h0 + sh < n_head ? sinks[h0 + sh] : 0.0f, l_run = 0.0f;
    float acc[8][4];
#pragma unroll
    for (int j = 0; j < 8; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    const int nq = dw / 8;  // n8 output tiles of this warp (≤ 8)
    const int d0w = dw * warp;
    const int ar = (lane & 7) + ((lane >> 3) & 1) * 8, ac = (lane >> 4) * 8;
    const u32 kb0 = at_smem(Ks + ((lane & 7) + (lane >> 4) * 8) * kst + d0w + ((lane >> 3) & 1) * 8);
    const u32 vb0 = at_smem(Ks + ar * kst + d0w + ac);
    const u32 pa0 = at_smem(Ps + ar * (RT + 8) + ac);
    const int c4 = dh >> 2;  // float4 pieces of a row
    for (int r0 = r_lo; r0 < r_hi; r0 += RT) {
        if (r0 != r_lo) __syncthreads();  // the previous tile's rows and weights are consumed
        if (tid < RT) {
            const int rr = r0 + tid;
            const float* src = nullptr;
            if (rr < r_hi)
                src = r0 == r_lo && rr >= a.n_raw && ratio == 4 ? a.comp + (long long)(unsigned)c_first * dh
                                                                 : fd_row(a, rr);
            // Bit 0 (the rows are 16-byte aligned) marks this chunk's rows: read after the wait.
            const bool late = rr < a.n_raw && a.lo + rr >= a.p0;
            tab[tid] = (const float*)((unsigned long long)src | (late ? 1ull : 0ull));
        }
        __syncthreads();
        if (r0 == r_lo) PROBE(6, 2);
        // The tile's rows: every load first, then the conversions and stores (rows past the
        // block's end are zeros: their weights are 0, and 0·NaN would not be).
        {
            constexpr int NP = RT * 128 / FDTC_THREADS;  // pieces a thread at dh = 512
            float4 v[NP];
            unsigned late = 0;  // bit i: piece i is of a row read after the wait
#pragma unroll
            for (int i = 0; i < NP; i++) {
                const int x = tid + FDTC_THREADS * i, r = x / c4, c = x - r * c4;
                const unsigned long long u = r < RT ? (unsigned long long)tab[r] : 0ull;
                const float* src = (const float*)(u & ~1ull);
                late |= (unsigned)(u & 1ull) << i;
                v[i] = src && !(u & 1ull) ? __ldcg((const float4*)src + c) : make_float4(0.f, 0.f, 0.f, 0.f);
            }
            if (r0 == r_lo) {
                // The queries of heads h0 + gid, + 8 (A fragments: k 2·tig.., + 8); heads past
                // n_head are zeros. Every load is issued before any conversion (the addresses
                // are clamped to a real head, so the loads need no predicate: with one, ptxas
                // issued them in four rounds, each waiting for the last).
                pdl_wait();
                const int ha = h0 + gid, hb = ha + 8;
                const float* pa = q + ((long long)t * n_head + min(ha, n_head - 1)) * dh + dw * warp + 2 * tig;
                const float* pb = q + ((long long)t * n_head + min(hb, n_head - 1)) * dh + dw * warp + 2 * tig;
                float2 x[4][4];
#pragma unroll
                for (int k = 0; k < 4; k++) {
                    if (k < ksteps) {
                        x[k][0] = __ldcg((const float2*)(pa + 16 * k));
                        x[k][1] = __ldcg((const float2*)(pb + 16 * k));
                        x[k][2] = __ldcg((const float2*)(pa + 16 * k + 8));
                        x[k][3] = __ldcg((const float2*)(pb + 16 * k + 8));
                    }
                }
                const bool za = ha >= n_head, zb = hb >= n_head;
#pragma unroll
                for (int k = 0; k < 4; k++) {
                    if (k < ksteps) {
#pragma unroll
                        for (int i = 0; i < 4; i++) {
                            const bool z = (i & 1) ? zb : za;
                            qa[k][i] = z ? 0u : at_h2(x[k][i].x, x[k][i].y);
                        }
                    }
                }
            }
            if (late) {
                pdl_wait();
#pragma unroll
                for (int i = 0; i < NP; i++) {
                    if (late >> i & 1) {
                        const int x = tid + FDTC_THREADS * i, r = x / c4, c = x - r * c4;
                        v[i] = __ldcg((const float4*)((unsigned long long)tab[r] & ~1ull) + c);
                    }
                }
            }
#pragma unroll
            for (int i = 0; i < NP; i++) {
                const int x = tid + FDTC_THREADS * i, r = x / c4, c = x - r * c4;
                if (r < RT) *(uint2*)(Ks + r * kst + 4 * c) = make_uint2(at_h2(v[i].x, v[i].y), at_h2(v[i].z, v[i].w));
            }
        }
        __syncthreads();
        if (r0 == r_lo) PROBE(6, 3);
        // Score partials: heads h0.., the tile's RT rows (RT/8 n8 tiles), this warp's dims.
        {
            float s[RT / 8][4];
#pragma unroll
            for (int j = 0; j < RT / 8; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
            for (int k = 0; k < 4; k++) {
                if (k < ksteps) {
#pragma unroll
                    for (int j = 0; j < RT / 16; j++) {
                        u32 bf[4];
                        at_ldm_x4(bf, kb0 + 2 * (16 * k + 16 * j * kst));
                        at_mma(s[2 * j], qa[k], bf);
                        at_mma(s[2 * j + 1], qa[k], bf + 2);
                    }
                }
            }
            float* sp = Sp + warp * 16 * (RT + 4);
#pragma unroll
            for (int j = 0; j < RT / 8; j++) {
                const int r = 8 * j + 2 * tig;
                *(float2*)(sp + gid * (RT + 4) + r) = make_float2(s[j][0], s[j][1]);
                *(float2*)(sp + (gid + 8) * (RT + 4) + r) = make_float2(s[j][2], s[j][3]);
            }
        }
        __syncthreads();
        // Online softmax of head sh over the tile (partials added in warp order).
        {
            float v[E], mt = NEG_INF;
#pragma unroll
            for (int e = 0; e < E; e++) {
                const int r = E * sj + e;
                float x = Sp[sh * (RT + 4) + r];
#pragma unroll
                for (int w = 1; w < FDTC_W; w++) x += Sp[(w * 16 + sh) * (RT + 4) + r];
                v[e] = r0 + r < r_hi ? x * scale : NEG_INF;
                mt = fmaxf(mt, v[e]);
            }
#pragma unroll
            for (int o = 8; o > 0; o >>= 1) mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, o));
            const float mn = fmaxf(m_run, mt);
            float sum = 0.0f;
            if constexpr (E == 1) {
                unsigned short hw = (unsigned short)(at_h2(expf(v[0] - mn), 0.0f) & 0xffffu);
                Ps[sh * (RT + 8) + sj] = hw;
                sum = at_f(hw, 0);
            } else {
#pragma unroll
                for (int e = 0; e < E; e += 2) {
                    const u32 w2 = at_h2(expf(v[e] - mn), expf(v[e + 1] - mn));
                    *(u32*)(Ps + sh * (RT + 8) + E * sj + e) = w2;
                    sum += at_f(w2, 0) + at_f(w2, 1);
                }
            }
#pragma unroll
            for (int o = 1; o < 16; o <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
            const float c = expf(m_run - mn);
            l_run = l_run * c + sum;
            m_run = mn;
            if (sj == 0) corr[sh] = c;
        }
        __syncthreads();
        // Output: heads h0.., this warp's dims (nq n8 tiles, two per ldmatrix).
        {
            const float c0 = corr[gid], c1 = corr[gid + 8];
#pragma unroll
            for (int j = 0; j < 8; j++) {
                acc[j][0] *= c0;
                acc[j][1] *= c0;
                acc[j][2] *= c1;
                acc[j][3] *= c1;
            }
            at_pv<RT>(acc, pa0, vb0, kst, nq);
        }
    }
    const long long base = ((long long)b * n + t) * n_head;
#pragma unroll
    for (int hi = 0; hi < 2; hi++) {
        const int h = h0 + gid + 8 * hi;
        if (h >= n_head) continue;
        float* dst = part + (base + h) * dh + d0w + 2 * tig;
#pragma unroll
        for (int j = 0; j < 8; j++)
            if (j < nq) *(float2*)(dst + 8 * j) = make_float2(acc[j][2 * hi], acc[j][2 * hi + 1]);
    }
    if (sj == 0 && h0 + sh < n_head) {
        ml[(base + h0 + sh) * 2] = m_run;
        ml[(base + h0 + sh) * 2 + 1] = l_run;
    }
    PROBE(6, 7);
}

#define DS4_ATT_FDTC(NAME, RT)                                                                    \
    extern "C" __global__ void __launch_bounds__(FDTC_THREADS) NAME(ATT_FD_PARAMS) {              \
        att_fdtc<RT>(ATT_FD_ARGS);                                                                \
    }
DS4_ATT_FDTC(k_att_fdtc16, 16)
DS4_ATT_FDTC(k_att_fdtc32, 32)

// ---- k_idx_scores_tc: the lightning indexer's scores (k_idx_scores' contract) on tensor cores,
// for production steps with QAT on (64 heads of 128 dims). The queries and the stored
// indexer rows are fp4sim values (E2M1 code × a power of two per 32 dims; the rows' F16
// storage rounding keeps them), so bf16 holds them exactly and every product q·k is exact in
// the MMA's f32 accumulator; within a 32-dim block all partial sums are exact too (multiples of
// a quarter of the two blocks' scale product, below 2^13 of it), so a dot product differs from
// the sequential f32 sum only when the four blocks' scales are more than ~2^10 apart. The
// weighted ReLU terms are summed over heads in head order from −0.0, as k_idx_scores does.
//
// Block (256 threads, 8 warps): RB rows (the K tile, converted to bf16 once per block; RB = 128,
// or 32 for decode steps, below) × up to IXC_TOK consecutive tokens; with 128 rows warp w owns
// rows 16w..16w+15 and all 64 heads (its B fragments stay in registers for all the tokens). Per token: the query (64 × 128 bf16, from q16, written by
// k_idx_q_finish or k_f32_to_bf16) arrives by cp.async, double-buffered; the 64×16-row products per warp are
// 4 head tiles × 8 k16 steps × 2 n8 tiles of m16n8k16; the terms w_h·max(0, dot) go to shared
// memory [head][row] and one thread per row sums them in head order. Rows are written only
// where visible to the token (row < (p0 + t + 1) / 4).
#define IXC_TOK 8
#define IXC_KS 136  // bf16 row stride of the K and Q tiles (272 bytes: ldmatrix without conflicts)

__device__ __forceinline__ void ix_mma_bf16(float* c, const u32* a, const u32* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// y[i] = bf16(x[i]) (round to nearest even), 4 elements a thread; n % 4 == 0.
extern "C" __global__ void k_f32_to_bf16(const float* __restrict__ x, u16* __restrict__ y,
                                         long long n) {
    long long i = 4 * ((long long)blockIdx.x * blockDim.x + threadIdx.x);
    if (i >= n) return;
    float4 v = *(const float4*)(x + i);
    *(uint2*)(y + i) = make_uint2(pack_bf2(v.x, v.y), pack_bf2(v.z, v.w));
}

// Asks L2 for the rows complete before the step (rows [0, p0 / ratio) of row_bytes each), with
// the evict-last priority, a 128-byte line a thread per grid stride. Launched at the start of a
// ratio-4 decode step's attention site for the indexer rows that k_idx_scores_tc reads ~15 µs
// later: cold in HBM, they were read there under q_b's traffic, 4–6 µs a block before its
// wait (bench/RESULTS.md, thirty-second session). A hint: changes no value.
extern "C" __global__ void k_l2_rows(const unsigned char* __restrict__ rows,
                                     const long long* __restrict__ p0p, int ratio, int row_bytes,
                                     int last) {
    const long long n = (*p0p / ratio) * (long long)row_bytes;
    const long long stride = (long long)gridDim.x * blockDim.x * 128;
    for (long long o = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 128; o < n; o += stride) {
        if (last) asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(rows + o));
        else asm volatile("prefetch.global.L2 [%0];" ::"l"(rows + o));
    }
}

// Dynamic shared memory of k_idx_scores_tc in bytes.
// (RB rows a block; attn.rs IXC_SMEM mirrors it.)
#define IXC_SMEM(RB) (((RB) + 2 * 64) * IXC_KS * 2 + 2 * 64 * 4 + 64 * ((RB) + 4) * 4)

// RB rows a block: 128 (k_idx_scores_tc) or 32 (k_idx_scores_tc32, decode steps: four times
// the blocks, so each SM's share of the products and of the cold row loads is a quarter). The
// warps split the rows into RB/16 groups of 16 and the 64 heads into 128/RB groups; every
// (head, row) term is the same MMA sum as with 128 rows, and a row's terms are added in head
// order as there: the same scores bit for bit.
template <int RB>
__device__ __forceinline__ void idx_scores_tc_body(const u16* __restrict__ q16,
                                                   const float* __restrict__ w, float wscale,
                                                   const float* __restrict__ krows,
                                                   const long long* __restrict__ p0p, int n,
                                                   float* __restrict__ scores, int ld, int pre) {
    constexpr int VS = RB + 4;        // f32 row stride of the [head][row] terms
    constexpr int WR = RB / 16;       // row groups (of 16) a block
    constexpr int NIT = 4 * WR / 8;   // m16 head tiles a warp
    static_assert(RB == 32 || RB == 64 || RB == 128, "rows a block");
    extern __shared__ __align__(16) unsigned char ixc_smem[];
    u16* ks = (u16*)ixc_smem;                       // [RB rows][IXC_KS]
    u16* qs = ks + RB * IXC_KS;                     // [2][64 heads][IXC_KS]
    float* ws = (float*)(qs + 2 * 64 * IXC_KS);     // [2][64]
    float* vs = ws + 2 * 64;                        // [64 heads][VS]
    // p0 is a host copy, written before the launch: read before the wait.
    PROBE(0, 0);
    pdl_trigger();
    const long long p0 = *p0p;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t4 = lane & 3;
    const int rg = warp % WR, hg = warp / WR;  // this warp's rows 16rg.., head tiles NIT·hg..
    const int r0 = blockIdx.x * RB, t0 = blockIdx.y * IXC_TOK;
    const int t1 = min(t0 + IXC_TOK, n);
    const int vis_last = (int)((p0 + t1) / 4);  // rows visible to the group's last token
    if (r0 >= vis_last) return;
    // K tile to bf16 (rows past the last visible one: zeros; they are never written out).
    // pre: rows complete before position p0 (r < p0 / 4: written by earlier launches, which
    // have ended) are converted before the wait, while the kernels before this one (the
    // indexer's compressor, its query product and finish) still run; the rows this launch's
    // compressor may write, and the zeros, after it, by ld.global.cg (bench/RESULTS.md,
    // thirty-first session).
    // pre bit 1: a thread's 16 loads are all issued before its first conversion (one round
    // trip to memory instead of the loop's four batches of 4; the same values).
    const int vis_pre = (pre & 1) ? min((int)(p0 / 4), vis_last) : 0;
    auto convert = [&](bool early) {
        if (pre & 2) {
            constexpr int NI = RB * 32 / 256;  // thread t: rows t/32 + 8i, columns 4(t%32)..
            const int rw = tid >> 5, c4 = tid & 31;
            float4 v[NI];
#pragma unroll
            for (int i = 0; i < NI; i++) {
                const int r = r0 + rw + 8 * i;
                const float4* src = (const float4*)(krows + (long long)r * 128 + 4 * c4);
                v[i] = make_float4(0.f, 0.f, 0.f, 0.f);
                if (early) {
                    if (r < vis_pre) v[i] = *src;
                } else if (r >= vis_pre && r < vis_last) {
                    v[i] = __ldcg(src);
                }
            }
#pragma unroll
            for (int i = 0; i < NI; i++) {
                const int row = rw + 8 * i;
                if ((r0 + row < vis_pre) != early) continue;
                *(uint2*)(ks + row * IXC_KS + 4 * c4) =
                    make_uint2(pack_bf2(v[i].x, v[i].y), pack_bf2(v[i].z, v[i].w));
            }
            return;
        }
        for (int f = tid; f < RB * 32; f += 256) {
            int row = f >> 5, c4 = f & 31;
            if ((r0 + row < vis_pre) != early) continue;
            float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
            const float4* src = (const float4*)(krows + (long long)(r0 + row) * 128 + 4 * c4);
            if (early) v = *src;
            else if (r0 + row < vis_last) v = __ldcg(src);
            *(uint2*)(ks + row * IXC_KS + 4 * c4) = make_uint2(pack_bf2(v.x, v.y), pack_bf2(v.z, v.w));
        }
    };
    if (vis_pre > r0) convert(true);
    PROBE(0, 1);
    pdl_wait();
    PROBE(0, 2);
    // The query of token t (64 × 128 bf16 = 1024 pieces of 16 bytes) and its 64 weights.
    auto fetch = [&](int t, int slot) {
        const u16* src = q16 + (long long)t * 64 * 128;
        u16* dst = qs + slot * 64 * IXC_KS;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            int f = tid + 256 * k, h = f >> 4, c = f & 15;
            pf_cp16(dst + h * IXC_KS + 8 * c, src + h * 128 + 8 * c, true);
        }
        if (tid < 64) ws[slot * 64 + tid] = w[(long long)t * 64 + tid] * wscale;
    };
    fetch(t0, 0);
    pf_cp_commit();
    convert(false);
    __syncthreads();
    PROBE(0, 3);
    // B fragments of the warp's rows 16rg + 8j + g: k = 16kk + 2t4 (+1) and + 8.
    u32 bf[2][8][2];
#pragma unroll
    for (int j = 0; j < 2; j++)
#pragma unroll
        for (int kk = 0; kk < 8; kk++) {
            const u16* kr = ks + (rg * 16 + j * 8 + g) * IXC_KS + 16 * kk + 2 * t4;
            bf[j][kk][0] = *(const u32*)kr;
            bf[j][kk][1] = *(const u32*)(kr + 8);
        }
    // ldmatrix row address of this lane in a query tile: head (lane & 15), dims 8·(lane >> 4).
    const u32 qa0 = at_smem(qs + (lane & 15) * IXC_KS + 8 * (lane >> 4));
    for (int t = t0, it = 0; t < t1; t++, it++) {
        const int slot = it & 1;
        if (t + 1 < t1) fetch(t + 1, slot ^ 1);  // that slot's last reader (t - 1) is done
        pf_cp_commit();
        pf_cp_wait1();
        __syncthreads();  // query t and its weights visible
        PROBE(0, 4);
        const int vis = (int)((p0 + t + 1) / 4);
        if (r0 < vis) {  // block-uniform
            float acc[NIT][2][4];
#pragma unroll
            for (int i = 0; i < NIT; i++)
#pragma unroll
                for (int j = 0; j < 2; j++)
#pragma unroll
                    for (int c = 0; c < 4; c++) acc[i][j][c] = 0.0f;
            const u32 qa = qa0 + slot * 64 * IXC_KS * 2;
#pragma unroll
            for (int i = 0; i < NIT; i++)
#pragma unroll
                for (int kk = 0; kk < 8; kk++) {
                    u32 a[4];
                    at_ldm_x4(a, qa + (16 * (NIT * hg + i) * IXC_KS + 16 * kk) * 2);
                    ix_mma_bf16(acc[i][0], a, bf[0][kk]);
                    ix_mma_bf16(acc[i][1], a, bf[1][kk]);
                }
            const float* wt = ws + slot * 64;
#pragma unroll
            for (int i = 0; i < NIT; i++)
#pragma unroll
                for (int j = 0; j < 2; j++)
#pragma unroll
                    for (int c = 0; c < 4; c++) {
                        int h = 16 * (NIT * hg + i) + g + 8 * (c >> 1);
                        int row = rg * 16 + j * 8 + 2 * t4 + (c & 1);
                        vs[h * VS + row] = wt[h] * fmaxf(acc[i][j][c], 0.0f);
                    }
            PROBE(0, 5);
            __syncthreads();
            if (tid < RB) {
                float tot = -0.0f;
#pragma unroll 8
                for (int h = 0; h < 64; h++) tot += vs[h * VS + tid];
                if (r0 + tid < vis) scores[(long long)t * ld + r0 + tid] = tot;
            }
        }
        __syncthreads();  // vs and this query slot are free again
    }
    PROBE(0, 7);
}

extern "C" __global__ void __launch_bounds__(256)
    k_idx_scores_tc(const u16* __restrict__ q16, const float* __restrict__ w, float wscale,
                    const float* __restrict__ krows, const long long* __restrict__ p0p, int n,
                    float* __restrict__ scores, int ld, int pre) {
    idx_scores_tc_body<128>(q16, w, wscale, krows, p0p, n, scores, ld, pre);
}

extern "C" __global__ void __launch_bounds__(256)
    k_idx_scores_tc32(const u16* __restrict__ q16, const float* __restrict__ w, float wscale,
                      const float* __restrict__ krows, const long long* __restrict__ p0p, int n,
                      float* __restrict__ scores, int ld, int pre) {
    idx_scores_tc_body<32>(q16, w, wscale, krows, p0p, n, scores, ld, pre);
}

// ---- k_idx_scores_wg (sm_90a): k_idx_scores_tc's contract, the products on the warpgroup
// MMA. k_idx_scores_tc runs mma.sync at about half of its rate and sums each token's terms
// with two block barriers and one thread a row; ncu puts it at ~130 TFLOPS at 30k context,
// where the indexer is ~15% of a prefill chunk. Here one warpgroup (128 threads) takes 128
// rows x `tpb` consecutive tokens; a block is two of them (256 rows), which share the query
// tiles (each query is read once per 256 rows):
// * The rows are the MMA's A operand, held in registers for all the tokens: converted to bf16
//   once (as k_idx_scores_tc's K tile) straight into mma.m16n8k16's fragment layout, rows
//   64j + 16·warp + g (+8) of the two m64 halves j.
// * A token's query (64 heads x 128 dims, bf16 from q16) is B, read by the tensor cores from
//   shared memory in K-major core matrices (8 heads x 8 dims, 16 bytes a head):
//   head group h/8 at (h/8)·2048, dims 8c.. at c·128; descriptor LBO 128, SBO 2048.
//   Four slots: a pair of tokens and the next pair, filled by cp.async a pair ahead.
// * Per token: 2 halves x 8 k16 steps of m64n64k16 (f32 accumulation; the same exact
//   products and block sums as k_idx_scores_tc, see there), then each row's terms
//   w_h·max(0, dot) are summed in registers and across its lane quad (`finish`): the same
//   terms as k_idx_scores_tc, added in another order (it sums them in head order through a
//   shared [row][head] tile: 130 µs a 2048-token chunk of a ratio-4 layer to 4k context,
//   109 µs here, H200 ncu; bench/RESULTS.md, twenty-fourth session).
// Rows are written only where visible to the token (row < (p0 + t + 1) / 4).
#define IXW_ROWS 256
#define IXW_SMEM (4 * 16384 + 4 * 64 * 4)

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// One m64n64k16 wgmma, bf16, A (4 registers, mma.m16n8k16's per-warp layout) x B (descriptor).
__device__ __forceinline__ void ixw_mma(float (&d)[8][4], const u32 (&a)[4], u64 db) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, 1, 1, 1, 0;"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db)
                 : "memory");
}


// Descriptor of a token's query tile at shared address a (K-major, no swizzle).
__device__ __forceinline__ u64 ixw_desc(u32 a) {
    return (u64)((a & 0x3FFFFu) >> 4) | ((u64)(128 >> 4) << 16) | ((u64)(2048 >> 4) << 32);
}
#endif

extern "C" __global__ void __launch_bounds__(256, 1)
    k_idx_scores_wg(const u16* __restrict__ q16, const float* __restrict__ w, float wscale,
                    const float* __restrict__ krows, const long long* __restrict__ p0p, int n,
                    int tpb, float* __restrict__ scores, int ld) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ __align__(128) unsigned char ixw_smem[];
    u16* qs = (u16*)ixw_smem;                       // [4][64 heads x 128 dims], core matrices
    float* ws = (float*)(ixw_smem + 4 * 16384);     // [4][64]
    pdl_enter();
    const long long p0 = *p0p;
    const int tid = threadIdx.x, lane = tid & 31, wgi = tid >> 7, warp = (tid >> 5) & 3;
    const int g = lane >> 2, t4 = lane & 3;
    const int r0 = blockIdx.x * IXW_ROWS, t0 = blockIdx.y * tpb;
    const int t1 = min(t0 + tpb, n);
    const int vis_last = (int)((p0 + t1) / 4);  // rows visible to the group's last token
    if (r0 >= vis_last) return;
    // A token's query by cp.async into its slot; its 64 head weights (threads < 64) into a
    // register, stored to the slot's weights at the top of the next pair's iteration, so that
    // no warp waits on that load inside the loop (warps 0-1 did, holding warpgroup 0's MMAs).
    auto fetch = [&](int t, int slot, float& wr) {
        const u16* src = q16 + (long long)t * 64 * 128;
        u16* dst = qs + slot * 64 * 128;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            int f = tid + 256 * k, h = f >> 4, c = f & 15;
            pf_cp16(dst + ((h >> 3) * 2048 + c * 128 + (h & 7) * 16) / 2, src + h * 128 + 8 * c, true);
        }
        if (tid < 64) wr = w[(long long)t * 64 + tid];
    };
    // The first token that sees any of this block's rows (visibility only grows with t).
    const int tv = max(t0, (int)(4LL * r0 + 3 - p0));
    if (tv >= t1) return;  // block-uniform (no barrier passed yet)
    float wr0 = 0.0f, wr1 = 0.0f;  // the next pair's weights
    fetch(tv, 0, wr0);
    if (tv + 1 < t1) fetch(tv + 1, 1, wr1);
    pf_cp_commit();
    // A fragments (rows past the last visible one: zeros; they are never written out).
    u32 af[2][8][4];
#pragma unroll
    for (int j = 0; j < 2; j++) {
        const int ra = r0 + 128 * wgi + 64 * j + 16 * warp + g, rb = ra + 8;
        const float* pa = krows + (long long)ra * 128 + 2 * t4;
        const float* pb = krows + (long long)rb * 128 + 2 * t4;
#pragma unroll
        for (int kk = 0; kk < 8; kk++) {
            float2 a0 = make_float2(0.f, 0.f), a1 = a0, b0 = a0, b1 = a0;
            if (ra < vis_last) {
                a0 = *(const float2*)(pa + 16 * kk);
                a1 = *(const float2*)(pa + 16 * kk + 8);
            }
            if (rb < vis_last) {
                b0 = *(const float2*)(pb + 16 * kk);
                b1 = *(const float2*)(pb + 16 * kk + 8);
            }
            af[j][kk][0] = pack_bf2(a0.x, a0.y);
            af[j][kk][1] = pack_bf2(b0.x, b0.y);
            af[j][kk][2] = pack_bf2(a1.x, a1.y);
            af[j][kk][3] = pack_bf2(b1.x, b1.y);
        }
    }
    const u32 q0 = at_smem(qs);
    // A token's products (its query in slot `slot`) into acc, left in flight.
    auto issue = [&](float (&acc)[2][8][4], int slot) {
        px_zero<8>(acc);
        const u32 qa = q0 + slot * 16384;
        pxw_fence();
#pragma unroll
        for (int kk = 0; kk < 8; kk++) {
            const u64 db = ixw_desc(qa + kk * 256);
            ixw_mma(acc[0], af[0][kk], db);
            ixw_mma(acc[1], af[1][kk], db);
        }
        pxw_commit();
    };
    // Token t's scores: row r's terms w_h·max(0, dot) summed where they are. Lane quad t4
    // holds heads 8b + 2t4, 8b + 2t4 + 1 (b = 0..7) of rows g and g + 8: each lane adds its 16
    // in head order, then the quad adds its 4 sums ((s0 + s1) + (s2 + s3), every lane the
    // same value). Not k_idx_scores_tc's head-order sum through a shared [row][head] tile,
    // whose 64 KB of stores and loads a token-block were most of this kernel's epilogue: the
    // same terms added in another order (differences of ~1e-7 of a score's mass; run to run
    // the same bits).
    auto finish = [&](float (&acc)[2][8][4], int t, int slot) {
        const float* wt = ws + slot * 64;
        const int vis = (int)((p0 + t + 1) / 4);
#pragma unroll
        for (int j = 0; j < 2; j++) {
            float sa = -0.0f, sb = -0.0f;
#pragma unroll
            for (int b = 0; b < 8; b++) {
                const int h = 8 * b + 2 * t4;
                const float w0 = wt[h], w1 = wt[h + 1];
                sa += w0 * fmaxf(acc[j][b][0], 0.0f);
                sa += w1 * fmaxf(acc[j][b][1], 0.0f);
                sb += w0 * fmaxf(acc[j][b][2], 0.0f);
                sb += w1 * fmaxf(acc[j][b][3], 0.0f);
            }
            sa += __shfl_xor_sync(0xffffffffu, sa, 1);
            sb += __shfl_xor_sync(0xffffffffu, sb, 1);
            sa += __shfl_xor_sync(0xffffffffu, sa, 2);
            sb += __shfl_xor_sync(0xffffffffu, sb, 2);
            const int ra = r0 + 128 * wgi + 64 * j + 16 * warp + g;
            if (t4 == 0) {
                if (ra < vis) scores[(long long)t * ld + ra] = sa;
                if (ra + 8 < vis) scores[(long long)t * ld + ra + 8] = sb;
            }
        }
    };
    // Tokens in pairs: token t + 1's products run on the tensor cores while token t's terms
    // are summed (two accumulator sets; the pair's own code, so that no accumulator in flight
    // crosses a branch or the loop's back edge, where the compiler would copy it and the
    // assembler serialize the MMAs). Per pair: its queries (fetched a pair ahead) visible and
    // the previous pair's sums done (barrier), the next pair's queries fetched into the other
    // two slots, both tokens' products issued, token t's waited for and summed, then t + 1's.
    float acc0[2][8][4], acc1[2][8][4];
    for (int t = tv, pair = 0; t < t1; t += 2, pair ^= 1) {
        const int sa = 2 * pair, sb = sa + 1, na = 2 - sa;
        // This pair's weights (its slots were last read two pairs ago, before the last
        // barrier), scaled as the score kernels take them.
        if (tid < 64) {
            ws[sa * 64 + tid] = wr0 * wscale;
            ws[sb * 64 + tid] = wr1 * wscale;
        }
        asm volatile("cp.async.wait_group 0;" ::: "memory");
        __syncthreads();
        if (t + 2 < t1) fetch(t + 2, na, wr0);
        if (t + 3 < t1) fetch(t + 3, na + 1, wr1);
        pf_cp_commit();
        if (t + 1 < t1) {  // block-uniform
            issue(acc0, sa);
            issue(acc1, sb);
            pxw_wait1();
            pxw_hold<8>(acc0);
            finish(acc0, t, sa);
            pxw_wait0();
            pxw_hold<8>(acc1);
            finish(acc1, t + 1, sb);
        } else {
            issue(acc0, sa);
            pxw_wait0();
            pxw_hold<8>(acc0);
            finish(acc0, t, sa);
        }
    }
#endif
}
