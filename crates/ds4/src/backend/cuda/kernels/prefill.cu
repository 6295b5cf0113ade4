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
// Tile of the grouped expert product pf_mm_<t>: PF_BM weight rows x PF_BN sorted rows
// (tokens of one expert), PF_BK columns per step; shared rows padded to PF_SA halves.
#define PF_BM 128
#define PF_BN 64
#define PF_BK 32
#define PF_SA 40

// One block of PF_GROUP_TILE threads; thread e < n_exp owns expert e. `meta` receives the
// per-expert counts (n_exp ints), the used experts in increasing id (n_exp ints, -1 after
// the last), then the number of row tiles; `tiles` the tiles of pf_mm (expert, first sorted
// row, rows ≤ PF_BN) in expert order. perm[r] = slot at sorted row r; inv[slot] = its sorted
// row. Rows of one expert keep slot order (stable): the result is a pure function of `ids`.
extern "C" __global__ void __launch_bounds__(PF_GROUP_TILE)
    pf_group(const int* __restrict__ ids, int slots, int n_exp, int* __restrict__ meta,
             int* __restrict__ perm, int* __restrict__ inv, int* __restrict__ tiles) {
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

// ---------------------------------------------------------------------------------------------
// pf_mm_<t>: grouped expert product on tensor cores, weights dequantized in the kernel (each
// expert's quantized bytes are read once per row tile of its tokens; no f16 weight copy).
// out[r][m] = Σ_k W_e[m][k] · xs[r][k] for the sorted rows r of tile blockIdx.y (expert e),
// m in the PF_BM rows of blockIdx.x; rows m < rows_a come from `wa`, the rest from `wb` (row
// m − rows_a: gate|up as one 2F-row product). xs: f16 rows of k_dim; out: f32 rows of m_total.
// Dequantization as dq_<t> (f32, rounded to f16); mma.sync m16n8k16 f16 x f16 -> f32.
// Needs rows_a, m_total multiples of PF_BM and k_dim of PF_BK (the host checks).
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ void mma16816(float* c, const u32* a, const u32* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

#define DS4_PF_MM(T, DQ_ELEMS)                                                                   \
    extern "C" __global__ void __launch_bounds__(256)                                            \
        pf_mm_##T(const u8* __restrict__ wa, const u8* __restrict__ wb, i64 expert_bytes,        \
                  int rows_a, int m_total, int k_dim, const int* __restrict__ n_tiles,           \
                  const int* __restrict__ tiles, const u16* __restrict__ xs,                     \
                  float* __restrict__ out) {                                                     \
        __shared__ __align__(16) u16 As[PF_BM * PF_SA];                                          \
        __shared__ __align__(16) u16 Bs[PF_BN * PF_SA];                                          \
        int tile = blockIdx.y;                                                                   \
        if (tile >= *n_tiles) return;                                                            \
        int e = tiles[3 * tile], r0 = tiles[3 * tile + 1], cnt = tiles[3 * tile + 2];            \
        int m0 = blockIdx.x * PF_BM;                                                             \
        const u8* w = m0 < rows_a ? wa : wb;                                                     \
        int wrow0 = m0 < rows_a ? m0 : m0 - rows_a;                                              \
        int nrows = m0 < rows_a ? rows_a : m_total - rows_a;                                     \
        w += (i64)e * expert_bytes;                                                              \
        int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;                                 \
        int g = lane >> 2, t4 = lane & 3;                                                        \
        int wm = (warp & 3) * 32, wn = (warp >> 2) * 32;                                         \
        float acc[2][4][4];                                                                      \
        _Pragma("unroll") for (int a = 0; a < 2; a++)                                            \
            _Pragma("unroll") for (int b = 0; b < 4; b++)                                        \
                _Pragma("unroll") for (int c = 0; c < 4; c++) acc[a][b][c] = 0.0f;               \
        const int upr = PF_BK / DQ_ELEMS;                                                        \
        for (int k0 = 0; k0 < k_dim; k0 += PF_BK) {                                              \
            __syncthreads();                                                                     \
            for (int i = tid; i < PF_BM * upr; i += 256) {                                       \
                int r = i / upr, uu = i % upr;                                                   \
                float v[DQ_ELEMS];                                                               \
                deq_##T(w, wrow0 + r, nrows, k_dim, k0 / DQ_ELEMS + uu, v);                      \
                u32* dst = (u32*)(As + r * PF_SA + uu * DQ_ELEMS);                               \
                _Pragma("unroll") for (int q = 0; q < DQ_ELEMS; q += 2) dst[q >> 1] =            \
                    (u32)f2h(v[q]) | ((u32)f2h(v[q + 1]) << 16);                                 \
            }                                                                                    \
            {                                                                                    \
                int n = tid >> 2, c8 = (tid & 3) * 8;                                            \
                uint4 val = make_uint4(0u, 0u, 0u, 0u);                                          \
                if (n < cnt) val = *(const uint4*)(xs + (i64)(r0 + n) * k_dim + k0 + c8);        \
                *(uint4*)(Bs + n * PF_SA + c8) = val;                                            \
            }                                                                                    \
            __syncthreads();                                                                     \
            _Pragma("unroll") for (int kk = 0; kk < PF_BK; kk += 16) {                           \
                u32 af[2][4], bf[4][2];                                                          \
                _Pragma("unroll") for (int mi = 0; mi < 2; mi++) {                               \
                    const u16* p = As + (wm + mi * 16 + g) * PF_SA + kk + t4 * 2;                \
                    af[mi][0] = *(const u32*)p;                                                  \
                    af[mi][1] = *(const u32*)(p + 8 * PF_SA);                                    \
                    af[mi][2] = *(const u32*)(p + 8);                                            \
                    af[mi][3] = *(const u32*)(p + 8 * PF_SA + 8);                                \
                }                                                                                \
                _Pragma("unroll") for (int ni = 0; ni < 4; ni++) {                               \
                    const u16* p = Bs + (wn + ni * 8 + g) * PF_SA + kk + t4 * 2;                 \
                    bf[ni][0] = *(const u32*)p;                                                  \
                    bf[ni][1] = *(const u32*)(p + 8);                                            \
                }                                                                                \
                _Pragma("unroll") for (int mi = 0; mi < 2; mi++)                                 \
                    _Pragma("unroll") for (int ni = 0; ni < 4; ni++)                             \
                        mma16816(acc[mi][ni], af[mi], bf[ni]);                                   \
            }                                                                                    \
        }                                                                                        \
        _Pragma("unroll") for (int mi = 0; mi < 2; mi++)                                         \
            _Pragma("unroll") for (int ni = 0; ni < 4; ni++) {                                   \
                int row = m0 + wm + mi * 16 + g;                                                 \
                int n = wn + ni * 8 + t4 * 2;                                                    \
                if (n < cnt) {                                                                   \
                    out[(i64)(r0 + n) * m_total + row] = acc[mi][ni][0];                         \
                    out[(i64)(r0 + n) * m_total + row + 8] = acc[mi][ni][2];                     \
                }                                                                                \
                if (n + 1 < cnt) {                                                               \
                    out[(i64)(r0 + n + 1) * m_total + row] = acc[mi][ni][1];                     \
                    out[(i64)(r0 + n + 1) * m_total + row + 8] = acc[mi][ni][3];                 \
                }                                                                                \
            }                                                                                    \
    }

DS4_PF_MM(f32, 4)
DS4_PF_MM(f16, 8)
DS4_PF_MM(q8_0, 32)
DS4_PF_MM(q2_k, 16)
DS4_PF_MM(q4_k, 32)
DS4_PF_MM(iq2_xxs, 32)
