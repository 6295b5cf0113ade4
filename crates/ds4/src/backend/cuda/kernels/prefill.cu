// ds4 CUDA kernels of the production-mode prefill path (chunks of n > 1 tokens): the weight
// products run as f16 tensor-core GEMMs (cuBLAS, f32 accumulation) over weights dequantized
// to f16 scratch. The routed experts are grouped by expert first, so each used expert's
// matrices are dequantized once per chunk and multiplied with all of its tokens at once:
//
//   pf_group   (token, slot) pairs sorted by expert: counting sort, stable by slot index
//   pf_gather  the sorted slots' inputs, rounded to f16
//   pf_dq_<t>  a batch of experts' matrices to f16 (same unit dequantizers as dq_<t>)
//   [cuBLAS]   gate|up = W_gu · X per expert, rows in sorted order
//   pf_swiglu  clamped SwiGLU × routing weight (k_swiglu's expressions), rounded to f16
//   [cuBLAS]   down per expert
//   pf_scatter rows back to slot order, then the ordinary k_moe_sum
//
// The session's path (n_exp <= 256): pf_group_par (the same sort in parallel), pf_gather16
// (copies of the f16 y its producer wrote), the fused expert product (pf_mxs_<t> / pf_mx_<t>
// for IQ2_XXS / Q2_K, which decode weights straight into the MMA fragments; pf_mm_<t>, which
// decodes weight tiles into shared memory, for other types), pf_swiglu4, the down product,
// and k_hc_post_moe_pf (forward.cu) reads the sorted rows through inv in place of
// pf_scatter + k_moe_sum + k_hc_post. No pf_dq + cuBLAS on the default path.
//
// No atomics: every output element is written by one thread, so results are bit-identical
// from run to run (cuBLAS GEMMs are deterministic for a given shape on one device).
// Appended after quant.cu (uses f2h, the deq_<t> unit dequantizers and the IQ2 tables).

#define PF_GROUP_TILE 1024
// Tile of the grouped expert product pf_mm_<t>: PF_BM weight rows x PF_BN sorted rows
// (tokens of one expert), PF_BK columns per step; shared rows padded to PF_SA halves.
#define PF_BM 128
#define PF_BN 64
#define PF_BK 32
#define PF_SA 40

// Rows of a tile of pf_mxw4 (pf_group's second list).
#define PF_BN2 128

// One block of PF_GROUP_TILE threads; thread e < n_exp owns expert e. `meta` receives the
// per-expert counts (n_exp ints), the used experts in increasing id (n_exp ints, -1 after
// the last), then the numbers of tiles in the three lists. Tiles are (expert, first sorted
// row, rows) in expert order: `tiles` cuts every expert at PF_BN rows (pf_mm, the down
// product); the gate|up split between pf_mxw4 and pf_mxw takes `tiles2`, the experts of more
// than PF_BN rows cut at PF_BN2, and `tiles1`, the one tile of each expert of 1..PF_BN rows.
// perm[r] = slot at sorted row r; inv[slot] = its sorted row. Rows of one expert keep slot
// order (stable): the result is a pure function of `ids`.
extern "C" __global__ void __launch_bounds__(PF_GROUP_TILE)
    pf_group(const int* __restrict__ ids, int slots, int n_exp, int* __restrict__ meta,
             int* __restrict__ perm, int* __restrict__ inv, int* __restrict__ tiles,
             int* __restrict__ tiles2, int* __restrict__ tiles1) {
    __shared__ int tile[PF_GROUP_TILE];
    __shared__ int off[PF_GROUP_TILE + 1];
    __shared__ int used_at[PF_GROUP_TILE];
    int e = threadIdx.x;
    int cnt = 0;
    for (int s0 = 0; s0 < slots; s0 += PF_GROUP_TILE) {
        int m = min(PF_GROUP_TILE, slots - s0);
        __syncthreads();
        if (e < m) tile[e] = ids[s0 + e];
        __syncthreads();
        if (e < n_exp)
            for (int j = 0; j < m; j++) cnt += tile[j] == e;
    }
    off[e + 1] = e < n_exp ? cnt : 0;
    __syncthreads();
    if (e == 0) {
        off[0] = 0;
        int u = 0;
        for (int i = 0; i < n_exp; i++) {
            used_at[i] = off[i + 1] > 0 ? u++ : -1;
            off[i + 1] += off[i];
        }
        for (int i = u; i < n_exp; i++) meta[n_exp + i] = -1;
        int nt = 0;
        for (int i = 0; i < n_exp; i++)
            for (int r = off[i]; r < off[i + 1]; r += PF_BN) {
                tiles[3 * nt] = i;
                tiles[3 * nt + 1] = r;
                tiles[3 * nt + 2] = min(PF_BN, off[i + 1] - r);
                nt++;
            }
        meta[2 * n_exp] = nt;
        int n2 = 0, n1 = 0;
        for (int i = 0; i < n_exp; i++) {
            int c = off[i + 1] - off[i];
            if (c > PF_BN) {
                for (int r = off[i]; r < off[i + 1]; r += PF_BN2) {
                    tiles2[3 * n2] = i;
                    tiles2[3 * n2 + 1] = r;
                    tiles2[3 * n2 + 2] = min(PF_BN2, off[i + 1] - r);
                    n2++;
                }
            } else if (c > 0) {
                tiles1[3 * n1] = i;
                tiles1[3 * n1 + 1] = off[i];
                tiles1[3 * n1 + 2] = c;
                n1++;
            }
        }
        meta[2 * n_exp + 1] = n2;
        meta[2 * n_exp + 2] = n1;
    }
    __syncthreads();
    if (e < n_exp) {
        meta[e] = cnt;
        if (used_at[e] >= 0) meta[n_exp + used_at[e]] = e;
    }
    int at = e < n_exp ? off[e] : 0;
    for (int s0 = 0; s0 < slots; s0 += PF_GROUP_TILE) {
        int m = min(PF_GROUP_TILE, slots - s0);
        __syncthreads();
        if (e < m) tile[e] = ids[s0 + e];
        __syncthreads();
        if (e < n_exp)
            for (int j = 0; j < m; j++)
                if (tile[j] == e) {
                    perm[at] = s0 + j;
                    inv[s0 + j] = at;
                    at++;
                }
    }
}

// ---- pf_group_par: the same grouping as pf_group (identical meta, perm, inv and tiles), in
// parallel for n_exp <= PFG_MAXE. The slots are cut into PFG_CH contiguous chunks, warp w
// owning chunk w; an expert's rows are chunk 0's slots of that expert in slot order, then
// chunk 1's, ..., which is slot order: the sort stays stable. No atomics: inside a warp the
// lanes holding the same expert find each other with __match_any_sync, the lowest of them
// adds their number, and a lane's rank among them is the count of lower lanes in the match.
//   1. hist[c][e] = slots of expert e in chunk c
//   2. exclusive scan of hist in (expert, chunk) order: hist[c][e] becomes the sorted row of
//      chunk c's first slot of expert e; the experts' starts give counts, used list, tiles
//   3. every warp walks its chunk again and writes perm / inv from its running hist row.
#define PFG_CH 32
#define PFG_MAXE 256

// Exclusive scan of one int per thread over a block of 1024 threads (32 warps), in thread
// order; *total receives the sum. wsum: 33 shared ints. Ends with a barrier (wsum reusable).
__device__ __forceinline__ int pfg_scan(int v, int* wsum, int* total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        int y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) wsum[warp] = x;
    __syncthreads();
    if (warp == 0) {
        int w = wsum[lane], xi = w;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            int y = __shfl_up_sync(0xffffffffu, xi, o);
            if (lane >= o) xi += y;
        }
        wsum[lane] = xi - w;
        if (lane == 31) wsum[32] = xi;
    }
    __syncthreads();
    int r = wsum[warp] + x - v;
    *total = wsum[32];
    __syncthreads();
    return r;
}

extern "C" __global__ void __launch_bounds__(1024)
    pf_group_par(const int* __restrict__ ids, int slots, int n_exp, int* __restrict__ meta,
                 int* __restrict__ perm, int* __restrict__ inv, int* __restrict__ tiles,
                 int* __restrict__ tiles2, int* __restrict__ tiles1) {
    __shared__ int hist[PFG_CH * PFG_MAXE];
    __shared__ int estart[PFG_MAXE + 1];
    __shared__ int wsum[33];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int cs = (slots + PFG_CH - 1) / PFG_CH;
    const int c0 = min(warp * cs, slots), c1 = min(c0 + cs, slots);
    const unsigned lt = (1u << lane) - 1u;
    for (int i = tid; i < PFG_CH * PFG_MAXE; i += 1024) hist[i] = 0;
    __syncthreads();
    // 1. Counts per (chunk, expert): only warp w writes row w.
    int* hrow = hist + warp * PFG_MAXE;
    for (int s0 = c0; s0 < c1; s0 += 32) {
        int s = s0 + lane;
        int e = s < c1 ? ids[s] : -1;
        unsigned m = __match_any_sync(0xffffffffu, e);
        if (e >= 0 && (m & lt) == 0) hrow[e] += __popc(m);
        __syncwarp();
    }
    __syncthreads();
    // 2. Thread tid scans entries 8·tid.. of the (expert, chunk) order: expert tid/4, chunks
    // 8·(tid%4)..+7 (PFG_CH = 32 = 4·8 chunks an expert).
    const int se = tid >> 2, sc0 = 8 * (tid & 3);
    int v[8], sum = 0;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        v[j] = se < n_exp ? hist[(sc0 + j) * PFG_MAXE + se] : 0;
        sum += v[j];
    }
    int tot;
    int run = pfg_scan(sum, wsum, &tot);
    if (se < n_exp) {
#pragma unroll
        for (int j = 0; j < 8; j++) {
            hist[(sc0 + j) * PFG_MAXE + se] = run;
            run += v[j];
        }
        if ((tid & 3) == 0) estart[se] = run - sum;
    }
    if (tid == 0) estart[n_exp] = tot;
    __syncthreads();
    // Counts, used list (increasing expert id, -1 after the last), the three tile lists.
    const int cnt = tid < n_exp ? estart[tid + 1] - estart[tid] : 0;
    int n_used, n_tiles, n_tiles2, n_tiles1;
    const int ui = pfg_scan(cnt > 0 ? 1 : 0, wsum, &n_used);
    const int nt_e = (cnt + PF_BN - 1) / PF_BN;
    const int ti = pfg_scan(nt_e, wsum, &n_tiles);
    const int nt_e2 = cnt > PF_BN ? (cnt + PF_BN2 - 1) / PF_BN2 : 0;
    const int ti2 = pfg_scan(nt_e2, wsum, &n_tiles2);
    const int nt_e1 = cnt > 0 && cnt <= PF_BN ? 1 : 0;
    const int ti1 = pfg_scan(nt_e1, wsum, &n_tiles1);
    if (tid < n_exp) {
        meta[tid] = cnt;
        if (cnt > 0) meta[n_exp + ui] = tid;
        if (tid >= n_used) meta[n_exp + tid] = -1;
        for (int j = 0; j < nt_e; j++) {
            int r = j * PF_BN;
            tiles[3 * (ti + j)] = tid;
            tiles[3 * (ti + j) + 1] = estart[tid] + r;
            tiles[3 * (ti + j) + 2] = min(PF_BN, cnt - r);
        }
        for (int j = 0; j < nt_e2; j++) {
            int r = j * PF_BN2;
            tiles2[3 * (ti2 + j)] = tid;
            tiles2[3 * (ti2 + j) + 1] = estart[tid] + r;
            tiles2[3 * (ti2 + j) + 2] = min(PF_BN2, cnt - r);
        }
        if (nt_e1) {
            tiles1[3 * ti1] = tid;
            tiles1[3 * ti1 + 1] = estart[tid];
            tiles1[3 * ti1 + 2] = cnt;
        }
    }
    if (tid == 0) {
        meta[2 * n_exp] = n_tiles;
        meta[2 * n_exp + 1] = n_tiles2;
        meta[2 * n_exp + 2] = n_tiles1;
    }
    // 3. Placement: lanes sharing an expert take consecutive rows in lane (= slot) order.
    for (int s0 = c0; s0 < c1; s0 += 32) {
        int s = s0 + lane;
        int e = s < c1 ? ids[s] : -1;
        unsigned m = __match_any_sync(0xffffffffu, e);
        int base = e >= 0 ? hrow[e] : 0;
        __syncwarp();
        if (e >= 0) {
            int at = base + __popc(m & lt);
            perm[at] = s;
            inv[s] = at;
            if ((m & lt) == 0) hrow[e] = base + __popc(m);
        }
        __syncwarp();
    }
}

// Where pf_mxw_<t> wants column c of an activation row (see pf_mxw below): inside each group
// of 32 columns, c = 8t + 4kk + 2u + e sits at 16kk + 8u + 2t + e, so that the wgmma's logical
// k order of the group's two k16 steps holds, for lane quad t, the 8 consecutive columns
// 8t..8t+7 its weight decoder produces. Column pairs (e = 0, 1) stay together.
__device__ __forceinline__ int px_pos(int c) {
    return (c & ~31) | (((c >> 2) & 1) << 4) | (((c >> 1) & 1) << 3) | (((c >> 3) & 3) << 1) |
           (c & 1);
}

// xs[r][8i..8i+8] = y16[perm[r] / k][8i..8i+8]: the sorted row's input from the f16 copy of
// y its producer wrote (the same values pf_gather rounds), 16 bytes a thread. d % 8 == 0.
// pm = 1: columns permuted for pf_mxw (px_pos; d % 32 == 0). grid (d/8/256, rows).
extern "C" __global__ void pf_gather16(const u16* __restrict__ y16, const int* __restrict__ perm,
                                       int k, int d, int pm, u16* __restrict__ xs) {
    int r = blockIdx.y;
    int i = 8 * (blockIdx.x * blockDim.x + threadIdx.x);
    if (i >= d) return;
    int t = perm[r] / k;
    uint4 v = *(const uint4*)(y16 + (i64)t * d + i);
    u16* dst = xs + (i64)r * d;
    if (pm) {
        // The 4 column pairs go to 4 different places of the permuted 32-column group.
        *(u32*)(dst + px_pos(i)) = v.x;
        *(u32*)(dst + px_pos(i + 2)) = v.y;
        *(u32*)(dst + px_pos(i + 4)) = v.z;
        *(u32*)(dst + px_pos(i + 6)) = v.w;
    } else {
        *(uint4*)(dst + i) = v;
    }
}

