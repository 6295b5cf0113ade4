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

// Two f32 -> one f16x2 word (lo in the low half), round to nearest even like f2h.
__device__ __forceinline__ u32 pack_h2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// Tile loaders of pf_mm: `load` fetches the raw bytes of 16 consecutive weights (row o,
// columns c0..c0+15, c0 % 16 == 0) into registers (issued before the MMAs of the previous
// step, so the loads are in flight meanwhile); `store` decodes them into 8 f16x2 words.
// Every value equals f2h of the deq_<t> value (same f32 operations, then one rounding).
struct PfIq2 {
    u32 a, b, half;
    float d;
    __device__ __forceinline__ void load(const u8* w, int o, int n_rows, int n_cols, int c0) {
        const u8* p = w + ((i64)o * (n_cols >> 8) + (c0 >> 8)) * 66;
        const u8* g = p + 2 + 8 * ((c0 >> 5) & 7);
        d = h2f(ld16(p));
        a = (u32)ld16(g) | ((u32)ld16(g + 2) << 16);
        b = (u32)ld16(g + 4) | ((u32)ld16(g + 6) << 16);
        half = (c0 >> 4) & 1;
    }
    __device__ __forceinline__ void store(u32* dst) const {
        float db = __fmul_rn(__fmul_rn(d, __fadd_rn(0.5f, (float)(b >> 28))), 0.25f);
#pragma unroll
        for (int j = 0; j < 2; j++) {
            int l = 2 * half + j;
            u64 grid = ds4_iq2_grid[(a >> (8 * l)) & 255];
            u32 sg = ds4_iq2_signs[(b >> (7 * l)) & 127];
            u32 lo = (u32)grid, hi = (u32)(grid >> 32);
#pragma unroll
            for (int k = 0; k < 8; k += 2) {
                u32 src = k < 4 ? lo : hi;
                u32 h = pack_h2(__fmul_rn(db, bytef(src, k & 3)), __fmul_rn(db, bytef(src, (k & 3) + 1)));
                // deq_iq2_xxs negates before rounding; RNE is symmetric, so flip the f16 sign.
                h ^= (((sg >> k) & 1u) << 15) | (((sg >> (k + 1)) & 1u) << 31);
                dst[4 * j + k / 2] = h;
            }
        }
    }
};

struct PfQ2K {
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
    __device__ __forceinline__ void store(u32* dst) const {
        float d = h2f((u16)(dd & 0xffff)), dmin = h2f((u16)(dd >> 16));
        float dl = __fmul_rn(d, (float)(sc & 15));
        float ml = __fmul_rn(dmin, (float)(sc >> 4));
        // The four possible values (codes 0..3) as f16, bytes 2c..2c+1 of (t01, t23).
        u32 t01 = pack_h2(__fsub_rn(__fmul_rn(dl, 0.0f), ml), __fsub_rn(__fmul_rn(dl, 1.0f), ml));
        u32 t23 = pack_h2(__fsub_rn(__fmul_rn(dl, 2.0f), ml), __fsub_rn(__fmul_rn(dl, 3.0f), ml));
#pragma unroll
        for (int i = 0; i < 4; i++) {
            u32 c = (q[i] >> shift) & 0x03030303u;
#pragma unroll
            for (int j = 0; j < 2; j++) {
                u32 c0 = (c >> (16 * j)) & 3u, c1 = (c >> (16 * j + 8)) & 3u;
                u32 sel = (2 * c0) | ((2 * c0 + 1) << 4) | ((2 * c1) << 8) | ((2 * c1 + 1) << 12);
                dst[2 * i + j] = __byte_perm(t01, t23, sel);
            }
        }
    }
};

