// ds4 CUDA kernels: quantized matrix-vector (decode), matrix-matrix (prefill), grouped MoE
// matvec and dequantization, for weights stored as F32, F16, Q8_0 (repacked), Q2_K, Q4_K and
// IQ2_XXS (model.md §5). Compiled at run time by NVRTC (backend/cuda/compile.rs); the host
// prepends a generated prelude that defines `ds4_iq2_grid` / `ds4_iq2_signs` (derived from the
// CPU reference dequantizer, so CPU and GPU share one source of truth for the tables).
//
// Conventions shared by every kernel:
// * A weight matrix is `n_rows x n_cols`, row-major; output `o` is row `o` . x.
// * Matvec/MoE kernels: one warp per output row, 8 warps (8 rows) per block. Each lane walks
//   the row's "units" (a fixed slice of a quant block) lane, lane+32, ... so a warp's loads of
//   one iteration cover a contiguous stretch of the row (coalesced), then a butterfly shuffle
//   reduction combines the lanes. The summation order depends only on n_cols, never on timing:
//   results are bit-identical from run to run (no atomics anywhere).
// * Q8_0 is stored repacked on the GPU (see `repack_q8_0` in device.rs): per matrix, a plane of
//   int8 codes (n_rows x n_cols) followed by a plane of f16 scales (n_rows x n_cols/32). The
//   GGML block of 34 bytes is only 2-byte aligned, which would force 2-byte loads; the planes
//   allow 16-byte loads.
// * Activations are f32 (the engine's exact mode); dequantized weights are formed exactly as the
//   CPU reference does (`__fmul_rn` etc. stop FMA contraction) where bit-exactness matters (the
//   dequantize kernels); the dot kernels factor the block scale out of the inner sums, which is
//   the same function up to f32 rounding.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

#define WARPS_PER_BLOCK 8
#define MM_TOKENS 8

__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ u16 ld16(const u8* p) { return *(const u16*)p; }
__device__ __forceinline__ u32 ld32(const u8* p) { return *(const u32*)p; }

// Byte k of v (0..255) as an exact float without the int->float converter (quarter rate on
// Hopper): place the byte under the exponent of 2^23 and subtract 2^23.
__device__ __forceinline__ float bytef(u32 v, int k) {
    return __int_as_float(__byte_perm(v, 0x4B000000u, 0x7440 | k)) - 8388608.0f;
}

// Signed byte k of v (int8) as an exact float: flip the sign bit so the byte is q+128, then
// subtract 2^23 + 128.
__device__ __forceinline__ float sbytef(u32 v, int k) {
    return __int_as_float(__byte_perm(v ^ 0x80808080u, 0x4B000000u, 0x7440 | k)) - 8388736.0f;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
    return v;
}

// Load of the IQ2_XXS tables into shared memory: the grid as floats (8 per entry, read as two
// float4) and the 128 sign patterns. Done once per block; every kernel that uses them calls it
// before any early return so that __syncthreads is reached by all threads.
struct Iq2Smem {
    float grid[256 * 8];
    u8 signs[128];
};

__device__ __forceinline__ void load_iq2_tables(Iq2Smem* s) {
    for (int i = threadIdx.x; i < 256 * 8; i += blockDim.x)
        s->grid[i] = ds4_iq2_gridf[i];
    for (int i = threadIdx.x; i < 128; i += blockDim.x) s->signs[i] = ds4_iq2_signs[i];
    __syncthreads();
}

// x pointer of token t of a tile with nt valid tokens: tokens past the end re-read the last
// valid one (their results are discarded), which keeps the inner loops branch-free.
__device__ __forceinline__ const float* tok(const float* x, i64 ldx, int t, int nt) {
    return x + (i64)(t < nt ? t : nt - 1) * ldx;
}

// ---------------------------------------------------------------------------------------------
// Per-type row dot products: `acc[t] += row_o . x_t` for the NT tokens of a tile, over this
// lane's units. Each type is a struct with `load` (global reads of one unit into registers)
// and `dot` (decode + FMAs). `dot_row` first issues the loads of UNR units, then computes
// them: decode matvecs are latency-bound unless a lane has several independent loads in
// flight (a 4096x4096 IQ2_XXS matrix is only 4.3 MB, about one microsecond of HBM time).
// ---------------------------------------------------------------------------------------------

