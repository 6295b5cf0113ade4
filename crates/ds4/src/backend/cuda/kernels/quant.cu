// ds4 CUDA kernels: quantized matrix-vector (decode), matrix-matrix (prefill), grouped MoE
// matvec and dequantization, for weights stored as F32, F16, Q8_0 (repacked), Q2_K, Q4_K and
// IQ2_XXS (model.md §5). Compiled at run time by NVRTC (backend/cuda/compile.rs); the host
// prepends a generated prelude that defines `ds4_iq2_grid` / `ds4_iq2_signs` (derived from the
// CPU reference dequantizer, so CPU and GPU share one source of truth for the tables).
//
// Conventions shared by every kernel:
// * A weight matrix is `n_rows x n_cols`, row-major; output `o` is row `o` . x.
// * Matvec/MoE kernels: `split` warps per output row (1, 2, 4 or 8; the host picks more for
//   matrices with few rows, so enough loads are in flight), 8 warps per block; a warp walks
//   its share of the row 256 elements at a time (lane l: elements 8l..8l+7, see dot_row), a
//   butterfly shuffle reduction combines the lanes, and the split parts are added in warp
//   order. The summation order depends only on n_cols, never on timing:
//   results are bit-identical from run to run (no atomics anywhere).
// * Q8_0 is stored repacked on the GPU (see `repack_q8_0` in device.rs): per matrix, a plane of
//   int8 codes (n_rows x n_cols) followed by a plane of f16 scales (n_rows x n_cols/32). The
//   GGML block of 34 bytes is only 2-byte aligned, which would force 2-byte loads; the planes
//   allow 16-byte loads. IQ2_XXS rows are regrouped by 8 blocks (`repack_iq2_xxs`, `iq2_codes`
//   below) for the same reason; the other types keep the file's blocks.
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

// Development aid (DS4_CUDA_NVRTC_DEFS="DS4_PROBE=1"): PROBE(k, i) stores the global timer (ns)
// from thread 0 of block b at ds4_probe[1024k + 8(b % 128) + i]; `ds4 cuda model` writes the
// array out under DS4_CUDA_PROBE_OUT. Compiled out otherwise.
#ifdef DS4_PROBE
__device__ unsigned long long ds4_probe[8192];
__device__ __forceinline__ void probe_at(int k, int i) {
    if (threadIdx.x == 0) {
        unsigned long long t;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
        ds4_probe[k * 1024 + (blockIdx.x & 127) * 8 + i] = t;
    }
}
#define PROBE(k, i) probe_at(k, i)
#else
#define PROBE(k, i) \
    do {             \
    } while (0)
#endif
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

// bf16 of lo (low half) and hi, each rounded to nearest even.
__device__ __forceinline__ u32 pack_bf2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// Programmatic dependent launch (production decode graph, see CudaBackend::set_pdl): a
// kernel launched with programmatic stream serialization may start before the previous
// kernel of the stream has finished. Every kernel that can be launched so calls this first,
// in every thread, before touching memory: it lets the next kernel's launch begin
// (`launch_dependents`) and then waits until the previous grid has completed and its writes
// are visible (`wait`; a no-op for an ordinary launch). Since each such kernel waits for its
// predecessor before it can finish, completion stays ordered along the whole stream.
__device__ __forceinline__ void pdl_enter() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
// pdl_enter in two halves, for kernels that read what no kernel writes (the weights) in
// between: blocks that start early, during the previous kernel's last wave or beside a
// one-block kernel, have their weight loads in flight while they wait. Everything an earlier
// kernel writes is read, and every output is written, after pdl_wait.
// (PDL needs sm_90; older cards never launch with it, so there these are no-ops.)
// Caution: ptxas may issue a load through a `const __restrict__` pointer (ld.global.nc) ahead
// of griddepcontrol.wait (seen in k_topk1_1: the position's load). Today every such early load
// reads the position (a host copy before the graph), a weight or a table; an output of an
// earlier kernel read that way could be read stale, so check the SASS (bench/pdl_audit.py lists
// the loads before each wait) when a PDL kernel's reads change.
__device__ __forceinline__ void pdl_trigger() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ u16 ld16(const u8* p) { return *(const u16*)p; }
__device__ __forceinline__ u32 ld32(const u8* p) { return *(const u32*)p; }

// PTX prmt: bytes of {y, x} picked by the four selector nibbles s[15:0] (bit 3 of a nibble
// replicates the byte's sign bit; every caller leaves it 0). Unlike __byte_perm, whose
// definition ignores those bits (so the compiler masks s with 0x7777) and s[31:16].
__device__ __forceinline__ u32 prmt(u32 x, u32 y, u32 s) {
    u32 r;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(x), "r"(y), "r"(s));
    return r;
}

// IQ2_XXS device layout (device.rs `repack_iq2_xxs`): a row keeps its bytes (66 per 256-column
// block) but its blocks are regrouped by 8: group k (blocks 8k..8k+m-1, m = 8 except maybe in
// the last group) holds their 64-byte code parts in order, then their m f16 scales. With
// 2048-column multiples every code part starts 64 bytes into a 16-byte-aligned 528-byte
// group, so lanes read codes with aligned vector loads (the file's blocks leave them only
// 2-byte aligned) and the staged prefill kernels copy a block as 4 aligned 16-byte chunks
// plus its group's scale chunk. nb = blocks per row.
__device__ __forceinline__ const u8* iq2_codes(const u8* row, int b) {
    return row + 528 * (b >> 3) + 64 * (b & 7);
}
__device__ __forceinline__ u16 iq2_scale(const u8* row, int b, int nb) {
    const int g = b & ~7, m = min(8, nb - g);
    return ld16(row + 66 * g + 64 * m + 2 * (b & 7));
}

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
// Per-type row dot products: `acc[t] += row_o . x_t` for the NT tokens of a tile.
//
// Mapping: a warp walks the row in steps of 256 elements (one K-quant block); in each step
// lane l owns elements 8l..8l+7. Consecutive lanes therefore read consecutive activations
// (two coalesced float4 loads per lane) and consecutive bytes of the weight block. (A first
// version gave each lane a whole quant group; its activation loads touched 32 cache lines
// per warp instruction and ran at ~10% of HBM bandwidth.)
//
// Each type is a struct with `load` (the lane's global weight reads for one step, into
// registers) and `dot` (decode + FMAs). `dot_row` issues the loads of UNR steps before
// computing any of them, so a lane keeps several independent loads in flight: decode
// matvecs are latency-bound otherwise (a 4096x4096 IQ2_XXS matrix is ~1 us of HBM time).
// Lanes whose elements lie past n_cols (n_cols not a multiple of 256) sit the step out.
// ---------------------------------------------------------------------------------------------

struct RowCtx {
    const u8* w;  // matrix base (one expert)
    int o;        // row
    int n_rows;
    int n_cols;
};

// The lane's 8 activations of token t at element e0.
struct X8 {
    float4 a, b;
};
__device__ __forceinline__ X8 load_x8(const float* x, int e0) {
    const float4* p = (const float4*)(x + e0);
    X8 r;
    r.a = p[0];
    r.b = p[1];
    return r;
}

__device__ __forceinline__ float dot8(const float* v, const X8& x, float s) {
    s = fmaf(v[0], x.a.x, s);
    s = fmaf(v[1], x.a.y, s);
    s = fmaf(v[2], x.a.z, s);
    s = fmaf(v[3], x.a.w, s);
    s = fmaf(v[4], x.b.x, s);
    s = fmaf(v[5], x.b.y, s);
    s = fmaf(v[6], x.b.z, s);
    s = fmaf(v[7], x.b.w, s);
    return s;
}

__device__ __forceinline__ float sum8(const X8& x) {
    return ((x.a.x + x.a.y) + (x.a.z + x.a.w)) + ((x.b.x + x.b.y) + (x.b.z + x.b.w));
}

// The warp takes steps first, first + stride, ... (stride > 1: the row is split between
// `stride` warps of the block, see mv_<t>).
template <class U, int NT, int UNR>
__device__ __forceinline__ void dot_row(const RowCtx& c, const float* x, i64 ldx, int nt,
                                        float* acc, const Iq2Smem* tb, int first, int stride) {
    const int lane = threadIdx.x & 31;
    const int steps = (c.n_cols + 255) >> 8;
    for (int s0 = first; s0 < steps; s0 += UNR * stride) {
        U r[UNR];
        bool on[UNR];
#pragma unroll
        for (int k = 0; k < UNR; k++) {
            const int sk = s0 + k * stride;
            on[k] = sk < steps && (sk << 8) + 8 * lane < c.n_cols;
            if (on[k]) r[k].load(c, sk, lane);
        }
#pragma unroll
        for (int k = 0; k < UNR; k++) {
            if (!on[k]) continue;
            const int e0 = ((s0 + k * stride) << 8) + 8 * lane;
#pragma unroll
            for (int t = 0; t < NT; t++)
                acc[t] = r[k].dot(load_x8(tok(x, ldx, t, nt), e0), lane, acc[t], tb);
        }
    }
}

// F32: the lane's 8 floats (two float4).
struct UF32 {
    float4 a, b;
    __device__ __forceinline__ void load(const RowCtx& c, int s, int lane) {
        const float4* p = (const float4*)(c.w + ((i64)c.o * c.n_cols + (s << 8) + 8 * lane) * 4);
        a = p[0];
        b = p[1];
    }
    __device__ __forceinline__ float dot(const X8& x, int, float acc, const Iq2Smem*) const {
        float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
        return dot8(v, x, acc);
    }
};

// F16: the lane's 8 halves (one 16-byte load).
struct UF16 {
    uint4 q;
    __device__ __forceinline__ void load(const RowCtx& c, int s, int lane) {
        q = *(const uint4*)(c.w + ((i64)c.o * c.n_cols + (s << 8) + 8 * lane) * 2);
    }
    __device__ __forceinline__ float dot(const X8& x, int, float acc, const Iq2Smem*) const {
        u32 w4[4] = {q.x, q.y, q.z, q.w};
        float v[8];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            v[2 * i] = h2f((u16)(w4[i] & 0xffff));
            v[2 * i + 1] = h2f((u16)(w4[i] >> 16));
        }
        return dot8(v, x, acc);
    }
};