// One SwiGLU output of the prefill expert path: silu(min(g, c)) · clamp(u, ±c), times the
// routing weight w when wts is set (k_swiglu's expressions and order).
__device__ __forceinline__ float pf_swiglu_val(float g, float u, float c, bool wt, float w) {
    float gv = fminf(g, c);
    float sil = gv * (1.0f / (1.0f + expf(-gv)));
    float uv = fminf(fmaxf(u, -c), c);
    float v = sil * uv;
    return wt ? v * w : v;
}

// pf_swiglu, 4 elements a thread (f % 4 == 0): the same expressions per element. pm = 1:
// columns permuted for pf_mxw (px_pos; f % 32 == 0). grid (f/4/256, rows).
extern "C" __global__ void pf_swiglu4(const float* __restrict__ gu, const int* __restrict__ perm,
                                      const float* __restrict__ wts, int r0, int f, float c,
                                      int pm, u16* __restrict__ h) {
    int r = r0 + blockIdx.y;
    int i = 4 * (blockIdx.x * blockDim.x + threadIdx.x);
    if (i >= f) return;
    const float* row = gu + (i64)r * 2 * f;
    float4 g4 = *(const float4*)(row + i), u4 = *(const float4*)(row + f + i);
    float gs[4] = {g4.x, g4.y, g4.z, g4.w}, us[4] = {u4.x, u4.y, u4.z, u4.w};
    float w = wts ? wts[perm[r]] : 0.0f;
    u16 o[4];
#pragma unroll
    for (int j = 0; j < 4; j++) o[j] = f2h(pf_swiglu_val(gs[j], us[j], c, wts != nullptr, w));
    uint2 q;
    q.x = (u32)o[0] | ((u32)o[1] << 16);
    q.y = (u32)o[2] | ((u32)o[3] << 16);
    u16* dst = h + (i64)r * f;
    if (pm) {
        *(u32*)(dst + px_pos(i)) = q.x;
        *(u32*)(dst + px_pos(i + 2)) = q.y;
    } else {
        *(uint2*)(dst + i) = q;
    }
}

// pf_swiglu_q8: pf_swiglu4's values (same expressions), quantized for pf_mxq_<t> as the CPU's
// expert linears quantize theirs (Q8_K per 256 columns: q8k_lane, so the codes and scales are
// those of `q8_k::quantize_block` on the same f32 values). Row r of f columns (f % 256 == 0):
// * xq[r][·]: the codes, each 32-column group in pf_mxq's logical k order: column
//   c = 8t + 4u + e of the group at byte 16u + 4t + e (lane quad t's 8 consecutive decoded
//   weights 8t..8t+7 are the A fragment's k 4t..4t+3 and 16+4t..16+4t+3);
// * xd[r][b]: block b's scale d (0 for an all-zero block);
// * xb[r][16b + j]: f16(d · Σ codes of 16-column group j) (|Σ| ≤ 16·127, exact as an
//   integer; the product is rounded once), the B operand of Q2_K's min term.
// One warp a 256-column block; grid (f/2048 rounded up, rows), 256 threads.
extern "C" __global__ void pf_swiglu_q8(const float* __restrict__ gu, const int* __restrict__ perm,
                                        const float* __restrict__ wts, int f, float c,
                                        signed char* __restrict__ xq, float* __restrict__ xd,
                                        u16* __restrict__ xb) {
    int r = blockIdx.y, lane = threadIdx.x & 31;
    int bq = 8 * blockIdx.x + (threadIdx.x >> 5);
    if (bq * 256 >= f) return;
    int i = bq * 256 + 8 * lane;
    const float* row = gu + (i64)r * 2 * f;
    float4 g0 = *(const float4*)(row + i), g1 = *(const float4*)(row + i + 4);
    float4 u0 = *(const float4*)(row + f + i), u1 = *(const float4*)(row + f + i + 4);
    float gs[8] = {g0.x, g0.y, g0.z, g0.w, g1.x, g1.y, g1.z, g1.w};
    float us[8] = {u0.x, u0.y, u0.z, u0.w, u1.x, u1.y, u1.z, u1.w};
    float w = wts ? wts[perm[r]] : 0.0f;
    float v[8];
#pragma unroll
    for (int j = 0; j < 8; j++) v[j] = pf_swiglu_val(gs[j], us[j], c, wts != nullptr, w);
    u32 w0, w1;
    float dd = q8k_lane(v, lane, &w0, &w1);
    u32* dst = (u32*)(xq + (i64)r * f + bq * 256 + 32 * (lane >> 2) + 4 * (lane & 3));
    dst[0] = w0;
    dst[4] = w1;
    int s = __dp4a((int)w0, 0x01010101, 0) + __dp4a((int)w1, 0x01010101, 0);
    s += __shfl_xor_sync(0xffffffffu, s, 1);
    if ((lane & 1) == 0) xb[(i64)r * (f / 16) + bq * 16 + (lane >> 1)] = f2h(dd * (float)s);
    if (lane == 0) xd[(i64)r * (f / 256) + bq] = dd;
}

// xs[r][i] = f16(y[perm[r] / k][i]): sorted row r's input (its token's row); pm = 1: at the
// permuted column px_pos(i) (pf_mxw). grid (d/256, rows).
extern "C" __global__ void pf_gather(const float* __restrict__ y, const int* __restrict__ perm,
                                     int k, int d, int pm, u16* __restrict__ xs) {
    int r = blockIdx.y;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= d) return;
    int t = perm[r] / k;
    xs[(i64)r * d + (pm ? px_pos(i) : i)] = f2h(y[(i64)t * d + i]);
}

// h[r][i] = f16(silu(min(g, c))·clamp(u, ±c)·wts[perm[r]]) with g = gu[r][i], u = gu[r][f+i]
// (the rows r0.. of one batch of experts). Same expressions as k_swiglu; pm as pf_gather.
// grid (f/256, rows).
extern "C" __global__ void pf_swiglu(const float* __restrict__ gu, const int* __restrict__ perm,
                                     const float* __restrict__ wts, int r0, int f, float c,
                                     int pm, u16* __restrict__ h) {
    int r = r0 + blockIdx.y;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= f) return;
    const float* row = gu + (i64)r * 2 * f;
    float w = wts ? wts[perm[r]] : 0.0f;
    h[(i64)r * f + (pm ? px_pos(i) : i)] = f2h(pf_swiglu_val(row[i], row[f + i], c, wts != nullptr, w));
}

// dn[s][i] = dns[inv[s]][i]: rows back to slot order. grid (d/256, slots).
extern "C" __global__ void pf_scatter(const float* __restrict__ dns, const int* __restrict__ inv,
                                      int d, float* __restrict__ dn) {
    int s = blockIdx.y;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= d) return;
    dn[(i64)s * d + i] = dns[(i64)inv[s] * d + i];
}

// pf_dq_<t>: matrices experts[e0 + b] (b = blockIdx.y; experts null: matrix e0 + b) to f16,
// row-major n_rows x n_cols at out + b·out_stride. Same units and rounding as dq_<t>.
#define DS4_PF_DQ(T, DQ_ELEMS)                                                                   \
    extern "C" __global__ void pf_dq_##T(const u8* __restrict__ w, i64 expert_bytes,             \
                                         const int* __restrict__ experts, int e0, int n_rows,    \
                                         int n_cols, u16* __restrict__ out, i64 out_stride) {    \
        i64 upr = n_cols / DQ_ELEMS;                                                             \
        i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;                                      \
        if (i >= upr * n_rows) return;                                                           \
        int b = blockIdx.y;                                                                      \
        int e = experts ? experts[e0 + b] : e0 + b;                                              \
        const u8* wb = w + (i64)e * expert_bytes;                                                \
        int o = (int)(i / upr), u = (int)(i % upr);                                              \
        float v[DQ_ELEMS];                                                                       \
        deq_##T(wb, o, n_rows, n_cols, u, v);                                                    \
        u16* dst = out + (i64)b * out_stride + (i64)o * n_cols + (i64)u * DQ_ELEMS;              \
        _Pragma("unroll") for (int k = 0; k < DQ_ELEMS; k += 4) {                                \
            uint2 q;                                                                             \
            q.x = (u32)f2h(v[k]) | ((u32)f2h(v[k + 1]) << 16);                                   \
            q.y = (u32)f2h(v[k + 2]) | ((u32)f2h(v[k + 3]) << 16);                               \
            *(uint2*)(dst + k) = q;                                                              \
        }                                                                                        \
    }

DS4_PF_DQ(f32, 4)
DS4_PF_DQ(f16, 8)
// Q8_0 (GPU planes: row-major int8 codes, then one f16 scale per 32): 8 elements a thread, one
// 8-byte code load and one 16-byte store (the generic form moved 32 single bytes and four
// 8-byte stores a thread); the same product __fmul_rn(d, q) and rounding as deq_q8_0.
// Thread i: row i / (n_cols/8), elements 8·(i % (n_cols/8)).. (device.rs sizes the grid).
extern "C" __global__ void pf_dq_q8_0(const u8* __restrict__ w, i64 expert_bytes,
                                      const int* __restrict__ experts, int e0, int n_rows,
                                      int n_cols, u16* __restrict__ out, i64 out_stride) {
    i64 upr = n_cols / 8;
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= upr * n_rows) return;
    int b = blockIdx.y;
    int e = experts ? experts[e0 + b] : e0 + b;
    const u8* wb = w + (i64)e * expert_bytes;
    i64 o = i / upr;
    int c = 8 * (int)(i % upr);
    uint2 q = *(const uint2*)(wb + o * n_cols + c);
    float d = h2f(((const u16*)(wb + (i64)n_rows * n_cols))[o * (n_cols >> 5) + (c >> 5)]);
    u32 wd[2] = {q.x, q.y}, h[4];
#pragma unroll
    for (int j = 0; j < 4; j++) {
        int lo = (int)(signed char)(wd[j >> 1] >> (16 * (j & 1)));
        int hi = (int)(signed char)(wd[j >> 1] >> (16 * (j & 1) + 8));
        h[j] = (u32)f2h(__fmul_rn(d, (float)lo)) | ((u32)f2h(__fmul_rn(d, (float)hi)) << 16);
    }
    *(uint4*)(out + (i64)b * out_stride + o * n_cols + c) = make_uint4(h[0], h[1], h[2], h[3]);
}
DS4_PF_DQ(q2_k, 16)
DS4_PF_DQ(q4_k, 32)
DS4_PF_DQ(iq2_xxs, 32)

// ---------------------------------------------------------------------------------------------
// pf_mm_<t>: grouped expert product on tensor cores, weights dequantized in the kernel (each
// expert's quantized bytes are read once per row tile of its tokens; no f16 weight copy).
// out[r][m] = Σ_k W_e[m][k] · xs[r][k] for the sorted rows r of tile blockIdx.y (expert e),
// m in the PF_BM rows of blockIdx.x; rows m < rows_a come from `wa`, the rest from `wb` (row
// m − rows_a: gate|up as one 2F-row product). xs: f16 rows of k_dim; out: f32 rows of m_total.
// Dequantization as dq_<t> (f32, rounded to f16); mma.sync m16n8k16 f16 x f16 -> f32, k in
// increasing 16-column steps (fixed order: bit-identical from run to run).
// Needs rows_a, m_total multiples of PF_BM and k_dim of PF_BK (the host checks).
//
// Pipeline (one barrier per 32-column step s): the decoded weight tile is double-buffered
// (As), the activation tile triple-buffered (Bs, filled by cp.async two steps ahead, rows past
// the tile's count zero-filled), and the raw quantized bytes of step s+2 are loaded into
// registers during step s. In step s every warp first reads its fragments of step s
// (ldmatrix), then decodes step s+1 into the other A buffer, issues the loads of step s+2 and
// runs its MMAs, so decoding (ALU) and MMAs (tensor pipe) overlap within and across warps.
// Warps whose 8-token groups lie past the tile's count skip those MMAs (those outputs are
// never written; the others do not depend on them).
// ---------------------------------------------------------------------------------------------

#define PF_BSTAGES 3

__device__ __forceinline__ void mma16816(float* c, const u32* a, const u32* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void pf_ldsm4(u32* r, const u16* p) {
    u32 a = (u32)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a)
                 : "memory");
}

// 16 bytes global -> shared, asynchronously; `valid` false writes 16 zero bytes (no read).
__device__ __forceinline__ void pf_cp16(u16* dst, const u16* src, bool valid) {
    u32 a = (u32)__cvta_generic_to_shared(dst);
    int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(a), "l"(src), "r"(n)
                 : "memory");
}

__device__ __forceinline__ void pf_cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

__device__ __forceinline__ void pf_cp_wait1() { asm volatile("cp.async.wait_group 1;" ::: "memory"); }

// Two f32 -> one f16x2 word (lo in the low half), round to nearest even like f2h.
__device__ __forceinline__ u32 pack_h2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// IQ2_XXS grid entry as byte_perm selectors: its bytes are 8, 25 or 43 (code c = 0, 1, 2);
// byte k of the result is 0x10 + 0x22·c, i.e. the nibbles (2c, 2c+1) that pick f16 number c
// out of the words (x = f16(8db) | f16(25db) << 16, y = f16(43db)). Two bytes per weight pair.
__device__ __forceinline__ u64 pf_iq2_sel(u64 g) {
    u64 s = 0;
#pragma unroll
    for (int k = 0; k < 8; k++) {
        u32 b = (u32)(g >> (8 * k)) & 255u;
        u32 c = b == 8u ? 0u : (b == 25u ? 1u : 2u);
        s |= (u64)(0x10u + 0x22u * c) << (8 * k);
    }
    return s;
}

