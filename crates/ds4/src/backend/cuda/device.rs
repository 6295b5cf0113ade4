//! The CUDA backend object: one device, one stream, the compiled kernel module, a cuBLAS
//! handle; weight upload and the kernel launches.

use super::cache::KernelCache;
use super::compile::{build_image, ImageOrigin};
use super::probe::{panic_text, probe, CudaAvailability, DeviceInfo};
use crate::quant::GgmlType;
use cudarc::cublas::{sys as cb, CudaBlas};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, CudaViewMut,
    DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

/// Errors of the CUDA backend.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// No usable device or library (the reason is meant for the user).
    #[error("CUDA unavailable: {0}")]
    Unavailable(String),
    /// A driver call failed.
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    /// NVRTC failed (the message carries the compiler log).
    #[error("CUDA kernel build: {0}")]
    Compile(String),
    /// cuBLAS failed.
    #[error("cuBLAS: {0}")]
    Blas(#[from] cudarc::cublas::result::CublasError),
    /// Bad arguments (shapes, types) from the caller.
    #[error("CUDA backend: {0}")]
    Invalid(String),
}

/// Result type of the CUDA backend.
pub type Result<T> = std::result::Result<T, CudaError>;

/// Weight types with GPU kernels.
pub const SUPPORTED_TYPES: [GgmlType; 6] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q4_K,
    GgmlType::IQ2_XXS,
];

fn kernel_suffix(ty: GgmlType) -> Option<&'static str> {
    Some(match ty {
        GgmlType::F32 => "f32",
        GgmlType::F16 => "f16",
        GgmlType::Q8_0 => "q8_0",
        GgmlType::Q2_K => "q2_k",
        GgmlType::Q4_K => "q4_k",
        GgmlType::IQ2_XXS => "iq2_xxs",
        _ => return None,
    })
}

/// Elements each thread of a dequantize kernel writes (its "unit"; see quant.cu).
fn dq_elems(ty: GgmlType) -> usize {
    match ty {
        GgmlType::F32 => 4,
        GgmlType::F16 => 8,
        GgmlType::Q2_K => 16,
        _ => 32,
    }
}

/// Rows per block of the matvec/matmul kernels (one warp per row) and tokens per matmul tile;
/// must match WARPS_PER_BLOCK / MM_TOKENS in quant.cu.
const WARPS_PER_BLOCK: u32 = 8;
const MM_TOKENS: u32 = 8;
/// Warps per output row of a matvec: rows are split between 2, 4 or 8 warps of a block when
/// the launch has few rows in all (under 8192 warps otherwise), as long as each warp keeps
/// at least 4 steps of 256 columns (one round of the kernel's loads in flight).
pub(crate) fn mv_split(n_rows: usize, n_cols: usize, slots: usize) -> u32 {
    let (total, steps) = (n_rows * slots, n_cols.div_ceil(256));
    let mut split = 1;
    while split < WARPS_PER_BLOCK as usize && total * split < 8192 && steps >= 8 * split {
        split *= 2;
    }
    split as u32
}

/// Device stride of one expert (and the tail padding of every weight buffer): keeps each
/// expert's base aligned for the 16-byte loads.
const EXPERT_ALIGN: usize = 256;

struct TypeKernels {
    mv: CudaFunction,
    mm: CudaFunction,
    dq: CudaFunction,
    dq32: CudaFunction,
    /// Batched dequantization to f16 (production prefill, prefill.cu).
    pfdq: CudaFunction,
    /// Grouped expert product on tensor cores (production prefill, prefill.cu).
    pfmm: CudaFunction,
    /// The same product with weights decoded straight into the MMA fragments (IQ2_XXS and
    /// Q2_K only).
    pfmx: Option<PfMx>,
    /// Int8-activation matvec (production mode), for the types with an integer dot.
    mv8: Option<CudaFunction>,
    /// Fused gate+up+SwiGLU over int8 activations (same types as `mv8`).
    mv8glu: Option<CudaFunction>,
    /// Q8_0 only: int8 matvecs with 16-byte loads (`mv8w2_q8_0`, 2 rows per warp;
    /// `mv8w4_q8_0`, 4 rows per warp for short rows), for `n_cols` a multiple of 512.
    mv8w: Option<(CudaFunction, CudaFunction)>,
    /// IQ2_XXS / Q2_K only: lane-owned int8 matvec `mvl_<t>` and its rows per warp RO
    /// (replaces `mv8` unless `DS4_CUDA_LANE=0`).
    mvl: Option<(CudaFunction, usize)>,
    /// Same for the fused gate+up+SwiGLU, `mvlglu_<t>` (outputs per warp, and the blocks
    /// the device holds at once: its persistent grid).
    mvlglu: Option<(CudaFunction, usize, usize)>,
}

/// The grouped expert kernel [`CudaBackend::pf_mm_raw`] takes (see
/// [`CudaBackend::pf_mx_choice`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PfChoice {
    Mm,
    Mx,
    Mxs,
    Mxw,
}

/// The fragment-decoding grouped expert kernels of one type (prefill.cu).
struct PfMx {
    /// `pf_mx_<t>`: raw weight bytes from global memory.
    mx: CudaFunction,
    /// `pf_mxs_<t>`: weight bytes staged in shared memory by cp.async.
    mxs: CudaFunction,
    /// `pf_mxw_<t>`: `pf_mxs` with the products on wgmma (sm_90a builds only); reads
    /// activation rows permuted by `px_pos`.
    mxw: Option<CudaFunction>,
    /// Dynamic shared memory of `pf_mxs` / `pf_mxw` in bytes.
    smem: u32,
}

/// Whether IQ2_XXS / Q2_K int8 products use the lane-owned kernels (`DS4_CUDA_LANE=0` keeps
/// the cooperative `mv8_<t>` / `mv8glu_<t>`, for comparisons).
fn use_lane() -> bool {
    super::switch_on("DS4_CUDA_LANE")
}

/// A kernel name and its rows (outputs) per warp.
type LaneKernel = (&'static str, usize);

/// Lane-owned kernels, as fixed in quant.cu: (`mvl_<t>`, RO), (`mvlglu_<t>`, RO).
fn lane_kernels(ty: GgmlType) -> Option<(LaneKernel, LaneKernel)> {
    match ty {
        GgmlType::IQ2_XXS => Some((("mvl_iq2_xxs", 2), ("mvlglu_iq2_xxs", 2))),
        GgmlType::Q2_K => Some((("mvl_q2_k", 4), ("mvlglu_q2_k", 1))),
        _ => None,
    }
}

/// Whether Q8_0 int8 products use the 16-byte-load kernels (`DS4_CUDA_MV8W=0` keeps
/// `mv8_q8_0`, for comparisons).
fn use_mv8w() -> bool {
    super::switch_on("DS4_CUDA_MV8W")
}

/// Whether those kernels take 4 rows a warp wherever the slots hold 4,096 rows or more
/// (`DS4_CUDA_MV8W4=0`: 2 rows a warp for rows of 2,048 columns or more, for comparisons).
fn use_mv8w4() -> bool {
    super::switch_on("DS4_CUDA_MV8W4")
}

/// [`CudaBackend::set_pf_mx`] level meaning "read the switches at each launch" (the default,
/// so `ds4 cuda model --variants` can change them between sessions).
const PF_MX_FROM_ENV: u8 = u8::MAX;

/// Which grouped expert product [`CudaBackend::pf_mm_raw`] takes where it can: 3 =
/// `pf_mxw_<t>` (the default; Hopper builds only, else level 2), 2 = `pf_mxs_<t>`
/// (`DS4_CUDA_PF_MXW=0`), 1 = `pf_mx_<t>` (`DS4_CUDA_PF_MXS=0`), 0 = `pf_mm_<t>`
/// (`DS4_CUDA_PF_MX=0`); for comparisons.
fn pf_mx_level() -> u8 {
    if !super::switch_on("DS4_CUDA_PF_MX") {
        0
    } else if !super::switch_on("DS4_CUDA_PF_MXS") {
        1
    } else if !super::switch_on("DS4_CUDA_PF_MXW") {
        2
    } else {
        3
    }
}

/// Activation quantization a weight type's int8 product needs (production mode, as the
/// CPU's `quant::matvec` with `exact = false`): Q8_0 weights take Q8_0 activations (scale per
/// 32), Q2_K and IQ2_XXS take Q8_K (scale per 256). `None`: the type keeps f32 activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActQuant {
    /// Per 32 elements, `d = amax/127`.
    Q8_0,
    /// Per 256 elements, `d = 1/iscale`, `iscale = -127/max`.
    Q8K,
}

impl ActQuant {
    /// The activation form `ty`'s int8 kernel reads, if it has one.
    pub fn of(ty: GgmlType) -> Option<ActQuant> {
        match ty {
            GgmlType::Q8_0 => Some(ActQuant::Q8_0),
            GgmlType::Q2_K | GgmlType::IQ2_XXS => Some(ActQuant::Q8K),
            _ => None,
        }
    }
    /// Elements per scale.
    pub fn block(self) -> usize {
        match self {
            ActQuant::Q8_0 => 32,
            ActQuant::Q8K => 256,
        }
    }
}