// Q8_0 (repacked planes): 8 codes (one 8-byte load) of block (256s + 8l)/32 and its scale.
struct UQ8_0 {
    uint2 q;
    u16 d;
    __device__ __forceinline__ void load(const RowCtx& c, int s, int lane) {
        int e0 = (s << 8) + 8 * lane;
        q = *(const uint2*)(c.w + (i64)c.o * c.n_cols + e0);
        d = ((const u16*)(c.w + (i64)c.n_rows * c.n_cols))[(i64)c.o * (c.n_cols >> 5) + (e0 >> 5)];
    }
    __device__ __forceinline__ float dot(const X8& x, int, float acc, const Iq2Smem*) const {
        float v[8] = {sbytef(q.x, 0), sbytef(q.x, 1), sbytef(q.x, 2), sbytef(q.x, 3),
                      sbytef(q.y, 0), sbytef(q.y, 1), sbytef(q.y, 2), sbytef(q.y, 3)};
        return fmaf(h2f(d), dot8(v, x, 0.0f), acc);
    }
};

// Q2_K, block s, lane l: elements e = 8l+i have half l/16, plane j = (l/4)%4, code bytes
// qs[32(l/16) + 8(l%4) + i] and group (scale byte) l/2.
struct UQ2_K {
    uint2 q;
    u32 dd, sc;
    __device__ __forceinline__ void load(const RowCtx& c, int s, int lane) {
        const u8* p = c.w + ((i64)c.o * (c.n_cols >> 8) + s) * 84;
        q = make_uint2(ld32(p + 16 + 32 * (lane >> 4) + 8 * (lane & 3)),
                       ld32(p + 20 + 32 * (lane >> 4) + 8 * (lane & 3)));
        dd = ld32(p + 80);
        sc = p[lane >> 1];
    }
    __device__ __forceinline__ float dot(const X8& x, int lane, float acc, const Iq2Smem*) const {
        int j = (lane >> 2) & 3;
        u32 m0 = (q.x >> (2 * j)) & 0x03030303u, m1 = (q.y >> (2 * j)) & 0x03030303u;
        float v[8] = {bytef(m0, 0), bytef(m0, 1), bytef(m0, 2), bytef(m0, 3),
                      bytef(m1, 0), bytef(m1, 1), bytef(m1, 2), bytef(m1, 3)};
        float dl = h2f((u16)(dd & 0xffff)) * (float)(sc & 15);
        float ml = h2f((u16)(dd >> 16)) * (float)(sc >> 4);
        return fmaf(dl, dot8(v, x, 0.0f), fmaf(-ml, sum8(x), acc));
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

// Q4_K, block s, lane l: sub-block l/4, code bytes qs[32(l/8) + 8(l%4) + i], nibble (l/4)%2.
struct UQ4_K {
    uint4 head;  // d, dmin, scales[12]
    uint2 q;
    __device__ __forceinline__ void load(const RowCtx& c, int s, int lane) {
        const u8* p = c.w + ((i64)c.o * (c.n_cols >> 8) + s) * 144;
        head = *(const uint4*)p;
        q = *(const uint2*)(p + 16 + 32 * (lane >> 3) + 8 * (lane & 3));
    }
    __device__ __forceinline__ float dot(const X8& x, int lane, float acc, const Iq2Smem*) const {
        u32 scw[3] = {head.y, head.z, head.w};
        u32 sc, mn;
        q4k_scale_min(scw, lane >> 2, &sc, &mn);
        int sh = 4 * ((lane >> 2) & 1);
        u32 m0 = (q.x >> sh) & 0x0f0f0f0fu, m1 = (q.y >> sh) & 0x0f0f0f0fu;
        float v[8] = {bytef(m0, 0), bytef(m0, 1), bytef(m0, 2), bytef(m0, 3),
                      bytef(m1, 0), bytef(m1, 1), bytef(m1, 2), bytef(m1, 3)};
        float dl = h2f((u16)(head.x & 0xffff)) * (float)sc;
        float ml = h2f((u16)(head.x >> 16)) * (float)mn;
        return fmaf(dl, dot8(v, x, 0.0f), fmaf(-ml, sum8(x), acc));
    }
};

// IQ2_XXS, block s, lane l: group l/4, grid entry l%4 of it = exactly the lane's 8 elements.
// Rows of 66-byte blocks are only 2-byte aligned in general: u16 loads.
struct UIQ2_XXS {
    u16 d, b0, b1;
    u8 a;
    __device__ __forceinline__ void load(const RowCtx& c, int s, int lane) {
        const int nb = c.n_cols >> 8;
        const u8* row = c.w + (i64)c.o * nb * 66;
        const u8* g = iq2_codes(row, s) + 8 * (lane >> 2);
        d = iq2_scale(row, s, nb);
        a = g[lane & 3];
        b0 = ld16(g + 4);
        b1 = ld16(g + 6);
    }
    __device__ __forceinline__ float dot(const X8& x, int lane, float acc, const Iq2Smem* tb) const {
        u32 b = (u32)b0 | ((u32)b1 << 16);
        float db = h2f(d) * (0.5f + (float)(b >> 28)) * 0.25f;
        const float4* gr = (const float4*)(tb->grid + (u32)a * 8);
        float4 g0 = gr[0], g1 = gr[1];
        u32 sg = tb->signs[(b >> (7 * (lane & 3))) & 127];
        float v[8] = {g0.x, g0.y, g0.z, g0.w, g1.x, g1.y, g1.z, g1.w};
#pragma unroll
        for (int k = 0; k < 8; k++)
            v[k] = __int_as_float(__float_as_int(v[k]) ^ ((sg << (31 - k)) & 0x80000000u));
        return fmaf(db, dot8(v, x, 0.0f), acc);
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
    const u8* row = w + (i64)o * nblk * 66;
    const u8* g = iq2_codes(row, u >> 3) + 8 * (u & 7);
    float d = h2f(iq2_scale(row, u >> 3, nblk));
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

// The end of a row-split product (mv_<t>, mv8_<t>, mv2_f16): with split 1, lane 0 of the
// row's warp stores its sum r at yo; else the split warps' sums go through part_ (one per
// warp) and the row's first warp adds them in warp order. `on`: the warp has a row.
__device__ __forceinline__ void split_store(float r, float* part_, int warp, int part, int split,
                                            bool on, float* yo) {
    const bool l0 = (threadIdx.x & 31) == 0;
    if (split == 1) {
        if (l0 && on) *yo = r;
        return;
    }
    if (l0) part_[warp] = r;
    __syncthreads();
    if (l0 && part == 0 && on) {
        for (int i = 1; i < split; i++) r += part_[warp + i];
        *yo = r;
    }
}

// mv_<t>: grouped matvec. blockIdx.y = slot; the slot's matrix is expert ids[slot] (matrix
// `slot` when ids is null: a stack of matrices in order) at `expert_bytes` stride; its input is x + slot*x_stride (x_stride 0 =
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
#define DS4_TABLES(USES_TABLES)                                                                     \
    __shared__ float4 tables_raw_[USES_TABLES ? (sizeof(Iq2Smem) + 15) / 16 : 1];                   \
    const Iq2Smem* tables_ = (const Iq2Smem*)tables_raw_;                                           \
    if (USES_TABLES) load_iq2_tables((Iq2Smem*)tables_raw_);

// NAME: matrix `w` (n_rows x n_cols of type T) dequantized by deq_<T>, one unit of DQ_ELEMS a
// thread, each value stored through CONV (f2h, or nothing for f32) into OUT_T.
#define DS4_DQ(NAME, T, DQ_ELEMS, OUT_T, CONV)                                                      \
    extern "C" __global__ void NAME(const u8* __restrict__ w, int n_rows, int n_cols,               \
                                    OUT_T* __restrict__ out) {                                      \
        i64 upr = n_cols / DQ_ELEMS;                                                                \
        i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;                                         \
        if (i >= upr * n_rows) return;                                                              \
        int o = (int)(i / upr), u = (int)(i % upr);                                                 \
        float v[DQ_ELEMS];                                                                          \
        deq_##T(w, o, n_rows, n_cols, u, v);                                                        \
        OUT_T* dst = out + (i64)o * n_cols + (i64)u * DQ_ELEMS;                                     \
        for (int k = 0; k < DQ_ELEMS; k++) dst[k] = CONV(v[k]);                                     \
    }

#define DS4_KERNELS(T, U, USES_TABLES, DQ_ELEMS)                                                    \
    extern "C" __global__ void __launch_bounds__(256)                                               \
        mv_##T(const u8* __restrict__ w, i64 expert_bytes, const int* __restrict__ ids,             \
               int n_rows, int n_cols, const float* __restrict__ x, i64 x_stride,                   \
               float* __restrict__ y, int split) {                                                  \
        pdl_enter();                                                                                \
        DS4_TABLES(USES_TABLES)                                                                     \
        __shared__ float part_[WARPS_PER_BLOCK];                                                    \
        int slot = blockIdx.y, warp = threadIdx.x >> 5;                                             \
        int o = blockIdx.x * (WARPS_PER_BLOCK / split) + warp / split, part = warp % split;         \
        float r = 0.0f;                                                                             \
        if (o < n_rows) {                                                                           \
            const u8* wb = w + (ids ? (i64)ids[slot] : (i64)slot) * expert_bytes;                   \
            float acc[1] = {0.0f};                                                                  \
            RowCtx c = {wb, o, n_rows, n_cols};                                                     \
            if (split == 1) /* constant stride: the prefill MoE path's code */                      \
                dot_row<U, 1, 4>(c, x + slot * x_stride, 0, 1, acc, tables_, 0, 1);                 \
            else                                                                                    \
                dot_row<U, 1, 4>(c, x + slot * x_stride, 0, 1, acc, tables_, part, split);          \
            r = warp_sum(acc[0]);                                                                   \
        }                                                                                           \
        split_store(r, part_, warp, part, split, o < n_rows, y + (i64)slot * n_rows + o);           \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(256)                                               \
        mm_##T(const u8* __restrict__ w, int n_rows, int n_cols, const float* __restrict__ x,       \
               int n_tok, float* __restrict__ y) {                                                  \
        DS4_TABLES(USES_TABLES)                                                                     \
        int o = blockIdx.x * WARPS_PER_BLOCK + (threadIdx.x >> 5);                                  \
        if (o >= n_rows) return;                                                                    \
        int t0 = blockIdx.y * MM_TOKENS;                                                            \
        int nt = min(MM_TOKENS, n_tok - t0);                                                        \
        float acc[MM_TOKENS];                                                                       \
        _Pragma("unroll") for (int t = 0; t < MM_TOKENS; t++) acc[t] = 0.0f;                        \
        RowCtx c = {w, o, n_rows, n_cols};                                                          \
        dot_row<U, MM_TOKENS, 1>(c, x + (i64)t0 * n_cols, n_cols, nt, acc, tables_, 0, 1);          \
        _Pragma("unroll") for (int t = 0; t < MM_TOKENS; t++) {                                     \
            float r = warp_sum(acc[t]);                                                             \
            if ((threadIdx.x & 31) == 0 && t < nt) y[(i64)(t0 + t) * n_rows + o] = r;               \
        }                                                                                           \
    }                                                                                               \
    DS4_DQ(dq_##T, T, DQ_ELEMS, u16, f2h)

DS4_KERNELS(f32, UF32, 0, 4)
DS4_KERNELS(f16, UF16, 0, 8)
DS4_KERNELS(q8_0, UQ8_0, 0, 32)
DS4_KERNELS(q2_k, UQ2_K, 0, 16)
DS4_KERNELS(q4_k, UQ4_K, 0, 32)
DS4_KERNELS(iq2_xxs, UIQ2_XXS, 1, 32)

// Two F16 matrices of the same shape times one input in one launch (decode: a compressor's
// kv and gate products both read the block's y): rows 0..n_rows-1 are A's into ya, rows
// n_rows..2·n_rows-1 B's into yb. Each row is computed exactly as mv_f16 computes it (same
// dot_row steps, same split, same order of the split parts), so the outputs are
// bit-identical to two mv_f16 launches.
extern "C" __global__ void __launch_bounds__(256)
    mv2_f16(const u8* __restrict__ wa, const u8* __restrict__ wb, int n_rows, int n_cols,
            const float* __restrict__ x, float* __restrict__ ya, float* __restrict__ yb,
            int split) {
    pdl_enter();
    __shared__ float part_[WARPS_PER_BLOCK];
    const int warp = threadIdx.x >> 5;
    const int og = blockIdx.x * (WARPS_PER_BLOCK / split) + warp / split, part = warp % split;
    const bool second = og >= n_rows;
    const int o = second ? og - n_rows : og;
    float r = 0.0f;
    if (og < 2 * n_rows) {
        float acc[1] = {0.0f};
        RowCtx c = {second ? wb : wa, o, n_rows, n_cols};
        if (split == 1)
            dot_row<UF16, 1, 4>(c, x, 0, 1, acc, nullptr, 0, 1);
        else
            dot_row<UF16, 1, 4>(c, x, 0, 1, acc, nullptr, part, split);
        r = warp_sum(acc[0]);
    }
    split_store(r, part_, warp, part, split, og < 2 * n_rows, (second ? yb : ya) + o);
}

// f32 -> f16 (round to nearest even) of x·scale, for the activations of the f16 GEMM path
// (scale a power of two: 1, or HC_X16_SCALE for the HC `fn` products' residual input).
extern "C" __global__ void f32_to_f16(const float* __restrict__ x, u16* __restrict__ y, i64 n,
                                      float scale) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = f2h(x[i] * scale);
}

// v = x·scale (a power of two: exact) as three f16 planes (n apart) whose sum is v: hi =
// f16(v), mid = f16(v − hi), lo = f16(v − hi − mid); both differences are exact in f32
// (each drops the leading 11 bits), so hi + mid + lo holds v's 24 bits wherever the f16
// range reaches them (|v| ≥ 2^−1 keeps every bit; smaller values lose what falls under the
// f16 subnormal step 2^−24 in lo, which the scale makes small against x). With f16
// weights, a product with each plane is exact in an f32-accumulating tensor core: the
// router's f32 product on tensor cores (dense_split3). |v| < 32768 (the host's bound).
__device__ __forceinline__ void split3_one(float x, float scale, u16& h, u16& m, u16& l) {
    float v = x * scale;
    h = f2h(v);
    float r = v - h2f(h);
    m = f2h(r);
    l = f2h(r - h2f(m));
}

// Four consecutive elements a thread (n a multiple of 4, x 16-byte aligned: one float4 load and
// three 8-byte stores; else one element a thread).
extern "C" __global__ void f32_split3_f16(const float* __restrict__ x, u16* __restrict__ y,
                                          i64 n, float scale) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if ((n & 3) == 0) {
        if (4 * i >= n) return;
        float4 v = ((const float4*)x)[i];
        u16 h[4], m[4], l[4];
        split3_one(v.x, scale, h[0], m[0], l[0]);
        split3_one(v.y, scale, h[1], m[1], l[1]);
        split3_one(v.z, scale, h[2], m[2], l[2]);
        split3_one(v.w, scale, h[3], m[3], l[3]);
        const u16* pl[3] = {h, m, l};
#pragma unroll
        for (int k = 0; k < 3; k++)
            *(uint2*)(y + k * n + 4 * i) =
                make_uint2((u32)pl[k][0] | ((u32)pl[k][1] << 16), (u32)pl[k][2] | ((u32)pl[k][3] << 16));
        return;
    }
    if (i >= n) return;
    u16 h, m, l;
    split3_one(x[i], scale, h, m, l);
    y[i] = h;
    y[n + i] = m;
    y[2 * n + i] = l;
}

// Dequantize to f32 (exact, used by the self-test to compare against the CPU bit for bit).
#define DS4_DQ32(T, DQ_ELEMS) DS4_DQ(dq32_##T, T, DQ_ELEMS, float, )

DS4_DQ32(f32, 4)
DS4_DQ32(f16, 8)
DS4_DQ32(q8_0, 32)
DS4_DQ32(q2_k, 16)
DS4_DQ32(q4_k, 32)
DS4_DQ32(iq2_xxs, 32)

// ---------------------------------------------------------------------------------------------
// Production-mode decode products with int8 activations (the CPU's `exact = false` path):
// the input vector is quantized once with the CPU's rules (qa_<kind>), then `mv8_<t>` takes
// integer dots with __dp4a. Integer partial sums are exact; each lane scales its partial by
// the block scales in f32, so results match the CPU's quantized dot up to f32 accumulation
// order (not bit for bit). Exact mode keeps the f32 kernels above.
//
// Activation buffers: `q` int8 codes (same element layout as x) and `d` f32 scales, one per
// 32 elements (Q8_0 activations) or per 256 (Q8_K); slot s of a grouped product reads
// q + s·x_stride and the scales of those elements.
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float warp_max_first(float a, int idx, float v, int* best_idx, float* best_v) {
    // Reduce (|v|, index): larger |v| wins, equal |v| keeps the smaller index (CPU: first).
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) {
        float oa = __shfl_xor_sync(0xffffffffu, a, m);
        int oi = __shfl_xor_sync(0xffffffffu, idx, m);
        float ov = __shfl_xor_sync(0xffffffffu, v, m);
        if (oa > a || (oa == a && oi < idx)) {
            a = oa;
            idx = oi;
            v = ov;
        }
    }
    *best_idx = idx;
    *best_v = v;
    return a;
}

// Q8_K (CPU `q8_k::quantize_block`) of one 256-element block held by a warp, lane l holding
// elements 8l..8l+7 in v: max = signed element of largest |x| (first on ties),
// iscale = (1/max)·(-127), q = clamp(rne(iscale·x), -128, 127), d = 1/iscale (0 for an
// all-zero block). The lane's 8 codes go to *w0/*w1 (bytes in element order); every lane
// gets d. All 32 lanes must call it. Shared by qa_q8_k and the fused producers (k_hc_pre1,
// k_rms_norm_q8 in forward.cu), so their codes are the same function of the same values.
__device__ __forceinline__ float q8k_lane(const float* v, int lane, u32* w0p, u32* w1p) {
    float am = 0.0f, mv = 0.0f;
    int mi = 0x7fffffff;
#pragma unroll
    for (int k = 0; k < 8; k++) {
        if (fabsf(v[k]) > am) {
            am = fabsf(v[k]);
            mv = v[k];
            mi = 8 * lane + k;
        }
    }
    int bi;
    float max;
    am = warp_max_first(am, mi, mv, &bi, &max);
    u32 w0 = 0, w1 = 0;
    float dd = 0.0f;
    if (am != 0.0f) {
        float iscale = __fmul_rn(__fdiv_rn(1.0f, max), -127.0f);
#pragma unroll
        for (int k = 0; k < 8; k++) {
            float r = fminf(fmaxf(rintf(__fmul_rn(iscale, v[k])), -128.0f), 127.0f);
            u32 c = (u32)(int)r & 255u;
            if (k < 4) w0 |= c << (8 * k);
            else w1 |= c << (8 * (k - 4));
        }
        dd = __fdiv_rn(1.0f, iscale);
    }
    *w0p = w0;
    *w1p = w1;
    return dd;
}

// Q8_0 activations (CPU `q8_0::quantize_act_block`) of 8 elements per lane, 4 lanes per
// 32-element block (lanes 4b..4b+3 hold block b of the warp's 256 elements): d = amax/127,
// q = clamp(rne(x·(1/d)), -128, 127). Codes to *w0/*w1, returns d. All 32 lanes must call
// it (lanes past the end pass zeros). Shared by qa_q8_0 and the fused producers.
__device__ __forceinline__ float q8_0_lane(const float* v, u32* w0p, u32* w1p) {
    float am = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; k++) am = fmaxf(am, fabsf(v[k]));
    am = fmaxf(am, __shfl_xor_sync(0xffffffffu, am, 1));
    am = fmaxf(am, __shfl_xor_sync(0xffffffffu, am, 2));
    float dd = __fdiv_rn(am, 127.0f);
    float id = dd == 0.0f ? 0.0f : __fdiv_rn(1.0f, dd);
    u32 w0 = 0, w1 = 0;
#pragma unroll
    for (int k = 0; k < 8; k++) {
        float r = fminf(fmaxf(rintf(__fmul_rn(v[k], id)), -128.0f), 127.0f);
        u32 c = (u32)(int)r & 255u;
        if (k < 4) w0 |= c << (8 * k);
        else w1 |= c << (8 * (k - 4));
    }
    *w0p = w0;
    *w1p = w1;
    return dd;
}