// Tile loaders of pf_mm: `load` fetches the raw bytes of 16 consecutive weights (row o,
// columns c0..c0+15, c0 % 16 == 0) into registers (issued a step ahead, so the loads are in
// flight meanwhile); `store` decodes them into 8 f16x2 words (`sel`: the block's shared
// selector table, filled when kSel). Every value equals f2h of the deq_<t> value (same f32
// operations, then one rounding).
struct PfIq2 {
    static constexpr bool kSel = true;
    u32 a, b, half;
    float d;
    __device__ __forceinline__ void load(const u8* w, int o, int n_rows, int n_cols, int c0) {
        const int nb = n_cols >> 8;
        const u8* row = w + (i64)o * nb * 66;
        const u8* g = iq2_codes(row, c0 >> 8) + 8 * ((c0 >> 5) & 7);
        d = h2f(iq2_scale(row, c0 >> 8, nb));
        a = (u32)ld16(g) | ((u32)ld16(g + 2) << 16);
        b = (u32)ld16(g + 4) | ((u32)ld16(g + 6) << 16);
        half = (c0 >> 4) & 1;
    }
    __device__ __forceinline__ void store(u32* dst, const u64* sel) const {
        float db = __fmul_rn(__fmul_rn(d, __fadd_rn(0.5f, (float)(b >> 28))), 0.25f);
        // The three magnitudes db·{8, 25, 43}, each rounded once (as f2h(db·grid byte)).
        u32 x = pack_h2(__fmul_rn(db, 8.0f), __fmul_rn(db, 25.0f));
        u32 y = pack_h2(__fmul_rn(db, 43.0f), __fmul_rn(db, 43.0f));
#pragma unroll
        for (int j = 0; j < 2; j++) {
            int l = 2 * half + j;
            u64 s = sel[(a >> (8 * l)) & 255];
            // ksigns: the 7 stored bits and their parity as bit 7.
            u32 i7 = (b >> (7 * l)) & 127u;
            u32 sg = i7 | ((__popc(i7) & 1u) << 7);
            u32 lo = (u32)s, hi = (u32)(s >> 32);
#pragma unroll
            for (int p = 0; p < 4; p++) {
                u32 src = p < 2 ? lo : hi;
                u32 h = __byte_perm(x, y, (p & 1) ? src >> 16 : src);
                // deq_iq2_xxs negates before rounding; RNE is symmetric, so flip the f16 sign
                // bits: weight 2p -> bit 15, weight 2p+1 -> bit 31.
                h ^= (((sg >> (2 * p)) & 3u) * 0x40008000u) & 0x80008000u;
                dst[4 * j + p] = h;
            }
        }
    }
};

struct PfQ2K {
    static constexpr bool kSel = false;
    u32 q[4], dd, sc, shift;
    __device__ __forceinline__ void load(const u8* w, int o, int n_rows, int n_cols, int c0) {
        const u8* p = w + ((i64)o * (n_cols >> 8) + (c0 >> 8)) * 84;
        int g = (c0 >> 4) & 15;
        dd = ld32(p + 80);
        sc = p[g];
        // Elements 16g..16g+15 of the block: bytes 16 + 32(g/8) + 16(g%2) .., bit pair (g%8)/2.
        const u8* qs = p + 16 + 32 * (g >> 3) + 16 * (g & 1);
#pragma unroll
        for (int i = 0; i < 4; i++) q[i] = ld32(qs + 4 * i);
        shift = 2 * ((g & 7) >> 1);
    }
    __device__ __forceinline__ void store(u32* dst, const u64*) const {
        float d = h2f((u16)(dd & 0xffff)), dmin = h2f((u16)(dd >> 16));
        float dl = __fmul_rn(d, (float)(sc & 15));
        float ml = __fmul_rn(dmin, (float)(sc >> 4));
        // The four possible values (codes 0..3) as f16, bytes 2c..2c+1 of (t01, t23).
        u32 t01 = pack_h2(__fsub_rn(__fmul_rn(dl, 0.0f), ml), __fsub_rn(__fmul_rn(dl, 1.0f), ml));
        u32 t23 = pack_h2(__fsub_rn(__fmul_rn(dl, 2.0f), ml), __fsub_rn(__fmul_rn(dl, 3.0f), ml));
#pragma unroll
        for (int i = 0; i < 4; i++) {
            // Codes c0..c3 (one per byte, ≤ 3) -> selector bytes 0x10 + 0x22·c = nibbles
            // (2c, 2c+1); no carries between bytes. Low 16 bits: weights 4i, 4i+1.
            u32 c = (q[i] >> shift) & 0x03030303u;
            u32 s = c * 0x22u + 0x10101010u;
            dst[2 * i] = __byte_perm(t01, t23, s);
            dst[2 * i + 1] = __byte_perm(t01, t23, s >> 16);
        }
    }
};

struct PfQ80 {
    static constexpr bool kSel = false;
    uint4 q;
    u16 dh;
    __device__ __forceinline__ void load(const u8* w, int o, int n_rows, int n_cols, int c0) {
        q = *(const uint4*)(w + (i64)o * n_cols + c0);
        dh = ((const u16*)(w + (i64)n_rows * n_cols))[(i64)o * (n_cols >> 5) + (c0 >> 5)];
    }
    __device__ __forceinline__ void store(u32* dst, const u64*) const {
        float d = h2f(dh);
        u32 v[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            dst[2 * i] = pack_h2(__fmul_rn(d, sbytef(v[i], 0)), __fmul_rn(d, sbytef(v[i], 1)));
            dst[2 * i + 1] = pack_h2(__fmul_rn(d, sbytef(v[i], 2)), __fmul_rn(d, sbytef(v[i], 3)));
        }
    }
};

// Other types: the deq_<t> unit decoders themselves (decoded in `store`).
#define DS4_PF_GEN(T, DQ_ELEMS)                                                                  \
    struct PfGen_##T {                                                                           \
        static constexpr bool kSel = false;                                                      \
        const u8* w;                                                                             \
        int o, n_rows, n_cols, c0;                                                               \
        __device__ __forceinline__ void load(const u8* w_, int o_, int nr, int nc, int c0_) {    \
            w = w_; o = o_; n_rows = nr; n_cols = nc; c0 = c0_;                                  \
        }                                                                                        \
        __device__ __forceinline__ void store(u32* dst, const u64*) const {                      \
            float v[DQ_ELEMS > 16 ? DQ_ELEMS : 16];                                              \
            int skip = 0;                                                                        \
            if (DQ_ELEMS > 16) {                                                                 \
                deq_##T(w, o, n_rows, n_cols, c0 / DQ_ELEMS, v);                                 \
                skip = c0 % DQ_ELEMS;                                                            \
            } else {                                                                             \
                _Pragma("unroll") for (int j = 0; j < 16 / DQ_ELEMS; j++)                        \
                    deq_##T(w, o, n_rows, n_cols, c0 / DQ_ELEMS + j, v + j * DQ_ELEMS);          \
            }                                                                                    \
            _Pragma("unroll") for (int i = 0; i < 8; i++)                                        \
                dst[i] = pack_h2(v[skip + 2 * i], v[skip + 2 * i + 1]);                          \
        }                                                                                        \
    };

DS4_PF_GEN(f32, 4)
DS4_PF_GEN(f16, 8)
DS4_PF_GEN(q4_k, 32)

template <class L>
__device__ __forceinline__ void pf_mm_body(const u8* __restrict__ wa, const u8* __restrict__ wb,
                                           i64 expert_bytes, int rows_a, int m_total, int k_dim,
                                           const int* __restrict__ n_tiles,
                                           const int* __restrict__ tiles,
                                           const u16* __restrict__ xs, float* __restrict__ out) {
    __shared__ __align__(16) u16 As[2][PF_BM * PF_SA];
    __shared__ __align__(16) u16 Bs[PF_BSTAGES][PF_BN * PF_SA];
    __shared__ u64 sel[256];
    int tile = blockIdx.y;
    if (tile >= *n_tiles) return;
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    if (L::kSel) sel[tid] = pf_iq2_sel(ds4_iq2_grid[tid]);
    int e = tiles[3 * tile], r0 = tiles[3 * tile + 1], cnt = tiles[3 * tile + 2];
    int m0 = blockIdx.x * PF_BM;
    const u8* w = m0 < rows_a ? wa : wb;
    int wrow0 = m0 < rows_a ? m0 : m0 - rows_a;
    int nrows = m0 < rows_a ? rows_a : m_total - rows_a;
    w += (i64)e * expert_bytes;
    int g = lane >> 2, t4 = lane & 3;
    int wm = (warp & 3) * 32, wn = (warp >> 2) * 32;
    // 8-token groups of this warp that hold rows of the tile (warp-uniform).
    int ngrp = min(4, max(0, (cnt - wn + 7) >> 3));
    // This thread decodes weights (row ar, columns ac..ac+15 of each step) and copies 8
    // inputs (row bn, columns bc..bc+7; zeros past the tile's rows).
    int ar = tid >> 1, ac = (tid & 1) * 16;
    int bn = tid >> 2, bc = (tid & 3) * 8;
    bool bval = bn < cnt;
    const u16* xrow = xs + (i64)(r0 + (bval ? bn : 0)) * k_dim + bc;
    u16* bdst = &Bs[0][bn * PF_SA + bc];
    u16* adst = &As[0][ar * PF_SA + ac];
    // ldmatrix row addresses of this lane (offsets in halves within a buffer).
    int a_off = (wm + (lane & 15)) * PF_SA + (lane >> 4) * 8;
    int b_off = (wn + (lane >> 4) * 8 + (lane & 7)) * PF_SA + ((lane >> 3) & 1) * 8;
    int nk = k_dim / PF_BK;
    float acc[2][4][4];
#pragma unroll
    for (int a = 0; a < 2; a++)
#pragma unroll
        for (int b = 0; b < 4; b++)
#pragma unroll
            for (int c = 0; c < 4; c++) acc[a][b][c] = 0.0f;
    L ld;
    ld.load(w, wrow0 + ar, nrows, k_dim, ac);
    pf_cp16(bdst, xrow, bval);
    pf_cp_commit();
    if (nk > 1) pf_cp16(bdst + PF_BN * PF_SA, xrow + PF_BK, bval);
    pf_cp_commit();
    __syncthreads();  // sel
    {
        u32 hw[8];
        ld.store(hw, sel);
        uint4* dst = (uint4*)adst;
        dst[0] = make_uint4(hw[0], hw[1], hw[2], hw[3]);
        dst[1] = make_uint4(hw[4], hw[5], hw[6], hw[7]);
    }
    if (nk > 1) ld.load(w, wrow0 + ar, nrows, k_dim, PF_BK + ac);
    pf_cp_wait1();
    __syncthreads();
    int bs = 0;  // Bs buffer of step s (s % 3)
    for (int s = 0; s < nk; s++) {
        const u16* A = &As[s & 1][0];
        const u16* B = &Bs[bs][0];
        u32 af[2][2][4], bf[2][4][2];
#pragma unroll
        for (int kk = 0; kk < 2; kk++) {
#pragma unroll
            for (int mi = 0; mi < 2; mi++) pf_ldsm4(af[kk][mi], A + a_off + mi * 16 * PF_SA + kk * 16);
#pragma unroll
            for (int nj = 0; nj < 4; nj += 2) {
                u32 r[4];
                pf_ldsm4(r, B + b_off + nj * 8 * PF_SA + kk * 16);
                bf[kk][nj][0] = r[0];
                bf[kk][nj][1] = r[1];
                bf[kk][nj + 1][0] = r[2];
                bf[kk][nj + 1][1] = r[3];
            }
        }
        if (s + 1 < nk) {
            u32 hw[8];
            ld.store(hw, sel);
            uint4* dst = (uint4*)(adst + ((s + 1) & 1) * (PF_BM * PF_SA));
            dst[0] = make_uint4(hw[0], hw[1], hw[2], hw[3]);
            dst[1] = make_uint4(hw[4], hw[5], hw[6], hw[7]);
        }
        int b2 = bs == 0 ? 2 : bs - 1;  // (s + 2) % 3
        if (s + 2 < nk) {
            int c2 = (s + 2) * PF_BK;
            ld.load(w, wrow0 + ar, nrows, k_dim, c2 + ac);
            pf_cp16(bdst + b2 * (PF_BN * PF_SA), xrow + c2, bval);
        }
        pf_cp_commit();
#pragma unroll
        for (int kk = 0; kk < 2; kk++)
#pragma unroll
            for (int ni = 0; ni < 4; ni++)
                if (ni < ngrp) {
#pragma unroll
                    for (int mi = 0; mi < 2; mi++) mma16816(acc[mi][ni], af[kk][mi], bf[kk][ni]);
                }
        pf_cp_wait1();
        __syncthreads();
        bs = bs == 2 ? 0 : bs + 1;
    }
#pragma unroll
    for (int mi = 0; mi < 2; mi++)
#pragma unroll
        for (int ni = 0; ni < 4; ni++) {
            int row = m0 + wm + mi * 16 + g;
            int n = wn + ni * 8 + t4 * 2;
            if (n < cnt) {
                out[(i64)(r0 + n) * m_total + row] = acc[mi][ni][0];
                out[(i64)(r0 + n) * m_total + row + 8] = acc[mi][ni][2];
            }
            if (n + 1 < cnt) {
                out[(i64)(r0 + n + 1) * m_total + row] = acc[mi][ni][1];
                out[(i64)(r0 + n + 1) * m_total + row + 8] = acc[mi][ni][3];
            }
        }
}

