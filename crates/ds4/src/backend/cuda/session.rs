//! The whole forward pass on one GPU (model.md §3): [`GpuModel`] holds every weight,
//! uploaded once from the mapped file, and [`GpuSession`] one conversation's state (raw
//! window ring, compressor frontiers, compressed and indexer rows) plus scratch, all in
//! device memory. `model::Session` dispatches to it when the CUDA backend is chosen.
//!
//! Per chunk of tokens the host only queues launches: the token ids and the first position
//! go up, the requested logits come back, nothing else crosses the bus (router choices,
//! indexer selections and row counts stay on the device; the host derives every size from
//! the positions alone). Kernels read the position from device memory, so a decode step is
//! captured once as a CUDA graph and replayed (recaptured when the position passes a
//! multiple of `DECODE_BUCKET` or a rows buffer grows; `DS4_CUDA_GRAPH=0` turns it off).
//!
//! Numerics: activations are f32 (the CPU's exact mode), except the inputs of production-mode
//! decode products with Q8_0, Q2_K or IQ2_XXS weights: those are quantized once per input
//! with the CPU's rules (Q8_0 activations per 32, Q8_K per 256; bit-identical codes and
//! scales) and multiplied with integer dots (`mv8_*`, `mv8glu_*` in quant.cu), so production
//! decode matches the CPU's quantized path up to f32 summation order (`DS4_CUDA_INT8=0` keeps
//! f32 activations). Production prefill (chunks of n > 1 tokens) runs its weight products on
//! tensor cores with f16 operands and f32 accumulation (prefill.rs: routed experts grouped
//! by expert, dense products through cuBLAS), except the HC `fn` products (f32 kernel), the
//! router (at f32 accuracy: three f16 planes of its input against the exact F16 weight, or an
//! f32 cuBLAS GEMM) and the output head (f32 kernel). Stored rows get the QAT
//! simulations when `qat_sim` is on and the F16 storage rounding when `exact` is off, like
//! the CPU, so a snapshot means the same thing on both backends.
//!
//! Decode (one token) has its own launch forms (`DS4_CUDA_HC1=0` turns them off, for
//! comparisons): hc_pre as a many-block control product (`k_hc_mix_part`) plus one block
//! (`k_hc_pre1`) that also writes y's int8 codes for the next products (with the quantizers'
//! own device functions, so the codes equal `qa_*` on the stored y), the q_b input's RMSNorm
//! with its codes (`k_rms_norm_q8`), query heads and KV row in one launch, ring push + hc_post
//! and expert sum + hc_post fused, and each of those hc_posts run inside the next site's
//! control product (`k_hc_post_mix`, the state alternating between two buffers;
//! `DS4_CUDA_POSTMIX=0` launches them alone). While a decode graph is captured, the kernels that begin
//! with `pdl_enter()` are launched with programmatic stream serialization, so each one's
//! launch overlaps its predecessor's tail (`DS4_CUDA_PDL=0` turns it off). Independent parts
//! of a decode layer run on side streams (`CudaBackend::fork_on`): the compressors and the
//! shared expert on one, a ratio-4 layer's indexer on another; the graph keeps each stream's
//! priority per node (indexer above the main path above the shared expert). A production
//! prefill chunk forks too, onto the highest-priority side stream with its own cuBLAS handle:
//! a layer's compressors and indexer beside the query path, and the shared expert beside the
//! routed experts from their grouping on (its GEMMs fill the SMs the one-block grouping and
//! the expert kernels' last waves leave); branches read F16 weights and f16 inputs in place,
//! so they share no conversion scratch with the main path.
//!
//! Order of work inside a layer mirrors model/forward.rs, attention.rs and moe.rs; each
//! kernel in kernels/forward.cu says which CPU function it stands for.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{self, CUfunction_attribute, CUstreamCaptureMode};
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};

use super::attn::{self, AttnKernels};
use super::device::{
    launch_ex, mv_split, ActQuant, CudaBackend, CudaError, GpuWeight, Result, Slot, SUPPORTED_TYPES,
};
use super::prefill::{
    dense_gemm, dense_sgemm, dense_split3, fused_fits, moe_grouped, split3_fits, split3_scale,
    MoeScratch, PfKernels,
};
use crate::gguf::TensorInfo;
use crate::model::cache::LayerCache;
use crate::model::Model;
use crate::quant::{self, GgmlType};

/// Chunk lengths of the GPU's prefill (longer prefills are split): [`gpu_chunk`] picks
/// `GPU_CHUNKS[0]` up to a context of `LONG_CTX[0]` positions, `[1]` up to `LONG_CTX[1]`,
/// else `[2]`; a session whose scratch does not fit in GPU memory takes a shorter one. A
/// longer chunk gives each routed expert more tokens per decoded weight (`pf_mxw4` takes up to
/// 128 a tile: an expert averages 96 of a 4096-token chunk's 24,576 slots, 48 of a 2048-token
/// chunk's) and fewer chunk-layers pay their launches' ramps and tails: whole-model prefill
/// +15–17% at the 8k–32k frontiers with 4096 against 2048, and +5–6% more at 16k–64k with
/// 8192 (bench/RESULTS.md, eighteenth session). The chunk bounds the scratch memory: for the
/// flash shapes ~1.15 MB a token (~9.4 GB at 8192), plus `4·(ctx/4 + 1)` bytes of indexer
/// scores per token, which the context steps keep under ~2 GiB. Exact-mode results do not
/// depend on the split; production prefill's dense cuBLAS GEMMs may round differently for
/// another chunk length (cuBLAS picks kernels by shape), never from run to run.
const GPU_CHUNKS: [usize; 3] = [8192, 4096, 2048];
/// See [`GPU_CHUNKS`].
const LONG_CTX: [usize; 2] = [1 << 17, 1 << 19];

/// The chunk length a session of `ctx` positions asks for: `DS4_CUDA_CHUNK` when it is a
/// multiple of 256 in 256..=8192, else from `GPU_CHUNKS` by the context.
pub fn gpu_chunk(ctx: usize) -> usize {
    let default = if ctx <= LONG_CTX[0] {
        GPU_CHUNKS[0]
    } else if ctx <= LONG_CTX[1] {
        GPU_CHUNKS[1]
    } else {
        GPU_CHUNKS[2]
    };
    match std::env::var("DS4_CUDA_CHUNK") {
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if (256..=8192).contains(&n) && n.is_multiple_of(256) => n,
            _ => {
                eprintln!(
                    "ds4: DS4_CUDA_CHUNK={v:?} ignored (a multiple of 256 in 256..=8192); \
                     chunks of {default}"
                );
                default
            }
        },
        Err(_) => default,
    }
}

/// Prints a prefill chunk's phase marks (`DS4_CUDA_PHASES=1`) to stderr: the mean µs of the
/// main stream between consecutive marks, by layer kind (ratio, hash or learned routing).
fn phase_report(gm: &GpuModel, model: &Model, n: usize, p0: usize, marks: &[(usize, &str, f64)]) {
    let kind = |il: usize| {
        let hash = gm.layers[il].tid2eid.is_some();
        format!("r{}{}", model.cfg.ratio(il), if hash { "h" } else { "" })
    };
    let mut kinds: Vec<String> = Vec::new();
    let mut tags: Vec<&str> = Vec::new();
    // (kind, tag) -> (sum µs, count)
    let mut acc: std::collections::HashMap<(String, &str), (f64, usize)> = Default::default();
    for &(il, tag, us) in marks {
        let k = kind(il);
        if !kinds.contains(&k) {
            kinds.push(k.clone());
        }
        if !tags.contains(&tag) {
            tags.push(tag);
        }
        let e = acc.entry((k, tag)).or_insert((0.0, 0));
        e.0 += us;
        e.1 += 1;
    }
    let total: f64 = marks.iter().map(|m| m.2).sum();
    eprintln!(
        "# phases: chunk of {n} at p0 {p0}: {:.0} µs between the first and last mark",
        total
    );
    eprint!("# phase      ");
    for k in &kinds {
        eprint!("{k:>9}");
    }
    eprintln!();
    for tag in &tags {
        eprint!("# {tag:<11}");
        for k in &kinds {
            match acc.get(&(k.clone(), *tag)) {
                Some(&(s, c)) => eprint!("{:>9.1}", s / c as f64),
                None => eprint!("{:>9}", "-"),
            }
        }
        eprintln!();
    }
}

/// Whether `e` is the driver running out of device memory.
fn out_of_memory(e: &CudaError) -> bool {
    matches!(e, CudaError::Driver(d) if d.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY)
}

/// Chunk length when the logits of every position are requested (bounds the logits
/// scratch: `LOGITS_CHUNK × n_vocab` floats).
pub const LOGITS_CHUNK: usize = 256;
/// Most HC streams the kernels support (fixed-size arrays in forward.cu).
const MAX_HC: usize = 8;
/// Widest compressed row the compressor kernel supports (its shared buffer).
const MAX_COMP_D: usize = 1024;
/// Dynamic shared memory the exact-mode attention kernel may use (H100/H200 allow 227 KiB
/// per block).
const ATTEND_SMEM: usize = 200 * 1024;
/// Threads of an exact-mode attention block (16 warps share a (token, head)'s rows).
const ATTEND_THREADS: usize = 512;
/// Widest head the exact-mode attention kernel keeps in registers (ATT_MAXJ · 32 in
/// forward.cu).
const ATTEND_MAX_DH: usize = 512;
/// Threads of `k_hc_pre1` (HC_PRE1_THREADS in forward.cu): 16 warps form y, one runs
/// Sinkhorn (or, on a fork, hands its logits to `k_sinkhorn1`).
pub(crate) const HC_PRE1_THREADS: u32 = 544;
/// Scale of the residual stream's f16 copy for the HC `fn` GEMMs in production prefill
/// (HC_X16_SCALE in forward.cu): a power of two, multiplied back in the GEMM exactly, that
/// keeps residual values up to ~1e6 finite in f16 (65,504 unscaled).
pub(crate) const HC_X16_SCALE: f32 = 0.0625;
/// Most streams `k_hc_pre1` holds in registers (HC_PRE1_MAX_HC in forward.cu).
pub(crate) const HC_PRE1_MAX_HC: usize = 4;
/// Decode graphs are captured for positions up to a multiple of this (grid sizes of the
/// position-dependent kernels), so one graph serves this many steps.
const DECODE_BUCKET: usize = 1024;

/// Sessions created while set use the tiled (production-mode) attention and indexer kernels
/// in exact mode too; parity.rs sets it to measure their drift on the golden fixtures.
static FORCE_TILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes GPU sessions created from now on use the tiled attention and indexer kernels
/// whatever the numerics mode (see `FORCE_TILED`).
pub fn force_tiled_attention(on: bool) {
    FORCE_TILED.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether decode steps replay CUDA graphs (`DS4_CUDA_GRAPH=0` turns them off, for
/// comparisons).
fn use_graphs() -> bool {
    super::switch_on("DS4_CUDA_GRAPH")
}

/// Whether production-mode decode uses int8 activations (`DS4_CUDA_INT8=0` keeps f32, for
/// comparisons).
fn use_int8() -> bool {
    super::switch_on("DS4_CUDA_INT8")
}

/// Whether decode uses the multi-block hc_pre with fused activation quantization
/// (`DS4_CUDA_HC1=0` keeps the one-block `k_hc_pre` and separate quantize launches, for
/// comparisons).
fn use_hc1() -> bool {
    super::switch_on("DS4_CUDA_HC1")
}

/// Whether decode runs each site's hc_post fused into the next site's control product
/// (`k_hc_post_mix`; `DS4_CUDA_POSTMIX=0` keeps the separate hc_post launches, for
/// comparisons). Bit-identical either way.
fn use_post_mix() -> bool {
    super::switch_on("DS4_CUDA_POSTMIX")
}

/// A decode site's hc_post left to the next site's hc_pre (`k_hc_post_mix`), or run alone.
#[derive(Clone, Copy)]
enum Post {
    /// The attention site's, with the ring push of its KV row (`k_hc_post_ring`).
    Ring { ring: u64 },
    /// The FFN site's, on the routed and shared experts' outputs (`k_hc_post_moe`).
    Moe,
}

/// Whether production decode runs independent paths of a layer on a second stream — the
/// shared expert beside the router and routed experts, the compressors beside the query
/// path — so a decode graph has parallel branches (`DS4_CUDA_FORK=0` keeps one stream).
fn use_fork() -> bool {
    super::switch_on("DS4_CUDA_FORK")
}

/// Whether production decode gives a ratio-4 layer's indexer its own side stream (see
/// `fork3` in `queue`; `DS4_CUDA_FORK3=0` keeps it behind the compressors on one).
fn use_fork3() -> bool {
    super::switch_on("DS4_CUDA_FORK3")
}

/// Whether a production prefill chunk runs a layer's compressors and indexer on the second side
/// stream (the highest priority) beside the query path (q_a, kv, q_b and the KV row), joined
/// before the attention; `DS4_CUDA_PF_ATT_FORK=0` keeps one stream. Read at every chunk (so
/// `ds4 cuda model --variants` can compare the two).
fn use_pf_att_fork() -> bool {
    super::switch_on("DS4_CUDA_PF_ATT_FORK")
}

/// Whether a production prefill chunk runs the shared expert on the highest-priority side stream
/// beside the routed experts, from their grouping on (`DS4_CUDA_PF_SH_FORK=0` keeps one
/// stream). Read at every chunk (for `--variants`).
fn use_pf_sh_fork() -> bool {
    super::switch_on("DS4_CUDA_PF_SH_FORK")
}

/// Whether production prefill's hc_pre writes only the forms of y its site reads: no f32 y at
/// the attention site, and at the FFN site the router's three f16 planes instead of it
/// (`DS4_CUDA_PF_Y_LEAN=0`: f32 y everywhere and the router's split kernel). Read at every
/// chunk (for `--variants`).
fn use_pf_y_lean() -> bool {
    super::switch_on("DS4_CUDA_PF_Y_LEAN")
}

/// Whether decode graphs use programmatic dependent launch (`DS4_CUDA_PDL=0` turns it off,
/// for comparisons).
fn use_pdl() -> bool {
    super::switch_on("DS4_CUDA_PDL")
}

/// Whether production-mode prefill runs its weight products as f16 tensor-core GEMMs
/// (`DS4_CUDA_GEMM=0` keeps the f32 CUDA-core kernels, for comparisons).
fn use_gemm() -> bool {
    super::switch_on("DS4_CUDA_GEMM")
}

/// Whether the production prefill's routed experts use the fused tensor-core kernel
/// (`pf_mm_<t>`, dequantizing in the kernel); `DS4_CUDA_PF_MM=0` takes the per-expert
/// f16-dequantize + cuBLAS path instead, for comparisons.
fn use_pf_mm() -> bool {
    super::switch_on("DS4_CUDA_PF_MM")
}

/// Whether a prefill chunk's routed gate|up reads each sorted row's token from hc_pre's
/// permuted f16 copy of y (`PfScratch::y16p`) instead of a gathered copy (`pf_gather16`);
/// `DS4_CUDA_PF_DIRECT=0` gathers.
fn use_pf_direct() -> bool {
    super::switch_on("DS4_CUDA_PF_DIRECT")
}

/// Whether production prefill's hc_pre runs as `k_hc_pre_pf` + `k_hc_comb` (default;
/// `DS4_CUDA_HC_PRE_PF=0` keeps one `k_hc_pre` block per token, for comparisons).
fn use_hc_pre_pf() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| super::switch_on("DS4_CUDA_HC_PRE_PF"))
}

/// Whether production prefill's tensor-core attention normalizes and rotates the query heads
/// itself, from the q_b product (default; `DS4_CUDA_QNORM=0` keeps `k_head_norm_rope` in
/// place before it, for comparisons; read at every chunk, so `ds4 cuda model --variants`
/// can compare both in one process).
fn use_qnorm() -> bool {
    super::switch_on("DS4_CUDA_QNORM")
}

/// Whether production prefill's hc_post kernels also form the next site's HC `fn` product
/// (`k_hc_post4_fn` / `k_hc_post_moe_fn`, forward.cu) instead of writing the state's f16 copy
/// for a cuBLAS GEMM; `DS4_CUDA_HC_FN=0` keeps the GEMM. Read at every chunk (so `ds4 cuda
/// model --variants` can compare the two).
fn use_hc_fn() -> bool {
    super::switch_on("DS4_CUDA_HC_FN")
}

/// Tokens a block of the fused hc_post + `fn` kernels takes (HPF_TT in forward.cu).
const HPF_TT: usize = 16;

/// The production prefill hc_pre kernel for width `d` and the columns (of 4 elements) a
/// thread owns: with `wide`, `k_hc_pre_pf512` (`true`) with the smallest of 1, 2 columns that
/// leaves at most 512 threads, a multiple of 32 (the only column counts that entry takes);
/// otherwise, or where that fails, `k_hc_pre_pf` (`false`) with the smallest of 1, 2, 4 that
/// leaves at most 256. None: the shape is not taken (n_hc ≠ 4, or d too wide or odd).
fn hc_pre_pf_pick(n_hc: usize, d: usize, wide: bool) -> Option<(bool, usize)> {
    if n_hc != 4 {
        return None;
    }
    let find = |cols: &[usize], max_threads: usize| {
        cols.iter().copied().find(|&c| {
            d.is_multiple_of(4 * c)
                && d / (4 * c) <= max_threads
                && (d / (4 * c)).is_multiple_of(32)
        })
    };
    wide.then(|| find(&[1, 2], 512))
        .flatten()
        .map(|c| (true, c))
        .or_else(|| find(&[1, 2, 4], 256).map(|c| (false, c)))
}

/// Whether production prefill's hc_pre takes 512-thread blocks where the width allows
/// (`k_hc_pre_pf512`: at d = 4096, two blocks an SM of 2 columns a thread) rather than 256
/// (`DS4_CUDA_HC_PRE_T=256`: `k_hc_pre_pf`, 4 columns a thread; read at every chunk, for
/// `--variants`).
fn hc_pre_wide() -> bool {
    std::env::var("DS4_CUDA_HC_PRE_T").ok().as_deref() != Some("256")
}

/// Whether production prefill's q_b GEMM writes f16 queries for the tensor-core attention
/// (default; `DS4_CUDA_Q16=0` keeps f32, for comparisons).
fn use_q16() -> bool {
    super::switch_on("DS4_CUDA_Q16")
}

/// Whether the production prefill's router product runs as a cuBLAS f32 GEMM (default;
/// `DS4_CUDA_ROUTER_SGEMM=0` keeps the f32 CUDA-core `mm_<t>` kernel, for comparisons).
fn use_router_sgemm() -> bool {
    super::switch_on("DS4_CUDA_ROUTER_SGEMM")
}

/// Whether that GEMM runs on tensor cores as three f16 planes of its input where the weight
/// is f16 (`dense_split3`; default, `DS4_CUDA_ROUTER_SPLIT3=0` keeps the f32 GEMM; read at
/// every chunk, for `--variants`).
fn use_router_split3() -> bool {
    super::switch_on("DS4_CUDA_ROUTER_SPLIT3")
}