// q8_0_lane for 4 elements a lane, 8 lanes a block of 32 (lanes 8k..8k+7, all present):
// the same scale and code expressions, the block's max by a 3-step butterfly (max is exact,
// so the codes equal qa_q8_0's).
__device__ __forceinline__ float q8_0_lane4(const float* v, u32* wp) {
    float am = fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])));
    am = fmaxf(am, __shfl_xor_sync(0xffffffffu, am, 1));
    am = fmaxf(am, __shfl_xor_sync(0xffffffffu, am, 2));
    am = fmaxf(am, __shfl_xor_sync(0xffffffffu, am, 4));
    float dd = __fdiv_rn(am, 127.0f);
    float id = dd == 0.0f ? 0.0f : __fdiv_rn(1.0f, dd);
    u32 w = 0;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        float r = fminf(fmaxf(rintf(__fmul_rn(v[k], id)), -128.0f), 127.0f);
        w |= ((u32)(int)r & 255u) << (8 * k);
    }
    *wp = w;
    return dd;
}

// Q8_K activations: one warp per 256 elements (q8k_lane).
extern "C" __global__ void qa_q8_k(const float* __restrict__ x, int n_blocks, signed char* __restrict__ q,
                                   float* __restrict__ d) {
    pdl_enter();
    int blk = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (blk >= n_blocks) return;
    int lane = threadIdx.x & 31;
    const float* xb = x + (i64)blk * 256 + 8 * lane;
    float4 a = ((const float4*)xb)[0], b = ((const float4*)xb)[1];
    float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
    u32 w0, w1;
    float dd = q8k_lane(v, lane, &w0, &w1);
    ((uint2*)(q + (i64)blk * 256))[lane] = make_uint2(w0, w1);
    if (lane == 0) d[blk] = dd;
}