// The entry points take pf_mxw's row-index arguments too (unused: one argument list for
// CudaBackend::pf_mm_raw, which passes no index to these).
#define DS4_PF_MM(T, L)                                                                          \
    extern "C" __global__ void __launch_bounds__(256, 2)                                         \
        pf_mm_##T(const u8* __restrict__ wa, const u8* __restrict__ wb, i64 expert_bytes,        \
                  int rows_a, int m_total, int k_dim, const int* __restrict__ n_tiles,           \
                  const int* __restrict__ tiles, const u16* __restrict__ xs,                     \
                  const int* __restrict__, int, float* __restrict__ out) {                       \
        pf_mm_body<L>(wa, wb, expert_bytes, rows_a, m_total, k_dim, n_tiles, tiles, xs, out);    \
    }

DS4_PF_MM(f32, PfGen_f32)
DS4_PF_MM(f16, PfGen_f16)
DS4_PF_MM(q8_0, PfQ80)
DS4_PF_MM(q2_k, PfQ2K)
DS4_PF_MM(q4_k, PfGen_q4_k)
DS4_PF_MM(iq2_xxs, PfIq2)

// ---------------------------------------------------------------------------------------------
// pf_mx_<t> (IQ2_XXS, Q2_K): the grouped expert product with the weights decoded straight into
// the MMA's A fragments (no decoded-weight tile in shared memory, no ldmatrix for weights).
// Same contract and numerics as pf_mm_<t> (every weight is f2h of the deq_<t> value, f16 x f16
// -> f32 mma.sync m16n8k16, k in increasing 32-column steps); only the pairing of products
// inside one MMA differs (below), so results match pf_mm to f32 rounding, not bit for bit.
//
// Block: 256 weight rows x one tile of <= 64 sorted rows (tokens); warp w owns rows
// 32w..32w+31 (two m16 tiles) and every token of the tile, so each weight is decoded once per
// block, by exactly one thread, into registers. The k axis is permuted inside each 32-column
// step, identically for both operands (a sum over k does not depend on its order): lane
// (g, t4) holds logical k {2t4, 2t4+1, 2t4+8, 2t4+9} of each of the step's two k16 MMAs, and
// these 8 logical columns are mapped to the 8 consecutive original columns 8t4..8t4+7:
//   MMA kk, logical 2t4+e -> original 8t4 + 4kk + e;  logical 2t4+8+e -> 8t4 + 4kk + 2 + e.
// So a thread decodes one run of 8 consecutive weights per row and step (IQ2_XXS: exactly one
// grid entry; Q2_K: 8 codes of one 16-weight group), and its B fragments for token n are the 16
// bytes at columns 8t4..8t4+7 of n's row in the (unpermuted, row-major) activation tile: one
// 128-bit shared load per 8 tokens and step, conflict-free with 64-byte rows.
//
// Pipeline: activation tile triple-buffered and filled by cp.async two steps ahead (one
// barrier per step, rows past the tile's count zero-filled); the raw bytes of step s+1 are
// loaded at the top of step s and decoded after step s's MMAs are issued, so the decode (ALU)
// overlaps the tensor pipe. NG = number of 8-token groups holding rows of the tile is
// block-uniform and a template argument: no predicated MMAs.
// ---------------------------------------------------------------------------------------------

#define PX_BM 256
#define PX_BN 64
#define PX_BK 32

// Shared tables of the IQ2_XXS decoder (Q2_K needs none). The selectors are read at random
// grid entries by every lane: each entry is stored PX_REP times side by side and lane l reads
// copy l % PX_REP (px_sel), so the 16 lanes of a 64-bit load phase collide on a bank pair only
// when lanes l and l + 8 want distinct entries of equal parity (~1.5 wavefronts a phase
// instead of ~2.7 with one copy).
#define PX_REP 8
struct PxTables {
    u64 sel[256 * PX_REP];  // grid entry -> byte_perm selectors (pf_iq2_sel), PX_REP copies
    uint2 sc[16];  // 4-bit scale s -> f16x2 (c8, c25), (c43, c43), cX = (2s+1)·X/8 exactly
};

__device__ __forceinline__ u64 px_sel(const PxTables& T, u32 a) {
    // Byte offset 64a + 8(lane % 8) from a lane base: one shift-add (LEA) a lookup.
    const u8* base = (const u8*)T.sel + 8 * (threadIdx.x % PX_REP);
    return *(const u64*)(base + (a << 6));
}

__device__ __forceinline__ u32 px_hmul2(u32 a, u32 b) {
    u32 r;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
}

// IQ2_XXS: per row and step, the grid index of entry t4 of the step's 32-weight sub-block, its
// sign/scale word and the block's f16 scale d (loaded at the block's first step only).
struct PxIq2 {
    static constexpr int kBlockBytes = 66;
    static constexpr bool kTables = true;
    u32 a, b, d;
    // rp: the row (device layout, see iq2_codes), nb blocks.
    __device__ __forceinline__ void load(const u8* rp, int s, int t4, int nb) {
        if ((s & 7) == 0) d = iq2_scale(rp, s >> 3, nb);
        const u8* q = iq2_codes(rp, s >> 3) + 8 * (s & 7);
        a = q[t4];
        b = (u32)ld16(q + 4) | ((u32)ld16(q + 6) << 16);
    }
    // Staged form (pf_mxs; rows in whole groups of 8 blocks): a block's slot holds its 64 code
    // bytes, then the 16 bytes of its group's 8 scales (px_stage).
    static constexpr int kRS = 80, kNCH = 5;
    static constexpr bool kGroups = true;
    static __device__ __forceinline__ int slot_off(int) { return 0; }
    // The step's 8 code bytes in one 8-byte load (grid index t4 picked by prmt, then the
    // sign/scale word), and the block's scale (entry (s/8) % 8 of its group's scale chunk).
    __device__ __forceinline__ void load_s(const u8* sb, int s, int t4) {
        uint2 v = *(const uint2*)(sb + 8 * (s & 7));
        d = ld16(sb + 64 + ((s >> 2) & 14));
        a = prmt(v.x, 0u, 0x4440u | (u32)t4);
        b = v.y;
    }
    // load_s for step s whose position su = s % 8 in its block is a compile-time constant
    // (pxw_body's 8-step loop): the block's scale only at its first step (it stays in d).
    __device__ __forceinline__ void load_s8(const u8* sb, int s, int su, int t4) {
        uint2 v = *(const uint2*)(sb + 8 * su);
        if (su == 0) d = ld16(sb + 64 + ((s >> 2) & 14));
        a = prmt(v.x, 0u, 0x4440u | (u32)t4);
        b = v.y;
    }
    // Words p = 0..3: weights 2p (low half), 2p+1 of the thread's 8. deq_iq2_xxs gives
    // ±f32(db·grid) with db = d·(0.5+s)·0.25 = d·(2s+1)/8 exactly (d has 11 significant bits),
    // so f2h of it is the f16 product d·cX rounded once: mul.rn.f16x2 computes exactly that.
    // The sign flips the f16 sign bit (RNE is symmetric). Signs: the entry's 7 stored bits s7
    // (weight i at bit i) and their parity (weight 7; the 8 signs have even parity). Word p
    // wants weight 2p's sign at bit 15 and 2p+1's at bit 31: s7 · (2^(15−2p) + 2^(30−2p))
    // puts them there, its two shifted copies of s7 do not overlap (no carries), and no other
    // bit of s7 lands on 15 or 31 (bits past 31 drop); for p = 3 the parity is added at bit
    // 31, which that product leaves clear. ALU work instead of a shared-table lookup (whose
    // random 7-bit index cost ~2 bank-conflicted wavefronts a row): pf_mxw_iq2_xxs −2 to −3.5%.
    __device__ __forceinline__ void decode(u32* w, const PxTables& T, int t4, int) const {
        u64 sl = px_sel(T, a);
        uint2 c = T.sc[b >> 28];
        u32 dd = d | (d << 16);
        u32 x = px_hmul2(dd, c.x), y = px_hmul2(dd, c.y);
        u32 lo = (u32)sl, hi = (u32)(sl >> 32);
        u32 s7 = (b >> (7 * t4)) & 127u;
        u32 par = (u32)__popc(s7) << 31;
        w[0] = prmt(x, y, lo) ^ ((s7 * 0x40008000u) & 0x80008000u);
        w[1] = prmt(x, y, lo >> 16) ^ ((s7 * 0x10002000u) & 0x80008000u);
        w[2] = prmt(x, y, hi) ^ ((s7 * 0x04000800u) & 0x80008000u);
        w[3] = prmt(x, y, hi >> 16) ^ ((s7 * 0x01000200u + par) & 0x80008000u);
    }
};

// Q2_K: step s covers columns 32(s%8).. of block s/8: half h = (s%8)/4, bit pair s%4; the
// thread's 8 weights are bytes 8t4..8t4+7 of that half's 32 code bytes (loaded once per 4
// steps), in 16-weight group 2(s%8) + t4/2 (one scale byte per step).
struct PxQ2K {
    static constexpr int kBlockBytes = 84;
    static constexpr bool kTables = false;
    u32 q0, q1, sc, dd;
    __device__ __forceinline__ void load(const u8* rp, int s, int t4, int) {
        const u8* p = rp + (s >> 3) * 84;
        if ((s & 7) == 0) dd = ld32(p + 80);
        if ((s & 3) == 0) {
            const u8* qs = p + 16 + 32 * ((s >> 2) & 1) + 8 * t4;
            q0 = ld32(qs);
            q1 = ld32(qs + 4);
        }
        sc = p[2 * (s & 7) + (t4 >> 1)];
    }
    // Staged form (pf_mxs); the copy of a block starts 4-aligned, rows 112 bytes apart (8
    // rows of a warp's load on distinct banks up to a 2-way conflict for the codes).
    static constexpr int kRS = 112, kNCH = 6;
    static constexpr bool kGroups = false;
    static __device__ __forceinline__ int slot_off(int q) { return (q * 84) & 15; }
    __device__ __forceinline__ void load_s(const u8* sb, int s, int t4) {
        dd = ld32(sb + 80);
        const u8* qs = sb + 16 + 32 * ((s >> 2) & 1) + 8 * t4;
        q0 = ld32(qs);
        q1 = ld32(qs + 4);
        sc = sb[2 * (s & 7) + (t4 >> 1)];
    }
    // Every word every step, as load_s (holding the block's words across steps, as PxIq2
    // does, spills pf_mxw_q2_k: 72 -> 356 bytes).
    __device__ __forceinline__ void load_s8(const u8* sb, int s, int, int t4) { load_s(sb, s, t4); }
    // Same f32 expressions as deq_q2_k / PfQ2K, the four values as f16 picked by byte_perm.
    __device__ __forceinline__ void decode(u32* w, const PxTables&, int, int s) const {
        float d = h2f((u16)(dd & 0xffff)), dmin = h2f((u16)(dd >> 16));
        float dl = __fmul_rn(d, (float)(sc & 15));
        float ml = __fmul_rn(dmin, (float)(sc >> 4));
        u32 t01 = pack_h2(__fsub_rn(__fmul_rn(dl, 0.0f), ml), __fsub_rn(__fmul_rn(dl, 1.0f), ml));
        u32 t23 = pack_h2(__fsub_rn(__fmul_rn(dl, 2.0f), ml), __fsub_rn(__fmul_rn(dl, 3.0f), ml));
        int sh = 2 * (s & 3);
        u32 s0 = ((q0 >> sh) & 0x03030303u) * 0x22u + 0x10101010u;
        u32 s1 = ((q1 >> sh) & 0x03030303u) * 0x22u + 0x10101010u;
        w[0] = prmt(t01, t23, s0);
        w[1] = prmt(t01, t23, s0 >> 16);
        w[2] = prmt(t01, t23, s1);
        w[3] = prmt(t01, t23, s1 >> 16);
    }
};

// The IQ2_XXS decoder's shared tables, filled by the block's 256 threads (visible after the
// body's first barrier).
__device__ __forceinline__ void px_tables(PxTables& T, int tid) {
    {
        u64 v = pf_iq2_sel(ds4_iq2_grid[tid]);
#pragma unroll
        for (int c = 0; c < PX_REP; c++) T.sel[PX_REP * tid + c] = v;
    }
    if (tid < 16) {
        float c = (float)(2 * tid + 1);
        T.sc[tid] = make_uint2(pack_h2(c, c * 25.0f / 8.0f),
                               pack_h2(c * 43.0f / 8.0f, c * 43.0f / 8.0f));
    }
}

template <int NG, int J = 2>
__device__ __forceinline__ void px_zero(float (&acc)[J][NG][4]) {
#pragma unroll
    for (int a = 0; a < J; a++)
#pragma unroll
        for (int b = 0; b < NG; b++)
#pragma unroll
            for (int c = 0; c < 4; c++) acc[a][b][c] = 0.0f;
}

// One 32-column step's MMAs: the thread's 4 decoded A fragments (rows 8ri + g) against the
// step's B tile (B: this thread's 16 bytes of token g's row; token groups 8 rows apart).
template <int NG>
__device__ __forceinline__ void px_mma(float (&acc)[2][NG][4], const u32 (&af)[4][4], const u16* B) {
#pragma unroll
    for (int ni = 0; ni < NG; ni++) {
        uint4 bv = *(const uint4*)(B + ni * 8 * PX_BK);
        u32 b0[2] = {bv.x, bv.y}, b1[2] = {bv.z, bv.w};
#pragma unroll
        for (int mi = 0; mi < 2; mi++) {
            u32 a0[4] = {af[2 * mi][0], af[2 * mi + 1][0], af[2 * mi][1], af[2 * mi + 1][1]};
            u32 a1[4] = {af[2 * mi][2], af[2 * mi + 1][2], af[2 * mi][3], af[2 * mi + 1][3]};
            mma16816(acc[mi][ni], a0, b0);
            mma16816(acc[mi][ni], a1, b1);
        }
    }
}

// Writes the block's outputs: accumulator (mi, ni, c) is sorted row r0 + 8ni + 2t4 (+1 for
// odd c), output column rbase + MSTEP·mi + g (+8 for c >= 2).
template <int NG, int MSTEP, int J = 2>
__device__ __forceinline__ void px_store(const float (&acc)[J][NG][4], int rbase, int m_total,
                                         int r0, int cnt, float* __restrict__ out) {
    int lane = threadIdx.x & 31;
    int g = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int mi = 0; mi < J; mi++)