struct RowCtx {
    const u8* w;  // matrix base (one expert)
    int o;        // row
    int n_rows;
    int n_cols;
};

template <class U, int NT, int UNR>
__device__ __forceinline__ void dot_row(const RowCtx& c, const float* x, i64 ldx, int nt,
                                        float* acc, const Iq2Smem* tb) {
    const int units = U::units(c.n_cols);
    for (int u0 = threadIdx.x & 31; u0 < units; u0 += 32 * UNR) {
        U r[UNR];
#pragma unroll
        for (int k = 0; k < UNR; k++)
            if (u0 + 32 * k < units) r[k].load(c, u0 + 32 * k);
#pragma unroll
        for (int k = 0; k < UNR; k++)
            if (u0 + 32 * k < units) r[k].template dot<NT>(c, u0 + 32 * k, x, ldx, nt, acc, tb);
    }
}

// F32: unit = 4 elements (one float4).
struct UF32 {
    float4 a;
    static __device__ __forceinline__ int units(int n_cols) { return n_cols >> 2; }
    __device__ __forceinline__ void load(const RowCtx& c, int u) {
        a = ((const float4*)(c.w + (i64)c.o * c.n_cols * 4))[u];
    }
    template <int NT>
    __device__ __forceinline__ void dot(const RowCtx&, int u, const float* x, i64 ldx, int nt,
                                        float* acc, const Iq2Smem*) const {
#pragma unroll
        for (int t = 0; t < NT; t++) {
            float4 b = ((const float4*)tok(x, ldx, t, nt))[u];
            float s = acc[t];
            s = fmaf(a.x, b.x, s);
            s = fmaf(a.y, b.y, s);
            s = fmaf(a.z, b.z, s);
            s = fmaf(a.w, b.w, s);
            acc[t] = s;
        }
    }
};

// F16: unit = 8 elements (one 16-byte load).
struct UF16 {
    uint4 q;
    static __device__ __forceinline__ int units(int n_cols) { return n_cols >> 3; }
    __device__ __forceinline__ void load(const RowCtx& c, int u) {
        q = ((const uint4*)(c.w + (i64)c.o * c.n_cols * 2))[u];
    }
    template <int NT>
    __device__ __forceinline__ void dot(const RowCtx&, int u, const float* x, i64 ldx, int nt,
                                        float* acc, const Iq2Smem*) const {
        float v[8];
        u32 words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            v[2 * i] = h2f((u16)(words[i] & 0xffff));
            v[2 * i + 1] = h2f((u16)(words[i] >> 16));
        }
#pragma unroll
        for (int t = 0; t < NT; t++) {
            const float4* xv = (const float4*)(tok(x, ldx, t, nt) + 8 * u);
            float4 b0 = xv[0], b1 = xv[1];
            float s = acc[t];
            s = fmaf(v[0], b0.x, s);
            s = fmaf(v[1], b0.y, s);
            s = fmaf(v[2], b0.z, s);
            s = fmaf(v[3], b0.w, s);
            s = fmaf(v[4], b1.x, s);
            s = fmaf(v[5], b1.y, s);
            s = fmaf(v[6], b1.z, s);
            s = fmaf(v[7], b1.w, s);
            acc[t] = s;
        }
    }
};