// Q8_0 activations: one warp per 256 elements (q8_0_lane); `n` (a multiple of 32) in all.
extern "C" __global__ void qa_q8_0(const float* __restrict__ x, i64 n, signed char* __restrict__ q,
                                   float* __restrict__ d) {
    pdl_enter();
    i64 e0 = ((i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * 256 + 8 * (threadIdx.x & 31);
    bool on = e0 < n;
    float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (on) {
        float4 a = ((const float4*)(x + e0))[0], b = ((const float4*)(x + e0))[1];
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
        v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    }
    u32 w0, w1;
    float dd = q8_0_lane(v, &w0, &w1);
    if (!on) return;
    *(uint2*)(q + e0) = make_uint2(w0, w1);
    if ((threadIdx.x & 3) == 0) d[e0 >> 5] = dd;
}

// IQ2_XXS tables for the int8 path: the grid as bytes (2 KB instead of 8 KB of floats).
struct Iq2Smem8 {
    u64 grid[256];
    // Sign pattern i as a byte mask (0xff where the element is negated): one lookup instead
    // of the pattern byte and two sign_mask4 expansions per step.
    u64 smask[128];
};

// The lane's 8 int8 activations and their block scale.
struct XQ8 {
    uint2 q;
    float d;
};

// Sign bits 0..3 of s as byte masks (0x00 / 0xff per byte).
__device__ __forceinline__ u32 sign_mask4(u32 s) { return ((s * 0x00204081u) & 0x01010101u) * 0xffu; }

// Byte mask of sign pattern i (bytes 0..7 = elements 0..7).
__device__ __forceinline__ u64 iq2_smask(int i) {
    u32 sg = ds4_iq2_signs[i];
    return (u64)sign_mask4(sg & 15) | ((u64)sign_mask4(sg >> 4) << 32);
}

// g with the bytes selected by mask negated. Each byte of g lies in 1..127 (IQ2_XXS grid
// values 8, 25, 43), so (g ^ 0xff) + 1 = 256 - g stays inside its byte (at most 255): a plain
// 32-bit add does the four byte negations, with no carry between bytes and without the
// multi-instruction __vsub4.
__device__ __forceinline__ int neg_bytes(u32 g, u32 mask) { return (int)((g ^ mask) + (mask & 0x01010101u)); }

struct I8Q8_0 : UQ8_0 {
    __device__ __forceinline__ float idot(const XQ8& x, int, float acc, const Iq2Smem8*) const {
        int s = __dp4a((int)q.x, (int)x.q.x, 0);
        s = __dp4a((int)q.y, (int)x.q.y, s);
        return fmaf(h2f(d) * x.d, (float)s, acc);
    }
};

// Q2_K for the int8 path, loaded cooperatively: lanes 0..20 read the block's 21 words (one
// coalesced 84-byte row); `idot` fetches each lane's two code words, scale byte and (d, dmin)
// with shuffles (n_cols is a multiple of 256: all lanes take part in every step).
struct I8Q2_K {
    u32 v;
    __device__ __forceinline__ void load(const RowCtx& c, int s, int lane) {
        const u32* p = (const u32*)(c.w + ((i64)c.o * (c.n_cols >> 8) + s) * 84);
        v = lane < 21 ? p[lane] : 0u;
    }
    __device__ __forceinline__ float idot(const XQ8& x, int lane, float acc, const Iq2Smem8*) const {
        const int qw = 4 + 8 * (lane >> 4) + 2 * (lane & 3);
        u32 q0 = __shfl_sync(0xffffffffu, v, qw);
        u32 q1 = __shfl_sync(0xffffffffu, v, qw + 1);
        u32 scw = __shfl_sync(0xffffffffu, v, lane >> 3);
        u32 dd = __shfl_sync(0xffffffffu, v, 20);
        u32 sc = (scw >> (8 * ((lane >> 1) & 3))) & 255u;
        int j = (lane >> 2) & 3;
        u32 m0 = (q0 >> (2 * j)) & 0x03030303u, m1 = (q1 >> (2 * j)) & 0x03030303u;
        int s = __dp4a((int)m0, (int)x.q.x, __dp4a((int)m1, (int)x.q.y, 0));
        int bs = __dp4a(0x01010101, (int)x.q.x, __dp4a(0x01010101, (int)x.q.y, 0));
        float dl = x.d * h2f((u16)(dd & 0xffff));
        float ml = x.d * h2f((u16)(dd >> 16));
        return fmaf(dl, (float)((int)(sc & 15) * s), fmaf(-ml, (float)((int)(sc >> 4) * bs), acc));
    }
};

// IQ2_XXS for the int8 path, loaded cooperatively: lane l reads code bytes 2l, 2l+1 of the
// block (the warp reads the 64 code bytes as one coalesced 64-byte row) plus the
// broadcast scale; `idot` moves each lane's grid byte and sign word over with shuffles
// (n_cols is a multiple of 256, so every lane of the warp takes part in every step).
struct I8IQ2_XXS {
    u16 d, w;
    __device__ __forceinline__ void load(const RowCtx& c, int s, int lane) {
        const int nb = c.n_cols >> 8;
        const u8* row = c.w + (i64)c.o * nb * 66;
        d = iq2_scale(row, s, nb);
        w = ld16(iq2_codes(row, s) + 2 * lane);
    }
    __device__ __forceinline__ float idot(const XQ8& x, int lane, float acc, const Iq2Smem8* tb) const {
        const int g0 = lane & ~3;
        u32 av = __shfl_sync(0xffffffffu, (u32)w, g0 | ((lane & 3) >> 1));
        u32 blo = __shfl_sync(0xffffffffu, (u32)w, g0 | 2);
        u32 bhi = __shfl_sync(0xffffffffu, (u32)w, g0 | 3);
        u32 a = (av >> (8 * (lane & 1))) & 255u;
        u32 b = blo | (bhi << 16);
        u64 g = tb->grid[a];
        u64 m = tb->smask[(b >> (7 * (lane & 3))) & 127];
        int w0 = neg_bytes((u32)g, (u32)m);
        int w1 = neg_bytes((u32)(g >> 32), (u32)(m >> 32));
        int s = __dp4a(w0, (int)x.q.x, __dp4a(w1, (int)x.q.y, 0));
        int tot = (2 * (int)(b >> 28) + 1) * s;
        return fmaf(0.125f * h2f(d) * x.d, (float)tot, acc);
    }
};

template <class U, int UNR, int DSH>
__device__ __forceinline__ float dot_row8(const RowCtx& c, const signed char* xq, const float* xd,
                                          const Iq2Smem8* tb, int first, int stride) {
    const int lane = threadIdx.x & 31;
    const int steps = (c.n_cols + 255) >> 8;
    float acc = 0.0f;
    for (int s0 = first; s0 < steps; s0 += UNR * stride) {
        U r[UNR];
        XQ8 xv[UNR];
        bool on[UNR];
#pragma unroll
        for (int k = 0; k < UNR; k++) {
            const int sk = s0 + k * stride;
            const int e0 = (sk << 8) + 8 * lane;
            on[k] = sk < steps && e0 < c.n_cols;
            if (on[k]) {
                r[k].load(c, sk, lane);
                xv[k].q = *(const uint2*)(xq + e0);
                xv[k].d = xd[e0 >> DSH];
            }
        }
#pragma unroll
        for (int k = 0; k < UNR; k++)
            if (on[k]) acc = r[k].idot(xv[k], lane, acc, tb);
    }
    return acc;
}

// Both rows (gate, up) of one output in the same loop: twice the loads in flight, one
// activation load per step.
template <class U, int UNR, int DSH>
__device__ __forceinline__ void dot_row8x2(const RowCtx& ca, const RowCtx& cb, const signed char* xq,
                                           const float* xd, const Iq2Smem8* tb, int first, int stride,
                                           float* ra, float* rb) {
    const int lane = threadIdx.x & 31;
    const int steps = (ca.n_cols + 255) >> 8;
    float acca = 0.0f, accb = 0.0f;
    for (int s0 = first; s0 < steps; s0 += UNR * stride) {
        U r[UNR], q[UNR];
        XQ8 xv[UNR];
        bool on[UNR];
#pragma unroll
        for (int k = 0; k < UNR; k++) {
            const int sk = s0 + k * stride;
            const int e0 = (sk << 8) + 8 * lane;
            on[k] = sk < steps && e0 < ca.n_cols;
            if (on[k]) {
                r[k].load(ca, sk, lane);
                q[k].load(cb, sk, lane);
                xv[k].q = *(const uint2*)(xq + e0);
                xv[k].d = xd[e0 >> DSH];
            }
        }
#pragma unroll
        for (int k = 0; k < UNR; k++)
            if (on[k]) {
                acca = r[k].idot(xv[k], lane, acca, tb);
                accb = q[k].idot(xv[k], lane, accb, tb);
            }
    }
    *ra = acca;
    *rb = accb;
}

#define DS4_MV8(NAME, U, USES_TABLES, DSH, UNR)                                                     \
    extern "C" __global__ void __launch_bounds__(256)                                               \
        NAME(const u8* __restrict__ w, i64 expert_bytes, const int* __restrict__ ids,               \
                int n_rows, int n_cols, const signed char* __restrict__ xq,                         \
                const float* __restrict__ xd, i64 x_stride, float* __restrict__ y, int split) {     \
        pdl_enter();                                                                                \
        __shared__ u64 tbraw_[USES_TABLES ? (sizeof(Iq2Smem8) + 7) / 8 : 1];                        \
        Iq2Smem8* tb_ = (Iq2Smem8*)tbraw_;                                                          \
        if (USES_TABLES) {                                                                          \
            for (int i = threadIdx.x; i < 256; i += blockDim.x) tb_->grid[i] = ds4_iq2_grid[i];     \
            for (int i = threadIdx.x; i < 128; i += blockDim.x) tb_->smask[i] = iq2_smask(i);       \
            __syncthreads();                                                                        \
        }                                                                                           \
        __shared__ float part_[WARPS_PER_BLOCK];                                                    \
        int slot = blockIdx.y, warp = threadIdx.x >> 5;                                             \
        int o = blockIdx.x * (WARPS_PER_BLOCK / split) + warp / split, part = warp % split;         \
        float r = 0.0f;                                                                             \
        if (o < n_rows) {                                                                           \
            const u8* wb = w + (ids ? (i64)ids[slot] : (i64)slot) * expert_bytes;                   \
            RowCtx c = {wb, o, n_rows, n_cols};                                                     \
            i64 xo = (i64)slot * x_stride;                                                          \
            r = warp_sum(dot_row8<U, UNR, DSH>(c, xq + xo, xd + (xo >> DSH), tb_, part, split));    \
        }                                                                                           \
        split_store(r, part_, warp, part, split, o < n_rows, y + (i64)slot * n_rows + o);           \
    }

DS4_MV8(mv8_q8_0, I8Q8_0, 0, 5, 4)
DS4_MV8(mv8_q2_k, I8Q2_K, 0, 8, 4)
DS4_MV8(mv8_iq2_xxs, I8IQ2_XXS, 1, 8, 4)

// Fused gate + up + clamped SwiGLU (production decode, int8 activations): warp(s) of row o
// take both dots of slot s (matrices wg/wu of expert ids[s], same input), then
// h[s][o] = silu(min(g, c))·clamp(u, ±c)·wts[s] (wts null: 1), the same expressions as
// k_swiglu in forward.cu. Saves the up launch, the SwiGLU launch and the g/u round trip.
#define DS4_MV8_GLU(NAME, U, USES_TABLES, DSH, UNR)                                                 \
    extern "C" __global__ void __launch_bounds__(256)                                               \
        NAME(const u8* __restrict__ wg, const u8* __restrict__ wu, i64 expert_bytes,                \
                   const int* __restrict__ ids, int n_rows, int n_cols,                             \
                   const signed char* __restrict__ xq, const float* __restrict__ xd,                \
                   i64 x_stride, const float* __restrict__ wts, float clampc,                       \
                   float* __restrict__ h, int split) {                                              \
        pdl_enter();                                                                                \
        __shared__ u64 tbraw_[USES_TABLES ? (sizeof(Iq2Smem8) + 7) / 8 : 1];                        \
        Iq2Smem8* tb_ = (Iq2Smem8*)tbraw_;                                                          \
        if (USES_TABLES) {                                                                          \
            for (int i = threadIdx.x; i < 256; i += blockDim.x) tb_->grid[i] = ds4_iq2_grid[i];     \
            for (int i = threadIdx.x; i < 128; i += blockDim.x) tb_->smask[i] = iq2_smask(i);       \
            __syncthreads();                                                                        \
        }                                                                                           \
        __shared__ float partg_[WARPS_PER_BLOCK], partu_[WARPS_PER_BLOCK];                          \
        int slot = blockIdx.y, warp = threadIdx.x >> 5;                                             \
        int o = blockIdx.x * (WARPS_PER_BLOCK / split) + warp / split, part = warp % split;         \
        float rg = 0.0f, ru = 0.0f;                                                                 \
        if (o < n_rows) {                                                                           \
            i64 eo = (ids ? (i64)ids[slot] : (i64)slot) * expert_bytes;                             \
            RowCtx cg = {wg + eo, o, n_rows, n_cols}, cu = {wu + eo, o, n_rows, n_cols};            \
            i64 xo = (i64)slot * x_stride;                                                          \
            dot_row8x2<U, UNR, DSH>(cg, cu, xq + xo, xd + (xo >> DSH), tb_, part, split, &rg, &ru); \
            rg = warp_sum(rg);                                                                      \
            ru = warp_sum(ru);                                                                      \
        }                                                                                           \
        if (split > 1) {                                                                            \
            if ((threadIdx.x & 31) == 0) {                                                          \
                partg_[warp] = rg;                                                                  \
                partu_[warp] = ru;                                                                  \
            }                                                                                       \
            __syncthreads();                                                                        \
            if (part != 0) return;                                                                  \
            for (int i = 1; i < split; i++) {                                                       \
                rg += partg_[warp + i];                                                             \
                ru += partu_[warp + i];                                                             \
            }                                                                                       \
        }                                                                                           \
        if ((threadIdx.x & 31) == 0 && o < n_rows) {                                                \
            float gv = fminf(rg, clampc);                                                           \
            float sil = gv * (1.0f / (1.0f + expf(-gv)));                                           \
            float uv = fminf(fmaxf(ru, -clampc), clampc);                                           \
            float r = sil * uv;                                                                     \
            if (wts) r = r * wts[slot];                                                             \
            h[(i64)slot * n_rows + o] = r;                                                          \
        }                                                                                           \
    }

DS4_MV8_GLU(mv8glu_q8_0, I8Q8_0, 0, 5, 4)
DS4_MV8_GLU(mv8glu_q2_k, I8Q2_K, 0, 8, 4)
DS4_MV8_GLU(mv8glu_iq2_xxs, I8IQ2_XXS, 1, 8, 4)

// Q8_0 int8 matvec with 16-byte loads (production decode; n_cols a multiple of 512): lane l
// takes elements 16l..16l+15 of each 512-element step (one 16-byte code load and its
// block's scale; the activation codes likewise), a warp takes RW consecutive rows and UNR
// steps of each before any dot, so RW·UNR 16-byte weight loads per lane are in flight
// (mv8_q8_0 has 4 of 8 bytes). Rows split between `split` warps as in mv8_<t>, partials
// added in warp order; per lane, per row the dots are added in step order: deterministic.
// Same per-block expression as I8Q8_0 (fmaf(d_w·d_x, Σq·q, acc)).
template <int RW, int UNR>
__device__ __forceinline__ void q8w_rows(const u8* w, int o, int n_rows, int n_cols,
                                         const signed char* xq, const float* xd, int first,
                                         int stride, bool waited, float* acc) {
    const int lane = threadIdx.x & 31;
    const int steps = n_cols >> 9, nb = n_cols >> 5;
    const u16* scp = (const u16*)(w + (i64)n_rows * n_cols);
    for (int s0 = first; s0 < steps; s0 += UNR * stride) {
        uint4 q[RW][UNR];
        u16 dw[RW][UNR];
        uint4 xv[UNR];
        float xs[UNR];
        bool on[UNR];
#pragma unroll
        for (int k = 0; k < UNR; k++) {
            const int sk = s0 + k * stride;
            on[k] = sk < steps;
            const int e0 = (sk << 9) + 16 * lane;
#pragma unroll
            for (int r = 0; r < RW; r++) {
                if (on[k] && o + r < n_rows) {
                    q[r][k] = *(const uint4*)(w + (i64)(o + r) * n_cols + e0);
                    dw[r][k] = scp[(i64)(o + r) * nb + (e0 >> 5)];
                } else {
                    q[r][k] = make_uint4(0u, 0u, 0u, 0u);
                    dw[r][k] = 0;
                }
            }
        }
        // The first step's weights are in flight before the wait (pdl_trigger).
        if (!waited) {
            pdl_wait();
            waited = true;
        }
#pragma unroll
        for (int k = 0; k < UNR; k++) {
            const int e0 = ((s0 + k * stride) << 9) + 16 * lane;
            if (on[k]) {
                xv[k] = *(const uint4*)(xq + e0);
                xs[k] = xd[e0 >> 5];
            }
        }
#pragma unroll
        for (int k = 0; k < UNR; k++) {
            if (!on[k]) continue;
#pragma unroll
            for (int r = 0; r < RW; r++) {
                int s = __dp4a((int)q[r][k].x, (int)xv[k].x, 0);
                s = __dp4a((int)q[r][k].y, (int)xv[k].y, s);
                s = __dp4a((int)q[r][k].z, (int)xv[k].z, s);
                s = __dp4a((int)q[r][k].w, (int)xv[k].w, s);
                acc[r] = fmaf(h2f(dw[r][k]) * xs[k], (float)s, acc[r]);
            }
        }
    }
}

// Grid: x = groups of (8/split)·RW rows, y = slot (matrix ids[slot], input slot·x_stride).
#define DS4_MV8W(NAME, RW, UNR)                                                                     \
    extern "C" __global__ void __launch_bounds__(256)                                               \
        NAME(const u8* __restrict__ w, i64 expert_bytes, const int* __restrict__ ids,               \
             int n_rows, int n_cols, const signed char* __restrict__ xq,                            \
             const float* __restrict__ xd, i64 x_stride, float* __restrict__ y, int split) {        \
        pdl_trigger();                                                                              \
        __shared__ float part_[WARPS_PER_BLOCK][RW];                                                \
        int slot = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;                    \
        int o = (blockIdx.x * (WARPS_PER_BLOCK / split) + warp / split) * RW;                       \
        int part = warp % split;                                                                    \
        float acc[RW];                                                                              \
        _Pragma("unroll") for (int r = 0; r < RW; r++) acc[r] = 0.0f;                               \
        /* Expert ids come from an earlier kernel: wait before reading them. Warps that */          \
        /* write y have waited (in q8w_rows: part 0 always runs a step). */                         \
        if (ids) pdl_wait();                                                                        \
        if (o < n_rows) {                                                                           \
            const u8* wb = w + (ids ? (i64)ids[slot] : (i64)slot) * expert_bytes;                   \
            i64 xo = (i64)slot * x_stride;                                                          \
            q8w_rows<RW, UNR>(wb, o, n_rows, n_cols, xq + xo, xd + (xo >> 5), part, split,          \
                              ids != nullptr, acc);                                                 \
            _Pragma("unroll") for (int r = 0; r < RW; r++) acc[r] = warp_sum(acc[r]);               \
        }                                                                                           \
        if (split == 1) {                                                                           \
            if (lane == 0) {                                                                        \
                _Pragma("unroll") for (int r = 0; r < RW; r++) {                                    \
                    if (o + r < n_rows) y[(i64)slot * n_rows + o + r] = acc[r];                     \
                }                                                                                   \
            }                                                                                       \
            return;                                                                                 \
        }                                                                                           \
        if (lane == 0) {                                                                            \
            _Pragma("unroll") for (int r = 0; r < RW; r++) part_[warp][r] = acc[r];                 \
        }                                                                                           \
        __syncthreads();                                                                            \
        if (lane == 0 && part == 0) {                                                               \
            _Pragma("unroll") for (int r = 0; r < RW; r++) {                                        \
                float v = acc[r];                                                                   \
                for (int i = 1; i < split; i++) v += part_[warp + i][r];                            \
                if (o + r < n_rows) y[(i64)slot * n_rows + o + r] = v;                              \
            }                                                                                       \
        }                                                                                           \
    }

DS4_MV8W(mv8w2_q8_0, 2, 4)
DS4_MV8W(mv8w4_q8_0, 4, 2)

// ---------------------------------------------------------------------------------------------
// Lane-owned int8 products for IQ2_XXS and Q2_K (production decode; `mvl_<t>` and the fused
// gate+up+SwiGLU `mvlglu_<t>`). The cooperative kernels above (mv8_/mv8glu_) read 2 or 4
// bytes per lane and move each lane's grid byte, sign word and scale over with 3–4 shuffles
// per 8–16 weights plus two bank-conflicted u64 table lookups: bound by the shared-memory /
// shuffle pipe with DRAM 13–15% busy. Here each lane reads and decodes its own slice of a
// block, with no shuffle in the inner loop:
// * IQ2_XXS: lane l owns group l%8 (32 elements, 8 bytes) of block l/8 of the step's 4
//   blocks (1024 columns). The group's 8 bytes are one aligned load in the device layout
//   (iq2_codes) when rows are whole groups of 8 blocks; one
//   32-bit table lookup per 8 weights gives PRMT selectors (`ds4_iq2_sel`), the 7 stored
//   sign bits + parity are moved into the selectors by ALU, and __byte_perm picks the 4
//   signed grid bytes ({8,25,43,0} or their negatives) in one instruction.
// * Q2_K: lane l owns a quarter (16 code bytes = 64 elements in 4 runs of 16, 4 scale
//   bytes) of block l/4 of the step's 8 blocks (2048 columns).
// A warp takes NR rows that share the activation loads (RO consecutive rows, or the gate
// and up rows of RO outputs) and UNR steps of loads before any decoding. Each lane adds its
// groups' scaled integer dots in block order, the lanes are summed by the butterfly:
// deterministic. Requires n_cols % 256 == 0 (both formats).
// ---------------------------------------------------------------------------------------------

#define IQ2_POS 0x002B1908u  // bytes 8, 25, 43, 0: selector nibbles 0..3
#define IQ2_NEG 0x00D5E7F8u  // bytes -8, -25, -43, 0: selector nibbles 4..7

// Sign pattern s7 (7 stored bits; bit 7 = their parity, as KSIGNS_IQ2XS) as bit 2 of nibble k
// for element k, so that `sel | signs` selects the negated grid byte. Three multiply-and-mask
// steps spread the 8 bits 4 apart; each multiply adds shifted copies that never overlap, so
// no carries.
__device__ __forceinline__ u32 iq2_sign_nibbles(u32 s7) {
    u32 s = s7 | ((__popc(s7) & 1u) << 7);
    s = (s * 0x1001u) & 0x000F000Fu;  // bits 0-3 stay, 4-7 -> 16-19
    s = (s * 65u) & 0x03030303u;       // two bits per byte
    return (s * 36u) & 0x44444444u;    // one bit per nibble, at bit 2
}

// The sign nibbles come from a 128-entry table in shared memory (after the 256 selectors,
// filled with iq2_sign_nibbles): one more shared load per 8 weights instead of ~9 ALU
// operations (measured: the same time either way). This general form serves rows that start
// only 2-byte aligned (widths that are not 2048-column multiples): the lane's 8 code bytes are
// two aligned 8-byte loads around them, funnel-shifted. Whole groups take lane_rows_iq2a.
struct LaneIQ2 {
    static constexpr int LPB = 8;  // lanes per block
    static constexpr int BLOCK_BYTES = 66;
    static constexpr bool kGroups = true;
    struct X {
        uint4 a, b;  // the group's 32 activation codes
        float d;
    };
    struct W {
        uint2 p, q;  // 16 aligned bytes holding the group's 8
        u32 off;     // group start - aligned start (0, 2, 4 or 6)
        u16 d;
    };
    static __device__ __forceinline__ void load_x(X& x, const signed char* xq, const float* xd, int b, int sub) {
        const uint4* p = (const uint4*)(xq + (b << 8) + 32 * sub);
        x.a = p[0];
        x.b = p[1];
        x.d = xd[b];
    }
    // Reads up to 8 bytes past the group: the rest of the row or the weight buffer's tail
    // padding (EXPERT_ALIGN in device.rs).
    static __device__ __forceinline__ void load_w(W& w, const u8* row, int b, int sub, int nb) {
        w.d = iq2_scale(row, b, nb);
        const u8* g = iq2_codes(row, b) + 8 * sub;
        const uint2* p = (const uint2*)((size_t)g & ~(size_t)7);
        w.p = p[0];
        w.q = p[1];
        w.off = (u32)(size_t)g & 7u;
    }
    static __device__ __forceinline__ void prep(X&) {}
    static __device__ __forceinline__ float dot(const W& w, const X& x, int, const u32* tab, float acc) {
        const bool hi = (w.off & 4u) != 0;
        const u32 u0 = hi ? w.p.y : w.p.x, u1 = hi ? w.q.x : w.p.y, u2 = hi ? w.q.y : w.q.x;
        const u32 sh = (w.off & 2u) * 8u;
        const u32 ga = __funnelshift_r(u0, u1, sh);  // 4 grid indices
        const u32 gb = __funnelshift_r(u1, u2, sh);  // 4 x 7 sign bits, scale in bits 28-31
        const u32 xs[8] = {x.a.x, x.a.y, x.a.z, x.a.w, x.b.x, x.b.y, x.b.z, x.b.w};
        int s = 0;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const u32 sg = (gb >> (7 * k)) & 127u;
            const u32 sel = tab[(ga >> (8 * k)) & 255u] | tab[256 + sg];
            s = __dp4a((int)__byte_perm(IQ2_POS, IQ2_NEG, sel), (int)xs[2 * k], s);
            s = __dp4a((int)__byte_perm(IQ2_POS, IQ2_NEG, sel >> 16), (int)xs[2 * k + 1], s);
        }
        const int tot = (2 * (int)(gb >> 28) + 1) * s;
        return fmaf(0.125f * h2f(w.d) * x.d, (float)tot, acc);
    }
};

// The integer dot of one lane's 8 code bytes (ga: 4 grid indices; gb: 4 x 7 sign bits, scale
// in bits 28-31) with its 32 activation codes, times 2s+1: LaneIQ2::dot's integer part with
// the tables read from their IQ2_TCOPY-fold copies (selectors at byte 64·e, sign nibbles at
// IQ2_TSIGN + 64·s) and PTX prmt (no selector masking); pos = IQ2_POS in a register, so no
// PRMT needs the constant moved into one. Lane l reads copy l % 16 (lb = 4·(l % 16)), so a
// warp's 32 lookups of one table hit each bank at most twice (one copy: ~3.5 wavefronts a
// lookup). An entry's offset (bits 6-13) and the lane's copy (bits 2-5) do not overlap, so
// `(index & mask) | lb` is one LOP3 and the table's own address stays the load's immediate
// (`tab0` is the static shared array): a shift and a LOP3 a lookup instead of a shift, a mask
// and an add (9% fewer instructions in mvlglu_iq2_xxs, the same time: it is not issue-bound).
#define IQ2_TCOPY 16
#define IQ2_TSIGN (256 * 4 * IQ2_TCOPY)
// The lookups' shifts (64-byte entries) and the table fill's 16-byte stores are written for it.
static_assert(IQ2_TCOPY == 16, "iq2_idot's offsets assume 16 table copies");
__device__ __forceinline__ int iq2_idot(u32 ga, u32 gb, const uint4& xa, const uint4& xb,
                                        const u8* tab0, u32 lb, u32 pos) {
    const u32 xs[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
    int s = 0;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        const u32 og = k == 0 ? (ga << 6) & 0x3fc0u : (ga >> (8 * k - 6)) & 0x3fc0u;
        const u32 os = k == 0 ? (gb << 6) & 0x1fc0u : (gb >> (7 * k - 6)) & 0x1fc0u;
        const u32 sel = *(const u32*)(tab0 + (og | lb)) | *(const u32*)(tab0 + IQ2_TSIGN + (os | lb));
        s = __dp4a((int)prmt(pos, IQ2_NEG, sel), (int)xs[2 * k], s);
        s = __dp4a((int)prmt(pos, IQ2_NEG, sel >> 16), (int)xs[2 * k + 1], s);
    }
    return (2 * (int)(gb >> 28) + 1) * s;
}

// One 8-block group (2 steps) of lane_rows_iq2a: lane l takes code group
// l%8 of blocks l/8 and 4 + l/8 of each row; wc[r] / ws[r] are its code bytes and the block
// scale of block l/8 (the second block is 256 / 8 bytes on), xp / xdp its activation codes
// and scale. Each lane adds its blocks in block order, with the same f32 operations as
// LaneIQ2 (the block scale's 1/8 moved onto the activation scale: a power of two, exact), so
// the sums equal lane_rows' bit for bit.
template <int NR>
__device__ __forceinline__ void iq2_group(const u8* const* wc, const u8* const* ws, const signed char* xp,
                                          const float* xdp, const u8* tab0, u32 lb, u32 pos, float* acc) {
    uint4 xa[2], xb[2];
    float x8[2];
    uint2 w[2][NR];
    u16 d[2][NR];
#pragma unroll
    for (int k = 0; k < 2; k++) {
        xa[k] = *(const uint4*)(xp + 1024 * k);
        xb[k] = *(const uint4*)(xp + 1024 * k + 16);
        x8[k] = xdp[4 * k];
#pragma unroll
        for (int r = 0; r < NR; r++) {
            w[k][r] = *(const uint2*)(wc[r] + 256 * k);
            d[k][r] = ld16(ws[r] + 8 * k);
        }
    }
#pragma unroll
    for (int k = 0; k < 2; k++) {
        const float xd8 = 0.125f * x8[k];
#pragma unroll
        for (int r = 0; r < NR; r++) {
            const int tot = iq2_idot(w[k][r].x, w[k][r].y, xa[k], xb[k], tab0, lb, pos);
            acc[r] = fmaf(h2f(d[k][r]) * xd8, (float)tot, acc[r]);
        }
    }
}

// acc[r] += rows[r] · x for IQ2_XXS rows of whole 528-byte groups (2048-column multiples,
// 16-byte-aligned rows; device layout, see iq2_codes): one iq2_group per group of 8 blocks
// (the warp's 32 code loads of a row one contiguous 256 bytes), every address a fixed offset
// from the group's start.
template <int NR>
__device__ __forceinline__ void lane_rows_iq2a(const u8* const* rows, int nb, const signed char* xq,
                                               const float* xd, const u32* tab, const u32* tabr,
                                               float* acc) {
    const int lane = threadIdx.x & 31, sub = lane & 7, b0 = lane >> 3;
    const u32 lb = 4 * (lane % IQ2_TCOPY);
    const u32 pos = tab[384];
    const u8* wc[NR];  // this lane's code bytes of block b0 in group 0
    const u8* ws[NR];  // the scale of block b0 in group 0
#pragma unroll
    for (int r = 0; r < NR; r++) {
        wc[r] = rows[r] + 64 * b0 + 8 * sub;
        ws[r] = rows[r] + 512 + 2 * b0;
    }
    const signed char* xp = xq + 256 * b0 + 32 * sub;
    const float* xdp = xd + b0;
    for (int g = 0; g < (nb >> 3); g++) {
        iq2_group<NR>(wc, ws, xp, xdp, (const u8*)tabr, lb, pos, acc);
#pragma unroll
        for (int r = 0; r < NR; r++) {
            wc[r] += 528;
            ws[r] += 528;
        }
        xp += 2048;
        xdp += 8;
    }
}

struct LaneQ2K {
    static constexpr int LPB = 4;
    static constexpr int BLOCK_BYTES = 84;
    static constexpr bool kGroups = false;
    // Quarter sub = 2n + h: code bytes 16 + 32n + 16h .. +15 (elements 128n + 32j + 16h + i,
    // i < 16, in bits 2j), scale bytes 8n + 2j + h for j = 0..3.
    struct X {
        uint4 q[4];  // run j: elements 128n + 32j + 16h .. +15
        float d;
        int bs[4];  // Σ codes of run j (the min term), once for all NR rows
    };
    struct W {
        u32 c[4];    // 16 code bytes
        u32 s0, s1;  // scale words 2n, 2n+1 (bytes 8n..8n+7)
        u32 dd;      // d | dmin << 16
    };
    static __device__ __forceinline__ void load_x(X& x, const signed char* xq, const float* xd, int b, int sub) {
        const signed char* p = xq + (b << 8) + 128 * (sub >> 1) + 16 * (sub & 1);
#pragma unroll
        for (int j = 0; j < 4; j++) x.q[j] = *(const uint4*)(p + 32 * j);
        x.d = xd[b];
    }
    static __device__ __forceinline__ void load_w(W& w, const u8* row, int b, int sub, int) {
        const u32* p = (const u32*)(row + 84 * b);
        const int n = sub >> 1, h = sub & 1;
#pragma unroll
        for (int i = 0; i < 4; i++) w.c[i] = p[4 + 8 * n + 4 * h + i];
        w.s0 = p[2 * n];
        w.s1 = p[2 * n + 1];
        w.dd = p[20];
    }
    static __device__ __forceinline__ void prep(X& x) {
#pragma unroll
        for (int j = 0; j < 4; j++) {
            int t = __dp4a(0x01010101, (int)x.q[j].x, 0);
            t = __dp4a(0x01010101, (int)x.q[j].y, t);
            t = __dp4a(0x01010101, (int)x.q[j].z, t);
            x.bs[j] = __dp4a(0x01010101, (int)x.q[j].w, t);
        }
    }
    static __device__ __forceinline__ float dot(const W& w, const X& x, int sub, const u32*, float acc) {
        const u32 hs = 8u * (u32)(sub & 1);
        const u32 sa = w.s0 >> hs, sb = w.s1 >> hs;
        int isum = 0, msum = 0;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const u32 sc = ((j < 2 ? sa : sb) >> (16 * (j & 1))) & 255u;
            int s = __dp4a((int)((w.c[0] >> (2 * j)) & 0x03030303u), (int)x.q[j].x, 0);
            s = __dp4a((int)((w.c[1] >> (2 * j)) & 0x03030303u), (int)x.q[j].y, s);
            s = __dp4a((int)((w.c[2] >> (2 * j)) & 0x03030303u), (int)x.q[j].z, s);
            s = __dp4a((int)((w.c[3] >> (2 * j)) & 0x03030303u), (int)x.q[j].w, s);
            isum += (int)(sc & 15u) * s;
            msum += (int)(sc >> 4) * x.bs[j];
        }
        const float dl = x.d * h2f((u16)(w.dd & 0xffffu)), ml = x.d * h2f((u16)(w.dd >> 16));
        return fmaf(dl, (float)isum, fmaf(-ml, (float)msum, acc));
    }
};