#pragma unroll
        for (int ni = 0; ni < NG; ni++) {
            int row = rbase + mi * MSTEP + g;
            int n = ni * 8 + t4 * 2;
            if (n < cnt) {
                out[(i64)(r0 + n) * m_total + row] = acc[mi][ni][0];
                out[(i64)(r0 + n) * m_total + row + 8] = acc[mi][ni][2];
            }
            if (n + 1 < cnt) {
                out[(i64)(r0 + n + 1) * m_total + row] = acc[mi][ni][1];
                out[(i64)(r0 + n + 1) * m_total + row + 8] = acc[mi][ni][3];
            }
        }
}

// One block's work for a tile with NG 8-token groups (see above). This thread's 4 weight rows
// (warp rows 8ri + g) start at rp0 + ri·rs8; Bs: the 3-stage activation ring.
template <class L, int NG>
__device__ __forceinline__ void px_body(const u8* rp0, i64 rs8, const PxTables& T, u16* Bs, int m0,
                                        int m_total, int k_dim, int r0, int cnt,
                                        const u16* __restrict__ xs, float* __restrict__ out) {
    int tid = threadIdx.x, lane = tid & 31;
    int g = lane >> 2, t4 = lane & 3;
    // This thread copies 16 bytes per step: row bn, columns 8(tid%4).. (zeros past the count).
    int bn = tid >> 2;
    bool bval = bn < cnt;
    const u16* xrow = xs + (i64)(r0 + (bval ? bn : 0)) * k_dim + (tid & 3) * 8;
    u16* bdst = Bs + bn * PX_BK + (tid & 3) * 8;
    const u16* bsrc = Bs + g * PX_BK + t4 * 8;
    int nk = k_dim / PX_BK;
    float acc[2][NG][4];
    px_zero<NG>(acc);
    const u8* rp[4] = {rp0, rp0 + rs8, rp0 + 2 * rs8, rp0 + 3 * rs8};
    L ld[4];
    u32 af[4][4];
#pragma unroll
    for (int ri = 0; ri < 4; ri++) ld[ri].load(rp[ri], 0, t4, k_dim >> 8);
    pf_cp16(bdst, xrow, bval);
    pf_cp_commit();
    if (nk > 1) pf_cp16(bdst + PX_BN * PX_BK, xrow + PX_BK, bval);
    pf_cp_commit();
    __syncthreads();  // tables
#pragma unroll
    for (int ri = 0; ri < 4; ri++) ld[ri].decode(af[ri], T, t4, 0);
    int bs = 0;  // ring slot of step s (s % 3)
    for (int s = 0; s < nk; s++) {
        pf_cp_wait1();
        __syncthreads();  // B(s) visible to all; every warp is done with slot (s + 2) % 3
        int b2 = bs == 0 ? 2 : bs - 1;
        if (s + 2 < nk) pf_cp16(bdst + b2 * (PX_BN * PX_BK), xrow + (s + 2) * PX_BK, bval);
        pf_cp_commit();
        if (s + 1 < nk) {
#pragma unroll
            for (int ri = 0; ri < 4; ri++) ld[ri].load(rp[ri], s + 1, t4, k_dim >> 8);
        }
        px_mma<NG>(acc, af, bsrc + bs * (PX_BN * PX_BK));
        if (s + 1 < nk) {
#pragma unroll
            for (int ri = 0; ri < 4; ri++) ld[ri].decode(af[ri], T, t4, s + 1);
        }
        bs = bs == 2 ? 0 : bs + 1;
    }
    px_store<NG, 16>(acc, m0 + (tid >> 5) * 32, m_total, r0, cnt, out);
}


// ---------------------------------------------------------------------------------------------
// pf_mxs_<t>: pf_mx with the quantized weight bytes staged in shared memory by cp.async, one
// 256-column block of the block's 256 rows at a time (double-buffered, issued 8 steps ahead):
// the decoders then read shared memory (short, fixed latency, 32-bit addresses) instead of
// waiting on global loads, and no raw bytes are held in registers across the MMAs. Each row's
// block is copied as kNCH 16-byte chunks into a kRS-byte slot (Q2_K: the chunks covering the
// block, which starts at `L::slot_off` = (q·84) % 16; IQ2_XXS: its codes and its group's
// scales, see PxIq2); needs the row stride to be a
// multiple of 16 bytes (IQ2_XXS: columns a multiple of 2048; Q2_K: of 1024; the host checks),
// so no chunk crosses the end of its row. Same decoders and MMAs as pf_mx: bit-identical to it.
// ---------------------------------------------------------------------------------------------

extern __shared__ __align__(16) u8 px_smem[];

__device__ __forceinline__ void px_cp16(void* dst, const void* src, bool valid) {
    u32 a = (u32)__cvta_generic_to_shared(dst);
    int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(a), "l"(src), "r"(n)
                 : "memory");
}

// Copies block q of the block's 256 rows (row 0 at wrow, rowb bytes apart) into stage st.
// THREADS: the block's threads (512 only for the grouped IQ2_XXS slots, pf_mxw4).
template <class L, int ROWS = PX_BM, int THREADS = 256>
__device__ __forceinline__ void px_stage(u8* As, const u8* wrow, i64 rowb, int q, int st) {
    static_assert(THREADS == 256 || (L::kGroups && ROWS == 256), "px_stage's thread shares");
    u8* dst = As + st * (ROWS * L::kRS);
    if (L::kGroups) {
        // IQ2_XXS: the block's 4 code chunks (64q + 16u = 528u + 64(q % 8) in group u), then
        // its group's scale chunk; each thread's share fixed by i, so no per-thread select
        // (which cost the loop its uniform-register addressing).
        const int u = q >> 3, co = 64 * q + 16 * u;
#pragma unroll
        for (int i = 0; i < 1024 / THREADS; i++) {
            int c = (int)threadIdx.x + THREADS * i, row = c >> 2, part = c & 3;
            px_cp16(dst + row * L::kRS + 16 * part, wrow + (i64)row * rowb + co + 16 * part, true);
        }
        if (THREADS == 256 || threadIdx.x < 256)
            px_cp16(dst + threadIdx.x * L::kRS + 64, wrow + (i64)threadIdx.x * rowb + 528 * u + 512,
                    true);
        return;
    }
    i64 lo = ((i64)q * L::kBlockBytes) & ~(i64)15;
#pragma unroll
    for (int i = 0; i < L::kNCH * ROWS / 256; i++) {
        int c = (int)threadIdx.x + 256 * i;
        int row = c / L::kNCH, part = c - row * L::kNCH;
        i64 go = lo + 16 * part;
        bool ok = go < rowb;
        px_cp16(dst + row * L::kRS + 16 * part, wrow + (i64)row * rowb + (ok ? go : 0), ok);
    }
}

template <class L, int NG>
__device__ __forceinline__ void pxs_body(const u8* wrow, i64 rowb, const PxTables& T, u16* Bs,
                                         u8* As, int m0, int m_total, int k_dim, int r0, int cnt,
                                         const u16* __restrict__ xs, float* __restrict__ out) {
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    int g = lane >> 2, t4 = lane & 3;
    int bn = tid >> 2;
    bool bval = bn < cnt;
    const u16* xrow = xs + (i64)(r0 + (bval ? bn : 0)) * k_dim + (tid & 3) * 8;
    u16* bdst = Bs + bn * PX_BK + (tid & 3) * 8;
    const u16* bsrc = Bs + g * PX_BK + t4 * 8;
    // This thread's rows 32·warp + 8ri + g: slot offset of ri = 0 in a stage.
    const u8* arow = As + (warp * 32 + g) * L::kRS;
    int nk = k_dim / PX_BK, nq = k_dim >> 8;
    float acc[2][NG][4];
    px_zero<NG>(acc);
    u32 af[4][4];
    px_stage<L>(As, wrow, rowb, 0, 0);
    pf_cp16(bdst, xrow, bval);
    pf_cp_commit();
    if (nk > 1) pf_cp16(bdst + PX_BN * PX_BK, xrow + PX_BK, bval);
    pf_cp_commit();
    pf_cp_wait1();
    __syncthreads();  // tables, block 0 of A, B(0)
    {
        L ld;
#pragma unroll
        for (int ri = 0; ri < 4; ri++) {
            ld.load_s(arow + ri * 8 * L::kRS, 0, t4);
            ld.decode(af[ri], T, t4, 0);
        }
    }
    int bs = 0;
    for (int s = 0; s < nk; s++) {
        pf_cp_wait1();
        __syncthreads();  // B(s) visible; every warp is done with slot (s + 2) % 3 and with
                          // the A stage of block s/8 - 1
        int b2 = bs == 0 ? 2 : bs - 1;
        if (s + 2 < nk) pf_cp16(bdst + b2 * (PX_BN * PX_BK), xrow + (s + 2) * PX_BK, bval);
        if ((s & 7) == 0 && (s >> 3) + 1 < nq)
            px_stage<L>(As, wrow, rowb, (s >> 3) + 1, ((s >> 3) + 1) & 1);
        pf_cp_commit();
        px_mma<NG>(acc, af, bsrc + bs * (PX_BN * PX_BK));
        int t = s + 1;
        if (t < nk) {
            int q = t >> 3;
            const u8* sb = arow + (q & 1) * (PX_BM * L::kRS) + L::slot_off(q);
            L ld;
#pragma unroll
            for (int ri = 0; ri < 4; ri++) {
                ld.load_s(sb + ri * 8 * L::kRS, t, t4);
                ld.decode(af[ri], T, t4, t);
            }
        }
        bs = bs == 2 ? 0 : bs + 1;
    }
    px_store<NG, 16>(acc, m0 + (tid >> 5) * 32, m_total, r0, cnt, out);
}

// ---------------------------------------------------------------------------------------------
// pf_mxw_<t> (sm_90a only): pf_mxs with the products on the warpgroup MMA (wgmma). The weights
// are decoded by the same decoders into the same A fragments (wgmma takes A from registers in
// mma.m16n8k16's per-warp layout); the token tile B is read by the tensor cores straight from
// shared memory, so the 8 x 128-bit B fragment loads per warp and step (a third of pf_mxs's
// shared-memory traffic) and the 2·2·NG HMMA per warp and step go away: one m64nNk16 per
// warpgroup, 64 weight rows and k16 (N = 8·NG tokens).
//
// Block: 256 weight rows x one tile (as pf_mxs); warpgroup wg = warp/4 owns rows 128wg..+127 as
// two m64 halves j; warp w4 = warp%4 holds rows 128wg + 64j + 16w4 + {g, g+8} of each half.
// The k permutation inside a 32-column step is pf_mx's, but here B is read by the hardware in
// logical k order, so the activation rows come permuted (px_pos; pf_gather*/pf_swiglu* with
// pm = 1): logical column 16kk + l of the step holds original column
// 8(l/2 % 4) + 4kk + 2(l/8) + l%2, i.e. lane quad t4's 8 decoded weights 8t4..8t4+7.
// Shared B tile per ring slot, K-major without swizzle: "core matrices" of 8 tokens x 8
// logical columns (16 bytes a token, 128 contiguous bytes) at (n/8)·512 + kc·128, kc = 0..3;
// the descriptor of k16 step kk starts at kk·256 with LBO 128 (next 8 columns) and SBO 512
// (next 8 tokens).
//
// Pipeline per step s (loop unrolled by two, A fragments double-buffered in registers):
// barrier; cp.async of B(s+2) (and the next A stage); wgmma.fence; the step's 4 wgmma with
// af[s%2]; commit; decode step s+1 into af[(s+1)%2] while the tensor cores run; wait for the
// group (it read af[s%2] and B slot s%3, both reused later). Numerics: the same f16 weights and
// activations as pf_mxs, f32 accumulation inside the MMA; the tensor core's order of additions
// inside one k16 product and across k may differ from mma.sync, so results agree with pf_mxs to
// f32 rounding (not bit for bit); deterministic from run to run.
// ---------------------------------------------------------------------------------------------

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define DS4_PXW 1
// Whether pxq_body reads a step's weight words one step ahead; 0 (set through
// DS4_CUDA_NVRTC_DEFS) keeps the load-then-decode order.
#ifndef DS4_PXQ_PRE
#define DS4_PXQ_PRE 1
#endif
// Whether pxq_body reads a 256-column block's code words and scale bytes into registers once,
// after the block's barrier, instead of every step (a step's two code words are the same for
// 4 steps, and the wgmma's memory clobbers keep the compiler from reusing them); 0 (through
// DS4_CUDA_NVRTC_DEFS) keeps the per-step reads (DS4_PXQ_PRE).
#ifndef DS4_PXQ_BLK
#define DS4_PXQ_BLK 1
#endif
// Whether pxw_body's decoders read a block's words once in its 8-step loop (load_s8: the
// IQ2_XXS block scale at the block's first step); 0 keeps every word read every step.
#ifndef DS4_PXW_U8
#define DS4_PXW_U8 1
#endif
#endif