/// A weight tensor resident on the GPU: one matrix (`n_experts == 1`) or a stack of expert
/// matrices, each `n_rows × n_cols`, in the device layout of its type (GGML blocks as in the
/// file, except Q8_0, which is split into a code plane and a scale plane, and IQ2_XXS, whose
/// rows are regrouped by `repack_iq2_xxs`; see quant.cu).
pub struct GpuWeight {
    buf: CudaSlice<u8>,
    /// Production prefill's f16 form of every matrix (row-major, `n_rows·n_cols` halves a
    /// matrix), made once at load when memory allows ([`CudaBackend::attach_f16`]); the
    /// dense GEMMs then skip their per-chunk dequantization.
    f16: Option<CudaSlice<u16>>,
    /// Element type.
    pub ty: GgmlType,
    /// Output rows per matrix.
    pub n_rows: usize,
    /// Input columns.
    pub n_cols: usize,
    /// Matrices in the stack.
    pub n_experts: usize,
    /// Device bytes from one expert to the next.
    pub expert_stride: usize,
}

impl GpuWeight {
    /// Bytes of one matrix as stored in the GGUF file (= bytes a full matvec must read).
    pub fn matrix_bytes(&self) -> usize {
        self.n_rows * row_bytes(self.ty, self.n_cols)
    }
    /// Device bytes held (the f16 copy included).
    pub fn device_bytes(&self) -> usize {
        self.buf.len() + self.f16.as_ref().map_or(0, |c| 2 * c.len())
    }
    /// Bytes an f16 copy of every matrix takes.
    pub fn f16_bytes(&self) -> usize {
        2 * self.n_experts * self.n_rows * self.n_cols
    }
}

fn row_bytes(ty: GgmlType, n_cols: usize) -> usize {
    n_cols / ty.block_elems() * ty.block_bytes()
}

/// Scratch buffers of the f16-GEMM prefill path, grown on demand.
#[derive(Default)]
pub struct GemmScratch {
    w16: Option<CudaSlice<u16>>,
    x16: Option<CudaSlice<u16>>,
}

/// One CUDA device with the ds4 kernels loaded.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: DeviceInfo,
    module: Arc<CudaModule>,
    kernels: Vec<(GgmlType, TypeKernels)>,
    f32_to_f16: CudaFunction,
    qa_q8_0: CudaFunction,
    qa_q8_k: CudaFunction,
    blas: CudaBlas,
    /// A cuBLAS handle (with its own workspace) on each side stream, for the GEMMs a
    /// production prefill chunk queues inside a fork ([`CudaBackend::blas_now`]).
    blas_sides: [CudaBlas; 3],
    origin: ImageOrigin,
    cache_key: String,
    /// Launch the PDL-ready kernels with programmatic stream serialization (set by the
    /// session around the capture of a decode graph; see `pdl_enter` in quant.cu).
    pdl: AtomicBool,
    /// Three more streams for independent branches of a decode step ([`CudaBackend::fork`],
    /// [`CudaBackend::fork_on`]); the third (highest priority, as the second) holds only the
    /// decode Sinkhorns that would otherwise queue behind a longer branch (session.rs).
    sides: [Arc<CudaStream>; 3],
    /// 0: kernels go to `stream`; 1 + i: to `sides[i]` (inside a fork).
    lane: AtomicU8,
    /// Grouped expert product kernel level (see [`pf_mx_level`]; the self-test switches it
    /// to check every kernel).
    pf_mx: AtomicU8,
    /// Timing events on the main stream at named points of a prefill chunk
    /// (`DS4_CUDA_PHASES=1`, a development aid: [`CudaBackend::mark`]); `None` when off.
    marks: Option<std::sync::Mutex<Vec<Mark>>>,
}

/// A phase mark: layer, point, the event recorded there ([`CudaBackend::mark`]).
type Mark = (usize, &'static str, CudaEvent);

/// Whether the backend's streams get different priorities and decode graphs keep them per
/// node (see `CudaBackend::init`; `DS4_CUDA_PRIO=0` turns it off, for comparisons).
pub(crate) fn use_priorities() -> bool {
    super::switch_on("DS4_CUDA_PRIO")
}

/// Keeps the memory the stream-ordered allocator frees in the device's default pool instead of
/// returning it to the driver at each synchronization (the pool's release threshold, 0 by
/// default, set to the maximum): a session's buffers that grow with the context (`grow_rows`,
/// during prefill) and the scratch of the next session then reuse mapped memory instead of
/// mapping it anew. The memory stays this process's (an inference server's own). A failure
/// here only costs that speed, so it is ignored. `DS4_CUDA_POOL_KEEP=0` leaves the default.
fn keep_pool_memory(ctx: &CudaContext) {
    use cudarc::driver::sys;
    if !super::switch_on("DS4_CUDA_POOL_KEEP") {
        return;
    }
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: the context is current on this thread (CudaContext::new binds it); both calls
    // only read and write the locals passed.
    unsafe {
        if sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
            .result()
            .is_ok()
        {
            let _ = sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            )
            .result();
        }
    }
}

/// A side-stream branch queued by [`CudaBackend::fork`], joined back into the main stream.
#[must_use = "the main stream must join the branch before using its results"]
pub struct Fork<'a> {
    be: &'a CudaBackend,
    done: CudaEvent,
}

impl Fork<'_> {
    /// Makes the main stream wait for the branch.
    pub fn join(self) -> Result<()> {
        Ok(self.be.stream.wait(&self.done)?)
    }
}

/// A kernel argument as the 8-byte slot `cuLaunchKernelEx` reads it from (the driver reads
/// the parameter's own size from the slot's start; little-endian).
pub(crate) trait Slot {
    /// The value's bytes in the low end of a u64.
    fn slot(self) -> u64;
}
impl Slot for u64 {
    fn slot(self) -> u64 {
        self
    }
}
impl Slot for i64 {
    fn slot(self) -> u64 {
        self as u64
    }
}
impl Slot for i32 {
    fn slot(self) -> u64 {
        self as u32 as u64
    }
}
impl Slot for u32 {
    fn slot(self) -> u64 {
        self as u64
    }
}
impl Slot for f32 {
    fn slot(self) -> u64 {
        self.to_bits() as u64
    }
}

/// Launches `f` on `st` through `cuLaunchKernelEx`, with programmatic stream serialization
/// when `pdl` (the kernel may then start before its predecessor ends, so it must wait with
/// `griddepcontrol.wait`, quant.cu's `pdl_wait`, before it reads that kernel's output).
/// `args` holds the kernel's parameters in order, each as a [`Slot`].
///
/// # Safety
/// `args` must match the kernel's signature, and every pointer in it must be a live device
/// buffer sized for this launch.
pub(crate) unsafe fn launch_ex(
    st: &CudaStream,
    f: &CudaFunction,
    cfg: LaunchConfig,
    pdl: bool,
    args: &mut [u64],
) -> Result<()> {
    use cudarc::driver::sys;
    let mut ptrs: Vec<*mut std::ffi::c_void> = args
        .iter_mut()
        .map(|a| a as *mut u64 as *mut std::ffi::c_void)
        .collect();
    let mut attr: sys::CUlaunchAttribute = std::mem::zeroed();
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let conf = sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: st.cu_stream(),
        attrs: &mut attr,
        numAttrs: u32::from(pdl),
    };
    st.context().bind_to_thread()?;
    sys::cuLaunchKernelEx(
        &conf,
        f.cu_function(),
        ptrs.as_mut_ptr(),
        std::ptr::null_mut(),
    )
    .result()?;
    Ok(())
}

impl CudaBackend {
    /// Probes device `ordinal`, builds (or loads from the disk cache) the kernels, creates the
    /// stream and cuBLAS handle. Never panics: every failure is a [`CudaError`].
    pub fn new(ordinal: usize) -> Result<CudaBackend> {
        Self::with_cache(ordinal, &KernelCache::from_env())
    }

    /// [`CudaBackend::new`] with an explicit kernel cache.
    pub fn with_cache(ordinal: usize, cache: &KernelCache) -> Result<CudaBackend> {
        let info = match probe(ordinal) {
            CudaAvailability::Available(i) => i,
            CudaAvailability::Unavailable(why) => return Err(CudaError::Unavailable(why)),
        };
        catch_unwind(AssertUnwindSafe(|| Self::init(info, cache))).unwrap_or_else(|p| {
            Err(CudaError::Unavailable(format!(
                "CUDA library failure during start-up ({})",
                panic_text(&p)
            )))
        })
    }