// acc[r] += rows[r] · x for the lane's share of every block (nb blocks of 256 columns).
template <class U, int NR, int UNR>
__device__ __forceinline__ void lane_rows(const u8* const* rows, int nb, const signed char* xq,
                                          const float* xd, const u32* tab, float* acc) {
    constexpr int BPS = 32 / U::LPB;  // blocks per step
    const int lane = threadIdx.x & 31;
    const int sub = lane % U::LPB, b0 = lane / U::LPB;
    for (int s0 = 0; s0 < nb; s0 += UNR * BPS) {
        typename U::X x[UNR];
        typename U::W w[UNR][NR];
        bool on[UNR];
#pragma unroll
        for (int k = 0; k < UNR; k++) {
            const int b = s0 + k * BPS + b0;
            on[k] = b < nb;
            if (on[k]) {
                U::load_x(x[k], xq, xd, b, sub);
#pragma unroll
                for (int r = 0; r < NR; r++) U::load_w(w[k][r], rows[r], b, sub, nb);
            }
        }
#pragma unroll
        for (int k = 0; k < UNR; k++) {
            if (!on[k]) continue;
            U::prep(x[k]);
#pragma unroll
            for (int r = 0; r < NR; r++) acc[r] = U::dot(w[k][r], x[k], sub, tab, acc[r]);
        }
    }
}