// Q8_0 (repacked planes): unit = one 32-element block: 32 code bytes (two 16-byte loads) and
// one f16 scale.
struct UQ8_0 {
    uint4 q0, q1;
    u16 d;
    static __device__ __forceinline__ int units(int n_cols) { return n_cols >> 5; }
    __device__ __forceinline__ void load(const RowCtx& c, int b) {
        const uint4* qrow = (const uint4*)(c.w + (i64)c.o * c.n_cols);
        q0 = qrow[2 * b];
        q1 = qrow[2 * b + 1];
        d = ((const u16*)(c.w + (i64)c.n_rows * c.n_cols))[(i64)c.o * (c.n_cols >> 5) + b];
    }
    template <int NT>
    __device__ __forceinline__ void dot(const RowCtx&, int b, const float* x, i64 ldx, int nt,
                                        float* acc, const Iq2Smem*) const {
        float df = h2f(d);
        u32 words[8] = {q0.x, q0.y, q0.z, q0.w, q1.x, q1.y, q1.z, q1.w};
#pragma unroll
        for (int t = 0; t < NT; t++) {
            const float4* xv = (const float4*)(tok(x, ldx, t, nt) + 32 * b);
            // Two partial sums halve the dependent FMA chain.
            float s0 = 0.0f, s1 = 0.0f;
#pragma unroll
            for (int i = 0; i < 8; i += 2) {
                float4 xa = xv[i], xb = xv[i + 1];
                s0 = fmaf(sbytef(words[i], 0), xa.x, s0);
                s0 = fmaf(sbytef(words[i], 1), xa.y, s0);
                s0 = fmaf(sbytef(words[i], 2), xa.z, s0);
                s0 = fmaf(sbytef(words[i], 3), xa.w, s0);
                s1 = fmaf(sbytef(words[i + 1], 0), xb.x, s1);
                s1 = fmaf(sbytef(words[i + 1], 1), xb.y, s1);
                s1 = fmaf(sbytef(words[i + 1], 2), xb.z, s1);
                s1 = fmaf(sbytef(words[i + 1], 3), xb.w, s1);
            }
            acc[t] = fmaf(df, s0 + s1, acc[t]);
        }
    }
};

// Q2_K: unit = 64 elements sharing 16 code bytes: half h (elements 128h..128h+127) and
// l-half lh (l in 16lh..16lh+15); the four 2-bit planes j of those bytes are the elements
// 128h + 32j + 16lh + i with group scale byte 8h + 2j + lh. Four units per 84-byte block.
struct UQ2_K {
    u32 dd, sc0, sc1, q[4];
    static __device__ __forceinline__ int units(int n_cols) { return (n_cols >> 8) * 4; }
    __device__ __forceinline__ void load(const RowCtx& c, int u) {
        const u8* p = c.w + ((i64)c.o * (c.n_cols >> 8) + (u >> 2)) * 84;
        int h = (u >> 1) & 1, lh = u & 1;
        dd = ld32(p + 80);
        sc0 = ld32(p + 8 * h);
        sc1 = ld32(p + 8 * h + 4);
        const u8* qp = p + 16 + 32 * h + 16 * lh;
#pragma unroll
        for (int i = 0; i < 4; i++) q[i] = ld32(qp + 4 * i);
    }
    template <int NT>
    __device__ __forceinline__ void dot(const RowCtx&, int u, const float* x, i64 ldx, int nt,
                                        float* acc, const Iq2Smem*) const {
        int h = (u >> 1) & 1, lh = u & 1;
        float d = h2f((u16)(dd & 0xffff)), dmin = h2f((u16)(dd >> 16));
        int e0 = (u >> 2) * 256 + 128 * h + 16 * lh;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            u32 sc = ((j < 2 ? sc0 : sc1) >> (8 * (2 * (j & 1) + lh))) & 255;
            float dl = d * (float)(sc & 15);
            float ml = dmin * (float)(sc >> 4);
            u32 m[4];
#pragma unroll
            for (int i = 0; i < 4; i++) m[i] = (q[i] >> (2 * j)) & 0x03030303u;
#pragma unroll
            for (int t = 0; t < NT; t++) {
                const float4* xv = (const float4*)(tok(x, ldx, t, nt) + e0 + 32 * j);
                float sq = 0.0f, sx = 0.0f;
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    float4 xx = xv[i];
                    sq = fmaf(bytef(m[i], 0), xx.x, sq);
                    sq = fmaf(bytef(m[i], 1), xx.y, sq);
                    sq = fmaf(bytef(m[i], 2), xx.z, sq);
                    sq = fmaf(bytef(m[i], 3), xx.w, sq);
                    sx += (xx.x + xx.y) + (xx.z + xx.w);
                }
                acc[t] = fmaf(dl, sq, fmaf(-ml, sx, acc[t]));
            }
        }
    }
};

