//! Launches of the attention-side kernels (kernels/attn.cu): tiled sink-aware attention
//! (scores, softmax, weighted sum + inverse RoPE), the lightning indexer's scores and exact
//! top-k, and the KV compressor parallel over windows. Shared by the GPU session and the
//! self-test (`check.rs`), which runs them on random data against CPU references.
//!
//! Every pointer argument is a raw device address (`u64`); the caller guarantees the buffers
//! are live and sized as each function states.

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaFunction, CudaStream, LaunchConfig, PushKernelArg};

use super::device::{launch_ex, CudaBackend, CudaError, Result, Slot};

/// Tile edge of the attention kernels (heads × rows, heads × dims).
const AT_T: usize = 32;
/// Row tile of the indexer scores kernel.
const IX_T: usize = 64;

macro_rules! launch {
    ($st:expr, $f:expr, $grid:expr, $block:expr, [$($a:expr),* $(,)?]) => {
        launch!($st, $f, $grid, $block, 0u32, [$($a),*])
    };
    ($st:expr, $f:expr, $grid:expr, $block:expr, $smem:expr, [$($a:expr),* $(,)?]) => {{
        let cfg = LaunchConfig {
            grid_dim: $grid,
            block_dim: $block,
            shared_mem_bytes: $smem,
        };
        let mut b = $st.launch_builder(&$f);
        $( let v = $a; b.arg(&v); )*
        // SAFETY: the argument list matches the kernel's signature in attn.cu / forward.cu;
        // the caller of the enclosing unsafe function vouches for the buffers.
        unsafe { b.launch(cfg) }?;
    }};
}

/// The kernels of kernels/attn.cu (and the top-k of forward.cu).
pub struct AttnKernels {
    scores: CudaFunction,
    softmax: CudaFunction,
    out: CudaFunction,
    combine: CudaFunction,
    idx_scores: CudaFunction,
    idx_scores_tc: CudaFunction,
    idx_scores_tc32: CudaFunction,
    l2_rows: CudaFunction,
    /// `k_idx_scores_wg`: the same scores on wgmma, each row's terms summed in another order
    /// (sm_90a images only).
    idx_scores_wg: Option<CudaFunction>,
    to_bf16: CudaFunction,
    topk: CudaFunction,
    topk_mb: CudaFunction,
    /// `k_topk1_<KPT>` for KPT = 1, 2, 4, 8, 16 keys a thread.
    topk1: [CudaFunction; 5],
    /// `k_topk_w_<KPL>` for KPL = 32, 64 keys a lane (a warp a token).
    topk_w: [CudaFunction; 2],
    /// Multiprocessors of the device (the most blocks `k_topk_mb` may use: they must all be
    /// resident together).
    sms: usize,
    comp_pool: CudaFunction,
    /// `k_comp_pool` loading 32 candidates at once (windows of a multiple of 32: ratio 128).
    comp_pool32: CudaFunction,
    comp_state: CudaFunction,
    tc: CudaFunction,
    /// `k_att_rows16`: the f16 copies of the rows `k_att_tc` reads.
    rows16: CudaFunction,
    /// `k_att_fd` (8 heads a block), `k_att_fd4` (4).
    fd: [CudaFunction; 2],
    /// `k_att_fd_combine` (8 partials loaded ahead), `k_att_fd_combine32` (all of them).
    fd_combine: [CudaFunction; 2],
    /// `k_att_fdtc16`, `k_att_fdtc32`: the split-rows kernel on tensor cores (tiles of 16 /
    /// 32 rows).
    fdtc: [CudaFunction; 2],
}

/// A kernel allowed `bytes` of dynamic shared memory (the widest shapes it takes).
fn smem_fn(be: &CudaBackend, name: &str, bytes: usize) -> Result<CudaFunction> {
    let f = be.function(name)?;
    f.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        bytes as i32,
    )?;
    Ok(f)
}

impl AttnKernels {
    /// Whether the module has `k_idx_scores_wg` (sm_90a).
    pub fn has_idx_wg(&self) -> bool {
        self.idx_scores_wg.is_some()
    }

    /// Looks the kernels up in the backend's module.
    pub fn load(be: &CudaBackend) -> Result<AttnKernels> {
        let f = |n: &str| be.function(n);
        Ok(AttnKernels {
            scores: f("k_att_scores")?,
            softmax: f("k_att_softmax")?,
            out: f("k_att_out")?,
            combine: f("k_att_combine")?,
            idx_scores: f("k_idx_scores")?,
            l2_rows: be.function("k_l2_rows")?,
            idx_scores_tc: {
                let f = be.function("k_idx_scores_tc")?;
                f.set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    ixc_smem(IXC_ROWS) as i32,
                )?;
                f
            },
            idx_scores_tc32: {
                let f = be.function("k_idx_scores_tc32")?;
                f.set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    ixc_smem(IXC_ROWS32) as i32,
                )?;
                f
            },
            idx_scores_wg: if be.info().arch() == "sm_90a" {
                Some(smem_fn(be, "k_idx_scores_wg", IXW_SMEM)?)
            } else {
                None
            },
            to_bf16: f("k_f32_to_bf16")?,
            topk: f("k_topk_rows")?,
            topk_mb: f("k_topk_mb")?,
            topk1: [
                f("k_topk1_1")?,
                f("k_topk1_2")?,
                f("k_topk1_4")?,
                f("k_topk1_8")?,
                f("k_topk1_16")?,
            ],
            topk_w: [f("k_topk_w_32")?, f("k_topk_w_64")?],
            sms: be.info().sm_count as usize,
            comp_pool: f("k_comp_pool")?,
            comp_pool32: f("k_comp_pool32")?,
            comp_state: f("k_comp_state")?,
            tc: smem_fn(be, "k_att_tc", tc_smem(TC_MAX_DH, TC_MAX_HALF))?,
            rows16: f("k_att_rows16")?,
            fd: [
                smem_fn(be, "k_att_fd", fd_smem(FD_MAX_DH, 8))?,
                smem_fn(be, "k_att_fd4", fd_smem(FD_MAX_DH, 4))?,
            ],
            fd_combine: [f("k_att_fd_combine")?, f("k_att_fd_combine32")?],
            fdtc: [
                smem_fn(be, "k_att_fdtc16", fdtc_smem(FD_MAX_DH, 16))?,
                smem_fn(be, "k_att_fdtc32", fdtc_smem(FD_MAX_DH, 32))?,
            ],
        })
    }
}