#ifdef DS4_PXW
template <int NG>
__device__ __forceinline__ void pxw_mma(float (&d)[NG][4], const u32 (&a)[4], u64 desc);
template <>
__device__ __forceinline__ void pxw_mma<1>(float (&d)[1][4], const u32 (&a)[4], u64 desc) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n8k16.f32.f16.f16 {%0, %1, %2, %3}, {%4, %5, %6, %7}, %8, 1, 1, 1, 0;"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc)
                 : "memory");
}
template <>
__device__ __forceinline__ void pxw_mma<2>(float (&d)[2][4], const u32 (&a)[4], u64 desc) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n16k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7}, {%8, %9, %10, %11}, %12, 1, 1, 1, 0;"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc)
                 : "memory");
}
template <>
__device__ __forceinline__ void pxw_mma<3>(float (&d)[3][4], const u32 (&a)[4], u64 desc) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n24k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11}, {%12, %13, %14, %15}, %16, 1, 1, 1, 0;"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc)
                 : "memory");
}
template <>
__device__ __forceinline__ void pxw_mma<4>(float (&d)[4][4], const u32 (&a)[4], u64 desc) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, {%16, %17, %18, %19}, %20, 1, 1, 1, 0;"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc)
                 : "memory");
}
template <>
__device__ __forceinline__ void pxw_mma<5>(float (&d)[5][4], const u32 (&a)[4], u64 desc) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n40k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19}, {%20, %21, %22, %23}, %24, 1, 1, 1, 0;"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc)
                 : "memory");
}
template <>
__device__ __forceinline__ void pxw_mma<6>(float (&d)[6][4], const u32 (&a)[4], u64 desc) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n48k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23}, {%24, %25, %26, %27}, %28, 1, 1, 1, 0;"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc)
                 : "memory");
}
template <>
__device__ __forceinline__ void pxw_mma<7>(float (&d)[7][4], const u32 (&a)[4], u64 desc) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n56k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27}, {%28, %29, %30, %31}, %32, 1, 1, 1, 0;"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc)
                 : "memory");
}
template <>
__device__ __forceinline__ void pxw_mma<8>(float (&d)[8][4], const u32 (&a)[4], u64 desc) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, 1, 1, 1, 0;"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc)
                 : "memory");
}

template <>
__device__ __forceinline__ void pxw_mma<10>(float (&d)[10][4], const u32 (&a)[4], u64 desc) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n80k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39}, {%40, %41, %42, %43}, %44, 1, 1, 1, 0;"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc)
                 : "memory");
}
template <>
__device__ __forceinline__ void pxw_mma<12>(float (&d)[12][4], const u32 (&a)[4], u64 desc) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n96k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47}, {%48, %49, %50, %51}, %52, 1, 1, 1, 0;"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc)
                 : "memory");
}
template <>
__device__ __forceinline__ void pxw_mma<14>(float (&d)[14][4], const u32 (&a)[4], u64 desc) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n112k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55}, {%56, %57, %58, %59}, %60, 1, 1, 1, 0;"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc)
                 : "memory");
}
template <>
__device__ __forceinline__ void pxw_mma<16>(float (&d)[16][4], const u32 (&a)[4], u64 desc) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, 1, 1, 1, 0;"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc)
                 : "memory");
}

__device__ __forceinline__ void pxw_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void pxw_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
__device__ __forceinline__ void pxw_wait0() {
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
}
__device__ __forceinline__ void pxw_wait1() {
    asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
}

// Keeps the compiler from moving accumulator accesses across the asynchronous MMAs.
template <int NG, int J>
__device__ __forceinline__ void pxw_hold(float (&acc)[J][NG][4]) {
#pragma unroll
    for (int j = 0; j < J; j++)
#pragma unroll
        for (int n = 0; n < NG; n++)
#pragma unroll
            for (int c = 0; c < 4; c++) asm volatile("" : "+f"(acc[j][n][c])::"memory");
}

// Descriptor of a K-major, unswizzled operand at shared address `a`: LBO 128 (the next core
// matrix along k), SBO `sbo` (the next 8 rows).
__device__ __forceinline__ u64 pxq_desc(u32 a, u32 sbo) {
    return (u64)((a & 0x3FFFFu) >> 4) | ((u64)(128 >> 4) << 16) | ((u64)(sbo >> 4) << 32);
}

// pf_mxw's B operand (8 tokens = 4 core matrices of 128 bytes along k: SBO 512).
__device__ __forceinline__ u64 pxw_desc(u32 a) { return pxq_desc(a, 512); }

// The step's 2J wgmma: halves j x k16 steps kk. af[ri]: row 8ri + g of this warp's 32 rows in
// pf_mx's numbering (J = 2), here ri = 2j + h (h: row g or g + 8 of half j).
template <int NG, int J>
__device__ __forceinline__ void pxw_step(float (&acc)[J][NG][4], const u32 (&af)[2 * J][4], u32 bslot) {
    pxw_fence();
#pragma unroll
    for (int kk = 0; kk < 2; kk++) {
        u64 desc = pxw_desc(bslot + kk * 256);
#pragma unroll
        for (int j = 0; j < J; j++) {
            const u32 a[4] = {af[2 * j][2 * kk], af[2 * j + 1][2 * kk], af[2 * j][2 * kk + 1],
                              af[2 * j + 1][2 * kk + 1]};
            pxw_mma<NG>(acc[j], a, desc);
        }
    }
    pxw_commit();
}

// The row of xs that a pxw_body thread's copies read, for its token bn = tid/4 of the tile
// (r0, cnt; past cnt, the tile's first): the sorted row r = r0 + bn itself (gathered rows), or
// with xrows the token's row xrows[r] / xk of the producer's permuted copy (no gather). The
// entries call it before filling their tables, so its loads overlap that.
__device__ __forceinline__ int pxw_xrow(const int* __restrict__ xrows, int xk, int r0, int cnt) {
    int bn = threadIdx.x >> 2;
    int r = r0 + (bn < cnt ? bn : 0);
    return xrows ? xrows[r] / xk : r;
}

// One block of pf_mxw (J = 2: 256 threads, warpgroup wg owns rows 128wg..+127 as two m64
// halves j, tiles of up to 64 tokens) or of pf_mxw4 (J = 1: 512 threads, one m64 a warpgroup,
// tiles of up to 128 tokens); see above for the rest.
template <class L, int NG, int J = 2>
__device__ __forceinline__ void pxw_body(const u8* wrow, i64 rowb, const PxTables& T, u16* Bs,
                                         u8* As, int m0, int m_total, int k_dim, int r0, int cnt,
                                         const u16* __restrict__ xs, int xr,
                                         float* __restrict__ out) {
    constexpr int THREADS = 512 / J, BN = 128 / J;  // threads; tokens a ring slot holds
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    int g = lane >> 2, t4 = lane & 3;
    int wg = warp >> 2, w4 = warp & 3;
    // Copy: token bn = tid/4, 16 bytes = permuted columns 8kc..8kc+7 (kc = tid%4) of the step,
    // to its core matrix (zeros past the count). pf_mxw4's warps whose 8 tokens lie past the
    // tile's 8·NG copy nothing.
    int bn = tid >> 2, kc = tid & 3;
    bool bcopy = J == 2 || bn < 8 * NG, bval = bn < cnt;
    // xr: the row of xs holding token bn's input (pxw_xrow).
    const u16* xrow = xs + (i64)xr * k_dim + kc * 8;
    u16* bdst = Bs + ((bn >> 3) * 512 + kc * 128 + (bn & 7) * 16) / 2;
    u32 bs0 = (u32)__cvta_generic_to_shared(Bs);
    // This thread's row of (j, h) = (ri / 2, ri % 2): 64J·wg + 64j + 16w4 + 8h + g.
    const u8* arow = As + (wg * 64 * J + w4 * 16 + g) * L::kRS;
    int roff[2 * J];
#pragma unroll
    for (int ri = 0; ri < 2 * J; ri++) roff[ri] = (64 * (ri >> 1) + 8 * (ri & 1)) * L::kRS;
    int nk = k_dim / PX_BK, nq = k_dim >> 8;
    float acc[J][NG][4];
    px_zero<NG, J>(acc);
    u32 af0[2 * J][4], af1[2 * J][4];
    px_stage<L, PX_BM, THREADS>(As, wrow, rowb, 0, 0);
    if (bcopy) pf_cp16(bdst, xrow, bval);
    pf_cp_commit();
    if (bcopy) pf_cp16(bdst + BN * PX_BK, xrow + PX_BK, bval);
    pf_cp_commit();
    pf_cp_wait1();
    __syncthreads();  // tables, block 0 of A, B(0)
    L ld[2 * J];
#pragma unroll
    for (int ri = 0; ri < 2 * J; ri++) {
        ld[ri].load_s(arow + roff[ri], 0, t4);
        ld[ri].decode(af0[ri], T, t4, 0);
    }
    // One step: B(s) in ring slot bs, s = s8 + u (s8 a multiple of 8; u a constant once the
    // loops below unroll, so the block's first-step work is no runtime test and the IQ2_XXS
    // decoder keeps its block scale in a register: load_s8); decodes step s + 1 into an.
    auto step = [&](int s8, int u, int bs, const u32 (&ac)[2 * J][4], u32 (&an)[2 * J][4]) {
        const int s = s8 + u;
        pf_cp_wait1();
        __syncthreads();  // B(s) visible; every group of step s - 1 is done (waited below), so
                          // slot (s + 2) % 3 and the A stage of block s/8 - 1 are free
        int b2 = bs == 0 ? 2 : bs - 1;
        if (bcopy && s + 2 < nk) pf_cp16(bdst + b2 * (BN * PX_BK), xrow + (s + 2) * PX_BK, bval);
        if (u == 0 && (s8 >> 3) + 1 < nq)
            px_stage<L, PX_BM, THREADS>(As, wrow, rowb, (s8 >> 3) + 1, ((s8 >> 3) + 1) & 1);
        pf_cp_commit();
        pxw_step<NG, J>(acc, ac, bs0 + bs * (BN * PX_BK * 2));
        const int t = s + 1, tu = (u + 1) & 7;
        if (u < 7 || t < nk) {
            int q = (s8 >> 3) + (u == 7 ? 1 : 0);
            const u8* sb = arow + (q & 1) * (PX_BM * L::kRS) + L::slot_off(q);
#pragma unroll
            for (int ri = 0; ri < 2 * J; ri++) {
#if DS4_PXW_U8
                ld[ri].load_s8(sb + roff[ri], t, tu, t4);
#else
                ld[ri].load_s(sb + roff[ri], t, t4);
#endif
                ld[ri].decode(an[ri], T, t4, tu);
            }
        }
        pxw_wait0();
        pxw_hold<NG, J>(acc);
    };
    int bs = 0;
    for (int s8 = 0; s8 < nk; s8 += 8) {  // nk is a multiple of 8
#pragma unroll
        for (int u = 0; u < 8; u += 2) {
            step(s8, u, bs, af0, af1);
            bs = bs == 2 ? 0 : bs + 1;
            step(s8, u + 1, bs, af1, af0);
            bs = bs == 2 ? 0 : bs + 1;
        }
    }
    // Outputs: half j's rows start at 64J·wg + 64j + 16w4.
    px_store<NG, 64, J>(acc, m0 + wg * 64 * J + w4 * 16, m_total, r0, cnt, out);
}

// ---------------------------------------------------------------------------------------------
// pf_mxw4_<t> (sm_90a only; pxw_body with J = 1): pf_mxw over the tiles of up to 128 tokens
// (pf_group's second list), so that an expert's weights are decoded once for up to 128 of its
// tokens instead of 64. 512 threads: warpgroup wg = warp/4 owns the m64 of rows 64wg..64wg+63 (warp w4 = warp%4
// holds rows 64wg + 16w4 + {g, g+8}, pf_mxw's half j = 0), so a thread decodes 2 rows a step
// and holds N/2 ≤ 64 accumulators: the N = 128 tile fits in the 128 registers that one
// 512-thread block an SM allows. The block still covers 256 rows, so the per-step copies and
// barrier are shared by as many rows as pf_mxw's. Same decoders, fragments, B layout and
// wgmma numerics as pf_mxw (the k16 products of one token do not depend on the tile's N).
// ---------------------------------------------------------------------------------------------
#define PX4_BN 128