// Q4_K scale/min of sub-block s from the 12 scale bytes held in three words.
__device__ __forceinline__ u32 sbyte(const u32* s, int i) { return (s[i >> 2] >> (8 * (i & 3))) & 255; }

__device__ __forceinline__ void q4k_scale_min(const u32* s, int sb, u32* sc, u32* m) {
    if (sb < 4) {
        *sc = sbyte(s, sb) & 63;
        *m = sbyte(s, sb + 4) & 63;
    } else {
        *sc = (sbyte(s, sb + 4) & 15) | ((sbyte(s, sb - 4) >> 6) << 4);
        *m = (sbyte(s, sb + 4) >> 4) | ((sbyte(s, sb) >> 6) << 4);
    }
}

// Q4_K: unit = chunk c of 64 elements = 32 code bytes (two 16-byte loads): low nibbles are
// sub-block 2c, high nibbles sub-block 2c+1. Four units per 144-byte block.
struct UQ4_K {
    u32 dd, s[3];
    uint4 qa, qb;
    static __device__ __forceinline__ int units(int n_cols) { return (n_cols >> 8) * 4; }
    __device__ __forceinline__ void load(const RowCtx& c, int u) {
        const u8* p = c.w + ((i64)c.o * (c.n_cols >> 8) + (u >> 2)) * 144;
        int ch = u & 3;
        uint4 head = *(const uint4*)p;  // d, dmin, scales[12]
        dd = head.x;
        s[0] = head.y;
        s[1] = head.z;
        s[2] = head.w;
        qa = *(const uint4*)(p + 16 + 32 * ch);
        qb = *(const uint4*)(p + 32 + 32 * ch);
    }
    template <int NT>
    __device__ __forceinline__ void dot(const RowCtx&, int u, const float* x, i64 ldx, int nt,
                                        float* acc, const Iq2Smem*) const {
        int ch = u & 3;
        float d = h2f((u16)(dd & 0xffff)), dmin = h2f((u16)(dd >> 16));
        u32 q[8] = {qa.x, qa.y, qa.z, qa.w, qb.x, qb.y, qb.z, qb.w};
        int e0 = (u >> 2) * 256 + 64 * ch;
#pragma unroll
        for (int hi = 0; hi < 2; hi++) {
            u32 sc, mn;
            q4k_scale_min(s, 2 * ch + hi, &sc, &mn);
            float dl = d * (float)sc;
            float ml = dmin * (float)mn;
#pragma unroll
            for (int t = 0; t < NT; t++) {
                const float4* xv = (const float4*)(tok(x, ldx, t, nt) + e0 + 32 * hi);
                float sq = 0.0f, sx = 0.0f;
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    u32 m = (q[i] >> (4 * hi)) & 0x0f0f0f0fu;
                    float4 xx = xv[i];
                    sq = fmaf(bytef(m, 0), xx.x, sq);
                    sq = fmaf(bytef(m, 1), xx.y, sq);
                    sq = fmaf(bytef(m, 2), xx.z, sq);
                    sq = fmaf(bytef(m, 3), xx.w, sq);
                    sx += (xx.x + xx.y) + (xx.z + xx.w);
                }
                acc[t] = fmaf(dl, sq, fmaf(-ml, sx, acc[t]));
            }
        }
    }
};

