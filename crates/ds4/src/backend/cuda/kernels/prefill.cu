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
// No atomics: every output element is written by one thread, so results are bit-identical
// from run to run (cuBLAS GEMMs are deterministic for a given shape on one device).
// Appended after quant.cu (uses f2h, the deq_<t> unit dequantizers and the IQ2 tables).

#define PF_GROUP_TILE 1024

// One block of PF_GROUP_TILE threads; thread e < n_exp owns expert e. `meta` receives the
// per-expert counts (n_exp ints) then the used experts in increasing id (n_exp ints, -1
// after the last). perm[r] = slot at sorted row r; inv[slot] = its sorted row. Rows of one
// expert keep slot order (stable): the result is a pure function of `ids`.
extern "C" __global__ void __launch_bounds__(PF_GROUP_TILE)
    pf_group(const int* __restrict__ ids, int slots, int n_exp, int* __restrict__ meta,
             int* __restrict__ perm, int* __restrict__ inv) {
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

// xs[r][i] = f16(y[perm[r] / k][i]): sorted row r's input (its token's row). grid (d/256, rows).
extern "C" __global__ void pf_gather(const float* __restrict__ y, const int* __restrict__ perm,
                                     int k, int d, u16* __restrict__ xs) {
    int r = blockIdx.y;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= d) return;
    int t = perm[r] / k;
    xs[(i64)r * d + i] = f2h(y[(i64)t * d + i]);
}

// h[r][i] = f16(silu(min(g, c))·clamp(u, ±c)·wts[perm[r]]) with g = gu[r][i], u = gu[r][f+i]
// (the rows r0.. of one batch of experts). Same expressions as k_swiglu. grid (f/256, rows).
extern "C" __global__ void pf_swiglu(const float* __restrict__ gu, const int* __restrict__ perm,
                                     const float* __restrict__ wts, int r0, int f, float c,
                                     u16* __restrict__ h) {
    int r = r0 + blockIdx.y;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= f) return;
    const float* row = gu + (i64)r * 2 * f;
    float gv = fminf(row[i], c);
    float sil = gv * (1.0f / (1.0f + expf(-gv)));
    float uv = fminf(fmaxf(row[f + i], -c), c);
    float v = sil * uv;
    if (wts) v = v * wts[perm[r]];
    h[(i64)r * f + i] = f2h(v);
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
DS4_PF_DQ(q8_0, 32)
DS4_PF_DQ(q2_k, 16)
DS4_PF_DQ(q4_k, 32)
DS4_PF_DQ(iq2_xxs, 32)