// ---------------------------------------------------------------------------------------------
// pf_mxq_q2_k (sm_90a only): the grouped Q2_K product on int8 tensor cores, with the
// activations quantized as the CPU quantizes an expert linear's input (Q8_K per 256 columns,
// pf_swiglu_q8): out[r][m] = Σ_b dx_b·(d_b·C_b − dmin_b·M_b), where for 256-column block b of
// row m, C_b = Σ sc·q·x (sc the 16-column group's 4-bit scale, q the 2-bit code, x the int8
// code) and M_b = Σ_j m_j·bsum_j (m_j the group's 4-bit min) — the CPU's Q2_K × Q8_K dot.
// * C_b on wgmma m64nNk32.s32.s8.s8: A = sc·q (≤ 45, an int8) decoded into registers, 4
//   codes by one shift, mask and multiply; B the int8 token tile read by the tensor cores from
//   shared memory. Integer sums: exact, as the CPU's.
// * After each block's 8 steps: acc += (d·dx)·f32(C_b) (C_b < 2^24, exact in f32).
// * The min term on wgmma m64nNk16.f32.f16.f16 into the same f32 accumulators: A = −f16(dmin·m_j)
//   for the block's 16 groups (k16), B = pf_swiglu_q8's f16(dx·bsum_j). These two f16 roundings
//   (relative 2^-12 each) are the only difference from the CPU's expression besides the
//   order of f32 additions (bench/RESULTS.md, sixteenth session; self-test moe_grouped_mxq).
// Block: 128 weight rows (warpgroup wg owns the m64 at 64wg, 2 rows a thread, pf_mxw's
// decoder loads) x one tile of ≤ 64 tokens; 121 registers, 2 blocks an SM. Everything a
// 256-column block reads (the rows' Q2_K blocks, its 8 steps of tokens, B' and dx) is staged
// by cp.async one block ahead, so there is one barrier per 8 steps; each step's wgmma stays
// in flight while the next step is decoded (1,000 µs a 4k chunk-layer against 1,080 with a
// barrier and copies per step, and 1,116 for the f16 pf_mxw_q2_k: bench/RESULTS.md). Integer
// shapes exist for N = 8, 16, 24, 32, 48, 64 only, so tiles of 5 or 7 token groups run as 6
// or 8 (the copies zero-fill tokens past the count).
// Shared: As (2 stages of 128 rows) | int8 B 2 stages × 8 steps × 64 tokens × 32 bytes | B'
// 2 × 64 × 16 halves | dx 2 × 64; a token's 32 bytes of a step (or of a block's B') as two
// K-major core matrices: (n/8)·256 + kc·128 + (n%8)·16 (LBO 128, SBO 256).
// ---------------------------------------------------------------------------------------------
template <int NG>
__device__ __forceinline__ void pxq_mma(u32 (&d)[NG][4], const u32 (&a)[4], u64 desc, int acc);
template <>
__device__ __forceinline__ void pxq_mma<1>(u32 (&d)[1][4], const u32 (&a)[4], u64 desc, int acc) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %9, 0;\nwgmma.mma_async.sync.aligned.m64n8k32.s32.s8.s8 {%0, %1, %2, %3}, {%4, %5, %6, %7}, %8, p;\n}"
                 : "+r"(d[0][0]), "+r"(d[0][1]), "+r"(d[0][2]), "+r"(d[0][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(acc)
                 : "memory");
}
template <>
__device__ __forceinline__ void pxq_mma<2>(u32 (&d)[2][4], const u32 (&a)[4], u64 desc, int acc) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\nwgmma.mma_async.sync.aligned.m64n16k32.s32.s8.s8 {%0, %1, %2, %3, %4, %5, %6, %7}, {%8, %9, %10, %11}, %12, p;\n}"
                 : "+r"(d[0][0]), "+r"(d[0][1]), "+r"(d[0][2]), "+r"(d[0][3]), "+r"(d[1][0]), "+r"(d[1][1]), "+r"(d[1][2]), "+r"(d[1][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(acc)
                 : "memory");
}
template <>
__device__ __forceinline__ void pxq_mma<3>(u32 (&d)[3][4], const u32 (&a)[4], u64 desc, int acc) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %17, 0;\nwgmma.mma_async.sync.aligned.m64n24k32.s32.s8.s8 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11}, {%12, %13, %14, %15}, %16, p;\n}"
                 : "+r"(d[0][0]), "+r"(d[0][1]), "+r"(d[0][2]), "+r"(d[0][3]), "+r"(d[1][0]), "+r"(d[1][1]), "+r"(d[1][2]), "+r"(d[1][3]), "+r"(d[2][0]), "+r"(d[2][1]), "+r"(d[2][2]), "+r"(d[2][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(acc)
                 : "memory");
}
template <>
__device__ __forceinline__ void pxq_mma<4>(u32 (&d)[4][4], const u32 (&a)[4], u64 desc, int acc) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\nwgmma.mma_async.sync.aligned.m64n32k32.s32.s8.s8 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, {%16, %17, %18, %19}, %20, p;\n}"
                 : "+r"(d[0][0]), "+r"(d[0][1]), "+r"(d[0][2]), "+r"(d[0][3]), "+r"(d[1][0]), "+r"(d[1][1]), "+r"(d[1][2]), "+r"(d[1][3]), "+r"(d[2][0]), "+r"(d[2][1]), "+r"(d[2][2]), "+r"(d[2][3]), "+r"(d[3][0]), "+r"(d[3][1]), "+r"(d[3][2]), "+r"(d[3][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(acc)
                 : "memory");
}
template <>
__device__ __forceinline__ void pxq_mma<6>(u32 (&d)[6][4], const u32 (&a)[4], u64 desc, int acc) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %29, 0;\nwgmma.mma_async.sync.aligned.m64n48k32.s32.s8.s8 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23}, {%24, %25, %26, %27}, %28, p;\n}"
                 : "+r"(d[0][0]), "+r"(d[0][1]), "+r"(d[0][2]), "+r"(d[0][3]), "+r"(d[1][0]), "+r"(d[1][1]), "+r"(d[1][2]), "+r"(d[1][3]), "+r"(d[2][0]), "+r"(d[2][1]), "+r"(d[2][2]), "+r"(d[2][3]), "+r"(d[3][0]), "+r"(d[3][1]), "+r"(d[3][2]), "+r"(d[3][3]), "+r"(d[4][0]), "+r"(d[4][1]), "+r"(d[4][2]), "+r"(d[4][3]), "+r"(d[5][0]), "+r"(d[5][1]), "+r"(d[5][2]), "+r"(d[5][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(acc)
                 : "memory");
}
template <>
__device__ __forceinline__ void pxq_mma<8>(u32 (&d)[8][4], const u32 (&a)[4], u64 desc, int acc) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\nwgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p;\n}"
                 : "+r"(d[0][0]), "+r"(d[0][1]), "+r"(d[0][2]), "+r"(d[0][3]), "+r"(d[1][0]), "+r"(d[1][1]), "+r"(d[1][2]), "+r"(d[1][3]), "+r"(d[2][0]), "+r"(d[2][1]), "+r"(d[2][2]), "+r"(d[2][3]), "+r"(d[3][0]), "+r"(d[3][1]), "+r"(d[3][2]), "+r"(d[3][3]), "+r"(d[4][0]), "+r"(d[4][1]), "+r"(d[4][2]), "+r"(d[4][3]), "+r"(d[5][0]), "+r"(d[5][1]), "+r"(d[5][2]), "+r"(d[5][3]), "+r"(d[6][0]), "+r"(d[6][1]), "+r"(d[6][2]), "+r"(d[6][3]), "+r"(d[7][0]), "+r"(d[7][1]), "+r"(d[7][2]), "+r"(d[7][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(acc)
                 : "memory");
}

template <int NG>
__device__ __forceinline__ void pxq_hold(u32 (&c)[NG][4]) {
#pragma unroll
    for (int n = 0; n < NG; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) asm volatile("" : "+r"(c[n][e])::"memory");
}
template <int NG>
__device__ __forceinline__ void pxq_holdf(float (&c)[NG][4]) {
#pragma unroll
    for (int n = 0; n < NG; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) asm volatile("" : "+f"(c[n][e])::"memory");
}
template <int NG>
__device__ __forceinline__ void px_zero1(float (&c)[NG][4]) {
#pragma unroll
    for (int n = 0; n < NG; n++) c[n][0] = c[n][1] = c[n][2] = c[n][3] = 0.0f;
}

// Weight rows of one pf_mxq block: two warpgroups, one m64 each.
#define PXQ_BM 128
// Bytes of a block's token stage: 8 steps of 64 tokens x 32 int8 columns.
#define PXQ_BSTAGE (8 * 2048)

// The step's int8 A words of one row: codes 8t4..8t4+3 and 8t4+4..8t4+7 times the group scale
// (PxQ2K::load_s's bytes; a byte-wise product ≤ 3·15, so no carries between bytes).
// From a row's two code words q0, q1, the step's bit pair sh = 2(s % 4) and group scale m.
__device__ __forceinline__ void pxq_words(u32 (&w)[2], u32 q0, u32 q1, u32 m, int sh) {
    w[0] = ((q0 >> sh) & 0x03030303u) * m;
    w[1] = ((q1 >> sh) & 0x03030303u) * m;
}
__device__ __forceinline__ void pxq_decode(u32 (&w)[2], const PxQ2K& l, int s) {
    pxq_words(w, l.q0, l.q1, l.sc & 15u, 2 * (s & 3));
}

template <int NG>
__device__ __forceinline__ void pxq_body(const u8* wrow, i64 rowb, u8* As, u8* Bq, int m0,
                                         int m_total, int k_dim, int r0, int cnt,
                                         const signed char* __restrict__ xq,
                                         const float* __restrict__ xd, const u16* __restrict__ xb,
                                         float* __restrict__ out) {
    using L = PxQ2K;
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    int g = lane >> 2, t4 = lane & 3;
    int wg = warp >> 2, w4 = warp & 3;
    u8* Bm = Bq + 2 * PXQ_BSTAGE;
    float* Dx = (float*)(Bm + 2 * 2048);
    int nq = k_dim >> 8;
    // Copies of a block's tokens: piece p = tid + 256i (i < 4) is token n = (p/2) % 64, half
    // kc = p % 2 of step u = p/128's 32 bytes; B' by threads 0..127 (token tid/2, half tid%2).
    int bn = (tid >> 1) & 63, kc = tid & 1;
    bool bval = bn < cnt;
    int rr = r0 + (bval ? bn : 0);
    const signed char* xrow = xq + (i64)rr * k_dim + 16 * kc + 32 * (tid >> 7);
    const u16* brow = xb + (i64)rr * (nq * 16) + 8 * kc;
    int coff = (bn >> 3) * 256 + kc * 128 + (bn & 7) * 16;
    u8* bdst = Bq + (tid >> 7) * 2048 + coff;
    u32 bq0 = (u32)__cvta_generic_to_shared(Bq), bm0 = (u32)__cvta_generic_to_shared(Bm);
    // This thread's rows 64wg + 16w4 + g (ri = 0) and + 8 (ri = 1): the m64 of warpgroup wg.
    const u8* arow = As + (wg * 64 + w4 * 16 + g) * L::kRS;
    const int roff[2] = {0, 8 * L::kRS};
    // Everything block q reads, into slot q % 2: its weight bytes, its 8 steps of tokens, its
    // min-term operands and scales (dx by plain stores: seen after the next barrier).
    auto stage = [&](int q) {
        int sl = q & 1;
        px_stage<L, PXQ_BM>(As, wrow, rowb, q, sl);
#pragma unroll
        for (int i = 0; i < 4; i++)
            px_cp16(bdst + sl * PXQ_BSTAGE + 2 * i * 2048, xrow + 256 * q + 64 * i, bval);
        if (tid < 128) px_cp16(Bm + sl * 2048 + coff, brow + 16 * q, bval);
        if (tid < 64) Dx[sl * 64 + tid] = tid < cnt ? xd[(i64)(r0 + tid) * nq + q] : 0.0f;
        pf_cp_commit();
    };
    float acc[1][NG][4];
    px_zero1<NG>(acc[0]);
    u32 C[NG][4];
    u32 af[2][2][2];
    L ld[2];
    auto load = [&](int s, L (&l)[2]) {
        int q = s >> 3;
        const u8* sb = arow + (q & 1) * (PXQ_BM * L::kRS) + L::slot_off(q);
#pragma unroll
        for (int ri = 0; ri < 2; ri++) l[ri].load_s(sb + roff[ri], s, t4);
    };
    auto decode = [&](int s, u32 (&an)[2][2]) {
        load(s, ld);
#pragma unroll
        for (int ri = 0; ri < 2; ri++) pxq_decode(an[ri], ld[ri], s);
    };
    // Block q's end: its C into acc, then its min term (read from the block's stage).
    auto fold = [&](int q) {
        const u8* sb = arow + (q & 1) * (PXQ_BM * L::kRS) + L::slot_off(q);
        const float* dx = Dx + (q & 1) * 64;
        float dr[2];
        u32 mn[2][2];
#pragma unroll
        for (int ri = 0; ri < 2; ri++) {
            const u8* p = sb + roff[ri];
            u32 dd = ld32(p + 80);
            dr[ri] = h2f((u16)(dd & 0xffff));
            float dm = -h2f((u16)(dd >> 16));
            mn[ri][0] = pack_h2(__fmul_rn(dm, (float)(p[2 * t4] >> 4)),
                                __fmul_rn(dm, (float)(p[2 * t4 + 1] >> 4)));
            mn[ri][1] = pack_h2(__fmul_rn(dm, (float)(p[8 + 2 * t4] >> 4)),
                                __fmul_rn(dm, (float)(p[9 + 2 * t4] >> 4)));
        }
#pragma unroll
        for (int n = 0; n < NG; n++) {
            float x0 = dx[8 * n + 2 * t4], x1 = dx[8 * n + 2 * t4 + 1];
            acc[0][n][0] += __fmul_rn(dr[0], x0) * (float)(int)C[n][0];
            acc[0][n][1] += __fmul_rn(dr[0], x1) * (float)(int)C[n][1];
            acc[0][n][2] += __fmul_rn(dr[1], x0) * (float)(int)C[n][2];
            acc[0][n][3] += __fmul_rn(dr[1], x1) * (float)(int)C[n][3];
        }
        pxw_fence();
        const u32 a[4] = {mn[0][0], mn[1][0], mn[0][1], mn[1][1]};
        pxw_mma<NG>(acc[0], a, pxq_desc(bm0 + (q & 1) * 2048, 256));
        pxw_commit();
        pxw_wait0();
        pxq_holdf<NG>(acc[0]);
    };
    // DS4_PXQ_BLK: row ri's scale word j (bytes 4j..4j+3 of its 16 scale bytes) shifted right
    // by 8·(t4/2), so that step u's byte 2u + t4/2 (PxQ2K::load_s's sc) is the low byte of
    // S[ri][u/2] >> 16(u%2), and its code words of half h (load_s's q0, q1 of steps 4h..4h+3).
    // Each word is read once a block, two steps before its first use (the unrolled steps index
    // them by constants, so only the live ones take registers): 4 + 4 shared loads a row a
    // block instead of 3 a row a step (ncu, H200, 4k: 742 → 701 µs a hash layer, 855 → 805 a
    // learned one; bench/RESULTS.md, twenty-fifth session).
    u32 S[2][4], Q[2][2][2];
    const int tsh = 8 * (t4 >> 1);
    const u8* sbq = arow;
    // The words step u first uses: scale word u/2 (even u), code half u/4 (u % 4 == 0).
    auto load_for = [&](int u) {
#pragma unroll
        for (int ri = 0; ri < 2; ri++) {
            const u8* p = sbq + roff[ri];
            if ((u & 1) == 0) S[ri][u >> 1] = ld32(p + 2 * u) >> tsh;
            if ((u & 3) == 0) {
                Q[ri][u >> 2][0] = ld32(p + 16 + 8 * u + 8 * t4);
                Q[ri][u >> 2][1] = ld32(p + 20 + 8 * u + 8 * t4);
            }
        }
    };
    // pxq_decode of step u of the block from those registers.
    auto decode_blk = [&](int u, u32 (&an)[2][2]) {
#pragma unroll
        for (int ri = 0; ri < 2; ri++)
            pxq_words(an[ri], Q[ri][u >> 2][0], Q[ri][u >> 2][1],
                      (S[ri][u >> 1] >> (16 * (u & 1))) & 15u, 2 * (u & 3));
    };
    stage(0);
    // Per block: one barrier (its stage landed, the previous block done by every warp), the
    // next block's stage issued 8 steps ahead, then 8 steps with no barrier: step s's wgmma
    // stays in flight while step s + 1 is decoded (the wait for all but one group frees the
    // registers step s - 1 read); the block's last step waits for all (the fold reads C).
    for (int q = 0; q < nq; q++) {
        asm volatile("cp.async.wait_all;" ::: "memory");
        __syncthreads();
        if (q + 1 < nq) stage(q + 1);
        // DS4_PXQ_BLK: the words of steps 0..3 now, the rest two steps ahead (load_for).
        // DS4_PXQ_PRE: step u + 1's words are read before step u's decode (ld holds them).
        if (DS4_PXQ_BLK) {
            sbq = arow + (q & 1) * (PXQ_BM * L::kRS) + L::slot_off(q);
            load_for(0);
            load_for(2);
            decode_blk(0, af[0]);
        } else if (DS4_PXQ_PRE) {
            L l0[2];
            load(8 * q, l0);
            load(8 * q + 1, ld);
#pragma unroll
            for (int ri = 0; ri < 2; ri++) pxq_decode(af[0][ri], l0[ri], 8 * q);
        } else {
            decode(8 * q, af[0]);
        }
        u32 bs = bq0 + (q & 1) * PXQ_BSTAGE;
#pragma unroll
        for (int u = 0; u < 8; u++) {
            pxw_fence();
            const u32(&ac)[2][2] = af[u & 1];
            const u32 a[4] = {ac[0][0], ac[1][0], ac[0][1], ac[1][1]};
            pxq_mma<NG>(C, a, pxq_desc(bs + u * 2048, 256), u);
            pxw_commit();
            if (u == 7) {
                pxw_wait0();
                pxq_hold<NG>(C);
                fold(q);
            } else if (DS4_PXQ_BLK) {
                pxw_wait1();
                if (u + 3 < 8) load_for(u + 3);
                decode_blk(u + 1, af[(u + 1) & 1]);
            } else if (DS4_PXQ_PRE) {
                pxw_wait1();
                L nx[2];
                if (u + 2 < 8) load(8 * q + u + 2, nx);
#pragma unroll
                for (int ri = 0; ri < 2; ri++) {
                    pxq_decode(af[(u + 1) & 1][ri], ld[ri], 8 * q + u + 1);
                    if (u + 2 < 8) ld[ri] = nx[ri];
                }
            } else {
                pxw_wait1();
                decode(8 * q + u + 1, af[(u + 1) & 1]);
            }
        }
    }
    // Rows 64wg + 16w4 + g (+8): accumulator (n, c) is token 8n + 2t4 (+1 for odd c).
    int row = m0 + wg * 64 + w4 * 16 + g;
#pragma unroll
    for (int n = 0; n < NG; n++) {
        int tk = 8 * n + 2 * t4;
        if (tk < cnt) {
            out[(i64)(r0 + tk) * m_total + row] = acc[0][n][0];
            out[(i64)(r0 + tk) * m_total + row + 8] = acc[0][n][2];
        }
        if (tk + 1 < cnt) {
            out[(i64)(r0 + tk + 1) * m_total + row] = acc[0][n][1];
            out[(i64)(r0 + tk + 1) * m_total + row + 8] = acc[0][n][3];
        }
    }
}
#endif  // DS4_PXW