/// Rows a tensor-core attention block stages at a time (attn.cu `TC_BR`).
const TC_BR: usize = 32;
/// Row stride (f32) of the score partials (attn.cu `TC_SP`).
const TC_SP: usize = 40;
/// Largest head width and RoPE tail (pairs) the tensor-core attention kernel takes.
const TC_MAX_DH: usize = 512;
const TC_MAX_HALF: usize = 64;
/// Most heads a tensor-core attention block holds (4 warps' 16-row MMA tiles).
const TC_MAX_HEADS: usize = 64;

/// Ratio-4 selections a tensor-core attention block copies into shared memory (attn.cu
/// `TC_SEL`; longer ones are read from global memory).
const TC_SEL: usize = 1024;

/// Dynamic shared memory of `k_att_tc` (attn.cu's layout): f16 queries (64 heads, `dh + 8`
/// wide); two tile buffers of f16 rows (`TC_BR` × (`dh + 8`)); the f32 score partials 4 × 64 ×
/// `TC_SP`; f16 weights 64 × 40; two tables of `TC_BR` row pointers; the selection; m, l and
/// the rescale factors (64 each); cos and −sin of the tail pairs.
pub fn tc_smem(dh: usize, half: usize) -> usize {
    TC_MAX_HEADS * (dh + 8) * 2
        + 2 * TC_BR * (dh + 8) * 2
        + 4 * TC_MAX_HEADS * TC_SP * 4
        + TC_MAX_HEADS * 40 * 2
        + 2 * TC_BR * 8
        + TC_SEL * 4
        + 3 * TC_MAX_HEADS * 4
        + 2 * half * 4
}

/// Whether the tensor-core attention kernel takes these shapes (else the f32 passes run).
pub fn tc_supported(n_head: usize, dh: usize, half: usize) -> bool {
    n_head <= TC_MAX_HEADS
        && dh.is_multiple_of(64)
        && dh <= TC_MAX_DH
        && half <= TC_MAX_HALF
        && 2 * half <= dh
}

/// Whether the tensor-core kernel can normalize and rotate the queries itself (`Attend::cs_tab`):
/// head widths of 128-column multiples (attn.cu `tc_qnorm`).
pub fn tc_qnorm_supported(dh: usize) -> bool {
    dh.is_multiple_of(128) && dh <= TC_MAX_DH
}

/// Whether production prefill attention (chunks of more than 8 tokens) runs on tensor cores
/// (`DS4_CUDA_ATT_TC=0` keeps the f32 tiled passes, for comparisons).
pub fn use_tc() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| super::switch_on("DS4_CUDA_ATT_TC"))
}

/// How many blocks ahead the tensor-core attention asks L2 for a later block's queries
/// (`k_att_tc`'s `q_ahead`): half the multiprocessor count by default (one block an SM, so
/// that block starts about half a block's time later; H200 ncu, f16 queries: 66 and 132
/// ahead the same within 1%, 264 +5%, none +4%), `n` with `DS4_CUDA_ATT_QPF=n` (0: off).
fn q_prefetch_ahead(sms: usize) -> i32 {
    match std::env::var("DS4_CUDA_ATT_QPF")
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    {
        Some(n) => n.max(0),
        None => (sms / 2) as i32,
    }
}

/// Rows of a tile and most row blocks of the split-rows decode attention (attn.cu `FD_R`,
/// `FD_MAXB`; the heads a block takes come from `fd_heads`).
const FD_R: usize = 16;
const FD_MAXB: usize = 32;
/// Widest head the split-rows decode kernel takes (128 threads of 4 output dims).
const FD_MAX_DH: usize = 512;

/// Dynamic shared memory of `k_att_fd` / `k_att_fd4` (`h` = 8 / 4 heads a block): `h`
/// queries and `FD_R` rows of `dh`, the tile's scores (`h × (FD_R + 1)`), weights
/// (`FD_R × h`) and rescale factors (`h`).
pub fn fd_smem(dh: usize, h: usize) -> usize {
    ((h + FD_R) * dh + h * (FD_R + 1) + FD_R * h + h) * 4
}

/// Dynamic shared memory of `k_att_fdtc<rt>` (attn.cu's layout): `rt` f16 rows (`dh + 8`
/// wide), the 8 warps' f32 score partials (16 heads × (`rt` + 4)), the f16 weights (16 ×
/// (`rt` + 8)), 16 rescale factors and `rt` row addresses.
pub fn fdtc_smem(dh: usize, rt: usize) -> usize {
    rt * (dh + 8) * 2 + 8 * 16 * (rt + 4) * 4 + 16 * (rt + 8) * 2 + 16 * 4 + rt * 8
}

/// Whether production decode steps run the split-rows attention on tensor cores
/// (`k_att_fdtc*`, f16 queries and weights as production prefill's `k_att_tc`;
/// `DS4_CUDA_FD_TC=0` keeps the f32 `k_att_fd` kernels). Read at each capture.
pub fn use_fd_tc() -> bool {
    super::switch_on("DS4_CUDA_FD_TC")
}

/// Heads a `k_att_fd` block takes: 4 (`k_att_fd4`, twice the blocks, half the chain a
/// block) unless `DS4_CUDA_FD4=0` (8, `k_att_fd`).
fn fd_heads() -> usize {
    if super::switch_on("DS4_CUDA_FD4") {
        4
    } else {
        8
    }
}

/// Whether the split-rows decode kernel takes this head width.
pub fn fd_supported(dh: usize) -> bool {
    dh.is_multiple_of(128) && dh <= FD_MAX_DH
}