// The IQ2_XXS tables in shared memory (256 selectors + 128 sign-nibble words + IQ2_POS at 384,
// 1.5 KB; a 4-byte dummy for Q2_K), filled before the PDL wait (nothing an earlier kernel
// writes) and before any early return, so every thread reaches the barrier. (32 copies side by
// side, lane l reading copy l in bank l, took the lookups' wavefronts from ~3.5 to 1 but made
// the gate/up 19.5 -> 22.3 us: 48 KB to fill per block, half the blocks per SM.)
// tabr_: the same 384 words in IQ2_TCOPY copies side by side (word 16e + c), for
// lane_rows_iq2a (iq2_idot); 24 KB, filled once per block: once for a whole launch of the
// persistent mvlglu_<t>, for every block of mvl_iq2_xxs (which no Flash product takes: its
// IQ2_XXS matrices are the fused gate and up).
#define DS4_LANE_TABLE(TABLES)                                                                      \
    __shared__ u32 tab_[TABLES ? 388 : 1];                                                          \
    __shared__ __align__(16) u32 tabr_[TABLES ? 384 * IQ2_TCOPY : 1];                               \
    if (TABLES) {                                                                                   \
        for (int i = threadIdx.x; i < 256; i += blockDim.x) tab_[i] = ds4_iq2_sel[i];               \
        if (threadIdx.x < 128) tab_[256 + threadIdx.x] = iq2_sign_nibbles(threadIdx.x);             \
        if (threadIdx.x == 0) tab_[384] = IQ2_POS;                                                  \
        for (int i = threadIdx.x; i < 384 * IQ2_TCOPY / 4; i += blockDim.x) {                       \
            const int e = i / (IQ2_TCOPY / 4);                                                      \
            const u32 v = e < 256 ? ds4_iq2_sel[e] : iq2_sign_nibbles(e - 256);                     \
            *(uint4*)(tabr_ + 4 * i) = make_uint4(v, v, v, v);                                      \
        }                                                                                           \
        __syncthreads();                                                                            \
    }