// IQ2_XXS: unit = one group of 32 elements (8 bytes after the block's f16 d). The 66-byte
// block is only 2-byte aligned, so the group is read as four u16.
struct UIQ2_XXS {
    u16 d, g[4];
    static __device__ __forceinline__ int units(int n_cols) { return (n_cols >> 8) * 8; }
    __device__ __forceinline__ void load(const RowCtx& c, int u) {
        const u8* p = c.w + ((i64)c.o * (c.n_cols >> 8) + (u >> 3)) * 66;
        const u16* gp = (const u16*)(p + 2 + 8 * (u & 7));
        d = *(const u16*)p;
#pragma unroll
        for (int i = 0; i < 4; i++) g[i] = gp[i];
    }
    template <int NT>
    __device__ __forceinline__ void dot(const RowCtx&, int u, const float* x, i64 ldx, int nt,
                                        float* acc, const Iq2Smem* tb) const {
        u32 a = (u32)g[0] | ((u32)g[1] << 16);
        u32 b = (u32)g[2] | ((u32)g[3] << 16);
        float db = h2f(d) * (0.5f + (float)(b >> 28)) * 0.25f;
        float s[NT];
#pragma unroll
        for (int t = 0; t < NT; t++) s[t] = 0.0f;
#pragma unroll
        for (int l = 0; l < 4; l++) {
            const float4* gr = (const float4*)(tb->grid + ((a >> (8 * l)) & 255) * 8);
            float4 g0 = gr[0], g1 = gr[1];
            u32 sg = tb->signs[(b >> (7 * l)) & 127];
            float v[8] = {g0.x, g0.y, g0.z, g0.w, g1.x, g1.y, g1.z, g1.w};
#pragma unroll
            for (int k = 0; k < 8; k++)
                v[k] = __int_as_float(__float_as_int(v[k]) ^ ((sg << (31 - k)) & 0x80000000u));
#pragma unroll
            for (int t = 0; t < NT; t++) {
                const float4* xv = (const float4*)(tok(x, ldx, t, nt) + 32 * u + 8 * l);
                float4 x0 = xv[0], x1 = xv[1];
                float z = s[t];
                z = fmaf(v[0], x0.x, z);
                z = fmaf(v[1], x0.y, z);
                z = fmaf(v[2], x0.z, z);
                z = fmaf(v[3], x0.w, z);
                z = fmaf(v[4], x1.x, z);
                z = fmaf(v[5], x1.y, z);
                z = fmaf(v[6], x1.z, z);
                z = fmaf(v[7], x1.w, z);
                s[t] = z;
            }
        }
#pragma unroll
        for (int t = 0; t < NT; t++) acc[t] = fmaf(db, s[t], acc[t]);
    }
};

// ---------------------------------------------------------------------------------------------
// Exact dequantization of one unit (same operation order as the CPU reference, no FMA
// contraction), used by the dequantize kernels. `out` receives `unit_elems` values.
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ void deq_f32(const u8* w, int o, int n_rows, int n_cols, int u, float* out) {
    float4 a = ((const float4*)(w + (i64)o * n_cols * 4))[u];
    out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
}

__device__ __forceinline__ void deq_f16(const u8* w, int o, int n_rows, int n_cols, int u, float* out) {
    const u16* row = (const u16*)(w + (i64)o * n_cols * 2);
    for (int i = 0; i < 8; i++) out[i] = h2f(row[8 * u + i]);
}

__device__ __forceinline__ void deq_q8_0(const u8* w, int o, int n_rows, int n_cols, int u, float* out) {
    int nb = n_cols >> 5;
    const signed char* q = (const signed char*)(w + (i64)o * n_cols + 32 * u);
    float d = h2f(((const u16*)(w + (i64)n_rows * n_cols))[(i64)o * nb + u]);
    for (int i = 0; i < 32; i++) out[i] = __fmul_rn(d, (float)q[i]);
}

__device__ __forceinline__ void deq_q2_k(const u8* w, int o, int n_rows, int n_cols, int u, float* out) {
    // unit = one 16-element group g of block u/16
    int nblk = n_cols >> 8;
    const u8* p = w + ((i64)o * nblk + (u >> 4)) * 84;
    int g = u & 15;
    float d = h2f(ld16(p + 80)), dmin = h2f(ld16(p + 82));
    u32 sc = p[g];
    float dl = __fmul_rn(d, (float)(sc & 15));
    float ml = __fmul_rn(dmin, (float)(sc >> 4));
    for (int i = 0; i < 16; i++) {
        int e = 16 * g + i;
        u32 q = (p[16 + 32 * (e >> 7) + (e & 31)] >> (2 * ((e & 127) >> 5))) & 3;
        out[i] = __fsub_rn(__fmul_rn(dl, (float)q), ml);
    }
}