/// Tiles of `FD_R` rows a `k_att_fd` block walks so that at most `FD_MAXB` blocks cover
/// `rows_cap` rows, and the number of row blocks.
pub fn fd_blocks(rows_cap: usize) -> (usize, usize) {
    let tiles = rows_cap.div_ceil(FD_R).max(1);
    let tpb = tiles.div_ceil(FD_MAXB);
    (tpb, tiles.div_ceil(tpb))
}

/// Whether production decode steps (one token) run the split-rows flash-decoding kernel
/// (`DS4_CUDA_ATT_FD=0` keeps the four tiled passes, for comparisons).
pub fn use_fd() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| super::switch_on("DS4_CUDA_ATT_FD"))
}

/// Attention of `n` tokens at positions `*p0..` (model.md §3.3 steps 5–6).
pub struct Attend {
    pub n: usize,
    /// Rotated queries, `n × n_head × dh` (with `cs_tab`: the q_b product, not yet
    /// normalized or rotated).
    pub q: u64,
    /// Not 0 (with [`Attend::uses_tc`] and [`tc_qnorm_supported`]): the chunk's RoPE table
    /// (`k_rope_cs`, `n × half` pairs); the tensor-core kernel then normalizes (eps `qeps`)
    /// and rotates the heads of `q` itself, as `k_head_norm_rope` would, and leaves `q` as
    /// it is.
    pub cs_tab: u64,
    pub qeps: f32,
    /// With `cs_tab`: `q` holds f16 values (the q_b GEMM's f16 output), not f32.
    pub q16: bool,
    /// This chunk's KV rows, `n × dh`.
    pub ckv: u64,
    /// Raw window ring, `swa × dh` (position p in row p mod swa).
    pub ring: u64,
    /// Compressed rows (`dh` wide), 0 when `ratio == 0`.
    pub comp: u64,
    /// Ratio 4: selected compressed rows per token (`sel_ld` apart) and their counts.
    pub sel: u64,
    pub cnt: u64,
    pub sel_ld: usize,
    pub ratio: usize,
    /// Device i64: position of the chunk's first token.
    pub p0: u64,
    pub swa: usize,
    pub dh: usize,
    pub n_head: usize,
    pub sinks: u64,
    pub scale: f32,
    /// RoPE pairs of the tail and the layer's f64 frequencies.
    pub half: usize,
    pub freqs: u64,
    /// Output, `n × n_head × dh`.
    pub o: u64,
    /// With [`Attend::uses_tc`]: scratch for the f16 copies of the rows the tensor-core
    /// kernel reads, (`swa` + `n` + `comp_rows`) × `dh` halves.
    pub rows16: u64,
    /// Compressed rows copied there (at least every row a token of the launch can see; at
    /// most what `comp` holds); 0 when `ratio == 0`.
    pub comp_rows: usize,
    /// Not 0 (with [`Attend::uses_tc`]): the tensor-core kernel writes the output as f16
    /// here (`n × n_head × dh` halves, f32_to_f16's rounding) instead of f32 to `o`.
    pub o16: u64,
    /// Scratch: `nsplit × n × n_head × rows_cap` scores, `n × n_head` inverse denominators
    /// and (`nsplit > 1`) `nsplit × n × n_head × dh` partial outputs.
    pub sc: u64,
    pub inv: u64,
    pub part: u64,
    /// Split of the dims (scores) and of the rows (output) over more blocks: 1 for chunks,
    /// [`DECODE_SPLIT`] for a few tokens.
    pub nsplit: usize,
    /// Most rows any token of the launch attends to (`swa` + most compressed rows).
    pub rows_cap: usize,
    /// Production chunk: one tensor-core block per token (`k_att_tc`, [`tc_supported`]
    /// shapes; `sc`, `inv`, `part` and `nsplit` unused), f16 queries and weights.
    pub tc: bool,
    /// Split-rows flash decoding (`k_att_fd` + `k_att_fd_combine`, [`fd_supported`] head
    /// widths; `tc` false): `part` then holds `nb × n × n_head × dh` partial outputs and `sc`
    /// `nb × n × n_head × 2` (m, l), `nb` = [`fd_blocks`]`(rows_cap).1` ≤ 32; `inv` and
    /// `nsplit` unused.
    pub fd: bool,
    /// With `fd_tc`: the combine launched with programmatic stream serialization (decode
    /// graph capture only): it reads the position, the count and the angles while the row
    /// blocks run, and waits for them before their partials.
    pub fd_pdl: bool,
    /// With `fd`: the row blocks on tensor cores (`k_att_fdtc*`: 16 heads a block, f16
    /// queries, rows and weights) instead of `k_att_fd`'s f32 products.
    pub fd_tc: bool,
    /// With `fd` (and `dh` a multiple of 32): the output's Q8_0 codes (`n × n_head × dh`
    /// bytes) and scales (one a 32) for the output product, 0 = none.
    pub q0: u64,
    pub d0: u64,
}

impl Attend {
    /// Whether [`attend`] runs the tensor-core kernel (so `o16`, when set, gets the output).
    pub fn uses_tc(&self) -> bool {
        self.tc && self.rows16 != 0 && tc_supported(self.n_head, self.dh, self.half)
    }

    /// Whether [`attend`] writes the output's Q8_0 codes into `q0`/`d0`.
    pub fn writes_q8(&self) -> bool {
        self.q0 != 0
            && self.fd
            && !self.uses_tc()
            && fd_supported(self.dh)
            && self.dh.is_multiple_of(32)
    }
}

/// The split a launch of `n` tokens uses (a decode step has too few tiles to fill the GPU):
/// [`DECODE_SPLIT`] up to 8 tokens (`DS4_CUDA_ATT_SPLIT=1..4` overrides it, for
/// measurements), 1 for chunks.
pub fn split_for(n: usize) -> usize {
    static OVERRIDE: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let o = OVERRIDE.get_or_init(|| {
        std::env::var("DS4_CUDA_ATT_SPLIT")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|v| (1..=DECODE_SPLIT).contains(v))
    });
    if n <= 8 {
        o.unwrap_or(DECODE_SPLIT)
    } else {
        1
    }
}

/// Split of a decode step's attention passes.
pub const DECODE_SPLIT: usize = 4;