    fn init(info: DeviceInfo, cache: &KernelCache) -> Result<CudaBackend> {
        let ctx = CudaContext::new(info.ordinal)?;
        // One stream carries all work, so stream order is the only synchronization needed;
        // cudarc's per-buffer event tracking (made for multi-stream use) would add event
        // records to every launch and is switched off before any buffer exists.
        // SAFETY: no CudaSlice exists yet. The one place work runs on other streams
        // (`fork_on`) orders it by explicit events, which is what the tracking would add.
        unsafe { ctx.disable_event_tracking() };
        keep_pool_memory(&ctx);
        // A created (non-default) stream: CUDA graph capture, which the decode loop uses,
        // is not allowed on the legacy default stream.
        // Stream priorities, which decode graphs keep per kernel node (session.rs
        // end_capture): the block scheduler serves the highest-priority pending grid first.
        // The second side stream (a ratio-4 layer's indexer, the longest branch of its step)
        // gets the highest, the main stream the middle one, and the first side stream (the
        // shared expert beside the routed ones, the compressors) the lowest, so the side
        // branches' blocks fill what the main path leaves instead of delaying it
        // (bench/RESULTS.md, eleventh session; `DS4_CUDA_PRIO=0`: all equal).
        let (least, greatest) = cudarc::driver::result::stream::get_priority_range()?;
        let (pm, p1, p2) = if use_priorities() {
            ((least + greatest) / 2, least, greatest)
        } else {
            (least, least, least)
        };
        let stream = ctx.new_stream_with_priority(pm)?;
        let sides = [
            ctx.new_stream_with_priority(p1)?,
            ctx.new_stream_with_priority(p2)?,
            ctx.new_stream_with_priority(p2)?,
        ];
        let (image, origin, cache_key) =
            build_image(cache, &info.arch(), info.nvrtc_version).map_err(CudaError::Compile)?;
        let module = ctx.load_module(Ptx::from_binary(image))?;
        let mut kernels = Vec::new();
        for ty in SUPPORTED_TYPES {
            let s = kernel_suffix(ty).expect("supported type");
            kernels.push((
                ty,
                TypeKernels {
                    mv: module.load_function(&format!("mv_{s}"))?,
                    mm: module.load_function(&format!("mm_{s}"))?,
                    dq: module.load_function(&format!("dq_{s}"))?,
                    dq32: module.load_function(&format!("dq32_{s}"))?,
                    pfdq: module.load_function(&format!("pf_dq_{s}"))?,
                    pfmm: module.load_function(&format!("pf_mm_{s}"))?,
                    pfmx: match ty {
                        GgmlType::IQ2_XXS | GgmlType::Q2_K => {
                            // Two stages of 256 rows x one block's 16-byte chunks (prefill.cu
                            // kRS: 80 bytes for IQ2_XXS, 112 for Q2_K).
                            let smem = 2 * 256 * if ty == GgmlType::Q2_K { 112 } else { 80 };
                            let dyn_smem = |f: &CudaFunction| {
                                f.set_attribute(
                                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                    smem as i32,
                                )
                            };
                            let mxs = module.load_function(&format!("pf_mxs_{s}"))?;
                            dyn_smem(&mxs)?;
                            // wgmma exists only in the sm_90a image (elsewhere the kernel
                            // is empty and never taken).
                            let mxw = if info.arch() == "sm_90a" {
                                let f = module.load_function(&format!("pf_mxw_{s}"))?;
                                dyn_smem(&f)?;
                                Some(f)
                            } else {
                                None
                            };
                            Some(PfMx {
                                mx: module.load_function(&format!("pf_mx_{s}"))?,
                                mxs,
                                mxw,
                                smem,
                            })
                        }
                        _ => None,
                    },
                    mv8: match ActQuant::of(ty) {
                        Some(_) => Some(module.load_function(&format!("mv8_{s}"))?),
                        None => None,
                    },
                    mv8glu: match ActQuant::of(ty) {
                        Some(_) => Some(module.load_function(&format!("mv8glu_{s}"))?),
                        None => None,
                    },
                    mv8w: if ty == GgmlType::Q8_0 {
                        Some((
                            module.load_function("mv8w2_q8_0")?,
                            module.load_function("mv8w4_q8_0")?,
                        ))
                    } else {
                        None
                    },
                    mvl: match lane_kernels(ty) {
                        Some(((name, ro), _)) => Some((module.load_function(name)?, ro)),
                        None => None,
                    },
                    mvlglu: match lane_kernels(ty) {
                        Some((_, (name, ro))) => {
                            let f = module.load_function(name)?;
                            // Resident blocks an SM: the persistent grid's size.
                            let occ = f.occupancy_max_active_blocks_per_multiprocessor(
                                32 * WARPS_PER_BLOCK,
                                0,
                                None,
                            )?;
                            Some((f, ro, (occ.max(1) * info.sm_count) as usize))
                        }
                        None => None,
                    },
                },
            ));
        }
        let f32_to_f16 = module.load_function("f32_to_f16")?;
        let qa_q8_0 = module.load_function("qa_q8_0")?;
        let qa_q8_k = module.load_function("qa_q8_k")?;
        let blas = CudaBlas::new(stream.clone())?;
        let blas_sides = [
            CudaBlas::new(sides[0].clone())?,
            CudaBlas::new(sides[1].clone())?,
            CudaBlas::new(sides[2].clone())?,
        ];
        Ok(CudaBackend {
            ctx,
            stream,
            info,
            module,
            kernels,
            f32_to_f16,
            qa_q8_0,
            qa_q8_k,
            blas,
            blas_sides,
            origin,
            cache_key,
            pdl: AtomicBool::new(false),
            sides,
            lane: AtomicU8::new(0),
            pf_mx: AtomicU8::new(PF_MX_FROM_ENV),
            marks: std::env::var_os("DS4_CUDA_PHASES")
                .filter(|v| v == "1")
                .map(|_| std::sync::Mutex::new(Vec::new())),
        })
    }

    /// The device.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Whether the kernel image came from the disk cache or was compiled now, and its key.
    pub fn kernel_origin(&self) -> (ImageOrigin, &str) {
        (self.origin, &self.cache_key)
    }

    /// Development aid: the `ds4_probe` timestamps (quant.cu `PROBE`) of a module compiled
    /// with `DS4_PROBE`; None when the module has none.
    pub fn probe_dump(&self) -> Option<Vec<u64>> {
        let g = self.module.get_global("ds4_probe", &self.stream).ok()?;
        let mut b = vec![0u8; g.len()];
        self.stream.memcpy_dtoh(&g, &mut b).ok()?;
        self.stream.synchronize().ok()?;
        Some(
            b.chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
        )
    }

    /// The stream all work is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The stream kernels are launched on now: a side stream inside [`CudaBackend::fork_on`],
    /// else [`CudaBackend::stream`]. Allocations and copies always use the main stream.
    pub fn st(&self) -> &Arc<CudaStream> {
        match self.lane.load(Ordering::Relaxed) {
            0 => &self.stream,
            i => &self.sides[usize::from(i) - 1],
        }
    }

    /// Which side stream launches go to now (inside [`CudaBackend::fork_on`]), if any.
    pub fn side(&self) -> Option<usize> {
        match self.lane.load(Ordering::Relaxed) {
            0 => None,
            i => Some(usize::from(i) - 1),
        }
    }

    /// The cuBLAS handle of the stream launches go to now ([`CudaBackend::st`]).
    fn blas_now(&self) -> cb::cublasHandle_t {
        match self.side() {
            None => *self.blas.handle(),
            Some(i) => *self.blas_sides[i].handle(),
        }
    }

    /// Whether launches go to a side stream now (inside a fork).
    pub fn on_side(&self) -> bool {
        self.side().is_some()
    }