__device__ __forceinline__ void deq_q4_k(const u8* w, int o, int n_rows, int n_cols, int u, float* out) {
    // unit = one 32-element sub-block s of block u/8
    int nblk = n_cols >> 8;
    const u8* p = w + ((i64)o * nblk + (u >> 3)) * 144;
    int sb = u & 7;
    float d = h2f(ld16(p)), dmin = h2f(ld16(p + 2));
    u32 s[3] = {ld32(p + 4), ld32(p + 8), ld32(p + 12)};
    u32 sc, mn;
    q4k_scale_min(s, sb, &sc, &mn);
    float dl = __fmul_rn(d, (float)sc);
    float ml = __fmul_rn(dmin, (float)mn);
    const u8* qs = p + 16 + 32 * (sb >> 1);
    for (int l = 0; l < 32; l++) {
        u32 q = (qs[l] >> (4 * (sb & 1))) & 15;
        out[l] = __fsub_rn(__fmul_rn(dl, (float)q), ml);
    }
}

__device__ __forceinline__ void deq_iq2_xxs(const u8* w, int o, int n_rows, int n_cols, int u, float* out) {
    int nblk = n_cols >> 8;
    const u8* p = w + ((i64)o * nblk + (u >> 3)) * 66;
    const u8* g = p + 2 + 8 * (u & 7);
    float d = h2f(ld16(p));
    u32 a = (u32)ld16(g) | ((u32)ld16(g + 2) << 16);
    u32 b = (u32)ld16(g + 4) | ((u32)ld16(g + 6) << 16);
    float db = __fmul_rn(__fmul_rn(d, __fadd_rn(0.5f, (float)(b >> 28))), 0.25f);
    for (int l = 0; l < 4; l++) {
        u64 grid = ds4_iq2_grid[(a >> (8 * l)) & 255];
        u32 sg = ds4_iq2_signs[(b >> (7 * l)) & 127];
        for (int k = 0; k < 8; k++) {
            float v = __fmul_rn(db, (float)((grid >> (8 * k)) & 255));
            out[8 * l + k] = (sg >> k) & 1 ? -v : v;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Kernels, instantiated per type by a macro (extern "C" names: mv_<t>, mm_<t>, dq_<t>).
// ---------------------------------------------------------------------------------------------

// mv_<t>: grouped matvec. blockIdx.y = slot; the slot's matrix is expert ids[slot] (expert 0
// when ids is null) at `expert_bytes` stride; its input is x + slot*x_stride (x_stride 0 =
// all slots share x) and its output y + slot*n_rows. A plain matvec is the one-slot case.
//
// mm_<t>: y[t][o] = row_o . x[t] for n_tok tokens (x: n_tok x n_cols, y: n_tok x n_rows,
// row-major like the CPU `matmul`); blockIdx.y = tile of MM_TOKENS tokens, so each weight
// unit is decoded once per tile.
//
// dq_<t>: dequantize the matrix to f16 (row-major n_rows x n_cols) for library GEMMs; one
// thread per dequantization unit.
// Shared memory for the IQ2_XXS tables only in the kernels that use them (a 16-byte dummy
// otherwise): unused shared memory would come out of the L1 that caches the activations.
#define DS4_TABLES(USES_TABLES)                                                                  \
    __shared__ float4 tables_raw_[USES_TABLES ? (sizeof(Iq2Smem) + 15) / 16 : 1];                \
    const Iq2Smem* tables_ = (const Iq2Smem*)tables_raw_;                                        \
    if (USES_TABLES) load_iq2_tables((Iq2Smem*)tables_raw_);

#define DS4_KERNELS(T, U, USES_TABLES, DQ_ELEMS)                                                     \
    extern "C" __global__ void __launch_bounds__(256)                                            \
        mv_##T(const u8* __restrict__ w, i64 expert_bytes, const int* __restrict__ ids,          \
               int n_rows, int n_cols, const float* __restrict__ x, i64 x_stride,                \
               float* __restrict__ y) {                                                          \
        DS4_TABLES(USES_TABLES)                                                                  \
        int slot = blockIdx.y;                                                                   \
        int o = blockIdx.x * WARPS_PER_BLOCK + (threadIdx.x >> 5);                               \
        if (o >= n_rows) return;                                                                 \
        const u8* wb = w + (ids ? (i64)ids[slot] : 0) * expert_bytes;                            \
        float acc[1] = {0.0f};                                                                   \
        RowCtx c = {wb, o, n_rows, n_cols};                                                      \
        dot_row<U, 1, 4>(c, x + slot * x_stride, 0, 1, acc, tables_);                            \
        float r = warp_sum(acc[0]);                                                              \
        if ((threadIdx.x & 31) == 0) y[(i64)slot * n_rows + o] = r;                              \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(256)                                            \
        mm_##T(const u8* __restrict__ w, int n_rows, int n_cols, const float* __restrict__ x,    \
               int n_tok, float* __restrict__ y) {                                               \
        DS4_TABLES(USES_TABLES)                                                                  \
        int o = blockIdx.x * WARPS_PER_BLOCK + (threadIdx.x >> 5);                               \
        if (o >= n_rows) return;                                                                 \
        int t0 = blockIdx.y * MM_TOKENS;                                                         \
        int nt = min(MM_TOKENS, n_tok - t0);                                                     \
        float acc[MM_TOKENS];                                                                    \
        _Pragma("unroll") for (int t = 0; t < MM_TOKENS; t++) acc[t] = 0.0f;                     \
        RowCtx c = {w, o, n_rows, n_cols};                                                       \
        dot_row<U, MM_TOKENS, 1>(c, x + (i64)t0 * n_cols, n_cols, nt, acc, tables_);             \
        _Pragma("unroll") for (int t = 0; t < MM_TOKENS; t++) {                                  \
            float r = warp_sum(acc[t]);                                                          \
            if ((threadIdx.x & 31) == 0 && t < nt) y[(i64)(t0 + t) * n_rows + o] = r;            \
        }                                                                                        \
    }                                                                                            \
    extern "C" __global__ void dq_##T(const u8* __restrict__ w, int n_rows, int n_cols,          \
                                      u16* __restrict__ out) {                                   \
        i64 upr = n_cols / DQ_ELEMS;                                                             \
        i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;                                      \
        if (i >= upr * n_rows) return;                                                           \
        int o = (int)(i / upr), u = (int)(i % upr);                                              \
        float v[DQ_ELEMS];                                                                       \
        deq_##T(w, o, n_rows, n_cols, u, v);                                                     \
        u16* dst = out + (i64)o * n_cols + (i64)u * DQ_ELEMS;                                    \
        for (int k = 0; k < DQ_ELEMS; k++) dst[k] = f2h(v[k]);                                   \
    }

DS4_KERNELS(f32, UF32, 0, 4)
DS4_KERNELS(f16, UF16, 0, 8)
DS4_KERNELS(q8_0, UQ8_0, 0, 32)
DS4_KERNELS(q2_k, UQ2_K, 0, 16)
DS4_KERNELS(q4_k, UQ4_K, 0, 32)
DS4_KERNELS(iq2_xxs, UIQ2_XXS, 1, 32)

// f32 -> f16 (round to nearest even), for the activations of the f16 GEMM path.
extern "C" __global__ void f32_to_f16(const float* __restrict__ x, u16* __restrict__ y, i64 n) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = f2h(x[i]);
}

// Dequantize to f32 (exact, used by the self-test to compare against the CPU bit for bit).
#define DS4_DQ32(T, DQ_ELEMS)                                                                    \
    extern "C" __global__ void dq32_##T(const u8* __restrict__ w, int n_rows, int n_cols,        \
                                        float* __restrict__ out) {                               \
        i64 upr = n_cols / DQ_ELEMS;                                                             \
        i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;                                      \
        if (i >= upr * n_rows) return;                                                           \
        int o = (int)(i / upr), u = (int)(i % upr);                                              \
        float v[DQ_ELEMS];                                                                       \
        deq_##T(w, o, n_rows, n_cols, u, v);                                                     \
        float* dst = out + (i64)o * n_cols + (i64)u * DQ_ELEMS;                                  \
        for (int k = 0; k < DQ_ELEMS; k++) dst[k] = v[k];                                        \
    }

DS4_DQ32(f32, 4)
DS4_DQ32(f16, 8)
DS4_DQ32(q8_0, 32)
DS4_DQ32(q2_k, 16)
DS4_DQ32(q4_k, 32)
DS4_DQ32(iq2_xxs, 32)