// Runs BODY<L, NG>(ARGS) for the tile's NG = ceil(cnt / 8) token groups (block-uniform).
#define PX_NG_SWITCH(BODY, ARGS)                                                                 \
    switch ((cnt + 7) >> 3) {                                                                    \
    case 1: BODY<L, 1> ARGS; break;                                                              \
    case 2: BODY<L, 2> ARGS; break;                                                              \
    case 3: BODY<L, 3> ARGS; break;                                                              \
    case 4: BODY<L, 4> ARGS; break;                                                              \
    case 5: BODY<L, 5> ARGS; break;                                                              \
    case 6: BODY<L, 6> ARGS; break;                                                              \
    case 7: BODY<L, 7> ARGS; break;                                                              \
    default: BODY<L, 8> ARGS; break;                                                             \
    }

// Which body px_kernel runs: pf_mx_<t> (weight bytes from global memory), pf_mxs_<t> (staged
// in shared memory), pf_mxw_<t> (staged, products on wgmma; sm_90a only).
#define PX_MX 0
#define PX_MXS 1
#define PX_MXW 2

// One block of pf_mx_<t>, pf_mxs_<t> or pf_mxw_<t> (MODE). Needs rows_a, m_total multiples of
// PX_BM and k_dim of 256; staged, also a row stride that is a multiple of 16 bytes, 16-byte
// aligned matrices and dynamic shared memory 2·PX_BM·kRS bytes (the host checks); pf_mxw, its
// activation rows permuted by px_pos, and with xrows (pf_mxw only; null for the others) its
// sorted row r read from xs row xrows[r] / xk. pf_mxw is built for every architecture, but
// outside sm_90a its body is empty and the host never launches it.
template <class L, int MODE>
__device__ __forceinline__ void px_kernel(const u8* __restrict__ wa, const u8* __restrict__ wb,
                                          i64 expert_bytes, int rows_a, int m_total, int k_dim,
                                          const int* __restrict__ n_tiles,
                                          const int* __restrict__ tiles,
                                          const u16* __restrict__ xs,
                                          const int* __restrict__ xrows, int xk,
                                          float* __restrict__ out) {
#ifndef DS4_PXW
    if constexpr (MODE == PX_MXW) return;
#endif
    __shared__ __align__(16) u16 Bs[3 * PX_BN * PX_BK];
    __shared__ __align__(16) PxTables T;
    int tile = blockIdx.y;
    if (tile >= *n_tiles) return;
    int tid = threadIdx.x;
    int e = tiles[3 * tile], r0 = tiles[3 * tile + 1], cnt = tiles[3 * tile + 2];
    int xr = MODE == PX_MXW ? pxw_xrow(xrows, xk, r0, cnt) : 0;
    if (L::kTables) px_tables(T, tid);
    int m0 = blockIdx.x * PX_BM;
    const u8* w = (m0 < rows_a ? wa : wb) + (i64)e * expert_bytes;
    int wrow0 = m0 < rows_a ? m0 : m0 - rows_a;
    i64 rowb = (i64)(k_dim >> 8) * L::kBlockBytes;
    if constexpr (MODE == PX_MX) {
        int lane = tid & 31;
        const u8* rp = w + (i64)(wrow0 + (tid >> 5) * 32 + (lane >> 2)) * rowb;
        i64 rs8 = 8 * rowb;
        PX_NG_SWITCH(px_body, (rp, rs8, T, Bs, m0, m_total, k_dim, r0, cnt, xs, out))
    } else {
        const u8* wrow = w + (i64)wrow0 * rowb;
        u8* As = px_smem;
        if constexpr (MODE == PX_MXS) {
            PX_NG_SWITCH(pxs_body, (wrow, rowb, T, Bs, As, m0, m_total, k_dim, r0, cnt, xs, out))
        } else {
#ifdef DS4_PXW
            PX_NG_SWITCH(pxw_body, (wrow, rowb, T, Bs, As, m0, m_total, k_dim, r0, cnt, xs, xr, out))
#endif
        }
    }
}

// The fragment-decoding kernels' entry points: K_<t> runs px_kernel<L, MODE>.
#define DS4_PF_PX(K, T, L, MODE)                                                                 \
    extern "C" __global__ void __launch_bounds__(256, 2)                                         \
        K##_##T(const u8* __restrict__ wa, const u8* __restrict__ wb, i64 expert_bytes,          \
                int rows_a, int m_total, int k_dim, const int* __restrict__ n_tiles,             \
                const int* __restrict__ tiles, const u16* __restrict__ xs,                       \
                const int* __restrict__ xrows, int xk, float* __restrict__ out) {                \
        px_kernel<L, MODE>(wa, wb, expert_bytes, rows_a, m_total, k_dim, n_tiles, tiles, xs,     \
                           xrows, xk, out);                                                      \
    }

DS4_PF_PX(pf_mx, q2_k, PxQ2K, PX_MX)
DS4_PF_PX(pf_mx, iq2_xxs, PxIq2, PX_MX)
DS4_PF_PX(pf_mxs, q2_k, PxQ2K, PX_MXS)
DS4_PF_PX(pf_mxs, iq2_xxs, PxIq2, PX_MXS)
DS4_PF_PX(pf_mxw, q2_k, PxQ2K, PX_MXW)
DS4_PF_PX(pf_mxw, iq2_xxs, PxIq2, PX_MXW)

// pf_mxw4_iq2_xxs's entry: px_kernel's setup for 512 threads over pf_group's tiles of up to
// 128 tokens (`tiles2`: the experts of more than 64 rows; pf_mxw takes the others' `tiles1`
// in a second launch); token groups past 8 run as the next even count (zero tokens, whose
// outputs are not stored). Needs what pf_mxw needs, plus dynamic shared memory 2·PX_BM·80
// bytes. Built for every architecture, empty outside sm_90a (never launched there).
extern "C" __global__ void __launch_bounds__(512, 1)
    pf_mxw4_iq2_xxs(const u8* __restrict__ wa, const u8* __restrict__ wb, i64 expert_bytes,
                    int rows_a, int m_total, int k_dim, const int* __restrict__ n_tiles,
                    const int* __restrict__ tiles, const u16* __restrict__ xs,
                    const int* __restrict__ xrows, int xk, float* __restrict__ out) {
#ifdef DS4_PXW
    using L = PxIq2;
    __shared__ __align__(16) u16 Bs[3 * PX4_BN * PX_BK];
    __shared__ __align__(16) PxTables T;
    int tile = blockIdx.y;
    if (tile >= *n_tiles) return;
    int e = tiles[3 * tile], r0 = tiles[3 * tile + 1], cnt = tiles[3 * tile + 2];
    int xr = pxw_xrow(xrows, xk, r0, cnt);
    if (threadIdx.x < 256) px_tables(T, threadIdx.x);
    int m0 = blockIdx.x * PX_BM;
    const u8* w = (m0 < rows_a ? wa : wb) + (i64)e * expert_bytes;
    int wrow0 = m0 < rows_a ? m0 : m0 - rows_a;
    i64 rowb = (i64)(k_dim >> 8) * L::kBlockBytes;
    const u8* wrow = w + (i64)wrow0 * rowb;
#define PX4_ARGS (wrow, rowb, T, Bs, px_smem, m0, m_total, k_dim, r0, cnt, xs, xr, out)
    switch ((cnt + 7) >> 3) {
    case 1: pxw_body<L, 1, 1> PX4_ARGS; break;
    case 2: pxw_body<L, 2, 1> PX4_ARGS; break;
    case 3: pxw_body<L, 3, 1> PX4_ARGS; break;
    case 4: pxw_body<L, 4, 1> PX4_ARGS; break;
    case 5: pxw_body<L, 5, 1> PX4_ARGS; break;
    case 6: pxw_body<L, 6, 1> PX4_ARGS; break;
    case 7: pxw_body<L, 7, 1> PX4_ARGS; break;
    case 8: pxw_body<L, 8, 1> PX4_ARGS; break;
    case 9:
    case 10: pxw_body<L, 10, 1> PX4_ARGS; break;
    case 11:
    case 12: pxw_body<L, 12, 1> PX4_ARGS; break;
    case 13:
    case 14: pxw_body<L, 14, 1> PX4_ARGS; break;
    default: pxw_body<L, 16, 1> PX4_ARGS; break;
    }
#undef PX4_ARGS
#endif
}

// pf_mxq_q2_k's entry (pf_mxw's grid: 256-row blocks x tiles; one matrix, no second): the
// expert's Q2_K rows, the tiles of pf_group, and pf_swiglu_q8's xq / xd / xb rows. Needs
// k_dim a multiple of 1024 (16-byte rows for the staged copies) and dynamic shared memory
// PXQ_SMEM bytes; built for every architecture, empty outside sm_90a (never launched there).
#define PXQ_SMEM (2 * PXQ_BM * 112 + 2 * PXQ_BSTAGE + 2 * 2048 + 2 * 64 * 4)
extern "C" __global__ void __launch_bounds__(256, 2)
    pf_mxq_q2_k(const u8* __restrict__ w, i64 expert_bytes, int m_total, int k_dim,
                const int* __restrict__ n_tiles, const int* __restrict__ tiles,
                const signed char* __restrict__ xq, const float* __restrict__ xd,
                const u16* __restrict__ xb, float* __restrict__ out) {
#ifdef DS4_PXW
    int tile = blockIdx.y;
    if (tile >= *n_tiles) return;
    int e = tiles[3 * tile], r0 = tiles[3 * tile + 1], cnt = tiles[3 * tile + 2];
    int m0 = blockIdx.x * PXQ_BM;
    i64 rowb = (i64)(k_dim >> 8) * PxQ2K::kBlockBytes;
    const u8* wrow = w + (i64)e * expert_bytes + (i64)m0 * rowb;
    u8* As = px_smem;
    u8* Bq = px_smem + 2 * PXQ_BM * PxQ2K::kRS;
    switch ((cnt + 7) >> 3) {
    case 1: pxq_body<1>(wrow, rowb, As, Bq, m0, m_total, k_dim, r0, cnt, xq, xd, xb, out); break;
    case 2: pxq_body<2>(wrow, rowb, As, Bq, m0, m_total, k_dim, r0, cnt, xq, xd, xb, out); break;
    case 3: pxq_body<3>(wrow, rowb, As, Bq, m0, m_total, k_dim, r0, cnt, xq, xd, xb, out); break;
    case 4: pxq_body<4>(wrow, rowb, As, Bq, m0, m_total, k_dim, r0, cnt, xq, xd, xb, out); break;
    case 5:
    case 6: pxq_body<6>(wrow, rowb, As, Bq, m0, m_total, k_dim, r0, cnt, xq, xd, xb, out); break;
    default: pxq_body<8>(wrow, rowb, As, Bq, m0, m_total, k_dim, r0, cnt, xq, xd, xb, out); break;
    }
#endif
}