// mvl_<t>: as mv8_<t> (slot = blockIdx.y, matrix ids[slot], input slot·x_stride), RO
// consecutive rows per warp, 8 warps per block; no split.
#define DS4_MVL(NAME, U, TABLES, RO, UNR, MINB)                                                     \
    extern "C" __global__ void __launch_bounds__(256, MINB)                                         \
        NAME(const u8* __restrict__ w, i64 expert_bytes, const int* __restrict__ ids,               \
             int n_rows, int n_cols, const signed char* __restrict__ xq,                            \
             const float* __restrict__ xd, i64 x_stride, float* __restrict__ y) {                   \
        pdl_trigger();                                                                              \
        DS4_LANE_TABLE(TABLES)                                                                      \
        pdl_wait();                                                                                 \
        const int slot = blockIdx.y, lane = threadIdx.x & 31;                                       \
        const int o = (blockIdx.x * WARPS_PER_BLOCK + (threadIdx.x >> 5)) * RO;                     \
        if (o >= n_rows) return;                                                                    \
        const int nb = n_cols >> 8;                                                                 \
        const i64 rb = (i64)nb * U::BLOCK_BYTES;                                                    \
        const u8* base = w + (ids ? (i64)ids[slot] : (i64)slot) * expert_bytes;                     \
        const u8* rows[RO];                                                                         \
        float acc[RO];                                                                              \
        _Pragma("unroll") for (int r = 0; r < RO; r++) {                                            \
            rows[r] = base + (i64)min(o + r, n_rows - 1) * rb;                                      \
            acc[r] = 0.0f;                                                                          \
        }                                                                                           \
        const i64 xo = (i64)slot * x_stride;                                                        \
        if (U::kGroups && (nb & 7) == 0 && ((size_t)base & 15) == 0)                                \
            lane_rows_iq2a<RO>(rows, nb, xq + xo, xd + (xo >> 8), tab_, tabr_, acc);                \
        else                                                                                        \
            lane_rows<U, RO, UNR>(rows, nb, xq + xo, xd + (xo >> 8), tab_, acc);                    \
        _Pragma("unroll") for (int r = 0; r < RO; r++) acc[r] = warp_sum(acc[r]);                   \
        if (lane == 0) {                                                                            \
            _Pragma("unroll") for (int r = 0; r < RO; r++) {                                        \
                if (o + r < n_rows) y[(i64)slot * n_rows + o + r] = acc[r];                         \
            }                                                                                       \
        }                                                                                           \
    }

