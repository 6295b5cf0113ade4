//! CUDA backend (issue 5): the whole model resident on one NVIDIA GPU behind the same
//! `Session` API as the CPU, checked against the CPU reference.
//!
//! Pieces:
//! * [`probe`](mod@probe): can CUDA run here, and if not, why (never panics; cudarc itself panics on a
//!   missing library, so libraries are probed before any other call).
//! * [`cache`] + [`compile`]: `kernels/*.cu` are embedded with `include_str!`, compiled by
//!   NVRTC to a cubin for the device's architecture on first use and cached on disk under a
//!   key hashing source, architecture, NVRTC version and options.
//! * [`CudaBackend`] (device.rs): one device, one stream, the kernel module and a cuBLAS
//!   handle; weight upload from the mmap with progress; the quantized products — f32
//!   matvec/matmul (exact mode), int8-activation dp4a matvecs and the fused expert gate+up
//!   (production decode), dequantize + cuBLAS.
//! * [`session`]: [`GpuModel`] (every weight uploaded once; routed experts as one 256-matrix
//!   stack per tensor) and [`GpuSession`] (KV rings, compressed rows and compressor state,
//!   scratch). `queue` issues one chunk's launches in model.md §3 order; a decode step is
//!   captured once as a CUDA graph and replayed (the kernels read the position from device
//!   memory). The logits stay on the device: [`GpuSession::narrow`] (kernels/sample.cu) sends
//!   back the argmax and, for min-p sampling, the candidate tokens only.
//! * [`prefill`]: production prefill's expert grouping (stable counting sort) and the grouped
//!   tensor-core expert product: for the Flash expert types (IQ2_XXS, Q2_K) `pf_mxs_<t>`
//!   decodes each weight once per 256-row block straight into the MMA fragments (weight bytes
//!   staged in shared memory by cp.async; `pf_mx_<t>` reads them from global memory where the
//!   rows are not 16-byte multiples); on Hopper (`sm_90a` image) `pf_mxw_<t>` feeds the same
//!   fragments to wgmma, which reads the token tile from shared memory itself; other types
//!   dequantize weight tiles into shared memory (`pf_mm_<t>`).
//! * [`attn`]: tiled attention / indexer scores (on tensor cores in production prefill:
//!   `k_idx_scores_tc`) / top-k / windowed compressor, the
//!   tensor-core attention of production prefill chunks and the split-rows flash-decoding
//!   attention of production decode steps; exact mode keeps the reference-order kernels of
//!   forward.cu.
//! * [`check`] + [`parity`]: `ds4 cuda selftest` (every kernel vs the CPU on random inputs)
//!   and `ds4 cuda parity` (golden fixtures, synthetic model GPU vs CPU, run-to-run identity,
//!   snapshots across backends, sampling).
//!
//! Numerics: exact mode runs f32 kernels in the CPU's order of operations where it matters;
//! production mode takes int8 activations in decode (codes bit-identical to the CPU's) and
//! f16 tensor-core operands with f32 sums in prefill (drift stated in the parity rows).
//!
//! Environment switches (all on by default; `=0` turns a path off, for comparisons and
//! bisecting — none is needed in normal use): `DS4_CUDA_GRAPH` (decode graph replay),
//! `DS4_CUDA_PDL` (programmatic dependent launch inside decode graphs), `DS4_CUDA_FORK` (a layer's
//! independent decode paths — shared expert, compressors — on a second stream), `DS4_CUDA_FORK3`
//! (a ratio-4 layer's indexer on a third stream, beside the compressors), `DS4_CUDA_PRIO` (stream
//! priorities kept per decode-graph node: indexer > main path > shared expert / compressors), `DS4_CUDA_INT8` (int8
//! activations in production decode), `DS4_CUDA_HC1` (multi-block HC pre with fused
//! quantization), `DS4_CUDA_POSTMIX` (each decode hc_post fused into the next site's control
//! product, `k_hc_post_mix`; the same bits), `DS4_CUDA_HCP1_HOIST` (`k_hc_pre1` loads both of a
//! warp's partial rows before summing; off = the loop), `DS4_CUDA_HCP1_LEAN` (`k_hc_pre1`'s
//! weights P_j and norm total formed in every warp; off = published through shared memory,
//! two block barriers more; the same bits), `DS4_CUDA_RMSQ8_ONE` (`k_rms_norm_q8`'s
//! row in registers; off = the loop form), `DS4_CUDA_ROUTE_WARP` (`k_route`'s slots finished by a
//! warp; off = thread 0) (those three: the same bits), `DS4_CUDA_MV8W` (16-byte-load Q8_0 int8 matvecs),
//! `DS4_CUDA_MV8W4` (those matvecs 4 rows a warp wherever their slots hold 4,096 rows or more;
//! off = 2 rows a warp for rows of 2,048 columns or more), `DS4_CUDA_LANE`
//! (lane-owned IQ2_XXS / Q2_K int8 matvecs and fused gate+up, `mvl_<t>` / `mvlglu_<t>`;
//! off = the cooperative shuffle kernels `mv8_<t>` / `mv8glu_<t>`), `DS4_CUDA_LANE_PERSIST`
//! (`mvlglu_<t>` on a persistent grid of the blocks the device holds; off = a block a unit),
//! `DS4_CUDA_GEMM`
//! (tensor-core products in production prefill), `DS4_CUDA_PF_MM` (the fused grouped expert
//! kernel; off = per-expert dequantize + cuBLAS), `DS4_CUDA_PF_MX` (the fragment-decoding
//! `pf_mx(s)_<t>` for IQ2_XXS / Q2_K experts; off = `pf_mm_<t>`), `DS4_CUDA_PF_MXS` (its
//! shared-memory staging; off = `pf_mx_<t>`), `DS4_CUDA_PF_MXW` (its wgmma form on Hopper; off =
//! `pf_mxs_<t>`), `DS4_CUDA_PF_Q8` (the Q2_K down product of that form on int8 wgmma with Q8_K
//! activations, `pf_mxq_q2_k`; off = f16 `pf_mxw_q2_k`), `DS4_CUDA_PF_W4` (the IQ2_XXS gate|up of
//! the experts of more than 64 rows on `pf_mxw4_iq2_xxs`, tiles of up to 128 tokens; off = all
//! on `pf_mxw`; the same bits), `DS4_CUDA_ROUTER_SGEMM` (router product as an f32 cuBLAS
//! GEMM), `DS4_CUDA_ROUTER_SPLIT3` (that product on tensor cores as three f16 planes of its
//! input against the exact f16 weight; off = the f32 GEMM), `DS4_CUDA_ATT_TC` (tensor-core
//! attention in production prefill), `DS4_CUDA_IDX_TC` (the
//! lightning indexer's scores on tensor cores in production steps, prefill and decode; off = the
//! f32 kernel), `DS4_CUDA_IDX_WG` (those scores on wgmma in prefill chunks on Hopper,
//! `k_idx_scores_wg`; off = `k_idx_scores_tc`; the same terms summed in another order),
//! `DS4_CUDA_HC_PRE_PF` (production prefill's hc_pre from registers with the Sinkhorn in a
//! separate warp-per-token kernel; off = the one-block-per-token `k_hc_pre`), `DS4_CUDA_QNORM`
//! (production prefill's query heads normalized and rotated inside the tensor-core attention;
//! off = `k_head_norm_rope` in place before it), `DS4_CUDA_Q16` (with that, the q_b GEMM writes
//! the queries as f16; off = f32), `DS4_CUDA_ATT_QPF=N` (the tensor-core attention asks L2 for
//! the queries of the block N ahead; default half the SM count, 0 = off),
//! `DS4_CUDA_TOPK_W` (prefill chunks' indexer top-k over up to 2,048 visible rows on
//! `k_topk_w`, a warp a token; off = the block kernels below; the same selection),
//! `DS4_CUDA_TOPK1_CHUNK` (prefill chunks' indexer top-k on `k_topk1`, a block a token; off =
//! `k_topk_rows`; the same selection),
//! `DS4_CUDA_ATT_FD` (split-rows flash-decoding attention in production decode steps; off =
//! the four tiled passes), `DS4_CUDA_FD_TC` (its row blocks on tensor cores, `k_att_fdtc*`, with
//! the prefill kernel's f16 rounding of queries and weights; off = the f32 `k_att_fd*`),
//! `DS4_CUDA_FD_PDL` (their combine launched with PDL; off = a plain launch),
//! `DS4_CUDA_SINKHORN_LAST` (a decode layer's Sinkhorns after the side branches' products,
//! the compressors' and the shared expert's; off = before them), `DS4_CUDA_SINKHORN_SIDE1` (the
//! attention site's Sinkhorn on the second side stream, beside the compressors; off = after
//! them), `DS4_CUDA_SINKHORN_SIDE2` (in a ratio-4 layer that Sinkhorn alone on the third side
//! stream; off = after the compressors), `DS4_CUDA_FFN_SK_SIDE2` (the FFN site's Sinkhorn on the
//! third side stream from hc_pre on, joined before the routed gate|up; off = after the shared
//! expert), `DS4_CUDA_IXC_PRE` (the decode indexer scores convert the rows complete before the
//! step to bf16 before their PDL wait; off = after it), `DS4_CUDA_IXC_UNR` (that conversion's
//! loads all issued before the first store; off = the loop's batches of 4), `DS4_CUDA_IXC32` (a
//! decode step's tensor-core indexer scores on 32-row blocks, `k_idx_scores_tc32`, up to
//! `DS4_CUDA_IXC32_MAX` visible rows, default 6144; off = 128, `k_idx_scores_tc`; the same
//! scores), `DS4_CUDA_IDX_L2PF` (a ratio-4 decode step asks L2, evict-last, for the indexer rows
//! at its attention site's start, `k_l2_rows`, up to `DS4_CUDA_IDX_L2PF_MAX` rows, default 6144;
//! off = no prefetch, `=2` the normal priority), `DS4_CUDA_IQF_PRE` / `DS4_CUDA_QKV_PRE` (a decode
//! step's indexer query finish / query-and-KV finish compute their RoPE angles before the PDL
//! wait, the latter also the KV row's FP8 scales by warps; off = the row functions; the same
//! bits), `DS4_CUDA_ROUTE_REG` (`k_route`'s top-k
//! rounds over keys in registers with warp reductions; off = over shared memory; the same
//! selection), `DS4_CUDA_ROUTE_BPRE` (`k_route` loads its first bias before the PDL wait; off =
//! after the score; the same value), `DS4_CUDA_COMB_EARLY` (the decode attention's combine lets the output product launch
//! at its start; off = at its end), `DS4_CUDA_SH_JOIN_EARLY` (the shared expert joined before
//! the routed down product; off = before the expert sum), `DS4_CUDA_ROUTE_PDL` (a decode step's
//! `k_route` launched with PDL, never triggering early; off = a plain launch),
//! `DS4_CUDA_ROWS_PDL` (the decode attention's tensor-core row blocks launched with PDL, reading
//! nothing but the position before their wait and triggering the combine after it; off = a
//! plain launch), `DS4_CUDA_IDXPROJ_MAIN` (a
//! ratio-4 decode step's indexer weights product on the main stream before q_a; off = on the
//! indexer's side stream behind its compressor), `DS4_CUDA_TOPK1` (a decode step's indexer top-k over up to 16,384
//! rows in one block with its keys in registers, `k_topk1_<KPT>`), `DS4_CUDA_NARROW_MB` (multi-block logits narrowing for sampling;
//! off = the one-block kernel), `DS4_CUDA_DECODE_NOWAIT` (a decode step returns once its graph
//! is queued; off = it waits for the graph), `DS4_CUDA_FEED` (the narrowing leaves its argmax
//! and the next position in the step's input buffers, and a step taking that token copies
//! nothing; off = copied every step), `DS4_CUDA_HEAD_HC1` (a production decode step's output
//! head mixing by `k_hc_pre1`'s head form after the last hc_post fused with its product,
//! writing the head product's codes; off = the product, `k_hc_head` and a quantization);
//! `DS4_CUDA_ATT_SPLIT=N` overrides the tiled decode attention split; `DS4_CUDA_TOPK_MB=N`
//! sets the visible compressed rows from which a decode step's indexer top-k is spread over many blocks (`k_topk_mb`, past `k_topk1`'s rows; default
//! 6144, 0 = never);
//! `DS4_CUDA_IDXQ_W=0` finishes the indexer queries with the block-per-head `k_idx_q_finish`
//! instead of the warp form `k_idx_q_finish_w<E>` (the same bits). `DS4_CUDA_F16_COPY=0` keeps
//! no f16 copy of the quantized dense weights and no f32 copy of the router's (prefill then
//! decodes them for every chunk; by default the copies are made at load when 24 GiB of GPU
//! memory stay free, `=1` always). `DS4_CUDA_HC_FN=0` has production prefill's hc_post write
//! the state's f16 copy for a cuBLAS HC `fn` GEMM instead of forming that product itself
//! (`k_hc_post4_fn` / `k_hc_post_moe_fn`). `DS4_CUDA_PF_W4_FORK=0` runs a prefill chunk's
//! `pf_mxw4` after `pf_mxw` instead of beside it; `DS4_CUDA_PF_ATT_FORK=0` keeps a layer's
//! compressors and indexer on the main stream in prefill (by default on the highest-priority
//! side stream beside the query path), `DS4_CUDA_PF_SH_FORK=0` the shared expert (by default
//! there beside the routed experts); the same bits either way. `DS4_CUDA_PF_ATT_SIDE`,
//! `DS4_CUDA_PF_SH_SIDE` and `DS4_CUDA_PF_W4_SIDE` (`0` / `1`) put those branches and
//! `pf_mxw4` on the lowest / highest-priority side stream (defaults 1, 1, 0: the fastest of
//! the combinations measured, bench/RESULTS.md). `DS4_CUDA_PF_Y_LEAN=0` has
//! production prefill's hc_pre write y's f32 form at every site (by default only the f16
//! forms the site's products read, and the router's three f16 planes). `DS4_CUDA_HC_PRE_T=256`
//! runs that hc_pre in 256-thread blocks of 4 columns a thread (`k_hc_pre_pf`; by default
//! 512-thread blocks of 2, `k_hc_pre_pf512`; the same bits).
//! `DS4_CUDA_POOL_KEEP=0` lets the stream-ordered allocator return freed memory to the
//! driver at each synchronization (by default the device's pool keeps it for reuse).
//! `DS4_CUDA_CHUNK=N` sets the prefill chunk (a multiple of 256 up to 8192; default 8192 up
//! to a 128k context, 4096 up to 512k, else 2048). `DS4_CUDA_CACHE=DIR` moves
//! the kernel cache (empty: no cache) and `DS4_CUDA_PTXAS_VERBOSE` prints register use.
//! `DS4_CUDA_NVRTC_DEFS="DS4_PROBE=1"` (a development aid) compiles `PROBE(k, i)` points into
//! some decode kernels (quant.cu): thread 0 of each block stores the global timer there, and
//! `ds4 cuda model` with `DS4_CUDA_PROBE_OUT=FILE` writes them out as CSV (the last launch of
//! each kernel: in-kernel phases of the decode graph, bench/RESULTS.md thirty-second session).
//! `DS4_CUDA_PHASES=1` (a development aid) times each prefill chunk's phases on the main
//! stream (events between hc_pre, the query path, the joins, attention, the output products,
//! the FFN site's steps) and prints the mean µs by layer kind to stderr, and how many
//! compressed-row buffers the chunk grew (host time).
//!
//! Determinism: every kernel reduces floats in a fixed order (warp shuffles, no float atomics;
//! the top-k kernels add integer counts atomically, which no order changes), so the same
//! inputs give bit-identical outputs from run to run; the self-test checks it.

pub mod attn;
pub mod cache;
pub mod check;
pub mod compile;
mod device;
pub mod parity;
pub mod prefill;
pub mod probe;
pub mod session;

pub use device::{
    repack_q8_0, ActQuant, CudaBackend, CudaError, GemmScratch, GpuWeight, Result, SUPPORTED_TYPES,
};
pub use probe::{probe, CudaAvailability, DeviceInfo};
pub use session::{GpuModel, GpuSession, Narrowed, NARROW_CAP};

/// Re-export of the cudarc buffer types used in the launch API, so callers need not depend
/// on cudarc directly.
pub use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};

/// Whether the comparison switch `name` (a `DS4_CUDA_*` variable, see the module docs) leaves
/// its path on: anything but `0`, or unset.
pub(crate) fn switch_on(name: &str) -> bool {
    std::env::var(name).map_or(true, |v| v != "0")
}

/// The side stream (0: lowest priority, 1: highest) `name` picks, else `default`.
pub(crate) fn side_of(name: &str, default: usize) -> usize {
    match std::env::var(name).as_deref() {
        Ok("0") => 0,
        Ok("1") => 1,
        _ => default,
    }
}