struct PfQ80 {
    uint4 q;
    u16 dh;
    __device__ __forceinline__ void load(const u8* w, int o, int n_rows, int n_cols, int c0) {
        q = *(const uint4*)(w + (i64)o * n_cols + c0);
        dh = ((const u16*)(w + (i64)n_rows * n_cols))[(i64)o * (n_cols >> 5) + (c0 >> 5)];
    }
    __device__ __forceinline__ void store(u32* dst) const {
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
        const u8* w;                                                                             \
        int o, n_rows, n_cols, c0;                                                               \
        __device__ __forceinline__ void load(const u8* w_, int o_, int nr, int nc, int c0_) {    \
            w = w_; o = o_; n_rows = nr; n_cols = nc; c0 = c0_;                                  \
        }                                                                                        \
        __device__ __forceinline__ void store(u32* dst) const {                                  \
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
    __shared__ __align__(16) u16 As[PF_BM * PF_SA];
    __shared__ __align__(16) u16 Bs[PF_BN * PF_SA];
    int tile = blockIdx.y;
    if (tile >= *n_tiles) return;
    int e = tiles[3 * tile], r0 = tiles[3 * tile + 1], cnt = tiles[3 * tile + 2];
    int m0 = blockIdx.x * PF_BM;
    const u8* w = m0 < rows_a ? wa : wb;
    int wrow0 = m0 < rows_a ? m0 : m0 - rows_a;
    int nrows = m0 < rows_a ? rows_a : m_total - rows_a;
    w += (i64)e * expert_bytes;
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    int g = lane >> 2, t4 = lane & 3;
    int wm = (warp & 3) * 32, wn = (warp >> 2) * 32;
    // This thread decodes weights (row ar, columns ac..ac+15 of each step) and copies 8
    // inputs (row bn, columns bc..bc+7).
    int ar = tid >> 1, ac = (tid & 1) * 16;
    int bn = tid >> 2, bc = (tid & 3) * 8;
    float acc[2][4][4];
#pragma unroll
    for (int a = 0; a < 2; a++)
#pragma unroll
        for (int b = 0; b < 4; b++)
#pragma unroll
            for (int c = 0; c < 4; c++) acc[a][b][c] = 0.0f;
    L ld;
    ld.load(w, wrow0 + ar, nrows, k_dim, ac);
    const u16* xrow = xs + (i64)(r0 + bn) * k_dim + bc;
    uint4 xb = make_uint4(0u, 0u, 0u, 0u);
    if (bn < cnt) xb = *(const uint4*)xrow;
    for (int k0 = 0; k0 < k_dim; k0 += PF_BK) {
        {
            u32 hw[8];
            ld.store(hw);
            uint4* dst = (uint4*)(As + ar * PF_SA + ac);
            dst[0] = make_uint4(hw[0], hw[1], hw[2], hw[3]);
            dst[1] = make_uint4(hw[4], hw[5], hw[6], hw[7]);
            *(uint4*)(Bs + bn * PF_SA + bc) = xb;
        }
        __syncthreads();
        if (k0 + PF_BK < k_dim) {
            ld.load(w, wrow0 + ar, nrows, k_dim, k0 + PF_BK + ac);
            if (bn < cnt) xb = *(const uint4*)(xrow + k0 + PF_BK);
        }
#pragma unroll
        for (int kk = 0; kk < PF_BK; kk += 16) {
            u32 af[2][4], bf[4][2];
#pragma unroll
            for (int mi = 0; mi < 2; mi++) {
                const u16* p = As + (wm + mi * 16 + g) * PF_SA + kk + t4 * 2;
                af[mi][0] = *(const u32*)p;
                af[mi][1] = *(const u32*)(p + 8 * PF_SA);
                af[mi][2] = *(const u32*)(p + 8);
                af[mi][3] = *(const u32*)(p + 8 * PF_SA + 8);
            }
#pragma unroll
            for (int ni = 0; ni < 4; ni++) {
                const u16* p = Bs + (wn + ni * 8 + g) * PF_SA + kk + t4 * 2;
                bf[ni][0] = *(const u32*)p;
                bf[ni][1] = *(const u32*)(p + 8);
            }
#pragma unroll
            for (int mi = 0; mi < 2; mi++)
#pragma unroll
                for (int ni = 0; ni < 4; ni++) mma16816(acc[mi][ni], af[mi], bf[ni]);
        }
        __syncthreads();
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

#define DS4_PF_MM(T, L)                                                                          \
    extern "C" __global__ void __launch_bounds__(256)                                            \
        pf_mm_##T(const u8* __restrict__ wa, const u8* __restrict__ wb, i64 expert_bytes,        \
                  int rows_a, int m_total, int k_dim, const int* __restrict__ n_tiles,           \
                  const int* __restrict__ tiles, const u16* __restrict__ xs,                     \
                  float* __restrict__ out) {                                                     \
        pf_mm_body<L>(wa, wb, expert_bytes, rows_a, m_total, k_dim, n_tiles, tiles, xs, out);    \
    }

DS4_PF_MM(f32, PfGen_f32)
DS4_PF_MM(f16, PfGen_f16)
DS4_PF_MM(q8_0, PfQ80)
DS4_PF_MM(q2_k, PfQ2K)
DS4_PF_MM(q4_k, PfGen_q4_k)
DS4_PF_MM(iq2_xxs, PfIq2)