/// A captured decode step's executable graph and the key it was captured for. A new key
/// captures again and first tries to update this executable in place (`cuGraphExecUpdate`:
/// the same kernels in the same order, other grid sizes and arguments), which costs much less
/// than instantiating the ~1,300-node graph anew; a graph whose shape changed is instantiated.
struct DecodeGraph {
    key: Vec<u64>,
    exec: sys::CUgraphExec,
    stream: Arc<CudaStream>,
}

// SAFETY: a CUDA graph exec may be launched from any thread as long as calls on it are
// serialized; it is only used through `&mut GpuSession` under the model's lock.
unsafe impl Send for DecodeGraph {}

impl Drop for DecodeGraph {
    fn drop(&mut self) {
        // SAFETY: the exec is owned here and no longer launched; errors at teardown have
        // nowhere to go (the context records them).
        unsafe {
            let _ = sys::cuGraphExecDestroy(self.exec);
        }
    }
}

impl DecodeGraph {
    /// Ends the stream capture begun on `st` and makes `old`'s executable run the captured
    /// graph (updated in place when possible, else a new instantiation).
    fn end_capture(
        st: &Arc<CudaStream>,
        key: Vec<u64>,
        old: Option<DecodeGraph>,
    ) -> Result<DecodeGraph> {
        let mut graph: sys::CUgraph = std::ptr::null_mut();
        // SAFETY: the capture was begun on this stream by this thread; the graph it returns
        // is owned here and destroyed below (an executable does not need its source graph).
        unsafe { sys::cuStreamEndCapture(st.cu_stream(), &mut graph).result()? };
        if graph.is_null() {
            return Err(CudaError::Invalid("empty decode graph".into()));
        }
        let built = (|| -> Result<DecodeGraph> {
            if let Some(mut g) = old {
                // SAFETY: `g.exec` and `graph` are live; a zeroed result info is valid input.
                let ok = unsafe {
                    let mut info: sys::CUgraphExecUpdateResultInfo = std::mem::zeroed();
                    sys::cuGraphExecUpdate_v2(g.exec, graph, &mut info)
                        == sys::CUresult::CUDA_SUCCESS
                };
                if ok {
                    g.key = key;
                    return Ok(g);
                }
                // Not updatable: drop the old executable and instantiate.
            }
            let mut exec: sys::CUgraphExec = std::ptr::null_mut();
            // Each kernel node keeps the priority of the stream it was captured on (device.rs
            // CudaBackend::init: the indexer's side stream highest, the other side stream
            // lowest) instead of taking the launch stream's.
            let flags = if super::device::use_priorities() {
                8 // CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY
            } else {
                0
            };
            // SAFETY: `graph` is a complete captured graph.
            unsafe { sys::cuGraphInstantiateWithFlags(&mut exec, graph, flags).result()? };
            Ok(DecodeGraph {
                key,
                exec,
                stream: st.clone(),
            })
        })();
        // SAFETY: `graph` is not used after this (the executable is independent of it).
        unsafe {
            let _ = sys::cuGraphDestroy(graph);
        }
        let g = built?;
        // SAFETY: a live executable on its own stream.
        unsafe { sys::cuGraphUpload(g.exec, st.cu_stream()).result()? };
        Ok(g)
    }

    fn launch(&self) -> Result<()> {
        // SAFETY: a live executable launched on the stream it was captured from.
        unsafe { sys::cuGraphLaunch(self.exec, self.stream.cu_stream()).result()? };
        Ok(())
    }
}

fn ptr<T>(s: &CudaSlice<T>, st: &CudaStream) -> u64 {
    let (p, _g) = s.device_ptr(st);
    p
}

/// Queues one launch of `$f` with the listed arguments (each must be a `DeviceRepr` value).
macro_rules! launch {
    ($st:expr, $f:expr, $grid:expr, $block:expr, $smem:expr, [$($a:expr),* $(,)?]) => {{
        let cfg = LaunchConfig {
            grid_dim: $grid,
            block_dim: $block,
            shared_mem_bytes: $smem as u32,
        };
        let mut b = $st.launch_builder(&$f);
        $( let v = $a; b.arg(&v); )*
        // SAFETY: the argument list matches the kernel's signature in forward.cu, and every
        // pointer is a live device buffer sized by the caller for this launch.
        unsafe { b.launch(cfg) }?;
    }};
}

/// [`launch!`] for a kernel that begins with `pdl_enter()` (quant.cu), through
/// [`CudaBackend::launch_slots`]: with programmatic stream serialization while the backend's
/// PDL switch is on (decode graph capture), a plain launch otherwise. Either way on the
/// backend's current stream (`CudaBackend::st`: the side stream inside a fork), as the
/// backend's own launchers do.
macro_rules! launchp {
    ($be:expr, $f:expr, $grid:expr, $block:expr, $smem:expr, [$($a:expr),* $(,)?]) => {{
        let cfg = LaunchConfig {
            grid_dim: $grid,
            block_dim: $block,
            shared_mem_bytes: $smem as u32,
        };
        let mut a = [$(Slot::slot($a)),*];
        // SAFETY: as launch!; the kernel starts with pdl_enter().
        unsafe { $be.launch_slots(&$f, cfg, &mut a) }?;
    }};
}

struct Kernels {
    embed: CudaFunction,
    rms_norm: CudaFunction,
    rms_norm_h: CudaFunction,
    head_norm_rope: CudaFunction,
    rope_cs: CudaFunction,
    kv_finish: CudaFunction,
    idx_q_finish: CudaFunction,
    /// k_idx_q_finish_w<E> for E = 2, 4, 8 (indexer key lengths 64, 128, 256).
    idx_q_finish_w: [CudaFunction; 3],
    hc_pre: CudaFunction,
    hc_pre_pf: CudaFunction,
    hc_pre_pf512: CudaFunction,
    hc_comb: CudaFunction,
    hc_mix_part: CudaFunction,
    hc_post_mix: CudaFunction,
    hc_pre1: CudaFunction,
    sinkhorn1: CudaFunction,
    rms_norm_q8: CudaFunction,
    qkv_finish1: CudaFunction,
    hc_post_moe: CudaFunction,
    hc_post_ring: CudaFunction,
    hc_post: CudaFunction,
    hc_post4: CudaFunction,
    hc_post_moe_pf: CudaFunction,
    hc_post4_fn: CudaFunction,
    hc_post_moe_fn: CudaFunction,
    hc_head: CudaFunction,
    at: AttnKernels,
    attend_ref: CudaFunction,
    idx_scores_ref: CudaFunction,
    ring_push: CudaFunction,
    route: CudaFunction,
    expand: CudaFunction,
    swiglu: CudaFunction,
    moe_sum: CudaFunction,
    fill: CudaFunction,
    sample_prep: CudaFunction,
    sample_mb: CudaFunction,
    mv2_f16: CudaFunction,
    pf: PfKernels,
}

impl Kernels {
    fn load(be: &CudaBackend) -> Result<Kernels> {
        let f = |n: &str| be.function(n);
        let k = Kernels {
            embed: f("k_embed")?,
            rms_norm: f("k_rms_norm")?,
            rms_norm_h: f("k_rms_norm_h")?,
            head_norm_rope: f("k_head_norm_rope")?,
            rope_cs: f("k_rope_cs")?,
            kv_finish: f("k_kv_finish")?,
            idx_q_finish: f("k_idx_q_finish")?,
            idx_q_finish_w: [
                f("k_idx_q_finish_w2")?,
                f("k_idx_q_finish_w4")?,
                f("k_idx_q_finish_w8")?,
            ],
            hc_pre: f("k_hc_pre")?,
            hc_pre_pf: f("k_hc_pre_pf")?,
            hc_pre_pf512: f("k_hc_pre_pf512")?,
            hc_comb: f("k_hc_comb")?,
            hc_mix_part: f("k_hc_mix_part")?,
            hc_post_mix: f("k_hc_post_mix")?,
            hc_pre1: f("k_hc_pre1")?,
            sinkhorn1: f("k_sinkhorn1")?,
            rms_norm_q8: f("k_rms_norm_q8")?,
            qkv_finish1: f("k_qkv_finish1")?,
            hc_post_moe: f("k_hc_post_moe")?,
            hc_post_ring: f("k_hc_post_ring")?,
            hc_post: f("k_hc_post")?,
            hc_post4: f("k_hc_post4")?,
            hc_post_moe_pf: f("k_hc_post_moe_pf")?,
            hc_post4_fn: f("k_hc_post4_fn")?,
            hc_post_moe_fn: f("k_hc_post_moe_fn")?,
            hc_head: f("k_hc_head")?,
            at: AttnKernels::load(be)?,
            attend_ref: f("k_attend")?,
            idx_scores_ref: f("k_idx_scores_ref")?,
            ring_push: f("k_ring_push")?,
            route: f("k_route")?,
            expand: f("k_expand")?,
            swiglu: f("k_swiglu")?,
            moe_sum: f("k_moe_sum")?,
            fill: f("k_fill")?,
            sample_prep: f("k_sample_prep")?,
            sample_mb: f("k_sample_mb")?,
            mv2_f16: f("mv2_f16")?,
            pf: PfKernels::load(be)?,
        };
        // Exact-mode attention keeps one score per visible row in shared memory; long
        // contexts at ratio 128 need more than the default 48 KiB.
        k.attend_ref.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            ATTEND_SMEM as i32,
        )?;
        Ok(k)
    }
}

struct GpuComp {
    kv: GpuWeight,
    gate: GpuWeight,
    ape: CudaSlice<f32>,
    norm: CudaSlice<f32>,
}

struct GpuIndexer {
    comp: GpuComp,
    q_b: GpuWeight,
    proj: GpuWeight,
}

struct GpuLayer {
    ratio: usize,
    freqs: CudaSlice<f64>,
    hc_attn_fn: GpuWeight,
    hc_attn_scale: CudaSlice<f32>,
    hc_attn_base: CudaSlice<f32>,
    attn_norm: CudaSlice<f32>,
    q_a: GpuWeight,
    q_a_norm: CudaSlice<f32>,
    q_b: GpuWeight,
    kv: GpuWeight,
    kv_a_norm: CudaSlice<f32>,
    sinks: CudaSlice<f32>,
    /// `attn_output_a` as a stack of `G` matrices (`Lo × H·Dh/G`), one per group.
    out_a: GpuWeight,
    out_b: GpuWeight,
    comp: Option<GpuComp>,
    indexer: Option<GpuIndexer>,
    hc_ffn_fn: GpuWeight,
    hc_ffn_scale: CudaSlice<f32>,
    hc_ffn_base: CudaSlice<f32>,
    ffn_norm: CudaSlice<f32>,
    /// Bound on |router input|: √D · max |ffn_norm| (an RMS-normalized row has no element
    /// above √D times its weight), for `dense_split3`'s f16 range.
    router_x_bound: f32,
    gate_inp: GpuWeight,
    /// The router's weight decoded to f32 once (`attach_prefill_copies`), for production
    /// prefill's f32 router GEMM; without it each chunk decodes it again.
    gate_inp32: Option<CudaSlice<f32>>,
    exp_bias: Option<CudaSlice<f32>>,
    tid2eid: Option<CudaSlice<i32>>,
    gate_exps: GpuWeight,
    up_exps: GpuWeight,
    down_exps: GpuWeight,
    sh_gate: GpuWeight,
    sh_up: GpuWeight,
    sh_down: GpuWeight,
    clamp: f32,
}

/// The weights production prefill multiplies through the dense f16 GEMMs (prefill.rs
/// `dense_gemm`) of layer `$l`, as `&` or (with `mut`) `&mut` references; the output head,
/// router and HC `fn` stay on f32 kernels.
macro_rules! dense_gemm_weights {
    ($l:expr $(, $m:tt)?) => {{
        let l = $l;
        let mut ws = vec![
            &$($m)? l.q_a,
            &$($m)? l.q_b,
            &$($m)? l.kv,
            &$($m)? l.out_a,
            &$($m)? l.out_b,
            &$($m)? l.sh_gate,
            &$($m)? l.sh_up,
            &$($m)? l.sh_down,
        ];
        if let Some(c) = &$($m)? l.comp {
            ws.push(&$($m)? c.kv);
            ws.push(&$($m)? c.gate);
        }
        if let Some(i) = &$($m)? l.indexer {
            ws.push(&$($m)? i.comp.kv);
            ws.push(&$($m)? i.comp.gate);
            ws.push(&$($m)? i.q_b);
            ws.push(&$($m)? i.proj);
        }
        ws
    }};
}

impl GpuLayer {
    fn dense_gemm_weights(&self) -> Vec<&GpuWeight> {
        dense_gemm_weights!(self)
    }
    fn dense_gemm_weights_mut(&mut self) -> Vec<&mut GpuWeight> {
        dense_gemm_weights!(self, mut)
    }
}

/// GPU memory `attach_prefill_copies` leaves free for sessions (KV caches, scratch) at least.
const F16_COPY_RESERVE: usize = 24 << 30;

/// Gives the quantized dense weights (not F16, which the GEMMs read as they are) an f16
/// copy, so production prefill does not dequantize them again for every chunk (for the q2
/// Flash model ~9% more weight memory for ~2.5% of a chunk's time, bench/RESULTS.md), and
/// the router's weight an f32 copy where its product is the f32 GEMM (`wants_router32`: 4 MB
/// and ~10 µs a layer at the Flash shapes), when the GPU keeps at least `F16_COPY_RESERVE`
/// free afterwards. `DS4_CUDA_F16_COPY=0` never makes them, `=1` always does. Returns the
/// bytes taken.
fn attach_prefill_copies(be: &CudaBackend, layers: &mut [GpuLayer]) -> Result<usize> {
    let mode = std::env::var("DS4_CUDA_F16_COPY").ok();
    if mode.as_deref() == Some("0") {
        return Ok(0);
    }
    let wanted = |w: &GpuWeight| !matches!(w.ty, GgmlType::F16 | GgmlType::F32);
    let need: usize = layers
        .iter()
        .flat_map(|l| l.dense_gemm_weights())
        .filter(|w| wanted(w))
        .map(|w| w.f16_bytes())
        .sum::<usize>()
        + layers
            .iter()
            .filter(|l| wants_router32(be, l))
            .map(|l| 4 * l.gate_inp.n_rows * l.gate_inp.n_cols)
            .sum::<usize>();
    let (free, _) = be.mem_info()?;
    if mode.as_deref() != Some("1") && free < need + F16_COPY_RESERVE {
        return Ok(0);
    }
    for l in layers.iter_mut() {
        for w in l.dense_gemm_weights_mut() {
            if wanted(w) {
                be.attach_f16(w)?;
            }
        }
        if !wants_router32(be, l) {
            continue;
        }
        let w32 = be.alloc_f32(l.gate_inp.n_rows * l.gate_inp.n_cols)?;
        // SAFETY: w32 holds the weight's n_rows × n_cols floats.
        unsafe { be.dq_f32_raw(&l.gate_inp, w32.device_ptr(be.stream()).0)? };
        l.gate_inp32 = Some(w32);
    }
    Ok(need)
}

/// Whether a layer's router takes the f32 GEMM in production prefill (and so gets the f32 copy
/// of its weight): not where its product runs on tensor cores (`dense_split3`; with
/// `DS4_CUDA_ROUTER_SPLIT3=0` set later the f32 GEMM decodes the weight each chunk).
fn wants_router32(be: &CudaBackend, l: &GpuLayer) -> bool {
    !(use_router_split3() && split3_fits(be, &l.gate_inp, l.router_x_bound))
}

/// Every weight of a model, resident on one GPU.
pub struct GpuModel {
    be: CudaBackend,
    k: Kernels,
    embd: GpuWeight,
    output: GpuWeight,
    output_hc_fn: GpuWeight,
    output_hc_base: CudaSlice<f32>,
    output_hc_scale: f32,
    /// The scale again, three times: `k_hc_pre1`'s `scale3` in its head form.
    output_hc_scale3: CudaSlice<f32>,
    output_norm: CudaSlice<f32>,
    layers: Vec<GpuLayer>,
    /// Serializes sessions' forward calls: they share the backend's one stream.
    lock: Mutex<()>,
    /// Bytes of weights one decode step reads (dense + selected experts + head).
    pub bytes_per_token: usize,
    /// Device bytes of all weights.
    pub device_bytes: usize,
}

/// Why weights of `need` bytes cannot go on a GPU with `free` bytes free, if they cannot.
/// The device holds every tensor as stored in the file (plus sessions' KV and scratch on top),
/// so a file larger than the free memory can never be uploaded.
fn wont_fit(need: usize, free: usize, gpu: &str) -> Option<String> {
    const GIB: f64 = 1073741824.0;
    (need > free).then(|| {
        format!(
            "the model's weights need {:.1} GiB of GPU memory and {gpu} has {:.1} GiB free \
             (sessions need more on top); use --backend cpu, a smaller quantization, or a \
             larger GPU",
            need as f64 / GIB,
            free as f64 / GIB
        )
    })
}

/// Why a model cannot run on the GPU (checked before anything is uploaded).
pub fn unsupported(model: &Model) -> Option<String> {
    let c = &model.cfg;
    if c.hc > MAX_HC {
        return Some(format!(
            "{} HC streams (the GPU kernels take at most {MAX_HC})",
            c.hc
        ));
    }
    if c.n_expert_used > 64 || c.n_expert_used == 0 {
        return Some(format!(
            "{} experts per token (1..64 supported)",
            c.n_expert_used
        ));
    }
    if c.head_dim > ATTEND_MAX_DH || c.idx_dim > MAX_COMP_D {
        return Some(format!("head dim {} over {ATTEND_MAX_DH}", c.head_dim));
    }
    for il in 0..c.n_layer {
        let r = c.ratio(il);
        if r != 0 && r * c.compressor_width(r) / c.head_dim > attn::MAX_COMP_CAND {
            return Some(format!(
                "compress ratio {r} (the GPU compressor pools at most {} candidates)",
                attn::MAX_COMP_CAND
            ));
        }
    }
    if !c.head_dim.is_multiple_of(32) || !c.idx_dim.is_multiple_of(32) {
        return Some(format!(
            "head dims {} / {} (the attention tiles need multiples of 32)",
            c.head_dim, c.idx_dim
        ));
    }
    for t in model.file.tensors() {
        let cols = t.dims.first().copied().unwrap_or(1);
        let small = t.dims.len() == 1 || t.ty == GgmlType::I32;
        if !small && !cols.is_multiple_of(32) {
            return Some(format!("{}: {cols} columns (not a multiple of 32)", t.name));
        }
    }
    None
}

fn f32_of(model: &Model, t: &TensorInfo) -> Vec<f32> {
    let mut v = vec![0f32; t.n_elements() as usize];
    quant::dequantize_row(t.ty, model.data(t), &mut v);
    v
}