    /// [`CudaBackend::fork_on`] the first side stream.
    pub fn fork(&self, branch: impl FnOnce() -> Result<()>) -> Result<Fork<'_>> {
        self.fork_on(0, branch)
    }

    /// Queues `branch` on side stream `side` (0, 1 or 2), concurrent with what the main stream
    /// queues after this call: the branch starts after everything queued on the main stream
    /// so far (and after what that side stream already holds), and `Fork::join` makes the
    /// main stream wait for it. Works in a graph capture too (the side stream joins the
    /// capture through the event, and the join returns to the origin stream), so a decode
    /// graph gets parallel paths. The branch must not write what the main path (or the other
    /// side stream) reads or writes until the join, nor read what they write (callers give it
    /// its own scratch). Forks do not nest.
    pub fn fork_on(&self, side: usize, branch: impl FnOnce() -> Result<()>) -> Result<Fork<'_>> {
        let s = &self.sides[side];
        let start = self.stream.record_event(None)?;
        s.wait(&start)?;
        self.lane.store(side as u8 + 1, Ordering::Relaxed);
        let r = branch();
        self.lane.store(0, Ordering::Relaxed);
        let done = s.record_event(None)?;
        r.map(|_| Fork { be: self, done })
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    /// (free, total) device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        Ok(self.ctx.mem_get_info()?)
    }

    fn kernels(&self, ty: GgmlType) -> Result<&TypeKernels> {
        self.kernels
            .iter()
            .find(|(t, _)| *t == ty)
            .map(|(_, k)| k)
            .ok_or_else(|| CudaError::Invalid(format!("no CUDA kernels for {ty}")))
    }

    // ---------------------------------------------------------------- buffers

    /// Zeroed f32 device buffer.
    pub fn alloc_f32(&self, n: usize) -> Result<CudaSlice<f32>> {
        Ok(self.stream.alloc_zeros::<f32>(n.max(1))?)
    }

    /// Copies host f32 data to a new device buffer.
    pub fn upload_f32(&self, x: &[f32]) -> Result<CudaSlice<f32>> {
        Ok(self.stream.clone_htod(x)?)
    }

    /// Copies host i32 data (e.g. expert ids) to a new device buffer.
    pub fn upload_i32(&self, x: &[i32]) -> Result<CudaSlice<i32>> {
        Ok(self.stream.clone_htod(x)?)
    }

    /// Overwrites a device f32 buffer from the host.
    pub fn write_f32(&self, dst: &mut CudaSlice<f32>, x: &[f32]) -> Result<()> {
        Ok(self.stream.memcpy_htod(x, dst)?)
    }

    /// Copies a device buffer back (waits for queued work).
    pub fn download<T: cudarc::driver::DeviceRepr + Default + Clone>(
        &self,
        x: &CudaSlice<T>,
    ) -> Result<Vec<T>> {
        Ok(self.stream.clone_dtoh(x)?)
    }

    /// Uploads a weight tensor from its GGUF bytes (e.g. a slice of the mmap): `n_experts`
    /// matrices of `n_rows × n_cols`, contiguous (model.md §2.3). `progress(done, total)` is
    /// called after each chunk with bytes uploaded so far.
    pub fn upload_weight(
        &self,
        ty: GgmlType,
        data: &[u8],
        n_rows: usize,
        n_cols: usize,
        n_experts: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<GpuWeight> {
        kernel_suffix(ty).ok_or_else(|| CudaError::Invalid(format!("no CUDA kernels for {ty}")))?;
        if n_rows == 0 || n_experts == 0 || n_cols == 0 || !n_cols.is_multiple_of(32) {
            return Err(CudaError::Invalid(format!(
                "{ty} weight {n_experts}×{n_rows}×{n_cols}: columns must be a positive multiple of 32"
            )));
        }
        if !n_cols.is_multiple_of(ty.block_elems()) {
            return Err(CudaError::Invalid(format!(
                "{ty}: {n_cols} columns is not a whole number of blocks"
            )));
        }
        let rb = row_bytes(ty, n_cols);
        let mat = rb * n_rows;
        if data.len() != mat * n_experts {
            return Err(CudaError::Invalid(format!(
                "{ty} weight: {} bytes given, {n_experts}×{n_rows}×{rb} expected",
                data.len()
            )));
        }
        if n_rows > i32::MAX as usize || n_cols > i32::MAX as usize {
            return Err(CudaError::Invalid("matrix too large".into()));
        }
        let stride = mat.next_multiple_of(EXPERT_ALIGN);
        let mut buf = self
            .stream
            .alloc_zeros::<u8>(stride * n_experts + EXPERT_ALIGN)?;
        // Chunks of whole rows of about 32 MiB: big enough for full PCIe speed, small enough
        // for a smooth progress bar and a small host staging buffer (Q8_0 repacking).
        let rows_per_chunk = ((32usize << 20) / rb).clamp(1, n_rows);
        let total = data.len();
        let mut done = 0usize;
        let mut staging = Vec::new();
        for e in 0..n_experts {
            let src = &data[e * mat..(e + 1) * mat];
            let base = e * stride;
            let mut r0 = 0;
            while r0 < n_rows {
                let r1 = (r0 + rows_per_chunk).min(n_rows);
                let chunk = &src[r0 * rb..r1 * rb];
                if ty == GgmlType::Q8_0 {
                    let nb = n_cols / 32;
                    staging.clear();
                    staging.resize(chunk.len(), 0);
                    let (qs, ds) = staging.split_at_mut((r1 - r0) * n_cols);
                    repack_q8_0(chunk, n_cols, qs, ds);
                    let qoff = base + r0 * n_cols;
                    self.stream
                        .memcpy_htod(&*qs, &mut buf.slice_mut(qoff..qoff + qs.len()))?;
                    let doff = base + n_rows * n_cols + r0 * nb * 2;
                    self.stream
                        .memcpy_htod(&*ds, &mut buf.slice_mut(doff..doff + ds.len()))?;
                } else if ty == GgmlType::IQ2_XXS {
                    staging.clear();
                    staging.resize(chunk.len(), 0);
                    repack_iq2_xxs(chunk, n_cols, &mut staging);
                    let off = base + r0 * rb;
                    self.stream
                        .memcpy_htod(&*staging, &mut buf.slice_mut(off..off + chunk.len()))?;
                } else {
                    let off = base + r0 * rb;
                    self.stream
                        .memcpy_htod(chunk, &mut buf.slice_mut(off..off + chunk.len()))?;
                }
                done += chunk.len();
                progress(done, total);
                r0 = r1;
            }
        }
        Ok(GpuWeight {
            buf,
            f16: None,
            ty,
            n_rows,
            n_cols,
            n_experts,
            expert_stride: stride,
        })
    }

    fn expert_view<'a>(&self, w: &'a GpuWeight, expert: usize) -> Result<CudaView<'a, u8>> {
        if expert >= w.n_experts {
            return Err(CudaError::Invalid(format!(
                "expert {expert} of {}",
                w.n_experts
            )));
        }
        Ok(w.buf.slice(expert * w.expert_stride..))
    }

    // ---------------------------------------------------------------- kernels

    /// `y[0..n_rows] = W_expert · x` (decode).
    pub fn matvec(
        &self,
        w: &GpuWeight,
        expert: usize,
        x: &CudaView<f32>,
        y: &mut CudaViewMut<f32>,
    ) -> Result<()> {
        check_len("x", x.len(), w.n_cols)?;
        check_len("y", y.len(), w.n_rows)?;
        let wv = self.expert_view(w, expert)?;
        self.launch_mv(w, &wv, None, 1, x, 0, y)
    }

    /// Grouped MoE matvec, one launch for all selected experts:
    /// `y[k·n_rows..(k+1)·n_rows] = W_{ids[k]} · x_k` for `k < ids.len()`, with
    /// `x_k = x[k·x_stride..]` (`x_stride = 0`: every expert reads the same `x`, as gate/up
    /// do; `x_stride = n_cols`: one input per expert, as down does). Ids must be
    /// `< n_experts` (they are produced on the GPU by the router, so they are not checked).
    pub fn moe_matvec(
        &self,
        w: &GpuWeight,
        ids: &CudaView<i32>,
        x: &CudaView<f32>,
        x_stride: usize,
        y: &mut CudaViewMut<f32>,
    ) -> Result<()> {
        let n = ids.len();
        if n == 0 {
            return Ok(());
        }
        if !x_stride.is_multiple_of(4) {
            return Err(CudaError::Invalid(
                "x_stride must be a multiple of 4".into(),
            ));
        }
        check_len("x", x.len(), (n - 1) * x_stride + w.n_cols)?;
        check_len("y", y.len(), n * w.n_rows)?;
        let wv = w.buf.slice(..);
        self.launch_mv(w, &wv, Some(ids), n, x, x_stride, y)
    }

    #[allow(clippy::too_many_arguments)]
    fn launch_mv(
        &self,
        w: &GpuWeight,
        wv: &CudaView<u8>,
        ids: Option<&CudaView<i32>>,
        slots: usize,
        x: &CudaView<f32>,
        x_stride: usize,
        y: &mut CudaViewMut<f32>,
    ) -> Result<()> {
        let k = self.kernels(w.ty)?;
        let split = mv_split(w.n_rows, w.n_cols, slots);
        let cfg = LaunchConfig {
            grid_dim: (
                (w.n_rows as u32).div_ceil(WARPS_PER_BLOCK / split),
                slots as u32,
                1,
            ),
            block_dim: (32 * WARPS_PER_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let expert_bytes = w.expert_stride as i64;
        let (n_rows, n_cols) = (w.n_rows as i32, w.n_cols as i32);
        let xs = x_stride as i64;
        let null = 0u64;
        let mut b = self.st().launch_builder(&k.mv);
        b.arg(wv).arg(&expert_bytes);
        match ids {
            Some(v) => b.arg(v),
            None => b.arg(&null),
        };
        let split_i = split as i32;
        b.arg(&n_rows)
            .arg(&n_cols)
            .arg(x)
            .arg(&xs)
            .arg(y)
            .arg(&split_i);
        // SAFETY: argument list matches mv_<t> in quant.cu; lengths checked by the callers.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// Prefill product on CUDA cores, exact f32 activations:
    /// `ys[t][o] = row_o(W_expert) · xs[t]`, `xs` `n_tok × n_cols`, `ys` `n_tok × n_rows`
    /// (row-major, as the CPU `quant::matmul`).
    pub fn matmul(
        &self,
        w: &GpuWeight,
        expert: usize,
        xs: &CudaView<f32>,
        n_tok: usize,
        ys: &mut CudaViewMut<f32>,
    ) -> Result<()> {
        check_len("xs", xs.len(), n_tok * w.n_cols)?;
        check_len("ys", ys.len(), n_tok * w.n_rows)?;
        if n_tok == 0 {
            return Ok(());
        }
        let k = self.kernels(w.ty)?;
        let wv = self.expert_view(w, expert)?;
        let cfg = LaunchConfig {
            grid_dim: (
                (w.n_rows as u32).div_ceil(WARPS_PER_BLOCK),
                (n_tok as u32).div_ceil(MM_TOKENS),
                1,
            ),
            block_dim: (32 * WARPS_PER_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let (n_rows, n_cols, nt) = (w.n_rows as i32, w.n_cols as i32, n_tok as i32);
        let mut b = self.st().launch_builder(&k.mm);
        b.arg(&wv)
            .arg(&n_rows)
            .arg(&n_cols)
            .arg(xs)
            .arg(&nt)
            .arg(ys);
        // SAFETY: matches mm_<t>; lengths checked above.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    fn launch_dq<T>(
        &self,
        f: &CudaFunction,
        w: &GpuWeight,
        expert: usize,
        out: &mut CudaViewMut<T>,
    ) -> Result<()> {
        check_len("out", out.len(), w.n_rows * w.n_cols)?;
        let wv = self.expert_view(w, expert)?;
        let units = (w.n_rows * w.n_cols / dq_elems(w.ty)) as u32;
        let cfg = LaunchConfig {
            grid_dim: (units.div_ceil(256), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (n_rows, n_cols) = (w.n_rows as i32, w.n_cols as i32);
        let mut b = self.st().launch_builder(f);
        b.arg(&wv).arg(&n_rows).arg(&n_cols).arg(out);
        // SAFETY: matches dq_<t>/dq32_<t>; output length checked.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// Dequantizes matrix `expert` to f16 bits (row-major `n_rows × n_cols`).
    pub fn dequantize_f16(
        &self,
        w: &GpuWeight,
        expert: usize,
        out: &mut CudaViewMut<u16>,
    ) -> Result<()> {
        let k = self.kernels(w.ty)?;
        self.launch_dq(&k.dq, w, expert, out)
    }

    /// Dequantizes matrix `expert` to f32, bit-exact with `quant::dequantize_row`.
    pub fn dequantize_f32(
        &self,
        w: &GpuWeight,
        expert: usize,
        out: &mut CudaViewMut<f32>,
    ) -> Result<()> {
        let k = self.kernels(w.ty)?;
        self.launch_dq(&k.dq32, w, expert, out)
    }

    /// Prefill product through cuBLAS: the matrix is dequantized to f16, the activations are
    /// rounded to f16, and a tensor-core GEMM accumulates in f32. Same layout as
    /// [`CudaBackend::matmul`]; less exact (f16 operands), far faster for large `n_tok`.
    pub fn matmul_gemm(
        &self,
        w: &GpuWeight,
        expert: usize,
        xs: &CudaView<f32>,
        n_tok: usize,
        ys: &mut CudaViewMut<f32>,
        scratch: &mut GemmScratch,
    ) -> Result<()> {
        check_len("xs", xs.len(), n_tok * w.n_cols)?;
        check_len("ys", ys.len(), n_tok * w.n_rows)?;
        if n_tok == 0 {
            return Ok(());
        }
        let nw = w.n_rows * w.n_cols;
        let nx = n_tok * w.n_cols;
        if scratch.w16.as_ref().is_none_or(|b| b.len() < nw) {
            scratch.w16 = Some(self.stream.alloc_zeros::<u16>(nw)?);
        }
        if scratch.x16.as_ref().is_none_or(|b| b.len() < nx) {
            scratch.x16 = Some(self.stream.alloc_zeros::<u16>(nx)?);
        }
        let (w16, x16) = (
            scratch.w16.as_mut().expect("allocated"),
            scratch.x16.as_mut().expect("allocated"),
        );
        let (pw, _g1) = w16.device_ptr(&self.stream);
        let (px16, _g2) = x16.device_ptr(&self.stream);
        let (px, _g3) = xs.device_ptr(&self.stream);
        let (py, _g4) = ys.device_ptr_mut(&self.stream);
        // SAFETY: w16 holds n_rows·n_cols halves, x16 n_tok·n_cols; xs and ys were checked
        // above; the expert index is checked here.
        if expert >= w.n_experts {
            return Err(CudaError::Invalid(format!(
                "expert {expert} of {}",
                w.n_experts
            )));
        }
        unsafe {
            super::prefill::dense_gemm(
                self, w, expert, 1, px, w.n_cols, n_tok, py, w.n_rows, pw, px16, false, 1.0, false,
            )
        }
    }

    // ---------------------------------------------------------------- raw launches
    //
    // The GPU forward pass (session.rs) addresses its many scratch buffers by device pointer;
    // these launchers take raw pointers so that one call can read one field of a scratch
    // struct and write another. Callers guarantee the sizes (checked where the buffers are
    // allocated).

    /// A kernel of the module by name.
    pub(crate) fn function(&self, name: &str) -> Result<CudaFunction> {
        Ok(self.module.load_function(name)?)
    }

    /// Whether PDL-ready kernels are launched with programmatic stream serialization.
    pub(crate) fn pdl(&self) -> bool {
        self.pdl.load(Ordering::Relaxed)
    }

    /// Turns programmatic dependent launch of the PDL-ready kernels on or off (the session
    /// turns it on while it captures a decode graph).
    pub(crate) fn set_pdl(&self, on: bool) {
        self.pdl.store(on, Ordering::Relaxed);
    }

    /// Which grouped expert kernel [`CudaBackend::pf_mm_raw`] may take (3: `pf_mxw_<t>`, 2:
    /// `pf_mxs_<t>`, 1: `pf_mx_<t>`, 0: `pf_mm_<t>`; see [`pf_mx_level`]); returns the
    /// previous setting.
    pub(crate) fn set_pf_mx(&self, level: u8) -> u8 {
        self.pf_mx.swap(level, Ordering::Relaxed)
    }

    /// Launches `f` on the current stream through `cuLaunchKernelEx`, with programmatic
    /// stream serialization allowed while a decode graph is being captured
    /// ([`CudaBackend::pdl`]): the kernel may then start before its predecessor ends, so it
    /// must begin with `pdl_enter()` or its halves (quant.cu; no-ops in a plain launch).
    /// `args` holds the kernel's parameters in order, each as a [`Slot`].
    ///
    /// # Safety
    /// `args` must match the kernel's signature, and every pointer in it must be a live
    /// device buffer sized for this launch.
    pub(crate) unsafe fn launch_slots(
        &self,
        f: &CudaFunction,
        cfg: LaunchConfig,
        args: &mut [u64],
    ) -> Result<()> {
        launch_ex(self.st(), f, cfg, self.pdl(), args)
    }

    /// Device address of a weight's first matrix.
    pub(crate) fn weight_ptr(&self, w: &GpuWeight) -> u64 {
        let (p, _g) = w.buf.device_ptr(&self.stream);
        p
    }

    /// Device address of matrix 0 of `w` as row-major f16 when it is held in that form: an
    /// F16 weight itself (the file's layout), or the copy [`CudaBackend::attach_f16`] made.
    pub(crate) fn f16_ptr(&self, w: &GpuWeight) -> Option<u64> {
        if w.ty == GgmlType::F16 && w.expert_stride == w.matrix_bytes() {
            return Some(self.weight_ptr(w));
        }
        w.f16.as_ref().map(|c| c.device_ptr(&self.stream).0)
    }

    /// Makes the f16 copy of every matrix of `w` (dequantized as the prefill GEMMs' per-chunk
    /// dequantization does, so the products are unchanged) for [`CudaBackend::f16_ptr`].
    pub(crate) fn attach_f16(&self, w: &mut GpuWeight) -> Result<()> {
        let mat = w.n_rows * w.n_cols;
        let buf = self.stream.alloc_zeros::<u16>(mat * w.n_experts)?;
        // SAFETY: buf holds n_experts matrices of mat halves; expert ids are 0..n_experts.
        unsafe { self.dq_f16_raw(w, 0, 0, w.n_experts, buf.device_ptr(&self.stream).0, mat)? };
        w.f16 = Some(buf);
        Ok(())
    }

    /// `mv_<t>` over `slots` slots: slot `s` multiplies matrix `ids[s]` (matrix `s` when
    /// `ids == 0`: the stack in order, so one slot is matrix 0) by `x + s·x_stride` into
    /// `y + s·n_rows`.
    ///
    /// # Safety
    /// `x`, `y` and `ids` must be live device buffers of the sizes the product needs, ids
    /// `< n_experts`.
    pub(crate) unsafe fn mv_raw(
        &self,
        w: &GpuWeight,
        ids: u64,
        slots: usize,
        x: u64,
        x_stride: usize,
        y: u64,
    ) -> Result<()> {
        let k = self.kernels(w.ty)?;
        let split = mv_split(w.n_rows, w.n_cols, slots);
        let cfg = LaunchConfig {
            grid_dim: (
                (w.n_rows as u32).div_ceil(WARPS_PER_BLOCK / split),
                slots as u32,
                1,
            ),
            block_dim: (32 * WARPS_PER_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let wp = self.weight_ptr(w);
        let expert_bytes = w.expert_stride as i64;
        let (n_rows, n_cols) = (w.n_rows as i32, w.n_cols as i32);
        let xs = x_stride as i64;
        let split_i = split as i32;
        self.launch_slots(
            &k.mv,
            cfg,
            &mut [
                wp,
                expert_bytes.slot(),
                ids,
                n_rows.slot(),
                n_cols.slot(),
                x,
                xs.slot(),
                y,
                split_i.slot(),
            ],
        )?;
        Ok(())
    }

    /// Quantizes `n` contiguous f32 activations at `x` into int8 codes `q` (`n` bytes) and
    /// f32 scales `d` (`n / kind.block()`) with the CPU's rule for `kind` (`qa_<kind>` in
    /// quant.cu). `n` must be a multiple of `kind.block()`.
    ///
    /// # Safety
    /// `x`, `q` and `d` must be live device buffers of those sizes.
    pub(crate) unsafe fn quant_act_raw(
        &self,
        kind: ActQuant,
        x: u64,
        n: usize,
        q: u64,
        d: u64,
    ) -> Result<()> {
        let warps = n.div_ceil(256) as u32;
        let cfg = LaunchConfig {
            grid_dim: (warps.div_ceil(8), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        match kind {
            ActQuant::Q8_0 => {
                self.launch_slots(&self.qa_q8_0, cfg, &mut [x, (n as i64).slot(), q, d])
            }
            ActQuant::Q8K => self.launch_slots(
                &self.qa_q8_k,
                cfg,
                &mut [x, ((n / 256) as i32).slot(), q, d],
            ),
        }
    }

    /// `mv8_<t>`: [`CudaBackend::mv_raw`] with activations already quantized by
    /// [`CudaBackend::quant_act_raw`] (codes `xq`, scales `xd`; slot `s` reads elements from
    /// `s·x_stride`). Only for types with [`ActQuant::of`].
    ///
    /// # Safety
    /// As [`CudaBackend::mv_raw`]; `xq`/`xd` hold the quantized inputs of every slot.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn mv8_raw(
        &self,
        w: &GpuWeight,
        ids: u64,
        slots: usize,
        xq: u64,
        xd: u64,
        x_stride: usize,
        y: u64,
    ) -> Result<()> {
        let k = self.kernels(w.ty)?;
        let f = k
            .mv8
            .as_ref()
            .ok_or_else(|| CudaError::Invalid(format!("no int8 kernel for {}", w.ty)))?;
        if let Some((fl, ro)) = k.mvl.as_ref().filter(|_| use_lane()) {
            let cfg = LaunchConfig {
                grid_dim: (
                    (w.n_rows.div_ceil(*ro) as u32).div_ceil(WARPS_PER_BLOCK),
                    slots as u32,
                    1,
                ),
                block_dim: (32 * WARPS_PER_BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            let wp = self.weight_ptr(w);
            let expert_bytes = w.expert_stride as i64;
            let (n_rows, n_cols) = (w.n_rows as i32, w.n_cols as i32);
            let xs = x_stride as i64;
            self.launch_slots(
                fl,
                cfg,
                &mut [
                    wp,
                    expert_bytes.slot(),
                    ids,
                    n_rows.slot(),
                    n_cols.slot(),
                    xq,
                    xd,
                    xs.slot(),
                    y,
                ],
            )?;
            return Ok(());
        }
        // Q8_0 with 512-multiple rows: 16-byte loads, RW rows per warp: 4 when a row has
        // fewer than 4 steps of 512 (so 8 loads per lane stay in flight), or when the slots
        // hold 4,096 rows or more (out_a, out_b, the shared expert's down, the output head:
        // the column split then leaves each warp 2-4 steps, as q_b's; full model +1-2%
        // decode, bench/RESULTS.md, twenty-sixth session; `use_mv8w4`); else 2 (q_a and kv:
        // 1,024 / 512 rows, where 4 measured no faster).
        let (f, rw) = match &k.mv8w {
            Some((w2, w4)) if w.n_cols.is_multiple_of(512) && use_mv8w() => {
                let many_rows = w.n_rows * slots >= 4096 && use_mv8w4();
                if w.n_cols < 4 * 512 || many_rows {
                    (w4, 4)
                } else {
                    (w2, 2)
                }
            }
            _ => (f, 1),
        };
        let groups = w.n_rows.div_ceil(rw);
        let split = mv_split(groups, w.n_cols, slots);
        let cfg = LaunchConfig {
            grid_dim: (
                (groups as u32).div_ceil(WARPS_PER_BLOCK / split),
                slots as u32,
                1,
            ),
            block_dim: (32 * WARPS_PER_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let wp = self.weight_ptr(w);
        let expert_bytes = w.expert_stride as i64;
        let (n_rows, n_cols) = (w.n_rows as i32, w.n_cols as i32);
        let xs = x_stride as i64;
        let split_i = split as i32;
        self.launch_slots(
            f,
            cfg,
            &mut [
                wp,
                expert_bytes.slot(),
                ids,
                n_rows.slot(),
                n_cols.slot(),
                xq,
                xd,
                xs.slot(),
                y,
                split_i.slot(),
            ],
        )?;
        Ok(())
    }

    /// `mv8glu_<t>`: `h[s] = silu(min(Wg·x, c))·clamp(Wu·x, ±c)·wts[s]` for every slot `s`
    /// (matrices `ids[s]` of `wg`/`wu`, `ids == 0`: matrix `s`; `wts == 0`: weight 1), over
    /// activations quantized by [`CudaBackend::quant_act_raw`]. `wg` and `wu` must have the
    /// same type, shape and expert stride.
    ///
    /// # Safety
    /// As [`CudaBackend::mv8_raw`]; `h` holds `slots · n_rows` floats, `wts` `slots`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn mv8glu_raw(
        &self,
        wg: &GpuWeight,
        wu: &GpuWeight,
        ids: u64,
        slots: usize,
        xq: u64,
        xd: u64,
        wts: u64,
        clamp: f32,
        h: u64,
    ) -> Result<()> {
        if wg.ty != wu.ty
            || wg.n_rows != wu.n_rows
            || wg.n_cols != wu.n_cols
            || wg.expert_stride != wu.expert_stride
        {
            return Err(CudaError::Invalid(
                "gate/up weights differ in layout".into(),
            ));
        }
        let k = self.kernels(wg.ty)?;
        let f = k
            .mv8glu
            .as_ref()
            .ok_or_else(|| CudaError::Invalid(format!("no int8 kernel for {}", wg.ty)))?;
        if let Some((fl, ro, resident)) = k.mvlglu.as_ref().filter(|_| use_lane()) {
            // (slot, row block) units; a persistent grid of at most the resident blocks
            // (`DS4_CUDA_LANE_PERSIST=0`: a block a unit).
            let units = wg.n_rows.div_ceil(*ro).div_ceil(WARPS_PER_BLOCK as usize) * slots;
            let grid = if super::switch_on("DS4_CUDA_LANE_PERSIST") {
                units.min(*resident)
            } else {
                units
            };
            let cfg = LaunchConfig {
                grid_dim: (grid as u32, 1, 1),
                block_dim: (32 * WARPS_PER_BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            let n_slots = slots as i32;
            let (pg, pu) = (self.weight_ptr(wg), self.weight_ptr(wu));
            let expert_bytes = wg.expert_stride as i64;
            let (n_rows, n_cols) = (wg.n_rows as i32, wg.n_cols as i32);
            let xs = 0i64;
            self.launch_slots(
                fl,
                cfg,
                &mut [
                    pg,
                    pu,
                    expert_bytes.slot(),
                    ids,
                    n_rows.slot(),
                    n_cols.slot(),
                    xq,
                    xd,
                    xs.slot(),
                    wts,
                    clamp.slot(),
                    h,
                    n_slots.slot(),
                ],
            )?;
            return Ok(());
        }
        let split = mv_split(wg.n_rows, wg.n_cols, 2 * slots);
        let cfg = LaunchConfig {
            grid_dim: (
                (wg.n_rows as u32).div_ceil(WARPS_PER_BLOCK / split),
                slots as u32,
                1,
            ),
            block_dim: (32 * WARPS_PER_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let (pg, pu) = (self.weight_ptr(wg), self.weight_ptr(wu));
        let expert_bytes = wg.expert_stride as i64;
        let (n_rows, n_cols) = (wg.n_rows as i32, wg.n_cols as i32);
        let xs = 0i64;
        let split_i = split as i32;
        self.launch_slots(
            f,
            cfg,
            &mut [
                pg,
                pu,
                expert_bytes.slot(),
                ids,
                n_rows.slot(),
                n_cols.slot(),
                xq,
                xd,
                xs.slot(),
                wts,
                clamp.slot(),
                h,
                split_i.slot(),
            ],
        )?;
        Ok(())
    }

    /// `pf_dq_<t>`: dequantizes `nb` matrices of `w` to f16 (row-major, matrix `b` at
    /// `out + b·out_stride` elements): matrices `experts[e0 + b]` (device ints), or `e0 + b`
    /// when `experts == 0`. Same rounding as [`CudaBackend::dequantize_f16`].
    ///
    /// # Safety
    /// `out` must hold `nb · out_stride` halves (`out_stride ≥ n_rows·n_cols`); expert ids
    /// `< n_experts`.
    pub(crate) unsafe fn dq_f16_raw(
        &self,
        w: &GpuWeight,
        experts: u64,
        e0: usize,
        nb: usize,
        out: u64,
        out_stride: usize,
    ) -> Result<()> {
        if nb == 0 {
            return Ok(());
        }
        let k = self.kernels(w.ty)?;
        // pf_dq_q8_0 takes 8 elements a thread (one 16-byte store), the others one unit.
        let per_thread = if w.ty == GgmlType::Q8_0 {
            8
        } else {
            dq_elems(w.ty)
        };
        let units = (w.n_rows * w.n_cols / per_thread) as u32;
        let cfg = LaunchConfig {
            grid_dim: (units.div_ceil(256), nb as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let wp = self.weight_ptr(w);
        let eb = w.expert_stride as i64;
        let (e0, n_rows, n_cols) = (e0 as i32, w.n_rows as i32, w.n_cols as i32);
        let os = out_stride as i64;
        let mut b = self.st().launch_builder(&k.pfdq);
        b.arg(&wp)
            .arg(&eb)
            .arg(&experts)
            .arg(&e0)
            .arg(&n_rows)
            .arg(&n_cols)
            .arg(&out)
            .arg(&os);
        b.launch(cfg)?;
        Ok(())
    }

    /// Which kernel [`CudaBackend::pf_mm_raw`] takes for these matrices at the current level:
    /// IQ2_XXS / Q2_K weights with rows (and `wa.n_rows`) multiples of 256 take the
    /// fragment-decoding kernels: `pf_mxw_<t>` or `pf_mxs_<t>` where rows are a multiple of
    /// 16 bytes (staged copies), else `pf_mx_<t>`; everything else `pf_mm_<t>`.
    fn pf_mx_choice(&self, wa: &GpuWeight, wb: Option<&GpuWeight>) -> Result<PfChoice> {
        let k = self.kernels(wa.ty)?;
        let m_total = wa.n_rows + wb.map_or(0, |w| w.n_rows);
        let pa = self.weight_ptr(wa);
        let pb = wb.map_or(pa, |w| self.weight_ptr(w));
        let level = match self.pf_mx.load(Ordering::Relaxed) {
            PF_MX_FROM_ENV => pf_mx_level(),
            l => l,
        };
        // pf_mx: 256-row blocks over whole 256-column quant blocks; pf_mxs also copies rows
        // in 16-byte chunks (row stride and matrix starts multiples of 16 bytes).
        let row_bytes = wa.n_cols / 256 * wa.ty.block_bytes();
        let Some(mx) = k.pfmx.as_ref().filter(|_| {
            level >= 1
                && wa.n_rows.is_multiple_of(256)
                && m_total.is_multiple_of(256)
                && wa.n_cols.is_multiple_of(256)
        }) else {
            return Ok(PfChoice::Mm);
        };
        let staged = level >= 2
            && row_bytes.is_multiple_of(16)
            && wa.expert_stride.is_multiple_of(16)
            && pa.is_multiple_of(16)
            && pb.is_multiple_of(16);
        Ok(match (staged, &mx.mxw) {
            (true, Some(_)) if level >= 3 => PfChoice::Mxw,
            (true, _) => PfChoice::Mxs,
            (false, _) => PfChoice::Mx,
        })
    }

    /// Whether [`CudaBackend::pf_mm_raw`] takes `pf_mxw_<t>` for these matrices, which reads
    /// its activation rows permuted (`px_pos`: `pf_gather*` / `pf_swiglu*` with `pm = 1`).
    pub(crate) fn pf_mm_permuted(&self, wa: &GpuWeight, wb: Option<&GpuWeight>) -> bool {
        matches!(self.pf_mx_choice(wa, wb), Ok(PfChoice::Mxw))
    }

    /// `pf_mm_<t>`: the grouped expert product over the row tiles written by `pf_group`
    /// (`n_tiles` device int, `tiles` device triples, at most `max_tiles`): for each tile's
    /// expert `e` and sorted rows `r`, `out[r][m] = W_e[m] · xs[r]` (`x = (xs, 0, _)`), or
    /// `W_e[m] · xs[rows[r] / k]` (`x = (xs, rows, k)`: `pf_mxw_<t>` only), with rows
    /// `m < wa.n_rows` from `wa` and the rest from `wb` (`wb = wa` for one matrix). `xs` f16
    /// rows of `n_cols`, `out` f32 rows of `wa.n_rows + wb.n_rows` (or `wa.n_rows` alone). The kernel
    /// is [`CudaBackend::pf_mx_choice`]'s; `permuted` says `xs` holds its rows permuted by
    /// `px_pos`, which must be exactly when that is `pf_mxw_<t>`
    /// ([`CudaBackend::pf_mm_permuted`]).
    ///
    /// # Safety
    /// Buffers live and covering every tile's rows; expert ids `< n_experts`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn pf_mm_raw(
        &self,
        wa: &GpuWeight,
        wb: Option<&GpuWeight>,
        n_tiles: u64,
        tiles: u64,
        max_tiles: usize,
        (xs, xrows, xk): (u64, u64, i32),
        permuted: bool,
        out: u64,
    ) -> Result<()> {
        let m_total = wa.n_rows + wb.map_or(0, |w| w.n_rows);
        if let Some(w) = wb {
            if w.ty != wa.ty || w.n_cols != wa.n_cols || w.expert_stride != wa.expert_stride {
                return Err(CudaError::Invalid(
                    "pf_mm: matrices differ in layout".into(),
                ));
            }
        }
        if !Self::pf_mm_fits(wa, wb) {
            return Err(CudaError::Invalid("pf_mm: shape not supported".into()));
        }
        let choice = self.pf_mx_choice(wa, wb)?;
        if xrows != 0 && (choice != PfChoice::Mxw || xk < 1) {
            return Err(CudaError::Invalid(
                "pf_mm: rows read by index only on pf_mxw".into(),
            ));
        }
        if permuted != (choice == PfChoice::Mxw) {
            return Err(CudaError::Invalid(
                "pf_mm: activation column order does not match the kernel".into(),
            ));
        }
        if max_tiles == 0 {
            return Ok(());
        }
        let k = self.kernels(wa.ty)?;
        let pa = self.weight_ptr(wa);
        let pb = wb.map_or(pa, |w| self.weight_ptr(w));
        let mx = k.pfmx.as_ref();
        let (func, rows_per_block, smem) = match (choice, mx) {
            (
                PfChoice::Mxw,
                Some(PfMx {
                    mxw: Some(f), smem, ..
                }),
            ) => (f, 256, *smem),
            (PfChoice::Mxs, Some(m)) => (&m.mxs, 256, m.smem),
            (PfChoice::Mx, Some(m)) => (&m.mx, 256, 0),
            _ => (&k.pfmm, 128, 0),
        };
        let cfg = LaunchConfig {
            grid_dim: ((m_total / rows_per_block) as u32, max_tiles as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: smem,
        };
        let eb = wa.expert_stride as i64;
        let (ra, mt, kd) = (wa.n_rows as i32, m_total as i32, wa.n_cols as i32);
        let mut b = self.st().launch_builder(func);
        b.arg(&pa)
            .arg(&pb)
            .arg(&eb)
            .arg(&ra)
            .arg(&mt)
            .arg(&kd)
            .arg(&n_tiles)
            .arg(&tiles)
            .arg(&xs)
            .arg(&xrows)
            .arg(&xk)
            .arg(&out);
        b.launch(cfg)?;
        Ok(())
    }

    /// Whether [`CudaBackend::pf_mm_raw`] takes these shapes (rows multiples of its 128-row
    /// tile, columns of its 32-column step).
    pub(crate) fn pf_mm_fits(wa: &GpuWeight, wb: Option<&GpuWeight>) -> bool {
        wa.n_rows.is_multiple_of(128)
            && wb.is_none_or(|w| w.n_rows.is_multiple_of(128))
            && wa.n_cols.is_multiple_of(32)
    }

    /// `dq32_<t>`: matrix 0 of `w` to f32 at `out` (`n_rows·n_cols` floats), bit-exact with
    /// `quant::dequantize_row`.
    ///
    /// # Safety
    /// `out` must hold `n_rows·n_cols` floats.
    pub(crate) unsafe fn dq_f32_raw(&self, w: &GpuWeight, out: u64) -> Result<()> {
        let k = self.kernels(w.ty)?;
        let units = (w.n_rows * w.n_cols / dq_elems(w.ty)) as u32;
        let cfg = LaunchConfig {
            grid_dim: (units.div_ceil(256), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let wp = self.weight_ptr(w);
        let (n_rows, n_cols) = (w.n_rows as i32, w.n_cols as i32);
        let mut b = self.st().launch_builder(&k.dq32);
        b.arg(&wp).arg(&n_rows).arg(&n_cols).arg(&out);
        b.launch(cfg)?;
        Ok(())
    }

    /// f32 GEMM (cuBLAS, f32 operands, f32 compute, no TF32): `c[t][o] = Σ_i a[o][i]·x[t][i]`,
    /// `o < m`, `t < n`, `i < k`, row-major with strides `lda`, `ldx`, `ldc`.
    ///
    /// # Safety
    /// Every operand must be a live device buffer covering the addressed elements.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn gemm_f32_raw(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: u64,
        lda: usize,
        x: u64,
        ldx: usize,
        c: u64,
        ldc: usize,
    ) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        let (alpha, beta) = (1.0f32, 0.0f32);
        let f32t = cb::cudaDataType::CUDA_R_32F;
        cudarc::cublas::result::gemm_ex(
            self.blas_now(),
            cb::cublasOperation_t::CUBLAS_OP_T,
            cb::cublasOperation_t::CUBLAS_OP_N,
            m as i32,
            n as i32,
            k as i32,
            &alpha as *const f32 as *const _,
            a as *const _,
            f32t,
            lda as i32,
            x as *const _,
            f32t,
            ldx as i32,
            &beta as *const f32 as *const _,
            c as *mut _,
            f32t,
            ldc as i32,
            cb::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cb::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )?;
        Ok(())
    }

    /// `y = f16(x · scale)` for `n` elements (`scale` a power of two: exact before rounding).
    ///
    /// # Safety
    /// `x` (`n` floats) and `y` (`n` halves) must be live device buffers.
    pub(crate) unsafe fn to_f16_scaled_raw(
        &self,
        x: u64,
        y: u64,
        n: usize,
        scale: f32,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig {
            grid_dim: ((n as u32).div_ceil(256), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let nn = n as i64;
        let mut b = self.st().launch_builder(&self.f32_to_f16);
        b.arg(&x).arg(&y).arg(&nn).arg(&scale);
        b.launch(cfg)?;
        Ok(())
    }

    /// Tensor-core GEMM over f16 operands with f32 accumulation, in the row-major terms of the
    /// engine: for `b < batch`, `c_b[t][o] = alpha · Σ_i a_b[o][i] · x_b[t][i]`, `o < m` (weight
    /// rows, `a` row-major with row stride `lda`), `t < n` (tokens, `x` rows of stride `ldx`),
    /// `i < k`; `c` rows of stride `ldc`, f16 (rounded by cuBLAS) when `c16`, else f32. Matrix
    /// `b` of each operand starts `b·stride_*` elements after the first. `alpha` is cuBLAS's
    /// (a power of two undoes an input scaling exactly). (cuBLAS column-major: C = op_T(A) · X.)
    ///
    /// # Safety
    /// Every operand must be a live device buffer covering the addressed elements (`c` of
    /// halves when `c16`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn gemm_f16_scaled_raw(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: u64,
        lda: usize,
        x: u64,
        ldx: usize,
        c: u64,
        ldc: usize,
        batch: usize,
        strides: [usize; 3],
        alpha: f32,
        c16: bool,
    ) -> Result<()> {
        if m == 0 || n == 0 || batch == 0 {
            return Ok(());
        }
        let beta = 0.0f32;
        let (mi, ni, ki) = (m as i32, n as i32, k as i32);
        let (la, lx, lc) = (lda as i32, ldx as i32, ldc as i32);
        let h = self.blas_now();
        let (t, nn) = (
            cb::cublasOperation_t::CUBLAS_OP_T,
            cb::cublasOperation_t::CUBLAS_OP_N,
        );
        let (f16t, f32t) = (cb::cudaDataType::CUDA_R_16F, cb::cudaDataType::CUDA_R_32F);
        let ct = cb::cublasComputeType_t::CUBLAS_COMPUTE_32F;
        let algo = cb::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT;
        let outt = if c16 { f16t } else { f32t };
        let al = &alpha as *const f32 as *const _;
        let be = &beta as *const f32 as *const _;
        if batch == 1 {
            cudarc::cublas::result::gemm_ex(
                h,
                t,
                nn,
                mi,
                ni,
                ki,
                al,
                a as *const _,
                f16t,
                la,
                x as *const _,
                f16t,
                lx,
                be,
                c as *mut _,
                outt,
                lc,
                ct,
                algo,
            )?;
        } else {
            cudarc::cublas::result::gemm_strided_batched_ex(
                h,
                t,
                nn,
                mi,
                ni,
                ki,
                al,
                a as *const _,
                f16t,
                la,
                strides[0] as i64,
                x as *const _,
                f16t,
                lx,
                strides[1] as i64,
                be,
                c as *mut _,
                outt,
                lc,
                strides[2] as i64,
                batch as i32,
                ct,
                algo,
            )?;
        }
        Ok(())
    }

    /// `mm_<t>` of matrix 0 over `n_tok` contiguous token rows.
    ///
    /// # Safety
    /// `xs` (`n_tok × n_cols`) and `ys` (`n_tok × n_rows`) must be live device buffers.
    pub(crate) unsafe fn mm_raw(
        &self,
        w: &GpuWeight,
        xs: u64,
        n_tok: usize,
        ys: u64,
    ) -> Result<()> {
        if n_tok == 0 {
            return Ok(());
        }
        let k = self.kernels(w.ty)?;
        let cfg = LaunchConfig {
            grid_dim: (
                (w.n_rows as u32).div_ceil(WARPS_PER_BLOCK),
                (n_tok as u32).div_ceil(MM_TOKENS),
                1,
            ),
            block_dim: (32 * WARPS_PER_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let wp = self.weight_ptr(w);
        let (n_rows, n_cols, nt) = (w.n_rows as i32, w.n_cols as i32, n_tok as i32);
        let mut b = self.st().launch_builder(&k.mm);
        b.arg(&wp)
            .arg(&n_rows)
            .arg(&n_cols)
            .arg(&xs)
            .arg(&nt)
            .arg(&ys);
        b.launch(cfg)?;
        Ok(())
    }

    // ---------------------------------------------------------------- timing

    /// Whether phase marks are being recorded (`DS4_CUDA_PHASES=1`).
    pub fn marking(&self) -> bool {
        self.marks.is_some()
    }

    /// Records a timing event on the main stream at point `tag` of layer `il` (when
    /// [`CudaBackend::marking`]; never inside a graph capture).
    pub fn mark(&self, il: usize, tag: &'static str) -> Result<()> {
        if let Some(m) = &self.marks {
            let e = self.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            e.record(&self.stream)?;
            m.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((il, tag, e));
        }
        Ok(())
    }

    /// The marks recorded since the last call, as (layer, tag, µs since the previous mark);
    /// the stream must be synchronized.
    pub fn take_marks(&self) -> Result<Vec<(usize, &'static str, f64)>> {
        let Some(m) = &self.marks else {
            return Ok(Vec::new());
        };
        let marks = std::mem::take(&mut *m.lock().unwrap_or_else(|e| e.into_inner()));
        let mut out = Vec::with_capacity(marks.len());
        for w in marks.windows(2) {
            let us = 1000.0 * w[0].2.elapsed_ms(&w[1].2)? as f64;
            out.push((w[1].0, w[1].1, us));
        }
        Ok(out)
    }

    /// Milliseconds of GPU time taken by the work `f` queues (events around it; waits).
    pub fn time_ms(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        let a = self.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        let b = self.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        a.record(&self.stream)?;
        f()?;
        b.record(&self.stream)?;
        b.synchronize()?;
        Ok(a.elapsed_ms(&b)? as f64)
    }
}

fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got < want {
        return Err(CudaError::Invalid(format!(
            "{what} has {got} elements, needs {want}"
        )));
    }
    Ok(())
}

/// Splits GGML Q8_0 rows (34-byte blocks `[f16 d][i8 q; 32]`) into the GPU layout: the codes
/// (`n_cols` bytes per row) into `qs` and the scales (f16, `n_cols/32` per row) into `ds`.
pub fn repack_q8_0(src: &[u8], n_cols: usize, qs: &mut [u8], ds: &mut [u8]) {
    let nb = n_cols / 32;
    for (bi, b) in src.chunks_exact(34).enumerate() {
        let (row, blk) = (bi / nb, bi % nb);
        ds[2 * bi..2 * bi + 2].copy_from_slice(&b[0..2]);
        let o = row * n_cols + 32 * blk;
        qs[o..o + 32].copy_from_slice(&b[2..34]);
    }
}

/// IQ2_XXS rows in the device layout (quant.cu `iq2_codes`): each row keeps its size, its
/// 66-byte blocks (f16 scale, 64 code bytes) regrouped by 8: a group of m ≤ 8 blocks holds
/// their m code parts, then their m scales. With 2048-column rows every code part is
/// 16-byte aligned, which the 66-byte blocks of the file are not (decode reads them with
/// one aligned load per lane instead of two straddling ones and a funnel shift).
pub fn repack_iq2_xxs(src: &[u8], n_cols: usize, dst: &mut [u8]) {
    let nb = n_cols / 256;
    for (srow, drow) in src.chunks_exact(66 * nb).zip(dst.chunks_exact_mut(66 * nb)) {
        for g in (0..nb).step_by(8) {
            let m = (nb - g).min(8);
            let out = &mut drow[66 * g..66 * (g + m)];
            for j in 0..m {
                let b = &srow[66 * (g + j)..66 * (g + j + 1)];
                out[64 * j..64 * j + 64].copy_from_slice(&b[2..66]);
                out[64 * m + 2 * j..64 * m + 2 * j + 2].copy_from_slice(&b[0..2]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iq2_xxs_repack_groups_codes_then_scales_by_eight() {
        // Rows of 9 blocks (a full group of 8, then a group of 1), 2 rows; block i of the
        // whole tensor has scale bytes (i, 0xa0) and code bytes i + k.
        let (nb, rows) = (9usize, 2usize);
        let mut src = Vec::new();
        for i in 0..(nb * rows) as u8 {
            src.extend_from_slice(&[i, 0xa0]);
            src.extend((0..64u8).map(|k| i.wrapping_add(k)));
        }
        let mut dst = vec![0u8; src.len()];
        repack_iq2_xxs(&src, 256 * nb, &mut dst);
        for r in 0..rows {
            let row = &dst[66 * nb * r..66 * nb * (r + 1)];
            for b in 0..nb {
                let i = (nb * r + b) as u8;
                let (g, j) = (b / 8 * 8, b % 8);
                let m = (nb - g).min(8);
                let codes = &row[66 * g + 64 * j..66 * g + 64 * j + 64];
                assert!(codes
                    .iter()
                    .enumerate()
                    .all(|(k, &c)| c == i.wrapping_add(k as u8)));
                assert_eq!(row[66 * g + 64 * m + 2 * j..][..2], [i, 0xa0]);
            }
        }
    }

    #[test]
    fn q8_0_repack_splits_codes_and_scales() {
        // 2 rows × 64 columns = 4 blocks; block i has d bytes (i, 0x3c) and codes i*32+k.
        let mut src = Vec::new();
        for i in 0..4u8 {
            src.extend_from_slice(&[i, 0x3c]);
            src.extend((0..32u8).map(|k| i.wrapping_mul(32).wrapping_add(k)));
        }
        let mut qs = vec![0u8; 128];
        let mut ds = vec![0u8; 8];
        repack_q8_0(&src, 64, &mut qs, &mut ds);
        assert_eq!(ds, [0, 0x3c, 1, 0x3c, 2, 0x3c, 3, 0x3c]);
        for (i, &q) in qs.iter().enumerate() {
            assert_eq!(q, i as u8);
        }
    }
}