/// Queues the attention passes (scores, softmax, weighted sum, and the combine of the splits
/// when `nsplit > 1`).
///
/// # Safety
/// Every pointer of `a` must be a live device buffer of the size its field states.
pub unsafe fn attend(st: &CudaStream, k: &AttnKernels, a: &Attend) -> Result<()> {
    if a.uses_tc() {
        // The rows as f16 (k_att_tc's own rounding of them, done once per launch instead of
        // once per reading token): ring, then this chunk's rows, then the compressed rows.
        let (n0, n1) = (a.swa as i64, a.n as i64);
        let n2 = if a.ratio == 0 { 0 } else { a.comp_rows as i64 };
        let elems = (n0 + n1 + n2) as usize * a.dh;
        let blocks = elems.div_ceil(4 * 256).clamp(1, 4096) as u32;
        launch!(
            st,
            k.rows16,
            (blocks, 1, 1),
            (256, 1, 1),
            0,
            [a.ring, a.ckv, a.comp, n0, n1, n2, a.dh as i32, a.rows16]
        );
        let h = |rows: i64| a.rows16 + 2 * (rows as u64) * a.dh as u64;
        launch!(
            st,
            k.tc,
            (a.n as u32, 1, 1),
            (512, 1, 1),
            tc_smem(a.dh, a.half) as u32,
            [
                a.q,
                h(n0),
                a.rows16,
                h(n0 + n1),
                a.sel,
                a.cnt,
                a.sel_ld as i32,
                a.ratio as i32,
                a.p0,
                a.swa as i32,
                a.dh as i32,
                a.n_head as i32,
                a.sinks,
                a.scale,
                a.half as i32,
                a.freqs,
                a.o,
                a.o16,
                a.cs_tab,
                a.qeps,
                i32::from(a.q16),
                if a.cs_tab != 0 {
                    q_prefetch_ahead(k.sms)
                } else {
                    0
                }
            ]
        );
        return Ok(());
    }
    if a.fd && fd_supported(a.dh) {
        let (tpb, nb) = fd_blocks(a.rows_cap);
        let tc = a.fd_tc;
        let fh = if tc { 16 } else { fd_heads() };
        // Tensor cores: one 16-row tile a block where blocks take one, else tiles of 32.
        let rt = if tpb == 1 { 16 } else { 32 };
        let (f, threads, smem) = if tc {
            (&k.fdtc[usize::from(rt == 32)], 256, fdtc_smem(a.dh, rt))
        } else {
            (&k.fd[usize::from(fh == 4)], 128, fd_smem(a.dh, fh))
        };
        let rows_pdl = tc && a.fd_pdl && super::switch_on("DS4_CUDA_ROWS_PDL");
        let cfg = LaunchConfig {
            grid_dim: (nb as u32, a.n_head.div_ceil(fh) as u32, a.n as u32),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let mut args = [
            a.q,
            a.ckv,
            a.ring,
            a.comp,
            a.sel,
            a.cnt,
            (a.sel_ld as i32).slot(),
            (a.ratio as i32).slot(),
            a.p0,
            (a.swa as i32).slot(),
            (a.dh as i32).slot(),
            (a.n_head as i32).slot(),
            a.sinks,
            a.scale.slot(),
            (tpb as i32).slot(),
            a.part,
            a.sc,
            i32::from(rows_pdl).slot(),
        ];
        // A plain launch reads the selection, its count and the compressed rows before the
        // kernel's first wait (which then returns at once). With PDL (`DS4_CUDA_ROWS_PDL`,
        // tensor cores in decode graphs) the kernel waits first and reads everything after
        // (bench/RESULTS.md, twenty-eighth to thirtieth sessions).
        launch_ex(st, f, cfg, rows_pdl, &mut args)?;
        // More than 8 row blocks: the form that loads every partial at once.
        let comb = &k.fd_combine[usize::from(nb > 8)];
        let cfg = LaunchConfig {
            grid_dim: ((a.n * a.n_head) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut args = [
            a.part,
            a.sc,
            a.cnt,
            (a.ratio as i32).slot(),
            a.p0,
            (a.swa as i32).slot(),
            (a.n_head as i32).slot(),
            (a.dh as i32).slot(),
            (tpb as i32).slot(),
            (nb as i32).slot(),
            a.sinks,
            (a.half as i32).slot(),
            a.freqs,
            a.o,
            if a.writes_q8() { a.q0 } else { 0 },
            a.d0,
            // Trigger the output product at the start (`DS4_CUDA_COMB_EARLY=0`: at the end).
            i32::from(tc && a.fd_pdl && super::switch_on("DS4_CUDA_COMB_EARLY")).slot(),
        ];
        // (k_att_fdtc triggers its dependents at its start, or after its wait when launched
        // with PDL; k_att_fd never does, so after it the attribute would change nothing.)
        launch_ex(st, comb, cfg, tc && a.fd_pdl, &mut args)?;
        return Ok(());
    }
    let ht = a.n_head.div_ceil(AT_T) as u32;
    let (ns, ld) = (a.nsplit.max(1), a.rows_cap as i32);
    let nz = (a.n * ns) as u32;
    let (ratio, swa, dh, nh) = (a.ratio as i32, a.swa as i32, a.dh as i32, a.n_head as i32);
    launch!(
        st,
        k.scores,
        (a.rows_cap.div_ceil(AT_T) as u32, ht, nz),
        (256, 1, 1),
        [
            a.q,
            a.ckv,
            a.ring,
            a.comp,
            a.sel,
            a.cnt,
            a.sel_ld as i32,
            ratio,
            a.p0,
            swa,
            dh,
            nh,
            a.sc,
            ld,
            ns as i32
        ]
    );
    launch!(
        st,
        k.softmax,
        ((a.n * a.n_head) as u32, 1, 1),
        (128, 1, 1),
        [a.sc, a.inv, a.cnt, ratio, a.p0, swa, nh, a.n as i32, a.sinks, ld, a.scale, ns as i32]
    );
    launch!(
        st,
        k.out,
        ((a.dh / AT_T) as u32, ht, nz),
        (256, 1, 1),
        [
            a.sc,
            a.inv,
            a.ckv,
            a.ring,
            a.comp,
            a.sel,
            a.cnt,
            a.sel_ld as i32,
            ratio,
            a.p0,
            swa,
            dh,
            nh,
            a.half as i32,
            a.freqs,
            a.o,
            ld,
            ns as i32,
            a.part
        ]
    );
    if ns > 1 {
        launch!(
            st,
            k.combine,
            ((a.n * a.n_head) as u32, 1, 1),
            (256, 1, 1),
            [
                a.part,
                a.inv,
                a.n as i32,
                nh,
                dh,
                ns as i32,
                a.half as i32,
                a.freqs,
                a.p0,
                a.o
            ]
        );
    }
    Ok(())
}

/// Indexer scores of `n` tokens over the rows visible to each (`(p+1) / ratio`), at most
/// `vis_max` for any token: `scores[t·ld + row]`, with head weights `w · wscale`.
///
/// # Safety
/// `q`: `n × n_head × id`; `w`: `n × n_head`; `krows`: `vis_max × id`; `scores`: `n × ld`
/// with `ld ≥ vis_max`; `p0` a device i64.
#[allow(clippy::too_many_arguments)]
pub unsafe fn idx_scores(
    st: &CudaStream,
    k: &AttnKernels,
    n: usize,
    q: u64,
    (w, wscale): (u64, f32),
    krows: u64,
    n_head: usize,
    id: usize,
    p0: u64,
    ratio: usize,
    vis_max: usize,
    scores: u64,
    ld: usize,
) -> Result<()> {
    launch!(
        st,
        k.idx_scores,
        (vis_max.div_ceil(IX_T).max(1) as u32, n as u32, 1),
        (256, 1, 1),
        [
            q,
            w,
            wscale,
            krows,
            n_head as i32,
            id as i32,
            p0,
            ratio as i32,
            scores,
            ld as i32
        ]
    );
    Ok(())
}

/// Rows of a `k_idx_scores_tc` block, and of a `k_idx_scores_tc32` one (attn.cu), and the
/// tokens of either (`IXC_TOK`).
const IXC_ROWS: usize = 128;
const IXC_ROWS32: usize = 32;
const IXC_TOK: usize = 8;
/// Their dynamic shared memory (attn.cu `IXC_SMEM`) for `rows` a block: bf16 K tile and two
/// query tiles (64 heads), 136 wide; two sets of 64 weights; the f32 terms, 64 heads × rows + 4.
const fn ixc_smem(rows: usize) -> usize {
    (rows + 2 * 64) * 136 * 2 + 2 * 64 * 4 + 64 * (rows + 4) * 4
}

/// Whether production steps (prefill chunks and decode) score the indexer on tensor cores
/// (`DS4_CUDA_IDX_TC=0`: the f32 `k_idx_scores`, for comparisons).
pub fn use_idx_tc() -> bool {
    super::switch_on("DS4_CUDA_IDX_TC")
}

/// Query heads a warp of `k_idx_q_finish_w<E>` finishes in prefill chunks (forward.cu
/// `IQF_HPW`; its `hpw` argument is this or 1, each a compiled form): its grid is (tokens,
/// ⌈heads / (8 · hpw)⌉) blocks of 256 threads.
pub const IQF_HPW: usize = 4;

/// Rows of a `k_idx_scores_wg` block (attn.cu `IXW_ROWS`: two warpgroups of 128).
const IXW_ROWS: usize = 256;
/// Its dynamic shared memory (attn.cu `IXW_SMEM`): four query tiles (64 × 128 bf16: two tokens
/// and the next two) and their head weights.
const IXW_SMEM: usize = 4 * 16384 + 4 * 64 * 4;
/// A `k_idx_scores_wg` block's cost of converting its rows, in tokens' time (an estimate).
const IXW_LOAD_TOKENS: usize = 2;

/// Tokens a `k_idx_scores_wg` block takes. A block converts its 256 rows to MMA fragments
/// once and then runs its tokens one after another, one block an SM; blocks none of whose
/// tokens sees any of their rows return at once (row r is visible from position 4r + 3). So
/// a launch takes about (waves of active blocks) × (tokens a block + the row conversion):
/// few tokens a block convert the rows many times and leave each block's first query load
/// exposed, many leave SMs idle in the last wave. `p0` is the chunk's first position (an
/// estimate is enough).
fn ixw_tokens_per_block(n: usize, p0: usize, vis_max: usize, sms: usize) -> usize {
    let bx = vis_max.div_ceil(IXW_ROWS).max(1);
    let mut best = (usize::MAX, 8);
    for tpb in (8..=256).step_by(8) {
        let groups = n.div_ceil(tpb);
        let active: usize = (0..bx)
            .map(|rb| {
                let first = (4 * rb * IXW_ROWS + 3).saturating_sub(p0);
                if first >= n {
                    0
                } else {
                    groups - first / tpb
                }
            })
            .sum();
        let cost = active.div_ceil(sms.max(1)).max(1) * (tpb.min(n) + IXW_LOAD_TOKENS);
        if cost < best.0 {
            best = (cost, tpb);
        }
    }
    best.1
}

/// Fewest tokens a step needs for `k_idx_scores_wg` to take it (decode steps keep
/// `k_idx_scores_tc`).
const IXW_MIN_TOKENS: usize = 16;

/// Whether `k_idx_scores_tc` converts the indexer rows complete before the step's first
/// position (written by earlier launches) before its PDL wait, while the indexer's query chain
/// still runs (`DS4_CUDA_IXC_PRE=0`: every row after it; the same values).
pub fn use_ixc_pre() -> bool {
    super::switch_on("DS4_CUDA_IXC_PRE")
}

/// Whether `k_idx_scores_tc` issues all of a thread's K-tile loads before converting any
/// (`DS4_CUDA_IXC_UNR=0`: the loop, four loads in flight; the same values).
pub fn use_ixc_unr() -> bool {
    super::switch_on("DS4_CUDA_IXC_UNR")
}

/// Whether a decode step whose launch may see `vis_max` indexer rows asks L2 for them at the
/// start of a ratio-4 layer's attention site ([`l2_rows`]): up to `DS4_CUDA_IDX_L2PF_MAX` rows
/// (default 6,144: 3 MB; `DS4_CUDA_IDX_L2PF=0`: never).
pub fn use_idx_l2pf(vis_max: usize) -> bool {
    super::switch_on("DS4_CUDA_IDX_L2PF") && vis_max <= rows_max("DS4_CUDA_IDX_L2PF_MAX")
}

/// Asks L2 (evict-last) for the rows complete before the step, `rows[0 .. p0 / ratio)` of
/// `row_bytes` each, on a grid sized for `max_rows` (a plain launch: a hint, no value changes).
///
/// # Safety
/// `rows` holds at least `p0 / ratio` rows; `p0` a device i64.
pub unsafe fn l2_rows(
    st: &CudaStream,
    k: &AttnKernels,
    rows: u64,
    p0: u64,
    ratio: usize,
    row_bytes: usize,
    max_rows: usize,
) -> Result<()> {
    let lines = (max_rows * row_bytes).div_ceil(128);
    let blocks = lines.div_ceil(256).clamp(1, 2 * k.sms.max(1));
    launch!(
        st,
        k.l2_rows,
        (blocks as u32, 1, 1),
        (256, 1, 1),
        [
            rows,
            p0,
            ratio as i32,
            row_bytes as i32,
            // `DS4_CUDA_IDX_L2PF=2`: the normal priority (a comparison).
            i32::from(std::env::var("DS4_CUDA_IDX_L2PF").as_deref() != Ok("2"))
        ]
    );
    Ok(())
}

/// Whether a decode step whose launch may see `vis_max` indexer rows takes its tensor-core
/// scores on 32 rows a block (`k_idx_scores_tc32`; the same scores): up to
/// `DS4_CUDA_IXC32_MAX` rows (default 6,144: up to a ~24k context, the graphs' position
/// buckets included; measured faster to 16k and neutral at 32k / 64k, bench/RESULTS.md,
/// thirty-second session; `DS4_CUDA_IXC32=0`: never).
pub fn use_ixc32(vis_max: usize) -> bool {
    super::switch_on("DS4_CUDA_IXC32") && vis_max <= rows_max("DS4_CUDA_IXC32_MAX")
}

/// The row limit `name` sets (default 6,144).
fn rows_max(name: &str) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6144)
}

/// Whether [`idx_scores_tc`] may take the wgmma form on Hopper (`DS4_CUDA_IDX_WG=0`: always
/// `k_idx_scores_tc`, for comparisons; the same terms summed in another order).
pub fn use_idx_wg() -> bool {
    super::switch_on("DS4_CUDA_IDX_WG")
}

/// `q16[i] = bf16(q[i])` for `len` elements (a multiple of 4).
///
/// # Safety
/// `q`: `len` f32; `q16`: `len` halves.
pub unsafe fn to_bf16(
    st: &CudaStream,
    k: &AttnKernels,
    q: u64,
    q16: u64,
    len: usize,
) -> Result<()> {
    let len = len as i64;
    launch!(
        st,
        k.to_bf16,
        ((len as u64 / 4).div_ceil(256) as u32, 1, 1),
        (256, 1, 1),
        [q, q16, len]
    );
    Ok(())
}

/// [`idx_scores`] on tensor cores, for 64 heads of 128 dims whose queries and rows are
/// fp4sim values (QAT on): `q16` holds the queries as bf16 (`k_idx_q_finish`'s copy, or
/// [`to_bf16`]); `k_idx_scores_tc` (exact products, head-order sums; see attn.cu), or with
/// `wg` on a Hopper build and at least `IXW_MIN_TOKENS` tokens `k_idx_scores_wg` (the same
/// terms summed in another order), with `tpb` tokens a block (None: `ixw_tokens_per_block`;
/// the scores do not depend on it). Otherwise `k_idx_scores_tc32` (32 rows a block, the same
/// scores) where `rows32` says so, or where it is None for a decode step ([`use_ixc32`]).
///
/// # Safety
/// As [`idx_scores`] with `n_head = 64`, `id = 128`, `ratio = 4`; `q16` holds `n × 8192`
/// halves.
#[allow(clippy::too_many_arguments)]
pub unsafe fn idx_scores_tc(
    be: &CudaBackend,
    k: &AttnKernels,
    n: usize,
    q16: u64,
    (w, wscale): (u64, f32),
    krows: u64,
    p0: u64,
    vis_max: usize,
    scores: u64,
    ld: usize,
    wg: bool,
    tpb: Option<usize>,
    rows32: Option<bool>,
) -> Result<()> {
    let wgf = k
        .idx_scores_wg
        .as_ref()
        .filter(|_| wg && n >= IXW_MIN_TOKENS);
    let (f, rows, tpb, smem) = match wgf {
        Some(f) => {
            let p0_host = (4 * vis_max).saturating_sub(n);
            let tpb = tpb.unwrap_or_else(|| ixw_tokens_per_block(n, p0_host, vis_max, k.sms));
            (f, IXW_ROWS, tpb, IXW_SMEM)
        }
        // A decode step (one token): 32 rows a block (`rows32` overrides the choice).
        None if rows32.unwrap_or(n == 1 && use_ixc32(vis_max)) => (
            &k.idx_scores_tc32,
            IXC_ROWS32,
            IXC_TOK,
            ixc_smem(IXC_ROWS32),
        ),
        None => (&k.idx_scores_tc, IXC_ROWS, IXC_TOK, ixc_smem(IXC_ROWS)),
    };
    let cfg = LaunchConfig {
        grid_dim: (
            vis_max.div_ceil(rows).max(1) as u32,
            n.div_ceil(tpb) as u32,
            1,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // Both kernels start with pdl_enter: inside a decode graph they may launch while the
    // kernel before finishes. k_idx_scores_wg also takes its tokens a block.
    let mut a = vec![q16, w, wscale.slot(), krows, p0, (n as i32).slot()];
    if wgf.is_some() {
        a.push((tpb as i32).slot());
    }
    a.extend([scores, (ld as i32).slot()]);
    if wgf.is_none() {
        a.push((i32::from(use_ixc_pre()) | i32::from(use_ixc_unr()) << 1).slot());
    }
    be.launch_slots(f, cfg, &mut a)
}

/// `u32` words of the multi-block top-k's work buffer (forward.cu `k_topk_mb`: four 256-bin
/// histograms, two counts per block, a grid barrier); zero before its first use.
pub const TOPK_MB_WORDS: usize = 1024 + 2 * TOPK_MB_MAXG + 2;
/// Most blocks of a `k_topk_mb` launch (forward.cu `TOPK_MB_MAXG`).
const TOPK_MB_MAXG: usize = 64;
/// Visible rows a block of `k_topk_mb` takes at most before the grid grows.
const TOPK_MB_ROWS_PER_BLOCK: usize = 1024;

/// Fewest visible rows (the most of any position the launch serves) for which one decode
/// token's top-k runs on `k_topk_mb`: the one-block kernel costs ~1.4 µs per 1,000 rows on the
/// decode critical path (bench/RESULTS.md, sixth session). `DS4_CUDA_TOPK_MB=N` sets it (0:
/// never).
pub fn topk_mb_min_rows() -> usize {
    std::env::var("DS4_CUDA_TOPK_MB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(6144, |n| if n == 0 { usize::MAX } else { n })
}

/// Most visible rows of a decode token whose top-k runs on `k_topk1` (1,024 threads of up to
/// 16 keys).
const TOPK1_MAX_ROWS: usize = 16 * 1024;

/// Whether one decode token's top-k runs on `k_topk1` (keys in registers, per-warp
/// histograms) when its rows fit (`DS4_CUDA_TOPK1=0`: `k_topk_rows` / `k_topk_mb` as before).
fn use_topk1() -> bool {
    super::switch_on("DS4_CUDA_TOPK1")
}

/// Most visible rows of a prefill chunk's token whose top-k runs on `k_topk_w` (a warp of
/// up to 64 keys a lane).
const TOPK_W_MAX_ROWS: usize = 64 * 32;

/// Whether prefill chunks whose tokens see at most [`TOPK_W_MAX_ROWS`] rows take their top-k
/// on `k_topk_w` (a warp a token; `DS4_CUDA_TOPK_W=0`: a block a token, `k_topk1`).
fn use_topk_w() -> bool {
    super::switch_on("DS4_CUDA_TOPK_W")
}

/// Whether prefill chunks' top-k runs on `k_topk1` too (`DS4_CUDA_TOPK1_CHUNK=0`: on
/// `k_topk_rows`, for comparisons).
fn use_topk1_chunk() -> bool {
    super::switch_on("DS4_CUDA_TOPK1_CHUNK")
}

/// Per token, the `topk` best visible rows by score (all of them when at most `topk` are
/// visible), ascending, into `sel[t·topk..]`, and their count into `cnt[t]`. Prefill chunks
/// whose tokens see at most `TOPK_W_MAX_ROWS` rows run on `k_topk_w` (a warp a token); else
/// tokens whose launch may see at most 16,384 rows run on `k_topk1` (a block each, its keys in registers;
/// chunks when `ld` is a multiple of 4); one decode token that may see more, and
/// `vis_max >= topk_mb_min_rows()`, on `k_topk_mb`, spread over up to one block per SM
/// (`work`, [`TOPK_MB_WORDS`] words, then not 0); else one block a token (`k_topk_rows`).
///
/// # Safety
/// `scores`: `n × ld` (read only where more than `topk` rows are visible); `sel`:
/// `n × topk` i32; `cnt`: `n` i32; `p0` a device i64; `work` 0 or a buffer of
/// [`TOPK_MB_WORDS`] u32 that only `k_topk_mb` launches on this stream touch.
#[allow(clippy::too_many_arguments)]
pub unsafe fn topk(
    be: &CudaBackend,
    k: &AttnKernels,
    n: usize,
    scores: u64,
    ld: usize,
    p0: u64,
    ratio: usize,
    topk: usize,
    sel: u64,
    cnt: u64,
    vis_max: usize,
    work: u64,
) -> Result<()> {
    // k_topk_w and k_topk1 take (scores, ld, p0, ratio, topk[, n_tok], sel, cnt).
    let rows = |f: &CudaFunction, blocks: usize, threads: u32, n_tok: Option<usize>| {
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut a = vec![
            scores,
            (ld as i32).slot(),
            p0,
            (ratio as i32).slot(),
            (topk as i32).slot(),
        ];
        a.extend(n_tok.map(|n| (n as i32).slot()));
        a.extend([sel, cnt]);
        // SAFETY: the caller's buffers, as this function documents; both kernels start with
        // pdl_enter (PDL inside a decode graph).
        unsafe { be.launch_slots(f, cfg, &mut a) }
    };
    // Prefill chunks of short rows: a warp a token (8 a block).
    if n > 1 && vis_max <= TOPK_W_MAX_ROWS && use_topk_w() {
        let kpl = if vis_max <= 1024 { 0 } else { 1 };
        return rows(&k.topk_w[kpl], n.div_ceil(8), 256, Some(n));
    }
    // Prefill chunks too (one block a token) when their rows are 16-byte aligned.
    if (n == 1 || (ld.is_multiple_of(4) && use_topk1_chunk()))
        && vis_max <= TOPK1_MAX_ROWS
        && use_topk1()
    {
        // Keys a thread: a power of two with 1,024 of them covering every visible row.
        let kpt = vis_max.div_ceil(1024).max(1).next_power_of_two();
        return rows(&k.topk1[kpt.trailing_zeros() as usize], n, 1024, None);
    }
    let st = be.st();
    if n == 1 && work != 0 && vis_max >= topk_mb_min_rows() {
        let g = vis_max
            .div_ceil(TOPK_MB_ROWS_PER_BLOCK)
            .clamp(1, TOPK_MB_MAXG.min(k.sms));
        launch!(
            st,
            k.topk_mb,
            (g as u32, 1, 1),
            (512, 1, 1),
            [scores, p0, ratio as i32, topk as i32, sel, cnt, work]
        );
        return Ok(());
    }
    launch!(
        st,
        k.topk,
        (n as u32, 1, 1),
        (1024, 1, 1),
        [scores, ld as i32, p0, ratio as i32, topk as i32, sel, cnt]
    );
    Ok(())
}

/// One compressor fed `n` tokens at positions `*p0..` (cache.rs `Compressor::push` per token,
/// then the row finishing of attention.rs `compress`).
pub struct Compress {
    pub n: usize,
    /// Projections of the chunk, `n × coff·d` (values and gate scores without the bias).
    pub kvp: u64,
    pub scp: u64,
    /// Position bias, `r × coff·d`.
    pub ape: u64,
    /// Frontier, `coff·r × coff·d` values and scores.
    pub skv: u64,
    pub ssc: u64,
    /// Rows (`d` wide), room for `(p0 + n) / r`.
    pub rows: u64,
    pub norm: u64,
    pub freqs: u64,
    pub p0: u64,
    pub ratio: usize,
    pub d: usize,
    pub coff: usize,
    pub half: usize,
    pub eps: f32,
    /// Row finishing: 0 = KV (FP8 QAT), 1 = indexer (Hadamard + FP4).
    pub kind: i32,
    pub qat: bool,
    pub exact: bool,
}

/// Most candidates a pooled window has (`coff · ratio`, the kernel's table).
pub const MAX_COMP_CAND: usize = 256;
/// Candidates `k_comp_pool` loads at once (attn.cu `COMP_B`): `coff · ratio` must be a multiple.
const COMP_BATCH: usize = 8;

/// Queues the windows' pooling (one block per window closing in the chunk) and the frontier
/// update. `coff · ratio` must be a multiple of 8 up to [`MAX_COMP_CAND`] (else an error), and
/// `d` at most 1024.
///
/// # Safety
/// Every pointer of `c` must be a live device buffer of the size its field states.
pub unsafe fn compress(be: &CudaBackend, k: &AttnKernels, c: &Compress) -> Result<()> {
    if !(c.coff * c.ratio).is_multiple_of(COMP_BATCH) || c.coff * c.ratio > MAX_COMP_CAND {
        return Err(CudaError::Invalid(format!(
            "compressor of ratio {} × {}: candidates not a multiple of {COMP_BATCH} up to {MAX_COMP_CAND}",
            c.ratio, c.coff
        )));
    }
    let inv_sqrt = (1.0 / (c.d as f64).sqrt()) as f32;
    let (n, r, d, coff) = (c.n as i32, c.ratio as i32, c.d as i32, c.coff as i32);
    let threads = c.d.next_multiple_of(32).min(1024) as u32;
    let cfg = |grid: u32, threads: u32| LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    // Both kernels start with pdl_enter: inside a decode graph (be.pdl()) their launches
    // may begin while the previous kernel of the stream finishes.
    let mut pool = vec![c.kvp, c.scp, c.ape, c.skv, c.ssc, c.rows, c.norm, c.freqs];
    pool.extend([
        n.slot(),
        c.p0,
        r.slot(),
        d.slot(),
        coff.slot(),
        (c.half as i32).slot(),
    ]);
    pool.extend([c.eps.slot(), c.kind.slot(), (c.qat as i32).slot()]);
    pool.extend([(c.exact as i32).slot(), inv_sqrt.slot()]);
    let pool_grid = (c.n / c.ratio + 1) as u32;
    // Long windows load 32 candidates at a time (a thread's chain of loads is their time).
    let pool_fn = if (c.coff * c.ratio).is_multiple_of(32) {
        &k.comp_pool32
    } else {
        &k.comp_pool
    };
    be.launch_slots(pool_fn, cfg(pool_grid, threads), &mut pool)?;
    let mut args = vec![c.kvp, c.scp, c.ape, c.skv, c.ssc, n.slot(), c.p0, r.slot()];
    args.extend([d.slot(), coff.slot()]);
    be.launch_slots(&k.comp_state, cfg(c.ratio as u32, 256), &mut args)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks of `k_idx_scores_wg` that some token sees (the cost model's count, recomputed
    /// block by block).
    fn active_blocks(n: usize, p0: usize, vis_max: usize, tpb: usize) -> usize {
        let bx = vis_max.div_ceil(IXW_ROWS).max(1);
        (0..n.div_ceil(tpb))
            .flat_map(|g| (0..bx).map(move |rb| (g, rb)))
            .filter(|&(g, rb)| {
                let last = (g * tpb + tpb).min(n) - 1;
                // Row rb·256 is visible to position p0 + last from 4·row + 3.
                p0 + last >= 4 * rb * IXW_ROWS + 3
            })
            .count()
    }

    #[test]
    fn idx_scores_wg_blocks_fill_the_machine_without_a_partial_wave() {
        let sms = 132;
        // A 2048-token chunk to 4k context: four row tiles, the last seen by half the tokens.
        let tpb = ixw_tokens_per_block(2048, 2048, 1024, sms);
        assert!(tpb > 8 && tpb.is_multiple_of(8), "{tpb}");
        let act = active_blocks(2048, 2048, 1024, tpb);
        assert!(
            act <= sms && act > sms * 3 / 4,
            "{tpb} tokens a block: {act} blocks"
        );
        // Long contexts: more row tiles than SMs, so the most tokens a block (each block
        // converts its rows once).
        assert_eq!(ixw_tokens_per_block(2048, 63488, 16384, sms), 256);
        // Small steps keep 8 tokens a block (more blocks than tokens' worth of waves).
        assert_eq!(ixw_tokens_per_block(20, 1020, 260, sms), 8);
        // Every choice is a multiple of 8 in [8, 256].
        for (n, p0) in [(16usize, 0usize), (300, 5000), (2048, 0), (4096, 30000)] {
            let t = ixw_tokens_per_block(n, p0, (p0 + n) / 4, sms);
            assert!(
                (8..=256).contains(&t) && t.is_multiple_of(8),
                "{n} {p0}: {t}"
            );
        }
    }
}