struct Uploader<'a> {
    be: &'a CudaBackend,
    model: &'a Model,
    done: usize,
    total: usize,
    progress: &'a mut dyn FnMut(usize, usize),
    device_bytes: usize,
}

impl Uploader<'_> {
    /// Uploads a matrix (or a stack of `n_experts`), converting types without GPU kernels
    /// (BF16) to F32 on the host.
    fn weight(&mut self, t: &TensorInfo, n_experts: usize) -> Result<GpuWeight> {
        let cols = t.dims[0] as usize;
        let rows = t.dims.iter().skip(1).product::<u64>() as usize / n_experts;
        let base = self.done;
        let total = self.total;
        let progress = &mut *self.progress;
        let mut cb = |d: usize, _: usize| progress(base + d, total);
        let w = if SUPPORTED_TYPES.contains(&t.ty) {
            self.be
                .upload_weight(t.ty, self.model.data(t), rows, cols, n_experts, &mut cb)?
        } else {
            let v = f32_of(self.model, t);
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            self.be
                .upload_weight(GgmlType::F32, &bytes, rows, cols, n_experts, &mut cb)?
        };
        self.done += t.n_bytes as usize;
        self.device_bytes += w.device_bytes();
        Ok(w)
    }

    fn vec(&mut self, v: &[f32]) -> Result<CudaSlice<f32>> {
        self.device_bytes += v.len() * 4;
        self.be.upload_f32(v)
    }
}

impl GpuModel {
    /// Uploads every weight of `model` to device 0. `progress(done, total)` gets bytes.
    pub fn new(model: &Model, progress: &mut dyn FnMut(usize, usize)) -> Result<GpuModel> {
        if let Some(why) = unsupported(model) {
            return Err(CudaError::Unavailable(format!(
                "model not supported on GPU: {why}"
            )));
        }
        let be = CudaBackend::new(0)?;
        let total: usize = model
            .file
            .tensors()
            .iter()
            .map(|t| t.n_bytes as usize)
            .sum();
        // Refuse at once what cannot fit, rather than after minutes of uploading.
        let (free, _) = be.mem_info()?;
        if let Some(why) = wont_fit(total, free, &be.info().name) {
            return Err(CudaError::Unavailable(why));
        }
        let k = Kernels::load(&be)?;
        let (c, w, p) = (&model.cfg, &model.weights, &model.params);
        let mut up = Uploader {
            be: &be,
            model,
            done: 0,
            total,
            progress,
            device_bytes: 0,
        };
        let embd = up.weight(&w.token_embd, 1)?;
        let output = up.weight(&w.output, 1)?;
        let output_hc_fn = up.weight(&w.output_hc_fn, 1)?;
        let output_hc_base = up.vec(&p.output_hc_base)?;
        let output_norm = up.vec(&p.output_norm)?;
        let output_hc_scale3 = up.vec(&[p.output_hc_scale; 3])?;
        let mut layers = Vec::with_capacity(c.n_layer);
        let mut bytes_per_token =
            embd.n_cols * 4 + output.matrix_bytes() + output_hc_fn.matrix_bytes();
        for (il, (lw, lp)) in w.layers.iter().zip(&p.layers).enumerate() {
            let comp = |up: &mut Uploader,
                        cw: &crate::model::weights::CompressorWeights,
                        cp: &crate::model::params::CompressorParams|
             -> Result<GpuComp> {
                Ok(GpuComp {
                    kv: up.weight(&cw.kv, 1)?,
                    gate: up.weight(&cw.gate, 1)?,
                    ape: up.vec(&cp.ape)?,
                    norm: up.vec(&cp.norm)?,
                })
            };
            let comp_w = match (&lw.attn_compressor, &lp.compressor) {
                (Some(cw), Some(cp)) => Some(comp(&mut up, cw, cp)?),
                _ => None,
            };
            let indexer = match (&lw.indexer, &lp.indexer_compressor) {
                (Some(iw), Some(cp)) => Some(GpuIndexer {
                    comp: comp(&mut up, &iw.compressor, cp)?,
                    q_b: up.weight(&iw.attn_q_b, 1)?,
                    proj: up.weight(&iw.proj, 1)?,
                }),
                _ => None,
            };
            let freqs: Vec<f64> = lp.rope.freqs().to_vec();
            let tid2eid = match &lp.tid2eid {
                Some(t) => {
                    let v: Vec<i32> = t.iter().map(|&e| e as i32).collect();
                    Some(be.upload_i32(&v)?)
                }
                None => None,
            };
            let layer = GpuLayer {
                ratio: lp.ratio,
                freqs: be.stream().clone_htod(&freqs)?,
                hc_attn_fn: up.weight(&lw.hc_attn_fn, 1)?,
                hc_attn_scale: up.vec(&lp.hc_attn.scale)?,
                hc_attn_base: up.vec(&lp.hc_attn.base)?,
                attn_norm: up.vec(&lp.attn_norm)?,
                q_a: up.weight(&lw.attn_q_a, 1)?,
                q_a_norm: up.vec(&lp.q_a_norm)?,
                q_b: up.weight(&lw.attn_q_b, 1)?,
                kv: up.weight(&lw.attn_kv, 1)?,
                kv_a_norm: up.vec(&lp.kv_a_norm)?,
                sinks: up.vec(&lp.sinks)?,
                out_a: up.weight(&lw.attn_output_a, c.o_groups)?,
                out_b: up.weight(&lw.attn_output_b, 1)?,
                comp: comp_w,
                indexer,
                hc_ffn_fn: up.weight(&lw.hc_ffn_fn, 1)?,
                hc_ffn_scale: up.vec(&lp.hc_ffn.scale)?,
                hc_ffn_base: up.vec(&lp.hc_ffn.base)?,
                ffn_norm: up.vec(&lp.ffn_norm)?,
                router_x_bound: (lp.ffn_norm.len() as f32).sqrt()
                    * lp.ffn_norm.iter().fold(0f32, |a, v| a.max(v.abs())),
                gate_inp: up.weight(&lw.ffn_gate_inp, 1)?,
                gate_inp32: None,
                exp_bias: lp.expert_bias.as_ref().map(|b| up.vec(b)).transpose()?,
                tid2eid,
                gate_exps: up.weight(&lw.ffn_gate_exps, c.n_expert)?,
                up_exps: up.weight(&lw.ffn_up_exps, c.n_expert)?,
                down_exps: up.weight(&lw.ffn_down_exps, c.n_expert)?,
                sh_gate: up.weight(&lw.ffn_gate_shexp, 1)?,
                sh_up: up.weight(&lw.ffn_up_shexp, 1)?,
                sh_down: up.weight(&lw.ffn_down_shexp, 1)?,
                clamp: c.swiglu_clamp[il],
            };
            let l = &layer;
            let mut b = l.hc_attn_fn.matrix_bytes()
                + l.q_a.matrix_bytes()
                + l.q_b.matrix_bytes()
                + l.kv.matrix_bytes()
                + l.out_a.matrix_bytes() * c.o_groups
                + l.out_b.matrix_bytes()
                + l.hc_ffn_fn.matrix_bytes()
                + l.gate_inp.matrix_bytes()
                + c.n_expert_used
                    * (l.gate_exps.matrix_bytes()
                        + l.up_exps.matrix_bytes()
                        + l.down_exps.matrix_bytes())
                + l.sh_gate.matrix_bytes()
                + l.sh_up.matrix_bytes()
                + l.sh_down.matrix_bytes();
            for cw in l.comp.iter().chain(l.indexer.as_ref().map(|i| &i.comp)) {
                b += cw.kv.matrix_bytes() + cw.gate.matrix_bytes();
            }
            if let Some(i) = &l.indexer {
                b += i.q_b.matrix_bytes() + i.proj.matrix_bytes();
            }
            bytes_per_token += b;
            layers.push(layer);
        }
        let copy_bytes = attach_prefill_copies(&be, &mut layers)?;
        let device_bytes = up.device_bytes + copy_bytes;
        be.synchronize()?;
        Ok(GpuModel {
            be,
            k,
            embd,
            output,
            output_hc_fn,
            output_hc_base,
            output_hc_scale: p.output_hc_scale,
            output_hc_scale3,
            output_norm,
            layers,
            lock: Mutex::new(()),
            bytes_per_token,
            device_bytes,
        })
    }

    /// The backend (device, stream).
    pub fn backend(&self) -> &CudaBackend {
        &self.be
    }
}

/// One compressor's device state: frontier (`coff·r × W` values and scores) and its rows.
struct CompState {
    ratio: usize,
    d: usize,
    coff: usize,
    kv: CudaSlice<f32>,
    sc: CudaSlice<f32>,
    rows: CudaSlice<f32>,
    /// Rows `rows` can hold.
    cap: usize,
    max_rows: usize,
}

struct LayerState {
    ring: CudaSlice<f32>,
    comp: Option<CompState>,
    index: Option<CompState>,
}

impl LayerState {
    /// The layer's compressor states (main, then the indexer's), where it has them.
    fn comps_mut(&mut self) -> impl Iterator<Item = &mut CompState> {
        [&mut self.comp, &mut self.index].into_iter().flatten()
    }
}

/// Scratch of one session, sized for a chunk of `chunk_len` tokens.
struct Scratch {
    tokens: CudaSlice<i32>,
    /// Position of the chunk's first token (read by the kernels, so graphs can replay).
    pos: CudaSlice<i64>,
    x: CudaSlice<f32>,
    /// Decode: the other state buffer `k_hc_post_mix` writes (one token's n_hc × D).
    x2: CudaSlice<f32>,
    mix: CudaSlice<f32>,
    y: CudaSlice<f32>,
    f: CudaSlice<f32>,
    post: CudaSlice<f32>,
    comb: CudaSlice<f32>,
    /// Decode hc_pre: per-block partial control products and sums of squares.
    hcpart: CudaSlice<f32>,
    hcss: CudaSlice<f64>,
    /// The HC combination logits `k_hc_pre1` leaves to `k_sinkhorn1` (n·n).
    clog: CudaSlice<f32>,
    qr: CudaSlice<f32>,
    q: CudaSlice<f32>,
    kv: CudaSlice<f32>,
    ckv: CudaSlice<f32>,
    csc: CudaSlice<f32>,
    /// A decode step's indexer-compressor products (one row each): that compressor may run
    /// on another stream than the main one, at the same time (`fork3`).
    ickv: CudaSlice<f32>,
    icsc: CudaSlice<f32>,
    iq: CudaSlice<f32>,
    iw: CudaSlice<f32>,
    isc: CudaSlice<f32>,
    /// The indexer queries as bf16 (`chunk × idx_heads × idx_dim`; 1 without an
    /// indexer), written by `k_idx_q_finish` for `k_idx_scores_tc`.
    iq16: CudaSlice<u16>,
    isc_ld: usize,
    sel: CudaSlice<i32>,
    cnt: CudaSlice<i32>,
    /// `k_topk_mb`'s work buffer (histograms, counts, grid barrier), zero-initialized.
    topk_work: CudaSlice<i32>,
    /// A prefill chunk's RoPE angles for the layer at hand (`k_rope_cs`: `chunk ×
    /// n_rot/2` (cos, sin) pairs), read by the query and indexer-query finishes.
    rope_cs: CudaSlice<f32>,
    o: CudaSlice<f32>,
    /// Production-mode attention: scores `DECODE_SPLIT × 8 × n_head × att_rows` (decode
    /// steps' split partials; `chunk × …` when chunks take the f32 passes too, i.e.
    /// `DS4_CUDA_ATT_TC=0` or the tiled passes forced in exact mode — tensor-core chunks keep
    /// their scores in shared memory), partial outputs of a split pass `DECODE_SPLIT × 8 ×
    /// n_head × Dh`, inverse denominators `chunk × n_head`.
    att_sc: CudaSlice<f32>,
    att_part: CudaSlice<f32>,
    att_inv: CudaSlice<f32>,
    /// Most rows a token attends to in any layer at this context.
    att_rows: usize,
    low: CudaSlice<f32>,
    gids: CudaSlice<i32>,
    rl: CudaSlice<f32>,
    ids: CudaSlice<i32>,
    wts: CudaSlice<f32>,
    zk: CudaSlice<f32>,
    g: CudaSlice<f32>,
    u: CudaSlice<f32>,
    shg: CudaSlice<f32>,
    shu: CudaSlice<f32>,
    dn: CudaSlice<f32>,
    sh: CudaSlice<f32>,
    h: CudaSlice<f32>,
    logits: CudaSlice<f32>,
    /// Production-mode decode: int8 activation codes and scales for Q8_0 weights (`q0`,
    /// `d0`) and for Q8_K-activation weights (`qk`, `dk`); codes are bytes held in f32 words.
    q0: CudaSlice<f32>,
    d0: CudaSlice<f32>,
    qk: CudaSlice<f32>,
    dk: CudaSlice<f32>,
    /// The same for products queued on the side stream (`CudaBackend::fork`), which run
    /// concurrently with the main stream's and so cannot share its scratch.
    q0s: CudaSlice<f32>,
    d0s: CudaSlice<f32>,
    qks: CudaSlice<f32>,
    dks: CudaSlice<f32>,
    /// Sampling: argmax, max bits, candidate count; then the candidates (`narrow`).
    nhead: CudaSlice<i32>,
    nids: CudaSlice<i32>,
    nvals: CudaSlice<f32>,
    /// Multi-block narrowing's scratch ([`narrow_scratch`]): blocks' bests, staged counts,
    /// ticket and staged ids; staged values.
    nwk: CudaSlice<i32>,
    nwv: CudaSlice<f32>,
    /// Production prefill on tensor cores (absent in exact mode).
    pf: Option<PfScratch>,
}

/// Most candidates [`GpuSession::narrow`] returns.
pub const NARROW_CAP: usize = 16384;

/// A logits row narrowed on the device for sampling.
#[derive(Debug, Clone, PartialEq)]
pub struct Narrowed {
    /// Argmax (lowest id on ties, NaN never wins) and its logit.
    pub best: u32,
    pub max: f32,
    /// `(id, logit)` of every token at or above the cut, in id order; `None` when more
    /// than the cap passed (the caller then reads the whole row).
    pub candidates: Option<Vec<(u32, f32)>>,
}

/// Elements of the logits row per block of the multi-block narrowing (sample.cu
/// `SP_CHUNK`).
const SP_CHUNK: usize = 1024;

/// Sizes of the multi-block narrowing's scratch for a row of `n`: i32 words (partials,
/// counts, ticket, staged ids) and f32 staged values.
pub(crate) fn narrow_scratch(n: usize) -> (usize, usize) {
    let g = n.div_ceil(SP_CHUNK);
    (3 * g + 1 + g * SP_CHUNK, g * SP_CHUNK)
}

/// Whether the logits row is narrowed over many blocks (`k_sample_mb`);
/// `DS4_CUDA_NARROW_MB=0` keeps the one-block `k_sample_prep`, for comparisons.
pub(crate) fn multi_block_narrow() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| super::switch_on("DS4_CUDA_NARROW_MB"))
}

/// Queues the narrowing of a logits row of `n` (kernels/sample.cu): `k = [k_sample_prep,
/// k_sample_mb]`, `ints = [head, wk, ids]`, `floats = [wk values, vals]`. `feed` = `(token,
/// position, next)`: the argmax is also stored at `token` (one i32) and `next` at `position`
/// (one i64), the next decode step's input; `None`: nothing more.
///
/// # Safety
/// `logits` holds `n` floats, `head` 3 ints, `ids`/`vals` at least `cap` entries, `wk`/`wv`
/// [`narrow_scratch`]`(n)` (`wk` zero before the first call; the kernel leaves it so); `feed`'s
/// pointers one i32 and one i64.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn narrow_launch(
    st: &CudaStream,
    k: [&CudaFunction; 2],
    multi: bool,
    logits: u64,
    n: usize,
    inv_t: f32,
    cut: f32,
    cap: usize,
    ints: [u64; 3],
    floats: [u64; 2],
    feed: Option<(u64, u64, i64)>,
) -> Result<()> {
    let [head, wk, ids] = ints;
    let [wv, vals] = floats;
    let (nn, cap) = (n as i32, cap as i32);
    let (ft, fp, next) = feed.unwrap_or((0, 0, 0));
    if !multi {
        launch!(
            st,
            k[0],
            (1, 1, 1),
            (1024, 1, 1),
            0,
            [logits, nn, inv_t, cut, cap, head, ids, vals, ft, fp, next]
        );
        return Ok(());
    }
    let g = n.div_ceil(SP_CHUNK) as u32;
    launch!(
        st,
        k[1],
        (g, 1, 1),
        (256, 1, 1),
        0,
        [logits, nn, inv_t, cut, cap, wk, wv, head, ids, vals, ft, fp, next]
    );
    Ok(())
}

/// Scratch of the production prefill GEMMs.
struct PfScratch {
    /// One dense weight (or the stacked `attn_output_a`) as f16.
    w16: CudaSlice<u16>,
    /// A dense product's input as f16 (also the attention output, written as f16 by the
    /// tensor-core attention for attn_output_a).
    x16: CudaSlice<u16>,
    /// f16 copies written by their producers (so the GEMMs reading them convert nothing):
    /// hc_pre's `y` (`chunk × D`) and the normalized `qr` (`chunk × q_lora_rank`).
    y16: CudaSlice<u16>,
    qr16: CudaSlice<u16>,
    /// The shared expert's SwiGLU output as f16 (`chunk × widest shared gate`), its down
    /// product's input.
    sh16: CudaSlice<u16>,
    /// The FFN site's `y` as f16 in the column order of the routed experts' gate|up kernel
    /// (`px_pos`), which reads each sorted row's token from it (no gathered copy).
    y16p: CudaSlice<u16>,
    /// out_a's output `low` as f16 (`chunk × o_groups × o_lora_rank`), out_b's input.
    low16: CudaSlice<u16>,
    /// The f16 copies of the rows the tensor-core attention reads (`k_att_rows16`): the raw
    /// window, a chunk's rows and the most compressed rows a layer keeps at this context,
    /// (`swa` + chunk + ctx / smallest ratio) × `head_dim` halves (1 when the tensor-core
    /// attention is not used).
    att16: CudaSlice<u16>,
    /// Per-token RMS scale of the state from `k_hc_pre_pf`, read by `k_hc_comb`.
    hsc: CudaSlice<f32>,
    /// Room for the router's weight decoded to f32 each chunk (its product stays f32, see
    /// `queue`); one float when the layers hold their f32 copies (`attach_prefill_copies`).
    w32: CudaSlice<f32>,
    /// The router product on tensor cores (`dense_split3`): its input as three f16 planes
    /// (3 × `GPU_CHUNK × D` halves) and its three partial logits (3 × `GPU_CHUNK × n_expert`),
    /// which `k_route` adds.
    rx3: CudaSlice<u16>,
    rparts: CudaSlice<f32>,
    moe: MoeScratch,
}