// The routed SwiGLU of one output: silu(min(g, c)) · clamp(u, ±c) · (routing weight).
__device__ __forceinline__ float glu_out(float g, float u, float clampc, const float* wts, int slot) {
    const float gv = fminf(g, clampc);
    const float sil = gv * (1.0f / (1.0f + expf(-gv)));
    const float uv = fminf(fmaxf(u, -clampc), clampc);
    float v = sil * uv;
    if (wts) v = v * wts[slot];
    return v;
}

// mvlglu_<t>: as mv8glu_<t>; a warp takes the gate and up rows of RO consecutive outputs
// (2·RO rows, one activation load per step), same SwiGLU epilogue. The grid is persistent:
// block b takes units b, b + gridDim.x, .. of the n_slots · ceil(n_rows / (8·RO)) (slot, row
// block) units, so its tables are filled once (before the PDL wait, while the kernel before
// runs) however many units it takes; a grid of one block a unit is the plain launch.
#define DS4_MVLGLU(NAME, U, TABLES, RO, UNR, MINB)                                                  \
    extern "C" __global__ void __launch_bounds__(256, MINB)                                         \
        NAME(const u8* __restrict__ wg, const u8* __restrict__ wu, i64 expert_bytes,                \
             const int* __restrict__ ids, int n_rows, int n_cols,                                   \
             const signed char* __restrict__ xq, const float* __restrict__ xd, i64 x_stride,        \
             const float* __restrict__ wts, float clampc, float* __restrict__ h, int n_slots) {     \
        pdl_trigger();                                                                              \
        DS4_LANE_TABLE(TABLES)                                                                      \
        pdl_wait();                                                                                 \
        const int lane = threadIdx.x & 31;                                                          \
        const int nbx = (n_rows + WARPS_PER_BLOCK * RO - 1) / (WARPS_PER_BLOCK * RO);               \
        const int nb = n_cols >> 8;                                                                 \
        const i64 rb = (i64)nb * U::BLOCK_BYTES;                                                    \
        for (int u = blockIdx.x; u < nbx * n_slots; u += gridDim.x) {                               \
            const int slot = u / nbx;                                                               \
            const int o = ((u - slot * nbx) * WARPS_PER_BLOCK + (threadIdx.x >> 5)) * RO;           \
            if (o >= n_rows) continue;                                                              \
            const i64 eo = (ids ? (i64)ids[slot] : (i64)slot) * expert_bytes;                       \
            const u8* rows[2 * RO];                                                                 \
            float acc[2 * RO];                                                                      \
            _Pragma("unroll") for (int r = 0; r < RO; r++) {                                        \
                const i64 ro = eo + (i64)min(o + r, n_rows - 1) * rb;                               \
                rows[r] = wg + ro;                                                                  \
                rows[RO + r] = wu + ro;                                                             \
                acc[r] = 0.0f;                                                                      \
                acc[RO + r] = 0.0f;                                                                 \
            }                                                                                       \
            const i64 xo = (i64)slot * x_stride;                                                    \
            if (U::kGroups && (nb & 7) == 0 && (((size_t)wg | (size_t)wu | (size_t)eo) & 15) == 0)  \
                lane_rows_iq2a<2 * RO>(rows, nb, xq + xo, xd + (xo >> 8), tab_, tabr_, acc);        \
            else                                                                                    \
                lane_rows<U, 2 * RO, UNR>(rows, nb, xq + xo, xd + (xo >> 8), tab_, acc);            \
            _Pragma("unroll") for (int r = 0; r < 2 * RO; r++) acc[r] = warp_sum(acc[r]);           \
            if (lane == 0) {                                                                        \
                _Pragma("unroll") for (int r = 0; r < RO; r++) {                                    \
                    if (o + r < n_rows)                                                             \
                        h[(i64)slot * n_rows + o + r] = glu_out(acc[r], acc[RO + r], clampc, wts, slot);  \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
    }

// Rows per warp RO = 4 for the plain Q2_K product (its activation loads and bsums shared by 4
// rows; at most 64 registers, 4 blocks per SM: 9.3 us for the experts' down vs 10.4 without
// the bound, 11.4 with RO = 2), 2 outputs (4 rows) for the fused IQ2_XXS gate+up (22.8 us vs
// 23.6 for one output; 2 or 4 steps in flight, the ALU sign path and a 64-register bound all
// measured within ±1 us: ncu puts this kernel at 81% of L1/TEX throughput, DRAM 23%).
// H200, ncu, flash-q2 decode shapes (bench/RESULTS-dx.md). Those figures are the general
// LaneIQ2 path; on 2048-column multiples the gate+up now takes lane_rows_iq2a (19.5 us).
// UNR is lane_rows' only: lane_rows_iq2a always holds one 8-block group (2 steps) a pass.
DS4_MVL(mvl_iq2_xxs, LaneIQ2, 1, 2, 1, 1)
DS4_MVL(mvl_q2_k, LaneQ2K, 0, 4, 1, 4)
DS4_MVLGLU(mvlglu_iq2_xxs, LaneIQ2, 1, 2, 1, 2)
DS4_MVLGLU(mvlglu_q2_k, LaneQ2K, 0, 1, 1, 1)