/// One conversation's state on the GPU.
pub struct GpuSession {
    gm: Arc<GpuModel>,
    ctx: usize,
    exact: bool,
    qat: bool,
    /// Tiled attention and indexer kernels (production mode, or forced); else the
    /// reference-order kernels, whose rounding the QAT golden fixture needs.
    tiled: bool,
    layers: Vec<LayerState>,
    s: Scratch,
    graph: Option<DecodeGraph>,
    vocab: usize,
    /// Tokens a prefill chunk holds at most (what the scratch is sized for; [`gpu_chunk`]).
    chunk_len: usize,
    /// The position after the last chunk (the next token's).
    next: usize,
    /// What `narrow` left in the token and position buffers for the next decode step,
    /// `position << 32 | token` ([`NOT_FED`]: nothing known): a step with that token at that
    /// position copies nothing to the device.
    fed: AtomicU64,
}

/// [`GpuSession::fed`] when the buffers hold nothing a step can take as is.
const NOT_FED: u64 = u64::MAX;

/// [`GpuSession::fed`]'s value for `token` at position `pos`.
fn feed_key(pos: usize, token: u32) -> u64 {
    ((pos as u64) << 32) | u64::from(token)
}

impl GpuSession {
    /// An empty session for a context of `ctx` positions.
    pub fn new(
        gm: Arc<GpuModel>,
        model: &Model,
        ctx: usize,
        exact: bool,
        qat: bool,
    ) -> Result<GpuSession> {
        let c = &model.cfg;
        let be = &gm.be;
        let tiled = !exact || FORCE_TILED.load(std::sync::atomic::Ordering::Relaxed);
        for il in 0..c.n_layer {
            let ratio = c.ratio(il);
            if !tiled && ratio != 0 && ratio != 4 {
                let rows = c.swa + ctx / ratio;
                if attend_smem(rows, c.head_dim) > ATTEND_SMEM {
                    return Err(CudaError::Unavailable(format!(
                        "context {ctx} needs {rows} attention rows per token (exact-mode GPU \
                         kernel takes {})",
                        ATTEND_SMEM / 4
                    )));
                }
            }
        }
        let mut layers = Vec::with_capacity(c.n_layer);
        for il in 0..c.n_layer {
            let ratio = c.ratio(il);
            let comp = |d: usize, width: usize| -> Result<CompState> {
                let coff = width / d;
                let n = coff * ratio * width;
                let mut sc = be.alloc_f32(n)?;
                fill(&gm, &mut sc, f32::NEG_INFINITY, n)?;
                Ok(CompState {
                    ratio,
                    d,
                    coff,
                    kv: be.alloc_f32(n)?,
                    sc,
                    rows: be.alloc_f32(64 * d)?,
                    cap: 64,
                    max_rows: ctx / ratio,
                })
            };
            layers.push(LayerState {
                ring: be.alloc_f32(c.swa * c.head_dim)?,
                comp: if ratio != 0 {
                    Some(comp(c.head_dim, c.compressor_width(ratio))?)
                } else {
                    None
                },
                index: if ratio == 4 {
                    Some(comp(c.idx_dim, 2 * c.idx_dim)?)
                } else {
                    None
                },
            });
        }
        let any4 = (0..c.n_layer).any(|il| c.ratio(il) == 4);
        // A multiple of 4 so that a chunk's top-k reads its score rows in 16-byte loads
        // (k_topk1).
        let isc_ld = if any4 {
            (ctx / 4 + 1).next_multiple_of(4)
        } else {
            1
        };
        let hd = c.n_head * c.head_dim;
        let cw = (0..c.n_layer)
            .map(|il| match c.ratio(il) {
                0 => 0,
                r => c.compressor_width(r),
            })
            .chain([2 * c.idx_dim])
            .max()
            .unwrap_or(1);
        let (k, f, d) = (c.n_expert_used, c.n_ff_exp, c.n_embd);
        let a = |n: usize| be.alloc_f32(n);
        // Widest input of a decode product (all slots of a grouped one together).
        let qn = [
            d,
            c.q_lora_rank,
            hd,
            c.o_groups * c.o_lora_rank,
            k * f,
            cw,
            c.idx_heads * c.idx_dim,
        ]
        .into_iter()
        .max()
        .unwrap_or(256)
        .next_multiple_of(256);
        // Production prefill chunks run the tensor-core attention (f16 row copies, no f32
        // score buffer).
        let tc_chunks =
            !exact && attn::use_tc() && attn::tc_supported(c.n_head, c.head_dim, c.n_rot / 2);
        let att_rows = c.swa
            + (0..c.n_layer)
                .map(|il| match c.ratio(il) {
                    0 => 0,
                    4 => c.idx_topk,
                    r => ctx / r,
                })
                .max()
                .unwrap_or(0);
        // The scratch of one chunk of m tokens.
        let scratch = |m: usize| -> Result<Scratch> {
            let gids: Vec<i32> = (0..m * c.o_groups)
                .map(|i| (i % c.o_groups) as i32)
                .collect();
            Ok(Scratch {
                tokens: be.upload_i32(&vec![0; m])?,
                pos: be.stream().clone_htod(&[0i64])?,
                x: a(m * c.hc * d)?,
                x2: a(c.hc * d)?,
                mix: a(m * c.hc_mix().max(c.hc))?,
                y: a(m * d)?,
                f: a(m * d)?,
                post: a(m * c.hc)?,
                comb: a(m * c.hc * c.hc)?,
                hcpart: a((c.hc * d).div_ceil(256) * c.hc_mix())?,
                hcss: be.stream().alloc_zeros::<f64>((c.hc * d).div_ceil(256))?,
                clog: a(c.hc * c.hc)?,
                qr: a(m * c.q_lora_rank)?,
                q: a(m * hd)?,
                kv: a(m * c.head_dim)?,
                ckv: a(m * cw)?,
                csc: a(m * cw)?,
                // A decode step's, or a prefill chunk's (the indexer's compressor runs beside
                // the main one on a fork, so it has product rows of its own).
                ickv: a(cw.max(m * 2 * c.idx_dim))?,
                icsc: a(cw.max(m * 2 * c.idx_dim))?,
                iq: a(m * c.idx_heads * c.idx_dim)?,
                iw: a(m * c.idx_heads)?,
                isc: a(if any4 { m * isc_ld } else { 1 })?,
                iq16: be.stream().alloc_zeros::<u16>(if any4 {
                    m * c.idx_heads * c.idx_dim
                } else {
                    1
                })?,
                isc_ld,
                sel: be.upload_i32(&vec![0; m * c.idx_topk.max(1)])?,
                cnt: be.upload_i32(&vec![0; m])?,
                topk_work: be.upload_i32(&vec![0; attn::TOPK_MB_WORDS])?,
                rope_cs: a(m * c.n_rot.max(2))?,
                o: a(m * hd)?,
                att_sc: a(if !tiled {
                    1
                } else {
                    // Production chunks of more than 8 tokens run on tensor cores (no scores
                    // buffer); the f32 passes then only serve decode steps (split partials).
                    let chunk_rows = if tc_chunks { 0 } else { m };
                    chunk_rows.max(attn::DECODE_SPLIT * 8) * c.n_head * att_rows
                })?,
                att_part: a(attn::DECODE_SPLIT * 8 * hd)?,
                att_inv: a(m * c.n_head)?,
                att_rows,
                low: a(m * c.o_groups * c.o_lora_rank)?,
                gids: be.upload_i32(&gids)?,
                rl: a(m * c.n_expert)?,
                ids: be.upload_i32(&vec![0; m * k])?,
                wts: a(m * k)?,
                zk: a(m * k * d)?,
                g: a(m * k * f)?,
                u: a(m * k * f)?,
                shg: a(m * f)?,
                shu: a(m * f)?,
                dn: a(m * k * d)?,
                sh: a(m * d)?,
                h: a(LOGITS_CHUNK * d)?,
                logits: a(LOGITS_CHUNK * c.n_vocab)?,
                q0: a(qn.div_ceil(4))?,
                d0: a(qn / 32)?,
                qk: a(qn.div_ceil(4))?,
                dk: a(qn / 256)?,
                q0s: a(qn.div_ceil(4))?,
                d0s: a(qn / 32)?,
                qks: a(qn.div_ceil(4))?,
                dks: a(qn / 256)?,
                nhead: be.upload_i32(&[0; 3])?,
                nids: be.upload_i32(&vec![0; NARROW_CAP])?,
                nvals: a(NARROW_CAP)?,
                nwk: be.upload_i32(&vec![0; narrow_scratch(c.n_vocab).0])?,
                nwv: a(narrow_scratch(c.n_vocab).1)?,
                pf: if exact {
                    None
                } else {
                    // Widest dense weight of a layer (stacked out_a counts whole) and widest
                    // dense input; the output head (vocab rows) stays on the f32 kernel.
                    let mut wmax = 0usize;
                    let mut xmax = hd;
                    for l in &gm.layers {
                        for w in l.dense_gemm_weights() {
                            wmax = wmax.max(w.n_rows * w.n_cols * w.n_experts);
                            xmax = xmax.max(w.n_cols);
                        }
                    }
                    Some(PfScratch {
                        w16: be.stream().alloc_zeros::<u16>(wmax.max(1))?,
                        x16: be.stream().alloc_zeros::<u16>(m * xmax)?,
                        y16: be.stream().alloc_zeros::<u16>(m * d)?,
                        y16p: be.stream().alloc_zeros::<u16>(m * d)?,
                        qr16: be.stream().alloc_zeros::<u16>(m * c.q_lora_rank)?,
                        sh16: be.stream().alloc_zeros::<u16>(
                            m * gm
                                .layers
                                .iter()
                                .map(|l| l.sh_gate.n_rows)
                                .max()
                                .unwrap_or(1),
                        )?,
                        low16: be
                            .stream()
                            .alloc_zeros::<u16>(m * c.o_groups * c.o_lora_rank)?,
                        att16: be.stream().alloc_zeros::<u16>(if tc_chunks {
                            let comp = (0..c.n_layer)
                                .map(|il| match c.ratio(il) {
                                    0 => 0,
                                    r => ctx / r,
                                })
                                .max()
                                .unwrap_or(0);
                            (c.swa + m + comp) * c.head_dim
                        } else {
                            1
                        })?,
                        hsc: a(m)?,
                        rparts: be.alloc_f32(3 * m * c.n_expert)?,
                        rx3: be.stream().alloc_zeros::<u16>(3 * m * d)?,
                        w32: be.alloc_f32(
                            gm.layers
                                .iter()
                                .filter(|l| l.gate_inp32.is_none())
                                .map(|l| l.gate_inp.n_rows * l.gate_inp.n_cols)
                                .max()
                                .unwrap_or(1),
                        )?,
                        moe: MoeScratch::new(
                            be,
                            m * k,
                            c.n_expert,
                            d,
                            f,
                            !use_pf_mm()
                                || gm
                                    .layers
                                    .iter()
                                    .any(|l| !fused_fits(&l.gate_exps, &l.up_exps, &l.down_exps)),
                        )?,
                    })
                },
            })
        };
        // The chunk for this context (no longer than the context can use), shorter (down to
        // the last of GPU_CHUNKS) while its scratch does not fit.
        let mut m = gpu_chunk(ctx).min(ctx.next_multiple_of(256).max(256));
        let s = loop {
            match scratch(m) {
                Ok(s) => break s,
                Err(e) if m > GPU_CHUNKS[2] && out_of_memory(&e) => {
                    let shorter = (m / 2).max(GPU_CHUNKS[2]);
                    eprintln!(
                        "ds4: prefill chunks of {m} tokens do not fit in GPU memory; using {shorter}"
                    );
                    m = shorter;
                }
                Err(e) => return Err(e),
            }
        };
        // Room for a chunk's compressed rows now, so that the first prefill chunk does not
        // allocate (a grown buffer costs ~17 µs of host calls, and the GPU waits for them at a
        // chunk's start: ~0.7 ms for the flash model's 42 ratio-4 buffers).
        for ls in layers.iter_mut() {
            for cs in ls.comps_mut() {
                grow_rows(be, cs, (m / cs.ratio).min(cs.max_rows))?;
            }
        }
        // The scratch's zeroing is queued on the stream: a new session is ready when it is
        // done, not inside its first prefill.
        be.synchronize()?;
        Ok(GpuSession {
            gm,
            ctx,
            exact,
            qat,
            tiled,
            layers,
            s,
            graph: None,
            vocab: c.n_vocab,
            chunk_len: m,
            next: 0,
            fed: AtomicU64::new(NOT_FED),
        })
    }

    /// Tokens a prefill chunk holds at most (longer `forward` calls are split).
    pub fn chunk_len(&self) -> usize {
        self.chunk_len
    }

    /// A session holding the state of CPU-format layer caches (snapshot restore).
    pub fn from_caches(
        gm: Arc<GpuModel>,
        model: &Model,
        ctx: usize,
        exact: bool,
        qat: bool,
        caches: &[LayerCache],
        pos: usize,
    ) -> Result<GpuSession> {
        let mut g = GpuSession::new(gm, model, ctx, exact, qat)?;
        let chunk = g.chunk_len;
        let be = &g.gm.be;
        for (ls, lc) in g.layers.iter_mut().zip(caches) {
            be.write_f32(&mut ls.ring, &lc.raw)?;
            for (st, hc) in [(&mut ls.comp, &lc.comp), (&mut ls.index, &lc.index)] {
                if let (Some(st), Some(hc)) = (st.as_mut(), hc.as_ref()) {
                    be.write_f32(&mut st.kv, &hc.state.kv)?;
                    be.write_f32(&mut st.sc, &hc.state.score)?;
                    // The restored rows and room for one more chunk's (a restored session is
                    // one about to be extended; see `new`).
                    let n = pos / st.ratio;
                    grow_rows(be, st, (n + chunk / st.ratio).min(st.max_rows).max(n))?;
                    if n > 0 {
                        let mut v = st.rows.slice_mut(0..n * st.d);
                        be.stream().memcpy_htod(&hc.rows.data[..n * st.d], &mut v)?;
                    }
                }
            }
        }
        be.synchronize()?;
        g.next = pos;
        Ok(g)
    }

    /// The state in the CPU's layer-cache form (for snapshots), after `pos` positions.
    pub fn to_caches(&self, model: &Model, pos: usize) -> Result<Vec<LayerCache>> {
        let c = &model.cfg;
        let be = &self.gm.be;
        let mut out = Vec::with_capacity(self.layers.len());
        for (il, ls) in self.layers.iter().enumerate() {
            let mut lc = LayerCache::new(c, il, self.ctx);
            lc.raw = be.download(&ls.ring)?;
            for (st, hc) in [(&ls.comp, &mut lc.comp), (&ls.index, &mut lc.index)] {
                if let (Some(st), Some(hc)) = (st.as_ref(), hc.as_mut()) {
                    hc.state.kv = be.download(&st.kv)?;
                    hc.state.score = be.download(&st.sc)?;
                    let n = pos / st.ratio;
                    let mut rows = vec![0f32; n * st.d];
                    if n > 0 {
                        be.stream()
                            .memcpy_dtoh(&st.rows.slice(0..n * st.d), &mut rows)?;
                    }
                    be.synchronize()?;
                    hc.rows.data = rows;
                }
            }
            out.push(lc);
        }
        Ok(out)
    }

    /// Device bytes of the KV state in use after `pos` positions.
    pub fn state_bytes(&self, pos: usize) -> usize {
        self.layers
            .iter()
            .map(|l| {
                l.ring.len() * 4
                    + [&l.comp, &l.index]
                        .into_iter()
                        .flatten()
                        .map(|c| (c.kv.len() + c.sc.len() + pos / c.ratio * c.d) * 4)
                        .sum::<usize>()
            })
            .sum()
    }

    /// Runs `tokens` at positions `p0..`; appends the logits of every position (`all`) or of
    /// the last one to `out`.
    pub fn forward(
        &mut self,
        model: &Model,
        tokens: &[u32],
        p0: usize,
        all: bool,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let gm = Arc::clone(&self.gm);
        let _guard = gm.lock.lock().unwrap_or_else(|e| e.into_inner());
        let step = if all { LOGITS_CHUNK } else { self.chunk_len };
        let n_chunks = tokens.len().div_ceil(step);
        for (i, chunk) in tokens.chunks(step).enumerate() {
            let head = all || i + 1 == n_chunks;
            self.chunk(&gm, model, chunk, p0 + i * step, head, all, out)?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn chunk(
        &mut self,
        gm: &GpuModel,
        model: &Model,
        tokens: &[u32],
        p0: usize,
        head: bool,
        all: bool,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let c = &model.cfg;
        let be = &gm.be;
        let st = be.stream();
        let n = tokens.len();
        // A decode step taking the token `narrow` fed at this position finds it and the
        // position on the device already (DS4_CUDA_FEED=0: copied every step).
        let fed = self.fed.swap(NOT_FED, Ordering::Relaxed);
        let on_device =
            n == 1 && fed == feed_key(p0, tokens[0]) && super::switch_on("DS4_CUDA_FEED");
        if !on_device {
            let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
            let mut v = self.s.tokens.slice_mut(0..n);
            st.memcpy_htod(&ids, &mut v)?;
            st.memcpy_htod(&[p0 as i64], &mut self.s.pos)?;
        }
        self.next = p0 + n;
        let t_grow = std::time::Instant::now();
        let mut grown = 0;
        for ls in self.layers.iter_mut() {
            for cs in ls.comps_mut() {
                let cap = cs.cap;
                grow_rows(be, cs, (p0 + n) / cs.ratio)?;
                grown += usize::from(cs.cap != cap);
            }
        }
        if be.marking() {
            eprintln!(
                "# phases: chunk of {n} at p0 {p0}: {grown} row buffers grown, {:.0} µs on the host",
                t_grow.elapsed().as_secs_f64() * 1e6
            );
        }
        // Decode steps replay a captured graph: the kernels read the position from `s.pos`,
        // and everything else a launch depends on (grid sizes, shared memory, the rows
        // buffers) is a function of the key: positions rounded up to DECODE_BUCKET and the
        // rows buffers' addresses. A new key (every DECODE_BUCKET tokens, or after a rows
        // buffer grew) captures again.
        let graphed = n == 1 && head && use_graphs();
        if graphed {
            let pb = (p0 + 1)
                .next_multiple_of(DECODE_BUCKET)
                .min(self.ctx.max(p0 + 1));
            let mut key = vec![pb as u64];
            for ls in &self.layers {
                for cs in [&ls.comp, &ls.index].into_iter().flatten() {
                    key.push(ptr(&cs.rows, st));
                }
            }
            if self.graph.as_ref().is_none_or(|g| g.key != key) {
                let old = self.graph.take();
                st.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
                // PDL exists from cc 9.0 (the kernels' griddepcontrol is compiled out below).
                be.set_pdl(use_pdl() && be.info().compute_capability.0 >= 9);
                let r = self.queue(gm, model, n, pb, true, all);
                be.set_pdl(false);
                let g = DecodeGraph::end_capture(st, key, old);
                r?;
                self.graph = Some(g?);
            }
            self.graph.as_ref().expect("captured").launch()?;
        } else {
            self.queue(gm, model, n, p0 + n, head, all)?;
        }
        if head && all {
            let v = c.n_vocab;
            let at = out.len();
            out.resize(at + n * v, 0.0);
            st.memcpy_dtoh(&self.s.logits.slice(0..n * v), &mut out[at..])?;
        }
        // Otherwise the last position's logits stay on the device for `narrow` and
        // `last_logits`. Synchronizing here surfaces errors and keeps prefill timings honest.
        // A decode step's graph is not waited for: whatever reads its results next (`narrow`,
        // `last_logits`, a snapshot, the next step's copies) is queued behind it on this
        // stream and synchronizes, so the narrowing starts as the graph ends instead of a
        // host wake-up later (~55 µs a token on the whole model, where the wake-up after the
        // step's ~5 ms is slow; bench/RESULTS.md, thirty-fourth session;
        // `DS4_CUDA_DECODE_NOWAIT=0`: waited for here).
        if !(graphed && !all && super::switch_on("DS4_CUDA_DECODE_NOWAIT")) {
            st.synchronize()?;
        }
        if be.marking() {
            phase_report(gm, model, n, p0, &be.take_marks()?);
        }
        Ok(())
    }

    /// The last position's logits (after a forward call without `all`).
    pub fn last_logits(&self) -> Result<Vec<f32>> {
        let _guard = self.gm.lock.lock().unwrap_or_else(|e| e.into_inner());
        let st = self.gm.be.stream();
        let mut out = vec![0.0f32; self.vocab];
        st.memcpy_dtoh(&self.s.logits.slice(0..self.vocab), &mut out)?;
        st.synchronize()?;
        Ok(out)
    }

    /// Narrows the last position's logits on the device (kernels/sample.cu): the argmax and
    /// its value, and, when at most `cap` (≤ [`NARROW_CAP`]) tokens have
    /// `(l − max)·inv_t ≥ cut`, those tokens in index order. Only these bytes are copied back.
    pub fn narrow(&self, cut: f32, inv_t: f32, cap: usize) -> Result<Narrowed> {
        let gm = &self.gm;
        let _guard = gm.lock.lock().unwrap_or_else(|e| e.into_inner());
        let st = gm.be.stream();
        let s = &self.s;
        let cap = cap.min(NARROW_CAP);
        let p = |b: &CudaSlice<f32>| ptr(b, st);
        let pi = |b: &CudaSlice<i32>| ptr(b, st);
        let k = &gm.k;
        // SAFETY: logits hold `vocab` floats, the head 3 ints, ids/vals NARROW_CAP ≥ cap
        // entries, nwk/nwv narrow_scratch(vocab).
        unsafe {
            narrow_launch(
                st,
                [&k.sample_prep, &k.sample_mb],
                multi_block_narrow(),
                p(&s.logits),
                self.vocab,
                inv_t,
                cut,
                cap,
                [pi(&s.nhead), pi(&s.nwk), pi(&s.nids)],
                [p(&s.nwv), p(&s.nvals)],
                Some((pi(&s.tokens), ptr(&s.pos, st), self.next as i64)),
            )?
        };
        let mut head = vec![0i32; 3];
        st.memcpy_dtoh(&s.nhead, &mut head)?;
        st.synchronize()?;
        self.fed
            .store(feed_key(self.next, head[0] as u32), Ordering::Relaxed);
        let count = head[2].max(0) as usize;
        let candidates = if count <= cap && cap > 0 {
            let (mut ids, mut vals) = (vec![0i32; count], vec![0f32; count]);
            if count > 0 {
                st.memcpy_dtoh(&s.nids.slice(0..count), &mut ids)?;
                st.memcpy_dtoh(&s.nvals.slice(0..count), &mut vals)?;
                st.synchronize()?;
            }
            Some(ids.into_iter().map(|i| i as u32).zip(vals).collect())
        } else {
            None
        };
        Ok(Narrowed {
            best: head[0] as u32,
            max: f32::from_bits(head[1] as u32),
            candidates,
        })
    }

    /// Queues every launch of one chunk of `n` tokens (positions from `s.pos`). `pb` bounds
    /// the chunk's end position (`p0 + n ≤ pb`): grids and shared memory are sized for it,
    /// and the kernels skip what lies past the true position.
    fn queue(
        &self,
        gm: &GpuModel,
        model: &Model,
        n: usize,
        pb: usize,
        head: bool,
        all: bool,
    ) -> Result<()> {
        let c = &model.cfg;
        let be = &gm.be;
        let st = be.stream();
        let k = &gm.k;
        let s = &self.s;
        let p = |b: &CudaSlice<f32>| ptr(b, st);
        let pi = |b: &CudaSlice<i32>| ptr(b, st);
        let p16 = |b: &CudaSlice<u16>| ptr(b, st);
        let (d, nh) = (c.n_embd, c.hc);
        let (ni, di) = (n as i32, d as i32);
        let eps = c.rms_eps;
        let half = (c.n_rot / 2) as i32;
        let p0l = ptr(&s.pos, st);
        let (exact, qat) = (self.exact as i32, self.qat as i32);
        let n32 = n as u32;
        // Production-mode decode quantizes each product's input once (the CPU's rule for the
        // weight type) and takes int8 dots; `memo` remembers which buffer each activation
        // scratch holds, so products sharing an input quantize it once. Every write to a
        // remembered buffer clears it: product outputs here, `hc_pre` (rewrites `y`) below.
        let int8 = !self.exact && n == 1 && use_int8();
        // Independent paths of a layer on the side stream (production decode only; the
        // exact mode and prefill keep one stream, and cuBLAS runs on the main one).
        let fork = int8 && use_fork();
        // Entries 0, 1: the main stream's Q8_0 / Q8_K scratch; 2, 3: the side stream's.
        let memo = std::cell::Cell::new([0u64; 4]);
        // Quantized form of `elems` inputs at `x` for `kind`: (codes, scales), from the memo
        // when that scratch already holds `x`.
        let qx = |kind: ActQuant, x: u64, elems: usize| -> Result<(u64, u64)> {
            // The second side stream (the indexer's branch) has no int8 scratch: it is
            // used only where that branch's products are all F16 (`fork3` below).
            if be.side() == Some(1) {
                return Err(CudaError::Invalid(
                    "int8 product queued on the second side stream".into(),
                ));
            }
            let (i, q, dd) = match (kind, be.on_side()) {
                (ActQuant::Q8_0, false) => (0, p(&s.q0), p(&s.d0)),
                (ActQuant::Q8K, false) => (1, p(&s.qk), p(&s.dk)),
                (ActQuant::Q8_0, true) => (2, p(&s.q0s), p(&s.d0s)),
                (ActQuant::Q8K, true) => (3, p(&s.qks), p(&s.dks)),
            };
            let mut m = memo.get();
            if m[i] != x {
                // SAFETY: the activation scratch holds the widest decode input (`qn`).
                unsafe { be.quant_act_raw(kind, x, elems, q, dd)? };
                m[i] = x;
                memo.set(m);
            }
            Ok((q, dd))
        };
        // A product wrote `y`: forget it in the memo.
        let wrote = |y: u64| {
            let mut m = memo.get();
            m.iter_mut().for_each(|v| {
                if *v == y {
                    *v = 0
                }
            });
            memo.set(m);
        };
        let mvq =
            |w: &GpuWeight, ids: u64, slots: usize, x: u64, xs: usize, y: u64| -> Result<()> {
                // SAFETY: scratch buffers are sized for `chunk_len` tokens of every product.
                unsafe {
                    match ActQuant::of(w.ty).filter(|_| int8) {
                        Some(kind) => {
                            let elems = if xs == 0 {
                                w.n_cols
                            } else {
                                (slots - 1) * xs + w.n_cols
                            };
                            let (q, dd) = qx(kind, x, elems)?;
                            be.mv8_raw(w, ids, slots, q, dd, xs, y)?;
                            wrote(y);
                            Ok(())
                        }
                        None => be.mv_raw(w, ids, slots, x, xs, y),
                    }
                }
            };
        // Production prefill: weight products as f16 tensor-core GEMMs (prefill.rs), except
        // F32 weights (the HC `fn` products, whose input is the raw residual stream), the
        // router's logits (expert choice) and the output head, which keep the f32 kernel.
        let pf = s.pf.as_ref().filter(|_| !self.exact && n > 1 && use_gemm());
        // f16 copies that producers wrote next to their f32 outputs (production prefill):
        // h16[0] = the f32 buffer whose copy `y16` holds (hc_pre's y), h16[1] = `qr16`'s
        // (the normalized qr), h16[2] = `x16`'s (the residual state x, written by the
        // chunk forms of hc_post for the next site's HC `fn` product), h16[3] = `sh16`'s (the
        // shared expert's SwiGLU output); 0 = none. A product writing such a buffer clears its
        // entry, and anything else writing x16 clears [2].
        let h16 = std::cell::Cell::new([0u64; 4]);
        // Whether the last hc_pre wrote y's f32 form (production prefill skips it where the
        // site's products all read y16; `lin_s` refuses to read the stale f32 form), and
        // whether it wrote the router's three f16 planes of y (`dense_split3`'s input).
        let y32_ok = std::cell::Cell::new(true);
        let planes_ready = std::cell::Cell::new(false);
        // The HC `fn` weight whose product with the current state a fused hc_post left in
        // `mix` (production prefill), or 0: the next hc_pre then skips that product.
        let mix_for = std::cell::Cell::new(0u64);
        // Whether hc_post can form the product of `fnw` (the next site's) with the new state.
        let fn_fused = |fnw: &GpuWeight| -> bool {
            pf.is_some()
                && n > 1
                && nh == 4
                && d.is_multiple_of(128)
                && fnw.ty == GgmlType::F16
                && fnw.n_experts == 1
                && fnw.n_rows == c.hc_mix()
                && fnw.n_rows <= 24
                && fnw.n_cols == nh * d
                && use_hc_fn()
        };
        let f16_of = |x: u64| -> Option<u64> {
            let ps = pf?;
            let m = h16.get();
            if x == 0 {
                None
            } else if x == m[0] {
                Some(p16(&ps.y16))
            } else if x == m[1] {
                Some(p16(&ps.qr16))
            } else if x == m[2] {
                Some(p16(&ps.x16))
            } else if x == m[3] {
                Some(p16(&ps.sh16))
            } else {
                None
            }
        };
        let set16 = |i: usize, x: u64| {
            let mut m = h16.get();
            m[i] = x;
            h16.set(m);
        };
        let wrote16 = |y: u64| {
            let mut m = h16.get();
            m.iter_mut().for_each(|v| {
                if *v == y {
                    *v = 0
                }
            });
            h16.set(m);
        };
        let gemm_ok = |w: &GpuWeight, nt: usize| -> Option<&PfScratch> {
            pf.filter(|ps| {
                w.ty != GgmlType::F32
                    && nt > 1
                    && w.n_rows * w.n_cols * w.n_experts <= ps.w16.len()
                    && nt * w.n_cols <= ps.x16.len()
            })
        };
        // `x_scale`: the f16 input is f16(x · x_scale) (HC_X16_SCALE for the HC `fn` products,
        // whose input is the raw residual stream, else 1; prefill.rs dense_gemm).
        // `y16`: the GEMM may write y as f16 (n × n_rows halves at y); the result says whether
        // it did (the other paths write f32).
        let lin_s =
            |w: &GpuWeight, x: u64, nt: usize, y: u64, x_scale: f32, y16: bool| -> Result<bool> {
                wrote16(y);
                if nt == 1 {
                    mvq(w, 0, 1, x, 0, y).map(|_| false)
                } else if let Some(ps) = gemm_ok(w, nt) {
                    // The producer's f16 copy when there is one (it holds the chunk's n rows) and
                    // has this product's scale (x16's copy of x is scaled, y16's and qr16's not);
                    // else the conversion below overwrites x16 (and x's copy there).
                    let ready =
                        f16_of(x).filter(|&r| nt == n && (r == p16(&ps.x16)) == (x_scale != 1.0));
                    if ready.is_none() && x == p(&s.y) && !y32_ok.get() {
                        return Err(CudaError::Invalid(
                            "prefill GEMM over y's f32 form, which hc_pre did not write".into(),
                        ));
                    }
                    // A side stream's GEMM must touch neither conversion scratch (the main
                    // path's products use them meanwhile): its weight and input f16 as they are.
                    if be.on_side() && (ready.is_none() || be.f16_ptr(w).is_none()) {
                        return Err(CudaError::Invalid(
                            "prefill GEMM on a side stream without f16 operands".into(),
                        ));
                    }
                    if ready.is_none() {
                        set16(2, 0);
                    }
                    // SAFETY: w16/x16 sizes checked by gemm_ok; x and y hold nt rows; y16 and
                    // qr16 hold n rows of the widths their products read.
                    unsafe {
                        dense_gemm(
                            be,
                            w,
                            0,
                            1,
                            x,
                            w.n_cols,
                            nt,
                            y,
                            w.n_rows,
                            p16(&ps.w16),
                            ready.unwrap_or(p16(&ps.x16)),
                            ready.is_some(),
                            x_scale,
                            y16,
                        )
                    }
                    .map(|_| y16)
                } else if x == p(&s.y) && !y32_ok.get() {
                    Err(CudaError::Invalid(
                        "product over y's f32 form, which hc_pre did not write".into(),
                    ))
                } else {
                    // SAFETY: scratch buffers are sized for `chunk_len` tokens of every product.
                    unsafe { be.mm_raw(w, x, nt, y) }.map(|_| false)
                }
            };
        let lin =
            |w: &GpuWeight, x: u64, nt: usize, y: u64| lin_s(w, x, nt, y, 1.0, false).map(|_| ());
        // Gate + up + SwiGLU into `g` (weights `wts`, 0: none): fused over int8 activations
        // where both matrices have an int8 kernel, else two products and k_swiglu.
        #[allow(clippy::too_many_arguments)]
        let glu = |wg: &GpuWeight,
                   wu: &GpuWeight,
                   ids: u64,
                   slots: usize,
                   x: u64,
                   xs: usize,
                   g: u64,
                   u: u64,
                   wts: u64,
                   clamp: f32|
         -> Result<()> {
            let kind = ActQuant::of(wg.ty).filter(|_| int8 && xs == 0 && wg.ty == wu.ty);
            if let Some(kind) = kind {
                let (q, dd) = qx(kind, x, wg.n_cols)?;
                // SAFETY: g holds `slots` rows of F; ids < n_expert (router) or 0.
                unsafe { be.mv8glu_raw(wg, wu, ids, slots, q, dd, wts, clamp, g)? };
                wrote(g);
                return Ok(());
            }
            if ids == 0 {
                lin(wg, x, n, g)?;
                lin(wu, x, n, u)?;
            } else {
                mvq(wg, ids, slots, x, xs, g)?;
                mvq(wu, ids, slots, x, xs, u)?;
            }
            let rows = if ids == 0 { n } else { slots };
            // A prefill chunk's shared expert: the down product reads the f16 copy, written
            // here into sh16 (the routed experts may still read y16 beside it on a fork).
            let g16 = pf
                .filter(|ps| ids == 0 && n > 1 && rows * wg.n_rows <= ps.sh16.len())
                .map_or(0, |ps| p16(&ps.sh16));
            launch!(
                be.st(),
                k.swiglu,
                ((wg.n_rows as u32).div_ceil(256), rows as u32, 1),
                (256, 1, 1),
                0,
                [g, u, wts, wg.n_rows as i32, clamp, g16]
            );
            if g16 != 0 {
                set16(3, g);
            }
            Ok(())
        };
        // §3.1 embedding.
        {
            let ty = match gm.embd.ty {
                GgmlType::F32 => 0i32,
                GgmlType::F16 => 1,
                _ => 2,
            };
            launch!(
                st,
                k.embed,
                (n32, 1, 1),
                (256, 1, 1),
                0,
                [
                    be.weight_ptr(&gm.embd),
                    ty,
                    gm.embd.n_rows as i32,
                    pi(&s.tokens),
                    di,
                    nh as i32,
                    p(&s.x)
                ]
            );
        }
        let rms_rows = |x: u64, w: u64, rows: usize, width: usize| -> Result<()> {
            launch!(
                st,
                k.rms_norm,
                (rows as u32, 1, 1),
                (256, 1, 1),
                0,
                [x, w, width as i32, eps]
            );
            Ok(())
        };
        // Decode (the hc1 path): a site's hc_post is left in `pending` for the next site's
        // hc_pre, which runs it fused with its control product (`k_hc_post_mix`: one round
        // trip to memory instead of two), the new state going to the other of x / x2.
        // `xcur` is where the state is now; a post with no hc_pre after it (the last
        // layer's, before the head) runs alone, in place.
        let xcur = std::cell::Cell::new(p(&s.x));
        let pending = std::cell::Cell::new(None::<Post>);
        let flush_post = || -> Result<()> {
            let Some(post) = pending.take() else {
                return Ok(());
            };
            let (nhi, dii) = ((nh as i32).slot(), di.slot());
            let (f, mut args) = match post {
                Post::Ring { ring } => (
                    &k.hc_post_ring,
                    vec![
                        xcur.get(),
                        p(&s.f),
                        p(&s.post),
                        p(&s.comb),
                        nhi,
                        dii,
                        p(&s.kv),
                        ring,
                        p0l,
                        (c.swa as i32).slot(),
                        (c.head_dim as i32).slot(),
                    ],
                ),
                Post::Moe => (
                    &k.hc_post_moe,
                    vec![
                        xcur.get(),
                        p(&s.dn),
                        p(&s.sh),
                        (c.n_expert_used as i32).slot(),
                        p(&s.post),
                        p(&s.comb),
                        nhi,
                        dii,
                    ],
                ),
            };
            let cfg = LaunchConfig {
                grid_dim: ((d as u32).div_ceil(256), 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: each list matches its kernel's parameters (forward.cu k_hc_post_ring /
            // k_hc_post_moe); x holds one token's state, f / dn and sh the site's output.
            unsafe { be.launch_slots(f, cfg, &mut args) }?;
            Ok(())
        };
        // hc_pre with the site's RMSNorm (`norm`) fused. Returns whether it left the
        // combination's Sinkhorn to `sinkhorn` (below): on a fork (production decode) that
        // runs on the side stream, off the path the site's products wait on.
        // Where the last hc_pre wrote y's permuted f16 copy (`PfScratch::y16p`), or 0.
        let y16p_at = std::cell::Cell::new(0u64);
        // `perm16`: also write y16p (the FFN site, when the routed experts read it).
        // `ffn`: the FFN site's (else the attention site's); `planes`: the router's split
        // input to write there (rx3, scale) in production prefill.
        // `head`: the output head's mixing instead (§3.5; `fnw` has N rows, y goes to `h` with
        // its Q8_0 codes), only where `head_hc1` holds; it returns false.
        let hc1_wty = |fnw: &GpuWeight, rows: usize| -> Option<i32> {
            let wty = match fnw.ty {
                GgmlType::F32 => 0i32,
                GgmlType::F16 => 1,
                _ => return None,
            };
            (n == 1
                && use_hc1()
                && nh <= HC_PRE1_MAX_HC
                && d <= 8 * (HC_PRE1_THREADS as usize - 32)
                && d.is_multiple_of(256)
                && (nh * d).is_multiple_of(512)
                && fnw.n_rows == rows)
                .then_some(wty)
        };
        // A production decode step's head mixing as one more hc_pre (`k_hc_pre1`'s head form,
        // the last layer's hc_post fused before it), which also writes the codes the head's
        // product reads (DS4_CUDA_HEAD_HC1=0: the product, `k_hc_head` and a quantization).
        let head_hc1 = int8
            && gm.output.ty == GgmlType::Q8_0
            && hc1_wty(&gm.output_hc_fn, nh).is_some()
            && super::switch_on("DS4_CUDA_HEAD_HC1");
        let hc_pre = |fnw: &GpuWeight,
                      sc: &CudaSlice<f32>,
                      base: &CudaSlice<f32>,
                      norm: &CudaSlice<f32>,
                      perm16: bool,
                      ffn: bool,
                      planes: Option<(u64, f32)>,
                      head: bool|
         -> Result<bool> {
            memo.set([0; 4]);
            y16p_at.set(0);
            y32_ok.set(true);
            planes_ready.set(false);
            // Decode: the control product and the state's sum of squares over many blocks,
            // then one block for the rest, which also writes y's int8 forms (production).
            if let Some(wty) = hc1_wty(fnw, if head { nh } else { c.hc_mix() }) {
                let width = nh * d;
                let nb = width / 512;
                // k_hc_mix_part's arguments; k_hc_post_mix takes the pending post's after
                // them. Each of its blocks' 512 elements must lie in one stream.
                let mut args = vec![
                    xcur.get(),
                    be.weight_ptr(fnw),
                    wty.slot(),
                    (fnw.n_rows as i32).slot(),
                    (width as i32).slot(),
                    p(&s.hcpart),
                    ptr(&s.hcss, st),
                ];
                let fused = pending
                    .get()
                    .filter(|_| use_post_mix() && d.is_multiple_of(512));
                let f = match fused {
                    Some(post) => {
                        pending.set(None);
                        let (f, sh, kx, kv, ring) = match post {
                            Post::Ring { ring } => (p(&s.f), 0, 0, p(&s.kv), ring),
                            Post::Moe => (p(&s.dn), p(&s.sh), c.n_expert_used as i32, 0, 0),
                        };
                        let xn = if xcur.get() == p(&s.x) {
                            p(&s.x2)
                        } else {
                            p(&s.x)
                        };
                        args.extend([xn, f, sh, kx.slot(), p(&s.post), p(&s.comb)]);
                        args.extend([(nh as i32).slot(), di.slot(), kv, ring, p0l]);
                        args.extend([(c.swa as i32).slot(), (c.head_dim as i32).slot()]);
                        xcur.set(xn);
                        &k.hc_post_mix
                    }
                    None => {
                        flush_post()?;
                        &k.hc_mix_part
                    }
                };
                let cfg = LaunchConfig {
                    grid_dim: (nb as u32, fnw.n_rows.div_ceil(8) as u32, 1),
                    block_dim: (64, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: the argument list matches the kernel's (forward.cu); hcpart / hcss
                // hold nb partials, x and x2 one token's state, f / dn the site's output.
                unsafe { be.launch_slots(f, cfg, &mut args) }?;
                let (q0, d0, qk, dk) = match (int8, head) {
                    (true, false) => (p(&s.q0), p(&s.d0), p(&s.qk), p(&s.dk)),
                    (true, true) => (p(&s.q0), p(&s.d0), 0, 0),
                    _ => (0, 0, 0, 0),
                };
                let y = if head { p(&s.h) } else { p(&s.y) };
                launchp!(
                    be,
                    k.hc_pre1,
                    (1, 1, 1),
                    (HC_PRE1_THREADS, 1, 1),
                    0,
                    [
                        xcur.get(),
                        p(&s.hcpart),
                        ptr(&s.hcss, st),
                        nb as i32,
                        nh as i32,
                        di,
                        eps,
                        c.hc_eps,
                        c.sinkhorn_iters as i32,
                        p(sc),
                        p(base),
                        y,
                        p(&s.post),
                        p(&s.comb),
                        p(norm),
                        q0,
                        d0,
                        qk,
                        dk,
                        if fork && !head { p(&s.clog) } else { 0 },
                        // Both rows' partials loaded at once (DS4_CUDA_HCP1_HOIST=0: the loop).
                        i32::from(super::switch_on("DS4_CUDA_HCP1_HOIST")),
                        // Each warp forms P_j and the norm's total itself, two block barriers
                        // fewer (DS4_CUDA_HCP1_LEAN=0: published through shared memory).
                        i32::from(super::switch_on("DS4_CUDA_HCP1_LEAN")),
                        i32::from(head)
                    ]
                );
                if head {
                    // The Q8_0 scratch holds h's codes.
                    memo.set([p(&s.h), 0, 0, 0]);
                    return Ok(false);
                }
                if int8 {
                    // Both scratches now hold y's codes (Q8_0 and Q8_K).
                    memo.set([p(&s.y), p(&s.y), 0, 0]);
                }
                return Ok(fork);
            }
            flush_post()?;
            if n == 1 || mix_for.get() != be.weight_ptr(fnw) {
                lin_s(fnw, xcur.get(), n, p(&s.mix), HC_X16_SCALE, false)?;
            }
            mix_for.set(0);
            if let (Some(ps), Some((wide, cols))) = (
                pf.filter(|_| use_hc_pre_pf()),
                hc_pre_pf_pick(nh, d, hc_pre_wide()),
            ) {
                // Production prefill: the state read once, y written as f32 and f16, and
                // the Sinkhorn of every token in parallel in k_hc_comb (forward.cu).
                let y16p = if perm16 && d.is_multiple_of(32) {
                    p16(&ps.y16p)
                } else {
                    0
                };
                // Production prefill reads y's f32 form only in the FFN site's router (the
                // GEMMs take y16, the routed experts y16p or y16), so it is skipped at the
                // attention site and, with the router's planes written here, at the FFN site.
                let lean = use_pf_y_lean();
                let (x3, x3s) = planes.filter(|_| lean && ffn).unwrap_or((0, 0.0));
                let y32 = !lean || (ffn && x3 == 0);
                let fun = if wide { &k.hc_pre_pf512 } else { &k.hc_pre_pf };
                launch!(
                    st,
                    fun,
                    (n32, 1, 1),
                    ((d / (4 * cols)) as u32, 1, 1),
                    0,
                    [
                        xcur.get(),
                        p(&s.mix),
                        di,
                        cols as i32,
                        eps,
                        c.hc_eps,
                        p(sc),
                        p(base),
                        p(&s.y),
                        p16(&ps.y16),
                        y16p,
                        p(&s.post),
                        p(norm),
                        p(&ps.hsc),
                        x3,
                        x3s,
                        (n * d) as i64,
                        i32::from(y32)
                    ]
                );
                y16p_at.set(y16p);
                y32_ok.set(y32);
                planes_ready.set(x3 != 0);
                launch!(
                    st,
                    k.hc_comb,
                    (n32.div_ceil(8), 1, 1),
                    (256, 1, 1),
                    0,
                    [
                        p(&s.mix),
                        p(&ps.hsc),
                        nh as i32,
                        c.sinkhorn_iters as i32,
                        c.hc_eps,
                        p(sc),
                        p(base),
                        p(&s.comb),
                        ni
                    ]
                );
                set16(0, p(&s.y));
                return Ok(false);
            }
            // Production prefill: y's f16 copy for the site's GEMMs and the grouped experts,
            // and 256-thread blocks (several a SM: the per-token Sinkhorn and barriers of one
            // block overlap the others' loads; 1024 threads left two blocks an SM).
            let (y16, threads) = match pf {
                Some(ps) => (p16(&ps.y16), 256),
                None => (0, 1024),
            };
            launch!(
                st,
                k.hc_pre,
                (n32, 1, 1),
                (threads, 1, 1),
                0,
                [
                    xcur.get(),
                    p(&s.mix),
                    nh as i32,
                    di,
                    eps,
                    c.hc_eps,
                    c.sinkhorn_iters as i32,
                    p(sc),
                    p(base),
                    p(&s.y),
                    p(&s.post),
                    p(&s.comb),
                    p(norm),
                    y16
                ]
            );
            if y16 != 0 {
                set16(0, p(&s.y));
            }
            Ok(false)
        };
        // The Sinkhorn hc_pre left (`left`: its return value), on the current stream.
        let sinkhorn = |left: bool| -> Result<()> {
            if left {
                launch!(
                    be.st(),
                    k.sinkhorn1,
                    (1, 1, 1),
                    (32, 1, 1),
                    0,
                    [
                        p(&s.clog),
                        nh as i32,
                        c.sinkhorn_iters as i32,
                        c.hc_eps,
                        p(&s.comb)
                    ]
                );
            }
            Ok(())
        };
        // Production prefill chunks whose attention runs on tensor cores (the condition of
        // `Attend::tc` below): the attention normalizes and rotates the queries itself.
        let qnorm = pf.is_some()
            && self.tiled
            && !self.exact
            && n > 8
            && half > 0
            && attn::use_tc()
            && attn::tc_supported(c.n_head, c.head_dim, half as usize)
            && attn::tc_qnorm_supported(c.head_dim)
            && use_qnorm();
        // A fused hc_post (`k_hc_post4_fn` / `k_hc_post_moe_fn`, forward.cu) forming `fnw`'s
        // product with the new state: its own leading arguments (`head`, then `kx` for the MoE
        // form), the common rest, and the bookkeeping after it (no f16 copy of the state).
        let post_fn = |f: &CudaFunction, head: &[u64], kx: Option<i32>, fnw: &GpuWeight| {
            let (wp, nmix, pc) = (
                be.weight_ptr(fnw),
                fnw.n_rows as i32,
                [p(&s.post), p(&s.comb)],
            );
            let mut b = st.launch_builder(f);
            for a in head {
                b.arg(a);
            }
            if let Some(kx) = kx.as_ref() {
                b.arg(kx);
            }
            b.arg(&pc[0])
                .arg(&pc[1])
                .arg(&ni)
                .arg(&di)
                .arg(&wp)
                .arg(&nmix);
            let mix = p(&s.mix);
            b.arg(&mix);
            let cfg = LaunchConfig {
                grid_dim: (n.div_ceil(HPF_TT) as u32, 1, 1),
                block_dim: (512, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the argument list matches the kernel (forward.cu): the state of n tokens,
            // the site's output rows, post / comb, the F16 fn weight (fn_fused checked its
            // shape) and mix (n rows of hc_mix).
            unsafe { b.launch(cfg) }?;
            set16(2, 0);
            mix_for.set(wp);
            Ok::<(), CudaError>(())
        };
        // `next`: the HC `fn` weight of the site after this one, formed with the new state when
        // fn_fused allows.
        let hc_post = |next: Option<&GpuWeight>| -> Result<()> {
            mix_for.set(0);
            if let Some(fnw) = next.filter(|w| fn_fused(w)) {
                return post_fn(&k.hc_post4_fn, &[xcur.get(), p(&s.f)], None, fnw);
            }
            if n > 1 && d.is_multiple_of(4) {
                // Chunks: 4 elements a thread (k_hc_post's operations per element), and in
                // production prefill x's f16 copy for the next HC `fn` product.
                let x16 = pf.map_or(0, |ps| p16(&ps.x16));
                launch!(
                    st,
                    k.hc_post4,
                    ((d as u32 / 4).div_ceil(256), n32, 1),
                    (256, 1, 1),
                    0,
                    [
                        xcur.get(),
                        p(&s.f),
                        p(&s.post),
                        p(&s.comb),
                        nh as i32,
                        di,
                        x16
                    ]
                );
                if x16 != 0 {
                    set16(2, p(&s.x));
                }
                return Ok(());
            }
            launchp!(
                be,
                k.hc_post,
                ((d as u32).div_ceil(256), n32, 1),
                (256, 1, 1),
                0,
                [xcur.get(), p(&s.f), p(&s.post), p(&s.comb), nh as i32, di]
            );
            Ok(())
        };
        // Phase marks of a prefill chunk (`DS4_CUDA_PHASES=1`; CudaBackend::mark).
        let mk = |il: usize, tag: &'static str| -> Result<()> {
            if n > 1 && be.marking() {
                be.mark(il, tag)?;
            }
            Ok(())
        };
        mk(0, "begin")?;
        for (il, (l, ls)) in gm.layers.iter().zip(self.layers.iter()).enumerate() {
            // The next layer's attention-site `fn` (none after the last layer: the head's).
            let next_attn_fn = gm.layers.get(il + 1).map(|nl| &nl.hc_attn_fn);
            // §3.2 + §3.3: attention site.
            let left = hc_pre(
                &l.hc_attn_fn,
                &l.hc_attn_scale,
                &l.hc_attn_base,
                &l.attn_norm,
                false,
                false,
                None,
                false,
            )?;
            mk(il, "hc_pre_a")?;
            // Compressors.
            let compress = |w: &GpuComp, cs: &CompState, kind: i32| -> Result<()> {
                let (a, b) = (&w.kv, &w.gate);
                // The indexer's compressor has its own product rows (on a fork it runs beside
                // the main one: `fork3` in decode, the prefill side branch).
                let (ckv, csc) = if kind == 1 {
                    (p(&s.ickv), p(&s.icsc))
                } else {
                    (p(&s.ckv), p(&s.csc))
                };
                if n == 1
                    && a.ty == GgmlType::F16
                    && b.ty == GgmlType::F16
                    && (a.n_rows, a.n_cols, a.n_experts) == (b.n_rows, b.n_cols, 1)
                    && b.n_experts == 1
                {
                    // Decode: both products read y, so one launch (quant.cu mv2_f16, rows
                    // bit-identical to two mv_f16 launches).
                    let split = mv_split(a.n_rows, a.n_cols, 1);
                    launchp!(
                        be,
                        k.mv2_f16,
                        ((2 * a.n_rows as u32).div_ceil(8 / split), 1, 1),
                        (256, 1, 1),
                        0,
                        [
                            be.weight_ptr(a),
                            be.weight_ptr(b),
                            a.n_rows as i32,
                            a.n_cols as i32,
                            p(&s.y),
                            ckv,
                            csc,
                            split as i32
                        ]
                    );
                } else {
                    lin(a, p(&s.y), n, ckv)?;
                    lin(b, p(&s.y), n, csc)?;
                }
                let args = attn::Compress {
                    n,
                    kvp: ckv,
                    scp: csc,
                    ape: p(&w.ape),
                    skv: p(&cs.kv),
                    ssc: p(&cs.sc),
                    rows: p(&cs.rows),
                    norm: p(&w.norm),
                    freqs: ptr(&l.freqs, st),
                    p0: p0l,
                    ratio: cs.ratio,
                    d: cs.d,
                    coff: cs.coff,
                    half: half as usize,
                    eps,
                    kind,
                    qat: self.qat,
                    exact: self.exact,
                };
                // SAFETY: ckv/csc hold n rows of the widest compressor (ickv/icsc: of the
                // indexer's); the frontier is coff·r × W; rows were grown to (p0 + n) / r
                // before queueing.
                unsafe { attn::compress(be, &k.at, &args) }
            };
            // Production decode of a ratio-4 layer whose indexer products are all F16 (the
            // published files' types; the second side stream has no int8 scratch): the
            // indexer's compressor and its weights product run on the second side stream from
            // here, and its query chain follows there after q_a's norm. The two compressors
            // and the indexer are then parallel branches instead of one chain on one side
            // stream, which was longer than the query path (bench/RESULTS.md, eleventh
            // session).
            let fork3 = fork
                && use_fork3()
                && l.indexer.as_ref().is_some_and(|iw| {
                    [&iw.comp.kv, &iw.comp.gate, &iw.q_b, &iw.proj]
                        .iter()
                        .all(|w| w.ty == GgmlType::F16)
                });
            // The indexer scores (and needs its query and weights) once more rows are visible
            // than it keeps.
            let idx_scores = pb / 4 > c.idx_topk;
            let comp_idx = || -> Result<()> {
                if let (Some(iw), Some(cs)) = (&l.indexer, &ls.index) {
                    compress(&iw.comp, cs, 1)?;
                }
                Ok(())
            };
            // The indexer's per-head weights: y's product, into its own scratch `iw`.
            let idx_proj = || -> Result<()> {
                match &l.indexer {
                    Some(iw) if idx_scores => lin(&iw.proj, p(&s.y), n, p(&s.iw)),
                    _ => Ok(()),
                }
            };
            // The compressors read only y and their own state: on a fork they run beside
            // the query path (queued above) and are joined before the indexer and the
            // attention read their rows.
            // The Sinkhorn (read only by the hc_post after the join) after the compressors, so
            // that they start first (`DS4_CUDA_SINKHORN_LAST=0`: before; bench/RESULTS.md,
            // twenty-ninth session).
            let sinkhorn_last = super::switch_on("DS4_CUDA_SINKHORN_LAST");
            // On a fork in a layer without an indexer the Sinkhorn runs on the second side
            // stream (idle then), beside the compressors instead of after them, where the
            // attention waited for it; joined with them (`DS4_CUDA_SINKHORN_SIDE1=0`: after the
            // compressors). Not in an indexer's layer: there it delayed the indexer's query
            // chain behind it (bench/RESULTS.md, thirtieth session).
            // In an indexer's layer it runs on the third side stream, alone
            // (`DS4_CUDA_SINKHORN_SIDE2=0`: after the compressors; thirty-first session).
            let sk_side = match l.indexer {
                None if super::switch_on("DS4_CUDA_SINKHORN_SIDE1") => Some(1),
                Some(_) if super::switch_on("DS4_CUDA_SINKHORN_SIDE2") => Some(2),
                _ => None,
            }
            .filter(|_| fork && sinkhorn_last && left);
            let comps = || -> Result<()> {
                if !sinkhorn_last {
                    sinkhorn(left)?;
                }
                if let (Some(w), Some(cs)) = (&l.comp, &ls.comp) {
                    compress(w, cs, 0)?;
                }
                if !fork3 {
                    comp_idx()?;
                }
                if sinkhorn_last && sk_side.is_none() {
                    sinkhorn(left)?;
                }
                Ok(())
            };
            // Production prefill: the compressors and the indexer (several small, partly
            // latency-bound launches, longer together than q_b's GEMM) run as one branch on the
            // highest-priority stream beside the query path. Their GEMMs read the F16 weights
            // and hc_pre's / rms_norm_h's f16 copies of y and qr in place (`lin_s` refuses
            // anything else on a side stream), so they share no scratch with the main path.
            let pf_side = pf.is_some()
                && n > 1
                && !fork
                && use_pf_att_fork()
                && (l.comp.is_some() || l.indexer.is_some())
                && l.comp
                    .iter()
                    .chain(l.indexer.iter().map(|iw| &iw.comp))
                    .all(|w| be.f16_ptr(&w.kv).is_some() && be.f16_ptr(&w.gate).is_some())
                && l.indexer.as_ref().is_none_or(|iw| {
                    be.f16_ptr(&iw.q_b).is_some() && be.f16_ptr(&iw.proj).is_some()
                });
            // A ratio-4 layer's side branch (the indexer's compressor and the indexer) is the
            // longer one: its main compressor runs on the main stream after the query path.
            let main_comp = pf_side && l.indexer.is_some();
            let att_side = super::side_of("DS4_CUDA_PF_ATT_SIDE", 1);
            let att_fork = if fork
                && ((left && sk_side.is_none()) || l.comp.is_some() || l.indexer.is_some())
            {
                Some(be.fork(comps)?)
            } else if main_comp {
                Some(be.fork_on(att_side, comp_idx)?)
            } else if pf_side {
                Some(be.fork_on(att_side, comps)?)
            } else {
                None
            };
            // A decode step of an indexer's layer asks L2 for the indexer rows its scores read
            // (~15 µs later, under q_b's traffic) on that stream, before the Sinkhorn.
            let idx_l2pf = match (&l.indexer, &ls.index) {
                (Some(_), Some(cs)) if n == 1 && idx_scores && attn::use_idx_l2pf(pb / 4) => {
                    Some(p(&cs.rows))
                }
                _ => None,
            };
            let sk_fork = match sk_side {
                Some(side) => Some(be.fork_on(side, || {
                    if let Some(rows) = idx_l2pf {
                        // SAFETY: the indexer rows hold (p0 + 1) / 4 ≥ p0 / 4 rows of idx_dim
                        // f32 (grown before queueing); p0l is the step's device position.
                        unsafe {
                            attn::l2_rows(be.st(), &k.at, rows, p0l, 4, 4 * c.idx_dim, pb / 4)?
                        };
                    }
                    sinkhorn(left)
                })?),
                None => None,
            };
            // The indexer's weights product on the main stream before q_a instead of behind
            // the indexer compressor on its side stream, where the query chain that follows
            // the norm waited for it: in a ratio-4 decode step that chain (not the query path)
            // is the one the attention waits for (`DS4_CUDA_IDXPROJ_MAIN=0`: on the side
            // stream; bench/RESULTS.md, twenty-ninth session).
            let proj_main = fork3 && super::switch_on("DS4_CUDA_IDXPROJ_MAIN");
            let idx_pre_fork = if fork3 {
                Some(be.fork_on(1, || {
                    comp_idx()?;
                    if proj_main {
                        Ok(())
                    } else {
                        idx_proj()
                    }
                })?)
            } else {
                None
            };
            if proj_main {
                idx_proj()?;
            }
            // Query.
            lin(&l.q_a, p(&s.y), n, p(&s.qr))?;
            lin(&l.kv, p(&s.y), n, p(&s.kv))?;
            if int8
                && n == 1
                && use_hc1()
                && l.q_b.ty == GgmlType::Q8_0
                && c.q_lora_rank.is_multiple_of(256)
            {
                // Norm + the Q8_0 codes q_b reads, in one launch (q_b is Q8_0).
                launchp!(
                    be,
                    k.rms_norm_q8,
                    (1, 1, 1),
                    ((c.q_lora_rank / 8).min(512) as u32, 1, 1),
                    0,
                    [
                        p(&s.qr),
                        p(&l.q_a_norm),
                        c.q_lora_rank as i32,
                        eps,
                        p(&s.q0),
                        p(&s.d0),
                        // The row in registers, its weights loaded with it
                        // (DS4_CUDA_RMSQ8_ONE=0: the loop form).
                        i32::from(super::switch_on("DS4_CUDA_RMSQ8_ONE"))
                    ]
                );
                let mut m = memo.get();
                m[0] = p(&s.qr);
                memo.set(m);
            } else if let Some(ps) = pf {
                // Norm + the f16 copy q_b (and the indexer's q_b) read.
                launch!(
                    st,
                    k.rms_norm_h,
                    (n32, 1, 1),
                    (256, 1, 1),
                    0,
                    [
                        p(&s.qr),
                        p(&l.q_a_norm),
                        c.q_lora_rank as i32,
                        eps,
                        p16(&ps.qr16)
                    ]
                );
                set16(1, p(&s.qr));
            } else {
                rms_rows(p(&s.qr), p(&l.q_a_norm), n, c.q_lora_rank)?;
            }
            // The indexer (ratio-4 layers): its query reads the normalized qr, its weights y,
            // its scores the indexer compressor's rows; it writes only its own scratch (iq, iw,
            // isc, sel, cnt). On a fork it runs on the side stream after the compressors,
            // beside q_b and the query heads, and is joined before the attention.
            // A chunk's RoPE angles, once for all of this layer's query heads and indexer
            // heads (the same f32 values their kernels would compute inline), where one of
            // them reads the table (the tensor-core attention's query finish, or the indexer).
            let cs_tab = if n > 1 && half > 0 && (qnorm || l.indexer.is_some()) {
                launch!(
                    st,
                    k.rope_cs,
                    ((half as u32).div_ceil(64), n32, 1),
                    (64, 1, 1),
                    0,
                    [ptr(&l.freqs, st), p0l, half, p(&s.rope_cs)]
                );
                p(&s.rope_cs)
            } else {
                0
            };
            let indexer = || -> Result<()> {
                if let (Some(iw), Some(cs)) = (&l.indexer, &ls.index) {
                    let (ih, id) = (c.idx_heads, c.idx_dim);
                    let vis_max = pb / 4;
                    if idx_scores {
                        // Production steps with QAT score on tensor cores (exact for the fp4sim
                        // queries and rows): q_finish also writes the bf16 queries for them.
                        let tc = !self.exact
                            && self.tiled
                            && self.qat
                            && ih == 64
                            && id == 128
                            && attn::use_idx_tc();
                        lin(&iw.q_b, p(&s.qr), n, p(&s.iq))?;
                        let inv_sqrt = (1.0 / (id as f64).sqrt()) as f32;
                        let q16 = if tc { p16(&s.iq16) } else { 0 };
                        // The warp form (same bits, one sincos set per token) where the key
                        // length allows; `DS4_CUDA_IDXQ_W=0`: the block form.
                        let wf = match id {
                            64 => Some(0),
                            128 => Some(1),
                            256 => Some(2),
                            _ => None,
                        }
                        .filter(|_| half <= 128 && super::switch_on("DS4_CUDA_IDXQ_W"));
                        if let Some(wi) = wf {
                            // Several heads a warp in chunks (more loads in flight); one for
                            // a decode token (more warps).
                            let hpw = if n > 1 { attn::IQF_HPW } else { 1 };
                            launchp!(
                                be,
                                k.idx_q_finish_w[wi],
                                (n32, ih.div_ceil(8 * hpw) as u32, 1),
                                (256, 1, 1),
                                0,
                                [
                                    p(&s.iq),
                                    ih as i32,
                                    half,
                                    ptr(&l.freqs, st),
                                    p0l,
                                    cs_tab,
                                    qat,
                                    inv_sqrt,
                                    q16,
                                    // The f32 rows only where the f32 scores read them.
                                    i32::from(!tc),
                                    // bit 4: a decode token's RoPE angles before the PDL
                                    // wait (`DS4_CUDA_IQF_PRE=0`: after it; the same values).
                                    hpw as i32
                                        | if n == 1 && super::switch_on("DS4_CUDA_IQF_PRE") {
                                            16
                                        } else {
                                            0
                                        }
                                ]
                            );
                        } else {
                            launch!(
                                be.st(),
                                k.idx_q_finish,
                                (n32 * ih as u32, 1, 1),
                                (64, 1, 1),
                                0,
                                [
                                    p(&s.iq),
                                    ih as i32,
                                    id as i32,
                                    half,
                                    ptr(&l.freqs, st),
                                    p0l,
                                    qat,
                                    inv_sqrt,
                                    q16
                                ]
                            );
                        }
                        if !fork3 {
                            idx_proj()?;
                        }
                        // The weights' scale is applied where the score kernels read them.
                        let wscale = 1.0 / ((id * ih) as f32).sqrt();
                        if !self.tiled {
                            launch!(
                                be.st(),
                                k.idx_scores_ref,
                                ((vis_max as u32).div_ceil(8), n32, 1),
                                (256, 1, 1),
                                0,
                                [
                                    p(&s.iq),
                                    p(&s.iw),
                                    wscale,
                                    p(&cs.rows),
                                    ih as i32,
                                    id as i32,
                                    p0l,
                                    4i32,
                                    p(&s.isc),
                                    s.isc_ld as i32
                                ]
                            );
                        } else if tc {
                            // SAFETY: as below; iq16 holds chunk × 64 × 128 halves, written
                            // by q_finish above.
                            unsafe {
                                attn::idx_scores_tc(
                                    be,
                                    &k.at,
                                    n,
                                    p16(&s.iq16),
                                    (p(&s.iw), wscale),
                                    p(&cs.rows),
                                    p0l,
                                    vis_max,
                                    p(&s.isc),
                                    s.isc_ld,
                                    attn::use_idx_wg(),
                                    None,
                                    None,
                                )?
                            };
                        } else {
                            // SAFETY: iq/iw hold n tokens of ih heads; the indexer rows hold
                            // (p0 + n) / 4 ≤ vis_max rows; isc is chunk × isc_ld, isc_ld > ctx / 4.
                            unsafe {
                                attn::idx_scores(
                                    be.st(),
                                    &k.at,
                                    n,
                                    p(&s.iq),
                                    (p(&s.iw), wscale),
                                    p(&cs.rows),
                                    ih,
                                    id,
                                    p0l,
                                    4,
                                    vis_max,
                                    p(&s.isc),
                                    s.isc_ld,
                                )?
                            };
                        }
                    }
                    // SAFETY: sel is chunk × idx_topk, cnt chunk; scores are read only
                    // for tokens with more than idx_topk visible rows (written above); the
                    // indexer chains of all layers run in order on one stream, so topk_work is
                    // never in two launches at once.
                    unsafe {
                        attn::topk(
                            be,
                            &k.at,
                            n,
                            p(&s.isc),
                            s.isc_ld,
                            p0l,
                            4,
                            c.idx_topk,
                            pi(&s.sel),
                            pi(&s.cnt),
                            pb / 4,
                            pi(&s.topk_work),
                        )?
                    };
                }
                Ok(())
            };
            let idx_fork = if fork && l.indexer.is_some() {
                Some(be.fork_on(usize::from(fork3), indexer)?)
            } else if pf_side && l.indexer.is_some() {
                // After rms_norm_h (qr16) and the angle table, behind the compressors.
                Some(be.fork_on(att_side, indexer)?)
            } else {
                None
            };
            // With the tensor-core attention normalizing the queries itself, q_b's GEMM writes
            // them as f16 (half the bytes written here and read there; the attention rounds
            // the normalized queries to f16 anyway).
            let q16 = lin_s(&l.q_b, p(&s.qr), n, p(&s.q), 1.0, qnorm && use_q16())?;
            if n == 1 && use_hc1() {
                // Query heads and the KV row in one launch (decode).
                launchp!(
                    be,
                    k.qkv_finish1,
                    (c.n_head as u32 + 1, 1, 1),
                    (256, 1, 1),
                    0,
                    [
                        p(&s.q),
                        p(&s.kv),
                        p(&l.kv_a_norm),
                        c.n_head as i32,
                        c.head_dim as i32,
                        half,
                        eps,
                        ptr(&l.freqs, st),
                        p0l,
                        qat,
                        // bit 1: the RoPE angles before the PDL wait and the KV row's FP8
                        // scales by warps (`DS4_CUDA_QKV_PRE=0`: the row functions; the
                        // same values).
                        exact | (i32::from(super::switch_on("DS4_CUDA_QKV_PRE")) << 1)
                    ]
                );
            } else {
                if !qnorm {
                    launch!(
                        st,
                        k.head_norm_rope,
                        (n32 * c.n_head as u32, 1, 1),
                        (128, 1, 1),
                        0,
                        [
                            p(&s.q),
                            c.n_head as i32,
                            c.head_dim as i32,
                            half,
                            eps,
                            ptr(&l.freqs, st),
                            p0l
                        ]
                    );
                }
                // KV row (its product was queued with q_a's, which reads the same input).
                launch!(
                    st,
                    k.kv_finish,
                    (n32, 1, 1),
                    (256, 1, 1),
                    0,
                    [
                        p(&s.kv),
                        p(&l.kv_a_norm),
                        c.head_dim as i32,
                        half,
                        eps,
                        ptr(&l.freqs, st),
                        p0l,
                        qat,
                        exact
                    ]
                );
            }
            mk(il, "q_path")?;
            if main_comp {
                if let (Some(w), Some(cs)) = (&l.comp, &ls.comp) {
                    compress(w, cs, 0)?;
                }
            }
            match att_fork {
                Some(f) => f.join()?,
                None => comps()?,
            }
            if let Some(f) = sk_fork {
                f.join()?;
            }
            if let Some(f) = idx_pre_fork {
                f.join()?;
            }
            match idx_fork {
                Some(f) => f.join()?,
                None => indexer()?,
            }
            mk(il, "comp_join")?;
            // Attention over the raw window and the compressed rows; in production prefill the
            // tensor-core kernel writes its output as f16 into x16 for attn_output_a.
            let mut o16_ready = false;
            {
                let max_comp = match l.ratio {
                    0 => 0,
                    4 => c.idx_topk,
                    r => pb / r,
                };
                let rows_cap = c.swa + max_comp;
                let comp_rows = ls.comp.as_ref().map_or(0, |cs| p(&cs.rows));
                if !self.tiled {
                    // Exact mode: the reference-order kernel (one block per (token, head)).
                    let smem = attend_smem(rows_cap, c.head_dim);
                    let scale = 1.0 / (c.head_dim as f32).sqrt();
                    launch!(
                        st,
                        k.attend_ref,
                        (n32 * c.n_head as u32, 1, 1),
                        (ATTEND_THREADS as u32, 1, 1),
                        smem,
                        [
                            p(&s.q),
                            p(&s.kv),
                            p(&ls.ring),
                            comp_rows,
                            pi(&s.sel),
                            pi(&s.cnt),
                            c.idx_topk as i32,
                            l.ratio as i32,
                            p0l,
                            c.swa as i32,
                            c.head_dim as i32,
                            c.n_head as i32,
                            p(&l.sinks),
                            scale,
                            half,
                            ptr(&l.freqs, st),
                            p(&s.o),
                            rows_cap as i32
                        ]
                    );
                } else {
                    if rows_cap > s.att_rows {
                        return Err(CudaError::Invalid(format!(
                            "position {pb} past the session's context ({} attention rows)",
                            s.att_rows
                        )));
                    }
                    let args = attn::Attend {
                        n,
                        q: p(&s.q),
                        cs_tab: if qnorm { cs_tab } else { 0 },
                        qeps: eps,
                        q16,
                        ckv: p(&s.kv),
                        ring: p(&ls.ring),
                        comp: comp_rows,
                        sel: pi(&s.sel),
                        cnt: pi(&s.cnt),
                        sel_ld: c.idx_topk,
                        ratio: l.ratio,
                        p0: p0l,
                        swa: c.swa,
                        dh: c.head_dim,
                        n_head: c.n_head,
                        sinks: p(&l.sinks),
                        scale: 1.0 / (c.head_dim as f32).sqrt(),
                        half: half as usize,
                        freqs: ptr(&l.freqs, st),
                        o: p(&s.o),
                        rows16: pf.map_or(0, |ps| p16(&ps.att16)),
                        // Rows the chunk's last token can see (grown to that before the
                        // chunk), within what the buffer holds.
                        comp_rows: ls
                            .comp
                            .as_ref()
                            .map_or(0, |cs| (pb / l.ratio.max(1)).min(cs.cap)),
                        o16: pf.map_or(0, |ps| p16(&ps.x16)),
                        sc: p(&s.att_sc),
                        part: p(&s.att_part),
                        inv: p(&s.att_inv),
                        nsplit: attn::split_for(n),
                        rows_cap,
                        tc: !self.exact && n > 8 && attn::use_tc(),
                        // Production decode step: split-rows flash decoding; part is
                        // DECODE_SPLIT × 8 × n_head × Dh ≥ 32 row blocks of one token, att_sc
                        // holds their (m, l).
                        fd: !self.exact && n == 1 && attn::use_fd(),
                        fd_tc: attn::use_fd_tc(),
                        // Only while a decode graph is captured (PDL on).
                        fd_pdl: be.pdl() && super::switch_on("DS4_CUDA_FD_PDL"),
                        // Production decode: o's Q8_0 codes for out_a from the combine (the
                        // main stream's scratch; q_b, its last reader, is done).
                        q0: if int8 { p(&s.q0) } else { 0 },
                        d0: p(&s.d0),
                    };
                    if qnorm && !args.uses_tc() {
                        // The queries were left for the tensor-core kernel to normalize.
                        return Err(CudaError::Invalid(
                            "prefill attention: un-normalized queries for the f32 passes".into(),
                        ));
                    }
                    // SAFETY: q/o hold n × H × Dh, kv n × Dh, the ring swa × Dh, the compressed
                    // rows every visible row; att_sc is chunk × H × att_rows ≥ rows_cap;
                    // x16 (o16) holds chunk × H × Dh halves; cs_tab n × half pairs.
                    unsafe { attn::attend(st, &k.at, &args)? };
                    o16_ready = args.o16 != 0 && args.uses_tc();
                    if args.writes_q8() {
                        let mut m = memo.get();
                        m[0] = p(&s.o);
                        memo.set(m);
                    }
                    // o16 is x16: x's copy there is gone.
                    set16(2, 0);
                }
            }
            mk(il, "attn")?;
            // Grouped output: group g of token t is slot t·G + g of the stacked out_a.
            {
                let g = c.o_groups;
                let hd = c.n_head * c.head_dim;
                let gw = hd / g;
                // o holds n·G inputs of gw, low n·G outputs of Lo; gids is 0..G
                // repeated for chunk tokens.
                // Production prefill: out_a writes `low` as f16 straight into low16, which
                // out_b reads as its input: no f32 `low` and no conversion of it (~45 µs a
                // 2048-token chunk).
                let out_b_ps = gemm_ok(&l.out_b, n);
                let low16 = gemm_ok(&l.out_a, n * g)
                    .filter(|ps| {
                        n > 1
                            && out_b_ps.is_some()
                            && n * g * c.o_lora_rank <= ps.low16.len()
                            && l.out_b.n_cols == g * c.o_lora_rank
                    })
                    .map(|ps| p16(&ps.low16));
                match gemm_ok(&l.out_a, n * g) {
                    // One strided-batched GEMM over the G groups: group g reads columns
                    // g·gw.. of each token's o row and writes columns g·Lo.. of its low row.
                    // SAFETY: w16 holds the G stacked matrices, x16 n·hd halves (gemm_ok);
                    // low16 n·G·Lo halves (checked above).
                    Some(ps) if n > 1 => unsafe {
                        dense_gemm(
                            be,
                            &l.out_a,
                            0,
                            g,
                            p(&s.o),
                            hd,
                            n,
                            low16.unwrap_or(p(&s.low)),
                            g * c.o_lora_rank,
                            p16(&ps.w16),
                            p16(&ps.x16),
                            o16_ready,
                            1.0,
                            low16.is_some(),
                        )?
                    },
                    _ => {
                        // One token: slot g is matrix g, which no ids (0) also means, so
                        // the product reads nothing an earlier kernel wrote before its
                        // weights (quant.cu pdl_trigger).
                        let ids = if n == 1 { 0 } else { pi(&s.gids) };
                        mvq(&l.out_a, ids, n * g, p(&s.o), gw, p(&s.low))?
                    }
                }
                match (low16, out_b_ps) {
                    (Some(l16), Some(ps)) => {
                        wrote16(p(&s.f));
                        // SAFETY: low16 holds n rows of out_b's n_cols halves; f n rows of
                        // n_rows floats; w16 sized by gemm_ok.
                        unsafe {
                            dense_gemm(
                                be,
                                &l.out_b,
                                0,
                                1,
                                p(&s.low),
                                l.out_b.n_cols,
                                n,
                                p(&s.f),
                                l.out_b.n_rows,
                                p16(&ps.w16),
                                l16,
                                true,
                                1.0,
                                false,
                            )?
                        }
                    }
                    _ => lin(&l.out_b, p(&s.low), n, p(&s.f))?,
                }
            }
            mk(il, "out_ab")?;
            if n == 1 && use_hc1() {
                // Ring push and hc_post in one launch (decode), with the FFN site's control
                // product when it can (`pending`).
                pending.set(Some(Post::Ring { ring: p(&ls.ring) }));
            } else {
                launch!(
                    st,
                    k.ring_push,
                    (n.min(c.swa) as u32, 1, 1),
                    (256, 1, 1),
                    0,
                    [
                        p(&s.kv),
                        p(&ls.ring),
                        ni,
                        p0l,
                        c.swa as i32,
                        c.head_dim as i32
                    ]
                );
                hc_post(Some(&l.hc_ffn_fn))?;
            }
            mk(il, "post_a")?;
            // §3.2 + §3.4: FFN site.
            let perm16 = pf.is_some()
                && use_pf_mm()
                && use_pf_direct()
                && be.pf_mm_permuted(&l.gate_exps, Some(&l.up_exps));
            // Expert choice at f32 accuracy on tensor cores (`dense_split3`), its input's three
            // planes written by hc_pre.
            let split3 = pf.filter(|ps| {
                n > 1
                    && use_router_sgemm()
                    && use_router_split3()
                    && split3_fits(be, &l.gate_inp, l.router_x_bound)
                    && ps.rparts.len() >= 3 * n * c.n_expert
                    && ps.rx3.len() >= 3 * n * d
            });
            let left = hc_pre(
                &l.hc_ffn_fn,
                &l.hc_ffn_scale,
                &l.hc_ffn_base,
                &l.ffn_norm,
                perm16,
                true,
                split3.map(|ps| (p16(&ps.rx3), split3_scale(l.router_x_bound))),
                false,
            )?;
            mk(il, "hc_pre_f")?;
            // The shared expert reads only y: on a fork it runs beside the router and the
            // routed experts, joined before the expert sum.
            // The Sinkhorn after the shared expert's products, which then start in the router's
            // stretch, before the routed gate|up fills the SMs (`DS4_CUDA_SINKHORN_LAST=0`:
            // before).
            let sinkhorn_last = super::switch_on("DS4_CUDA_SINKHORN_LAST");
            // In decode the Sinkhorn runs alone on the third side stream from here, joined
            // before the routed gate|up (which starts when k_route ends, well after it): at
            // the shared expert's end it waited for a slot behind the gate|up's blocks, which
            // fill every SM's registers, and the routed down waited for it
            // (`DS4_CUDA_FFN_SK_SIDE2=0`: after the shared expert; thirty-first session).
            let sk_own = fork && sinkhorn_last && left && super::switch_on("DS4_CUDA_FFN_SK_SIDE2");
            let sk_fork = if sk_own {
                Some(be.fork_on(2, || sinkhorn(left))?)
            } else {
                None
            };
            let shared = || -> Result<()> {
                if !sinkhorn_last {
                    sinkhorn(left)?;
                }
                glu(
                    &l.sh_gate,
                    &l.sh_up,
                    0,
                    1,
                    p(&s.y),
                    0,
                    p(&s.shg),
                    p(&s.shu),
                    0,
                    l.clamp,
                )?;
                lin(&l.sh_down, p(&s.shg), n, p(&s.sh))?;
                if sinkhorn_last && !sk_own {
                    sinkhorn(left)?;
                }
                Ok(())
            };
            let mut ffn_fork = if fork { Some(be.fork(shared)?) } else { None };
            let mut sh_joined = false;
            // Production prefill: the shared expert on the highest-priority side stream from the
            // expert grouping on (one block: the GEMMs take the other SMs), beside the routed
            // experts; its GEMMs read F16 weights and f16 inputs in place (`lin_s`).
            let pf_sh_fork = pf.is_some()
                && n > 1
                && !fork
                && use_pf_sh_fork()
                && f16_of(p(&s.y)).is_some()
                && [&l.sh_gate, &l.sh_up, &l.sh_down]
                    .iter()
                    .all(|w| be.f16_ptr(w).is_some());
            if n == 1 {
                lin(&l.gate_inp, p(&s.y), n, p(&s.rl))?;
            } else if let Some(ps) = split3 {
                // Expert choice at f32 accuracy on tensor cores: y as three f16 planes against
                // the exact f16 weight, the three partial logits added by k_route.
                // SAFETY: y holds n rows of D; rx3 3·n·D halves, rparts 3·n·n_expert floats
                // (checked above); the weight is f16 (split3_fits).
                unsafe {
                    dense_split3(
                        be,
                        &k.pf,
                        &l.gate_inp,
                        p(&s.y),
                        l.router_x_bound,
                        n,
                        p16(&ps.rx3),
                        planes_ready.get(),
                        p(&ps.rparts),
                    )?
                };
            } else if let Some(ps) = pf.filter(|_| use_router_sgemm()) {
                // Expert choice: f32 inputs and products (cuBLAS SGEMM on the exactly decoded
                // weight), not f16 operands.
                let w = &l.gate_inp;
                // SAFETY: y holds n rows of D, rl n rows of n_expert, w32 the weight (or room
                // for it) as f32.
                unsafe {
                    match &l.gate_inp32 {
                        Some(w32) => be.gemm_f32_raw(
                            w.n_rows,
                            n,
                            w.n_cols,
                            p(w32),
                            w.n_cols,
                            p(&s.y),
                            w.n_cols,
                            p(&s.rl),
                            w.n_rows,
                        )?,
                        None => dense_sgemm(be, w, p(&s.y), n, p(&s.rl), p(&ps.w32))?,
                    }
                };
            } else {
                // SAFETY: y holds n rows of D, rl n rows of n_expert.
                unsafe { be.mm_raw(&l.gate_inp, p(&s.y), n, p(&s.rl))? };
            }
            {
                let ke = c.n_expert_used;
                let t2e = l.tid2eid.as_ref().map_or(0, pi);
                let bias = l.exp_bias.as_ref().map_or(0, p);
                // The split product's three partial logits (k_route adds them), else rl.
                let (logits, rsplit) = split3.map_or((p(&s.rl), 1i32), |ps| (p(&ps.rparts), 3));
                // Decode: with PDL (resident before the router's product ends; the kernel waits
                // first and never triggers early), `DS4_CUDA_ROUTE_PDL=0`: a plain launch.
                let route_pdl = n == 1 && super::switch_on("DS4_CUDA_ROUTE_PDL");
                let mut route_args = [
                    logits,
                    (c.n_expert as i32).slot(),
                    (ke as i32).slot(),
                    pi(&s.tokens),
                    t2e,
                    bias,
                    (c.expert_weights_norm as i32).slot(),
                    c.expert_weights_scale.slot(),
                    pi(&s.ids),
                    p(&s.wts),
                    rsplit.slot(),
                    ((n * c.n_expert) as i64).slot(),
                    // Warp 0 finishes the slots (DS4_CUDA_ROUTE_WARP=0: thread 0's loops).
                    i32::from(super::switch_on("DS4_CUDA_ROUTE_WARP")).slot(),
                    // The top-k rounds over keys in registers (DS4_CUDA_ROUTE_REG=0: in
                    // shared memory; the same selection).
                    i32::from(super::switch_on("DS4_CUDA_ROUTE_REG")).slot(),
                    // The first bias before the PDL wait (DS4_CUDA_ROUTE_BPRE=0: after the
                    // score; the same value).
                    i32::from(super::switch_on("DS4_CUDA_ROUTE_BPRE")).slot(),
                ];
                let route_cfg = LaunchConfig {
                    grid_dim: (n32, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: (c.n_expert.next_multiple_of(2) * 4 + c.n_expert * 8) as u32,
                };
                // SAFETY: the list matches k_route's parameters (forward.cu); logits hold
                // n·n_expert floats (rsplit parts), ids / wts n·k entries.
                unsafe {
                    launch_ex(
                        st,
                        &k.route,
                        route_cfg,
                        route_pdl && be.pdl(),
                        &mut route_args,
                    )
                }?;
                mk(il, "router")?;
                if let Some(f) = sk_fork {
                    f.join()?;
                }
                let f = c.n_ff_exp;
                let slots = n * ke;
                // Production prefill: the routed rows stay in the grouped product's sorted
                // order and k_hc_post_moe_pf reads them through inv (no slot-order copy, no
                // separate sum).
                let fused_sum = pf.filter(|_| d.is_multiple_of(4));
                if pf_sh_fork {
                    ffn_fork = Some(be.fork_on(super::side_of("DS4_CUDA_PF_SH_SIDE", 1), shared)?);
                }
                if let Some(ps) = pf {
                    // SAFETY: ids/wts hold `slots` entries from the router (ids < n_expert),
                    // y n rows of D, dn `slots` rows of D; the scratch holds chunk·k slots.
                    unsafe {
                        moe_grouped(
                            be,
                            &k.pf,
                            &ps.moe,
                            &l.gate_exps,
                            &l.up_exps,
                            &l.down_exps,
                            pi(&s.ids),
                            p(&s.wts),
                            p(&s.y),
                            f16_of(p(&s.y)).unwrap_or(0),
                            y16p_at.get(),
                            n,
                            ke,
                            l.clamp,
                            if fused_sum.is_some() { 0 } else { p(&s.dn) },
                            use_pf_mm(),
                        )?
                    };
                } else {
                    let (x, xs) = if n == 1 {
                        (p(&s.y), 0)
                    } else {
                        launch!(
                            st,
                            k.expand,
                            ((d as u32).div_ceil(256), slots as u32, 1),
                            (256, 1, 1),
                            0,
                            [p(&s.y), ke as i32, di, p(&s.zk)]
                        );
                        (p(&s.zk), d)
                    };
                    // Ids come from the router (< n_expert); buffers hold `slots` rows.
                    glu(
                        &l.gate_exps,
                        &l.up_exps,
                        pi(&s.ids),
                        slots,
                        x,
                        xs,
                        p(&s.g),
                        p(&s.u),
                        p(&s.wts),
                        l.clamp,
                    )?;
                    // The shared expert joined here, not before the expert sum: that sum's
                    // kernel (k_hc_post_mix) then waits on one kernel and can launch early
                    // (`DS4_CUDA_SH_JOIN_EARLY=0`: joined there; bench/RESULTS.md, thirtieth
                    // session).
                    if n == 1 && super::switch_on("DS4_CUDA_SH_JOIN_EARLY") {
                        if let Some(f) = ffn_fork.take() {
                            f.join()?;
                            sh_joined = true;
                        }
                    }
                    // As above; g holds `slots` activations of F.
                    mvq(&l.down_exps, pi(&s.ids), slots, p(&s.g), f, p(&s.dn))?;
                }
                mk(il, "moe")?;
                match ffn_fork {
                    Some(f) => f.join()?,
                    None if !sh_joined => shared()?,
                    None => {}
                }
                mk(il, "sh_join")?;
                if n == 1 && use_hc1() {
                    // Expert sum and hc_post in one pass (decode), with the next layer's
                    // control product when it can (`pending`).
                    pending.set(Some(Post::Moe));
                } else if let Some((ps, fnw)) =
                    fused_sum.zip(next_attn_fn.filter(|w| fn_fused(w) && ke <= 6))
                {
                    let (dns, inv) = ps.moe.sorted_out(be);
                    let head = [p(&s.x), dns, inv, p(&s.sh)];
                    post_fn(&k.hc_post_moe_fn, &head, Some(ke as i32), fnw)?;
                } else if let Some(ps) = fused_sum {
                    let (dns, inv) = ps.moe.sorted_out(be);
                    mix_for.set(0);
                    launch!(
                        st,
                        k.hc_post_moe_pf,
                        ((d as u32 / 4).div_ceil(256), n32, 1),
                        (256, 1, 1),
                        0,
                        [
                            p(&s.x),
                            dns,
                            inv,
                            p(&s.sh),
                            ke as i32,
                            p(&s.post),
                            p(&s.comb),
                            nh as i32,
                            di,
                            p16(&ps.x16)
                        ]
                    );
                    set16(2, p(&s.x));
                } else {
                    launch!(
                        st,
                        k.moe_sum,
                        ((d as u32).div_ceil(256), n32, 1),
                        (256, 1, 1),
                        0,
                        [p(&s.dn), p(&s.sh), ke as i32, di, p(&s.f)]
                    );
                    hc_post(next_attn_fn)?;
                }
            }
            mk(il, "post_moe")?;
        }
        if !head {
            flush_post()?;
            return Ok(());
        }
        // §3.5 output head.
        if head_hc1 {
            // The mixing weights' product, h and its norm and codes as a site's hc_pre forms
            // y (the last layer's hc_post fused before it); the head's product reads the codes.
            hc_pre(
                &gm.output_hc_fn,
                &gm.output_hc_scale3,
                &gm.output_hc_base,
                &gm.output_norm,
                false,
                false,
                None,
                true,
            )?;
            lin(&gm.output, p(&s.h), 1, p(&s.logits))?;
            return Ok(());
        }
        flush_post()?;
        let first = if all { 0 } else { n - 1 };
        let m = n - first;
        let flat = nh * d;
        let xh = xcur.get() + (first * flat * 4) as u64;
        lin(&gm.output_hc_fn, xh, m, p(&s.mix))?;
        launch!(
            st,
            k.hc_head,
            (m as u32, 1, 1),
            (1024, 1, 1),
            0,
            [
                xh,
                p(&s.mix),
                nh as i32,
                di,
                eps,
                c.hc_eps,
                gm.output_hc_scale,
                p(&gm.output_hc_base),
                p(&gm.output_norm),
                p(&s.h)
            ]
        );
        lin(&gm.output, p(&s.h), m, p(&s.logits))?;
        Ok(())
    }
}

/// Shared memory of one exact-mode attention block: a score per row and a partial output per
/// warp.
fn attend_smem(rows: usize, dh: usize) -> usize {
    (rows + ATTEND_THREADS / 32 * dh) * 4
}

fn fill(gm: &GpuModel, x: &mut CudaSlice<f32>, v: f32, n: usize) -> Result<()> {
    let st = gm.be.stream();
    let nn = n as i64;
    launch!(
        st,
        gm.k.fill,
        ((n as u32).div_ceil(256).max(1), 1, 1),
        (256, 1, 1),
        0,
        [ptr(x, st), v, nn]
    );
    Ok(())
}

/// Makes room for `needed` rows (geometric growth, capped at the context's rows).
fn grow_rows(be: &CudaBackend, cs: &mut CompState, needed: usize) -> Result<()> {
    if needed <= cs.cap {
        return Ok(());
    }
    let cap = (cs.cap * 2).max(needed).min(cs.max_rows.max(needed));
    let mut rows = be.alloc_f32(cap * cs.d)?;
    be.stream().memcpy_dtod(
        &cs.rows.slice(0..cs.cap * cs.d),
        &mut rows.slice_mut(0..cs.cap * cs.d),
    )?;
    cs.rows = rows;
    cs.cap = cap;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{gpu_chunk, hc_pre_pf_pick, wont_fit};

    #[test]
    fn hc_pre_takes_an_entry_only_with_column_counts_it_has() {
        // The flash width: 512 threads of 2 columns, or 256 of 4.
        assert_eq!(hc_pre_pf_pick(4, 4096, true), Some((true, 2)));
        assert_eq!(hc_pre_pf_pick(4, 4096, false), Some((false, 4)));
        // Narrow test models: one column a thread, in either entry.
        assert_eq!(hc_pre_pf_pick(4, 256, true), Some((true, 1)));
        assert_eq!(hc_pre_pf_pick(4, 1024, false), Some((false, 1)));
        // Wider than 4 columns of 256 threads can hold (k_hc_pre_pf512 has no 4-column
        // form): neither entry.
        assert_eq!(hc_pre_pf_pick(4, 8192, true), None);
        // Only four HC streams, and widths of whole warps.
        assert_eq!(hc_pre_pf_pick(2, 4096, true), None);
        assert_eq!(hc_pre_pf_pick(4, 4100, true), None);
    }

    #[test]
    fn the_prefill_chunk_shortens_as_the_context_grows() {
        // A DS4_CUDA_CHUNK in the test's environment overrides the policy under test.
        if std::env::var_os("DS4_CUDA_CHUNK").is_some() {
            return;
        }
        assert_eq!(gpu_chunk(4096), 8192);
        assert_eq!(gpu_chunk(1 << 17), 8192);
        assert_eq!(gpu_chunk((1 << 17) + 1), 4096);
        assert_eq!(gpu_chunk(1 << 19), 4096);
        assert_eq!(gpu_chunk(1 << 20), 2048);
        // The indexer's scores, 4·(ctx/4 + 1) bytes a chunk token, stay near 2 GiB at most.
        for ctx in [1 << 17, 1 << 19, 1 << 20] {
            assert!(gpu_chunk(ctx) * (ctx / 4 + 1) * 4 <= (2 << 30) + (1 << 16));
        }
    }

    #[test]
    fn a_model_larger_than_free_memory_is_refused_with_the_sizes() {
        let gib = 1usize << 30;
        assert_eq!(wont_fit(80 * gib, 139 * gib, "NVIDIA H200"), None);
        assert_eq!(wont_fit(78 * gib, 78 * gib, "NVIDIA H100"), None);
        let why = wont_fit(81 * gib, 78 * gib, "NVIDIA H100 80GB HBM3").expect("refused");
        assert!(why.contains("81.0 GiB"), "{why}");
        assert!(
            why.contains("NVIDIA H100 80GB HBM3 has 78.0 GiB free"),
            "{why}"
        );
        assert!(why.contains("--backend cpu"), "{why}");
    }
}
