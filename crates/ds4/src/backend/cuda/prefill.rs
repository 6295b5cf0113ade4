//! Production-mode prefill products on tensor cores (kernels/prefill.cu + cuBLAS).
//!
//! * Dense products ([`dense_gemm`]): the weight is dequantized to an f16 scratch (or read
//!   from its f16 copy made at load, or as it is when F16) (same
//!   rounding as `dq_<t>`), the activations are rounded to f16, and cuBLAS multiplies with
//!   f32 accumulation.
//! * Routed experts ([`moe_grouped`]): the chunk's (token, slot) pairs are sorted by expert
//!   on the GPU (`pf_group`, a stable counting sort: a pure function of the router's ids,
//!   which also lists row tiles of up to 64 rows per expert), the sorted rows' inputs are
//!   gathered as f16 (the wgmma gate|up instead reads each row's token from hc_pre's f16
//!   copy of y in its column order: no gather), and one launch of `pf_mm_<t>` per product
//!   multiplies every used expert's gate|up (one 2F-row product) and then down with all of
//!   its rows: each block decodes a 128-row × 32-column slice of the quantized weight into
//!   shared memory as f16 and runs `mma.sync` m16n8k16 (f32 accumulation), so the quantized
//!   bytes are read once per 64-row tile and no f16 weight copy exists; no host read, no
//!   per-expert launches.
//!   For IQ2_XXS and Q2_K (the Flash experts) `pf_mxs_<t>` / `pf_mx_<t>` take over (chosen
//!   in `CudaBackend::pf_mm_raw`): 256-row blocks whose warps decode their 32 rows straight
//!   into the MMA's A fragments (k permuted inside each 32-column step so that a thread's
//!   fragment elements are 8 consecutive weights), with the quantized bytes staged in shared
//!   memory by cp.async (`pf_mxs`); same f16 values and f32 accumulation, ~2x faster.
//!   On Hopper the products run on wgmma (`pf_mxw_<t>`), and the Q2_K down product on int8
//!   wgmma (`pf_mxq_q2_k`, `DS4_CUDA_PF_Q8`): its input rows are quantized to Q8_K as the
//!   CPU quantizes an expert linear's input (`pf_swiglu_q8`), the integer sums are exact
//!   and only the min term's two operands are rounded to f16 (prefill.cu). The IQ2_XXS
//!   gate|up of the experts with more than 64 rows runs on `pf_mxw4_iq2_xxs` (512 threads,
//!   tiles of up to 128 rows, so their weights are decoded once per 128 tokens; the same
//!   bits as `pf_mxw`), the other experts' on `pf_mxw` (`pf_group`'s second and third tile
//!   lists; `DS4_CUDA_PF_W4`), the two launches side by side on two streams.
//!   The clamped SwiGLU × routing weight uses k_swiglu's expressions (result rounded to
//!   f16); the rows go back to slot order for the ordinary `k_moe_sum`. A second path
//!   (`DS4_CUDA_PF_MM=0`, or shapes `pf_mm` does not take) dequantizes batches of experts
//!   to f16 and runs one cuBLAS GEMM per expert after one host read of the counts.
//! * The router's product stays f32 ([`dense_sgemm`]: exact decode + cuBLAS SGEMM).
//!
//! Numerics: weights and activations are rounded to f16 (relative 2^-11 each) and products
//! accumulate in f32, except `pf_mxq_q2_k`'s Q8_K activations (the CPU's own quantization of
//! that product); no atomics, so repeated runs are bit-identical. Exact mode never comes
//! here.

use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};

use super::device::{CudaBackend, GpuWeight, Result};
use crate::quant::GgmlType;

/// Experts dequantized per batch (bounds the f16 expert scratch: `PF_EXPERT_BATCH · 3·F·D`
/// halves, 384 MiB for the flash shapes).
pub const PF_EXPERT_BATCH: usize = 8;

/// The kernels of prefill.cu used by the grouped MoE.
pub struct PfKernels {
    group: CudaFunction,
    group_par: CudaFunction,
    gather: CudaFunction,
    gather16: CudaFunction,
    swiglu: CudaFunction,
    swiglu4: CudaFunction,
    swiglu_q8: CudaFunction,
    scatter: CudaFunction,
    /// `pf_mxq_q2_k` (sm_90a builds only): the Q2_K down product on int8 tensor cores.
    mxq: Option<CudaFunction>,
    /// Whether the Q2_K down product takes `pf_mxq_q2_k` where it can: `None` reads
    /// `DS4_CUDA_PF_Q8` (on unless `0`) at each launch; the self-test sets it.
    pub q8: Option<bool>,
    /// `pf_mxw4_iq2_xxs` (sm_90a builds only): the IQ2_XXS gate|up product over tiles of up
    /// to 128 tokens.
    mxw4: Option<CudaFunction>,
    /// Whether the IQ2_XXS gate|up product takes `pf_mxw4_iq2_xxs` for the experts of more
    /// than 64 rows where `pf_mxw` would run: `None` reads `DS4_CUDA_PF_W4` (on unless `0`) at
    /// each launch; the self-test sets it.
    pub w4: Option<bool>,
    split3: CudaFunction,
}

impl PfKernels {
    /// Whether this build has `pf_mxq_q2_k` (sm_90a).
    pub fn has_mxq(&self) -> bool {
        self.mxq.is_some()
    }

    /// Whether this build has `pf_mxw4_iq2_xxs` (sm_90a).
    pub fn has_mxw4(&self) -> bool {
        self.mxw4.is_some()
    }

    /// Loads the kernels from the backend's module.
    pub fn load(be: &CudaBackend) -> Result<PfKernels> {
        Ok(PfKernels {
            group: be.function("pf_group")?,
            group_par: be.function("pf_group_par")?,
            gather: be.function("pf_gather")?,
            gather16: be.function("pf_gather16")?,
            swiglu: be.function("pf_swiglu")?,
            swiglu4: be.function("pf_swiglu4")?,
            swiglu_q8: be.function("pf_swiglu_q8")?,
            scatter: be.function("pf_scatter")?,
            // wgmma exists only in the sm_90a image (elsewhere the kernels are empty).
            mxq: wgmma_kernel(be, "pf_mxq_q2_k", PXQ_SMEM)?,
            q8: None,
            mxw4: wgmma_kernel(be, "pf_mxw4_iq2_xxs", PXW4_SMEM)?,
            w4: None,
            split3: be.function("f32_split3_f16")?,
        })
    }
}

/// A wgmma kernel of prefill.cu with `smem` bytes of dynamic shared memory, on sm_90a (`None`
/// elsewhere, where its body is empty).
fn wgmma_kernel(be: &CudaBackend, name: &str, smem: u32) -> Result<Option<CudaFunction>> {
    if be.info().arch() != "sm_90a" {
        return Ok(None);
    }
    let f = be.function(name)?;
    f.set_attribute(
        cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        smem as i32,
    )?;
    Ok(Some(f))
}

fn ptr<T>(s: &CudaSlice<T>, be: &CudaBackend) -> u64 {
    let (p, _g) = s.device_ptr(be.stream());
    p
}

fn cfg(grid: (u32, u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Dynamic shared memory of `pf_mxq_q2_k` (PXQ_SMEM in prefill.cu): two stages each of 128
/// Q2_K rows' blocks, of a block's 8 steps of int8 tokens, and of its min-term operands and
/// scales.
const PXQ_SMEM: u32 = 2 * 128 * 112 + 2 * 8 * 2048 + 2 * 2048 + 2 * 64 * 4;

/// Dynamic shared memory of `pf_mxw4_iq2_xxs`: two stages of 256 IQ2_XXS rows' 80-byte slots.
const PXW4_SMEM: u32 = 2 * 256 * 80;

/// Rows of one `pf_mm` tile (PF_BN in prefill.cu).
const PF_BN: usize = 64;

/// Rows of a tile of the second list (`pf_mxw4`'s; PF_BN2 in prefill.cu).
const PF_BN2: usize = 128;

/// Most tiles of the second list: the experts of more than `PF_BN` rows (at most
/// `slots / (PF_BN + 1)`) cut at `PF_BN2`.
fn max_tiles2(slots: usize) -> usize {
    slots / PF_BN2 + slots / (PF_BN + 1)
}

/// Most experts the parallel grouping `pf_group_par` takes (PFG_MAXE in prefill.cu); more
/// go through the one-block serial `pf_group` (same results).
const PFG_MAXE: usize = 256;

/// Most row tiles `slots` pairs over `n_exp` experts can need (`Σ_e ⌈c_e/PF_BN⌉`).
fn max_tiles(slots: usize, n_exp: usize) -> usize {
    slots / PF_BN + n_exp.min(slots)
}

/// What `pf_group` writes: `meta` (counts per expert, the used experts in increasing id then
/// -1, the numbers of `tiles`, `tiles2` and `tiles1`), `perm` (sorted row → slot), `inv` (slot
/// → sorted row), and the row tiles (expert, first sorted row, rows): every expert cut at 64
/// rows, the experts of more than 64 rows cut at 128, and the others' single tiles.
#[derive(Debug, Clone, PartialEq)]
pub struct Grouping {
    pub meta: Vec<i32>,
    pub perm: Vec<i32>,
    pub inv: Vec<i32>,
    pub tiles: Vec<i32>,
    pub tiles2: Vec<i32>,
    pub tiles1: Vec<i32>,
}

/// Scratch of the grouped MoE for up to `slots` (token, expert) pairs.
pub struct MoeScratch {
    slots: usize,
    n_exp: usize,
    d: usize,
    f: usize,
    /// gate|up of a batch of experts (`2F × D` each, f16).
    e16: CudaSlice<u16>,
    /// down of a batch of experts (`D × F` each, f16).
    d16: CudaSlice<u16>,
    /// Sorted rows' inputs (`slots × D`, f16).
    xs: CudaSlice<u16>,
    /// gate|up outputs of the sorted rows (`slots × 2F`, f32).
    gu: CudaSlice<f32>,
    /// SwiGLU outputs (`slots × F`, f16).
    h: CudaSlice<u16>,
    /// down outputs of the sorted rows (`slots × D`, f32).
    dns: CudaSlice<f32>,
    /// Counts per expert, the used experts, the number of row tiles.
    meta: CudaSlice<i32>,
    /// Row tiles of `pf_mm` (expert, first sorted row, rows).
    tiles: CudaSlice<i32>,
    /// The experts of more than `PF_BN` rows cut at `PF_BN2` (`pf_mxw4`).
    tiles2: CudaSlice<i32>,
    /// The one tile of each expert of 1..=`PF_BN` rows (`pf_mxw` beside `pf_mxw4`).
    tiles1: CudaSlice<i32>,
    perm: CudaSlice<i32>,
    inv: CudaSlice<i32>,
}

impl MoeScratch {
    /// Scratch for `slots` pairs over `n_exp` experts of `F × D` (gate, up) and `D × F`;
    /// `per_expert`: also the f16 expert copies of the per-expert cuBLAS path (384 MiB for
    /// the flash shapes; the fused `pf_mm` path needs none).
    pub fn new(
        be: &CudaBackend,
        slots: usize,
        n_exp: usize,
        d: usize,
        f: usize,
        per_expert: bool,
    ) -> Result<Self> {
        let st = be.stream();
        let b = if per_expert { PF_EXPERT_BATCH } else { 0 };
        Ok(MoeScratch {
            slots,
            n_exp,
            d,
            f,
            e16: st.alloc_zeros::<u16>((b * 2 * f * d).max(1))?,
            d16: st.alloc_zeros::<u16>((b * d * f).max(1))?,
            xs: st.alloc_zeros::<u16>(slots * d)?,
            gu: st.alloc_zeros::<f32>(slots * 2 * f)?,
            h: st.alloc_zeros::<u16>(slots * f)?,
            dns: st.alloc_zeros::<f32>(slots * d)?,
            meta: st.alloc_zeros::<i32>(2 * n_exp + 3)?,
            tiles: st.alloc_zeros::<i32>(3 * max_tiles(slots, n_exp))?,
            tiles2: st.alloc_zeros::<i32>(3 * max_tiles2(slots).max(1))?,
            tiles1: st.alloc_zeros::<i32>(3 * n_exp.min(slots).max(1))?,
            perm: st.alloc_zeros::<i32>(slots)?,
            inv: st.alloc_zeros::<i32>(slots)?,
        })
    }

    /// Device bytes held.
    pub fn bytes(&self) -> usize {
        (self.e16.len() + self.d16.len() + self.xs.len() + self.h.len()) * 2
            + (self.gu.len() + self.dns.len()) * 4
            + (self.meta.len() + self.tiles.len() + self.tiles2.len() + self.tiles1.len()) * 4
            + (self.perm.len() + self.inv.len()) * 4
    }

    /// The grouped product's down outputs in sorted row order (`slots × D` f32) and `inv`
    /// (slot → sorted row), for a consumer that reads them in place of the slot-order copy
    /// (`moe_grouped` with `dn = 0`; kernel `k_hc_post_moe_pf`).
    pub fn sorted_out(&self, be: &CudaBackend) -> (u64, u64) {
        (ptr(&self.dns, be), ptr(&self.inv, be))
    }

    /// The last run's gate|up outputs (`slots × 2F`) and down outputs (`slots × D`), sorted
    /// rows, for the self-test.
    pub fn products(&self, be: &CudaBackend) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok((be.download(&self.gu)?, be.download(&self.dns)?))
    }

    /// The last grouping, for the self-test (the tile lists whole, past their counts too).
    pub fn grouping(&self, be: &CudaBackend) -> Result<Grouping> {
        Ok(Grouping {
            meta: be.download(&self.meta)?,
            perm: be.download(&self.perm)?,
            inv: be.download(&self.inv)?,
            tiles: be.download(&self.tiles)?,
            tiles2: be.download(&self.tiles2)?,
            tiles1: be.download(&self.tiles1)?,
        })
    }
}

/// Whether the fused `pf_mm` path takes these expert weights (gate and up alike, rows
/// multiples of 128, columns of 32).
pub fn fused_fits(gate: &GpuWeight, up: &GpuWeight, down: &GpuWeight) -> bool {
    gate.ty == up.ty
        && gate.expert_stride == up.expert_stride
        && CudaBackend::pf_mm_fits(gate, Some(up))
        && CudaBackend::pf_mm_fits(down, None)
}

/// `pf_group` / `pf_group_par`: sorts the `slots` pairs of `ids` by expert into the
/// scratch's meta, perm, inv and tiles (a stable counting sort, see prefill.cu).
///
/// # Safety
/// `ids` must hold `slots ≤ sc.slots` ints `< n_exp ≤ sc.n_exp`.
pub unsafe fn group(
    be: &CudaBackend,
    kf: &PfKernels,
    sc: &MoeScratch,
    ids: u64,
    slots: usize,
    n_exp: usize,
) -> Result<()> {
    if slots > sc.slots || n_exp > sc.n_exp || n_exp > 1024 {
        return Err(super::device::CudaError::Invalid(
            "expert grouping: more slots or experts than the scratch".into(),
        ));
    }
    let (meta, perm, inv) = (ptr(&sc.meta, be), ptr(&sc.perm, be), ptr(&sc.inv, be));
    let (tiles, tiles2, tiles1) = (ptr(&sc.tiles, be), ptr(&sc.tiles2, be), ptr(&sc.tiles1, be));
    let (si, ne) = (slots as i32, n_exp as i32);
    let f = if n_exp <= PFG_MAXE {
        &kf.group_par
    } else {
        &kf.group
    };
    let mut b = be.stream().launch_builder(f);
    b.arg(&ids)
        .arg(&si)
        .arg(&ne)
        .arg(&meta)
        .arg(&perm)
        .arg(&inv)
        .arg(&tiles)
        .arg(&tiles2)
        .arg(&tiles1);
    b.launch(cfg((1, 1, 1), 1024))?;
    Ok(())
}

/// Routed experts of a chunk: `dn[s] = W_down[ids[s]] · h_s` with
/// `h_s = silu(min(g, c))·clamp(u, ±c)·wts[s]`, `g|u = W_gate|up[ids[s]] · y[s / k]`, for
/// every slot `s < n_tok·k`, f16 operands and f32 accumulation (see the module doc).
/// `y16` (not 0): `f16(y)`, already written by y's producer; the sorted rows are copied from
/// it (same values as rounding `y`). `y16p` (not 0): the same values in `px_pos` column order
/// (`k_hc_pre_pf`), which the wgmma gate|up kernels read per token instead of a gathered copy
/// (the same products, bit for bit). `dn = 0`: the outputs stay in sorted row order
/// ([`MoeScratch::sorted_out`]) for a consumer that reads them through `inv`.
///
/// # Safety
/// `ids` (`n_tok·k` ints `< n_experts`), `wts` (`n_tok·k` floats), `y` (`n_tok × D`), `y16`
/// and `y16p` (0 or `n_tok × D` halves each) and `dn` (0 or `n_tok·k × D`) must be live
/// device buffers; `n_tok·k ≤` the scratch's slots.
#[allow(clippy::too_many_arguments)]
pub unsafe fn moe_grouped(
    be: &CudaBackend,
    kf: &PfKernels,
    sc: &MoeScratch,
    gate: &GpuWeight,
    up: &GpuWeight,
    down: &GpuWeight,
    ids: u64,
    wts: u64,
    y: u64,
    y16: u64,
    y16p: u64,
    n_tok: usize,
    k: usize,
    clamp: f32,
    dn: u64,
    fused: bool,
) -> Result<()> {
    let (d, f) = (sc.d, sc.f);
    let slots = n_tok * k;
    if slots == 0 {
        return Ok(());
    }
    if slots > sc.slots
        || gate.n_experts > sc.n_exp
        || gate.n_rows != f
        || up.n_rows != f
        || gate.n_cols != d
        || up.n_cols != d
        || down.n_rows != d
        || down.n_cols != f
    {
        return Err(super::device::CudaError::Invalid(
            "grouped MoE: shapes do not match the scratch".into(),
        ));
    }
    let st = be.stream();
    let n_exp = gate.n_experts;
    let (meta, perm, inv) = (ptr(&sc.meta, be), ptr(&sc.perm, be), ptr(&sc.inv, be));
    let tiles = ptr(&sc.tiles, be);
    group(be, kf, sc, ids, slots, n_exp)?;
    let (xs, gu, h, dns) = (
        ptr(&sc.xs, be),
        ptr(&sc.gu, be),
        ptr(&sc.h, be),
        ptr(&sc.dns, be),
    );
    let fused = fused && fused_fits(gate, up, down);
    // pf_mxw reads its activation rows permuted (px_pos): the gather and the SwiGLU write
    // them so for the product that takes it.
    let pm_gu = fused && be.pf_mm_permuted(gate, Some(up));
    let pm_dn = fused && be.pf_mm_permuted(down, None);
    // The gate|up input: with y's permuted copy (y16p) that kernel reads each sorted row's
    // token there (rows perm[r] / k), else the rows gathered into xs.
    let (gx, grows, gk) = if pm_gu && y16p != 0 && d.is_multiple_of(32) {
        (y16p, perm, k as i32)
    } else {
        (xs, 0u64, 1i32)
    };
    if grows == 0 {
        let (ki, di, pm) = (k as i32, d as i32, i32::from(pm_gu));
        if y16 != 0 && d.is_multiple_of(8) {
            let mut b = st.launch_builder(&kf.gather16);
            b.arg(&y16).arg(&perm).arg(&ki).arg(&di).arg(&pm).arg(&xs);
            b.launch(cfg(((d as u32 / 8).div_ceil(256), slots as u32, 1), 256))?;
        } else {
            let mut b = st.launch_builder(&kf.gather);
            b.arg(&y).arg(&perm).arg(&ki).arg(&di).arg(&pm).arg(&xs);
            b.launch(cfg(((d as u32).div_ceil(256), slots as u32, 1), 256))?;
        }
    }
    // SwiGLU × routing weight of sorted rows r0..r0+rows (4 elements a thread when f allows).
    let swiglu = |r0: usize, rows: usize| -> Result<()> {
        let (r0i, fi, pm) = (r0 as i32, f as i32, i32::from(pm_dn));
        let (fun, per) = if f.is_multiple_of(4) {
            (&kf.swiglu4, 4)
        } else {
            (&kf.swiglu, 1)
        };
        let mut b = st.launch_builder(fun);
        b.arg(&gu)
            .arg(&perm)
            .arg(&wts)
            .arg(&r0i)
            .arg(&fi)
            .arg(&clamp)
            .arg(&pm)
            .arg(&h);
        b.launch(cfg(((f as u32 / per).div_ceil(256), rows as u32, 1), 256))?;
        Ok(())
    };
    let scatter = || -> Result<()> {
        if dn == 0 {
            return Ok(());
        }
        let di = d as i32;
        let mut b = st.launch_builder(&kf.scatter);
        b.arg(&dns).arg(&inv).arg(&di).arg(&dn);
        b.launch(cfg(((d as u32).div_ceil(256), slots as u32, 1), 256))?;
        Ok(())
    };
    if fused {
        // All on the device, no host read: grids cover the most tiles `slots` can need, and
        // blocks past the tile count pf_group wrote return at once.
        let mt = max_tiles(slots, n_exp);
        let nt = meta + (2 * n_exp * 4) as u64;
        // IQ2_XXS gate|up: the experts of more than 64 rows on pf_mxw4 (tiles of up to 128
        // tokens: its 512-thread block spends ~37% more instructions a row-step than pf_mxw's,
        // which a 128-token tile repays and a 48-token one does not), the others on pf_mxw
        // over their single tiles (bench/RESULTS.md, eighteenth session).
        let w4 = kf.mxw4.as_ref().filter(|_| {
            pm_gu
                && gate.ty == GgmlType::IQ2_XXS
                && kf.w4.unwrap_or_else(|| super::switch_on("DS4_CUDA_PF_W4"))
        });
        if let Some(f4) = w4.filter(|_| max_tiles2(slots) > 0) {
            let (pa, pb) = (be.weight_ptr(gate), be.weight_ptr(up));
            let eb = gate.expert_stride as i64;
            let (ra, mtot, kd) = (f as i32, (2 * f) as i32, d as i32);
            let (nt2, tiles2) = (nt + 4, ptr(&sc.tiles2, be));
            let w4 = || -> Result<()> {
                let mut b = be.st().launch_builder(f4);
                b.arg(&pa)
                    .arg(&pb)
                    .arg(&eb)
                    .arg(&ra)
                    .arg(&mtot)
                    .arg(&kd)
                    .arg(&nt2)
                    .arg(&tiles2)
                    .arg(&gx)
                    .arg(&grows)
                    .arg(&gk)
                    .arg(&gu);
                b.launch(LaunchConfig {
                    grid_dim: ((2 * f / 256) as u32, max_tiles2(slots) as u32, 1),
                    block_dim: (512, 1, 1),
                    shared_mem_bytes: PXW4_SMEM,
                })?;
                Ok(())
            };
            // The two gate|up launches write disjoint rows of gu (their own tiles): on a side
            // stream, pf_mxw4's last partial wave of one-block-an-SM blocks shares the GPU
            // with pf_mxw's blocks instead of leaving SMs idle (DS4_CUDA_PF_W4_FORK=0: one
            // after the other).
            let fork = if be.side().is_none() && super::switch_on("DS4_CUDA_PF_W4_FORK") {
                Some(be.fork_on(super::side_of("DS4_CUDA_PF_W4_SIDE", 0), w4)?)
            } else {
                w4()?;
                None
            };
            let (nt1, tiles1) = (nt + 8, ptr(&sc.tiles1, be));
            let mt1 = n_exp.min(slots);
            be.pf_mm_raw(gate, Some(up), nt1, tiles1, mt1, (gx, grows, gk), pm_gu, gu)?;
            if let Some(fk) = fork {
                fk.join()?;
            }
        } else {
            be.pf_mm_raw(gate, Some(up), nt, tiles, mt, (gx, grows, gk), pm_gu, gu)?;
        }
        // Q2_K down on int8 tensor cores (Hopper; the staged pf_mxw's shapes): the SwiGLU
        // rows quantized as the CPU quantizes them, over h's bytes (codes S·F, then the
        // min-term operands S·F/8 and the scales S·F/64: fits the S·F·2 of h).
        let q8 = kf.mxq.as_ref().filter(|_| {
            pm_dn
                && down.ty == GgmlType::Q2_K
                && f.is_multiple_of(1024)
                && kf.q8.unwrap_or_else(|| super::switch_on("DS4_CUDA_PF_Q8"))
        });
        if let Some(mxq) = q8 {
            let (xq, xb) = (h, h + (slots * f) as u64);
            let xd = xb + (slots * f / 8) as u64;
            let fi = f as i32;
            let mut b = st.launch_builder(&kf.swiglu_q8);
            b.arg(&gu)
                .arg(&perm)
                .arg(&wts)
                .arg(&fi)
                .arg(&clamp)
                .arg(&xq)
                .arg(&xd)
                .arg(&xb);
            b.launch(cfg(((f as u32).div_ceil(2048), slots as u32, 1), 256))?;
            let (wp, eb) = (be.weight_ptr(down), down.expert_stride as i64);
            let (mti, kd) = (d as i32, f as i32);
            let mut b = st.launch_builder(mxq);
            b.arg(&wp)
                .arg(&eb)
                .arg(&mti)
                .arg(&kd)
                .arg(&nt)
                .arg(&tiles)
                .arg(&xq)
                .arg(&xd)
                .arg(&xb)
                .arg(&dns);
            b.launch(LaunchConfig {
                grid_dim: ((d / 128) as u32, mt as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: PXQ_SMEM,
            })?;
        } else {
            swiglu(0, slots)?;
            be.pf_mm_raw(down, None, nt, tiles, mt, (h, 0, 1), pm_dn, dns)?;
        }
        return scatter();
    }
    if sc.e16.len() < PF_EXPERT_BATCH * 2 * f * d {
        return Err(super::device::CudaError::Invalid(
            "grouped MoE: no scratch for the per-expert path".into(),
        ));
    }
    // The one host read of the layer: how many rows each expert has.
    let mut counts = vec![0i32; n_exp];
    st.memcpy_dtoh(&sc.meta.slice(0..n_exp), &mut counts[..])?;
    st.synchronize()?;
    let mut offs = vec![0usize; n_exp + 1];
    for e in 0..n_exp {
        offs[e + 1] = offs[e] + counts[e].max(0) as usize;
    }
    // Same order as the device's used list (increasing expert id).
    let used: Vec<usize> = (0..n_exp).filter(|&e| counts[e] > 0).collect();
    let used_dev = meta + (n_exp * 4) as u64;
    let (e16, d16) = (ptr(&sc.e16, be), ptr(&sc.d16, be));
    let (fd, gud) = (f * d, 2 * f * d);
    for (bi, batch) in used.chunks(PF_EXPERT_BATCH).enumerate() {
        let j0 = bi * PF_EXPERT_BATCH;
        let nb = batch.len();
        be.dq_f16_raw(gate, used_dev, j0, nb, e16, gud)?;
        be.dq_f16_raw(up, used_dev, j0, nb, e16 + (fd * 2) as u64, gud)?;
        be.dq_f16_raw(down, used_dev, j0, nb, d16, fd)?;
        for (b, &e) in batch.iter().enumerate() {
            let (c, o) = (counts[e] as usize, offs[e]);
            be.gemm_f16_scaled_raw(
                2 * f,
                c,
                d,
                e16 + (b * gud * 2) as u64,
                d,
                xs + (o * d * 2) as u64,
                d,
                gu + (o * 2 * f * 4) as u64,
                2 * f,
                1,
                [0; 3],
                1.0,
                false,
            )?;
        }
        let (r0, r1) = (offs[batch[0]], offs[batch[nb - 1] + 1]);
        swiglu(r0, r1 - r0)?;
        for (b, &e) in batch.iter().enumerate() {
            let (c, o) = (counts[e] as usize, offs[e]);
            be.gemm_f16_scaled_raw(
                d,
                c,
                f,
                d16 + (b * fd * 2) as u64,
                f,
                h + (o * f * 2) as u64,
                f,
                dns + (o * d * 4) as u64,
                d,
                1,
                [0; 3],
                1.0,
                false,
            )?;
        }
    }
    scatter()
}

/// Dense prefill product on tensor cores: `y[t] = W_e · x[t]` for `nt` tokens (row-major
/// `x`: `nt × n_cols`, `y`: `nt × n_rows`), matrices `e0..e0+batch` of `w` at once when
/// `batch > 1` (input `b` at column `b·n_cols` of rows of stride `ldx`, output `b` at column
/// `b·n_rows` of rows of stride `ldy`), through `w16` (`batch·n_rows·n_cols` halves; not
/// written when the weight is held as f16, `CudaBackend::f16_ptr`) and `x16` (`nt·ldx`
/// halves). `x16` holds `f16(x · x_scale)` (a power of two; the sums are multiplied back by
/// `1/x_scale` in cuBLAS's alpha, exactly): 1 for every product but the HC `fn` ones, whose
/// input, the raw residual stream, is scaled by 1/16 so that f16 holds residual values up to
/// ~1e6 instead of 65,504. `x16_ready`: `x16` already holds it (written by x's producer), so
/// no conversion runs and `x` is not read. `y16`: `y` is written as f16 (halves, rounded by
/// cuBLAS from the f32 sums) for a consumer that reads f16 only.
///
/// # Safety
/// All buffers live and large enough as stated.
#[allow(clippy::too_many_arguments)]
pub unsafe fn dense_gemm(
    be: &CudaBackend,
    w: &GpuWeight,
    e0: usize,
    batch: usize,
    x: u64,
    ldx: usize,
    nt: usize,
    y: u64,
    ldy: usize,
    w16: u64,
    x16: u64,
    x16_ready: bool,
    x_scale: f32,
    y16: bool,
) -> Result<()> {
    let mat = w.n_rows * w.n_cols;
    let w16 = match be.f16_ptr(w) {
        Some(p) => p + (2 * e0 * mat) as u64,
        None => {
            be.dq_f16_raw(w, 0, e0, batch, w16, mat)?;
            w16
        }
    };
    if !x16_ready {
        be.to_f16_scaled_raw(x, x16, nt * ldx, x_scale)?;
    }
    be.gemm_f16_scaled_raw(
        w.n_rows,
        nt,
        w.n_cols,
        w16,
        w.n_cols,
        x16,
        ldx,
        y,
        ldy,
        batch,
        [mat, w.n_cols, w.n_rows],
        1.0 / x_scale,
        y16,
    )
}

/// Whether [`dense_split3`] gives `w`'s product its f32 accuracy for inputs bounded by
/// `x_bound` in magnitude: `w` held as f16 (so each weight is exact in an f16 operand) and
/// every input inside the f16 range.
pub fn split3_fits(be: &CudaBackend, w: &GpuWeight, x_bound: f32) -> bool {
    w.ty == GgmlType::F16 && be.f16_ptr(w).is_some() && x_bound.is_finite() && x_bound < 32768.0
}

/// The power of two [`dense_split3`] scales its input by before splitting it: the largest
/// up to 2^24 that keeps `x_bound` times it below 32768, so that the lo plane's step (2^−24
/// in f16 subnormals) is at most 2^−24 / scale of the input, below an f32 ulp of all but
/// the smallest inputs.
pub fn split3_scale(x_bound: f32) -> f32 {
    let mut s = 1.0f32;
    while s < 16_777_216.0 && x_bound * s * 2.0 < 32768.0 {
        s *= 2.0;
    }
    s
}

/// The router's product on tensor cores at f32 accuracy: `x` (`nt × n_cols` f32, each
/// |value| at most `x_bound`, see [`split3_fits`]) times [`split3_scale`]`(x_bound)` (a power
/// of two) as three f16 planes whose sum is that (quant.cu `f32_split3_f16`, into `x3`:
/// `3 · nt × n_cols` halves), then one f16 GEMM over the `3 · nt` rows with f32 sums scaled
/// back (exactly): `y` gets three partial products (`nt × n_rows` floats apart) of the exact
/// f16 weights with the hi, mid and lo planes, which `k_route` adds in that order. Against
/// the f32 GEMM: ~3× the flops at the tensor cores' rate instead of the f32 pipe's, the same
/// operands (up to input bits below the scaled lo plane's step), and another order of the
/// f32 additions.
///
/// # Safety
/// `x`, `x3` and `y` (`3 · nt × n_rows` floats) live and large enough; `split3_fits`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn dense_split3(
    be: &CudaBackend,
    kf: &PfKernels,
    w: &GpuWeight,
    x: u64,
    x_bound: f32,
    nt: usize,
    x3: u64,
    x3_ready: bool,
    y: u64,
) -> Result<()> {
    let Some(w16) = be.f16_ptr(w).filter(|_| w.ty == GgmlType::F16) else {
        return Err(super::device::CudaError::Invalid(
            "split f16 product: the weight is not f16".into(),
        ));
    };
    let n = nt * w.n_cols;
    if n == 0 {
        return Ok(());
    }
    let (ni, scale) = (n as i64, split3_scale(x_bound));
    if !x3_ready {
        let mut b = be.stream().launch_builder(&kf.split3);
        b.arg(&x).arg(&x3).arg(&ni).arg(&scale);
        // Four elements a thread where n allows (the kernel's vector form).
        let threads = if n.is_multiple_of(4) { n / 4 } else { n };
        b.launch(cfg(((threads as u32).div_ceil(256), 1, 1), 256))?;
    }
    dense_gemm(
        be,
        w,
        0,
        1,
        0,
        w.n_cols,
        3 * nt,
        y,
        w.n_rows,
        w16,
        x3,
        true,
        scale,
        false,
    )
}

/// Prefill product in plain f32 on cuBLAS (f32 operands and accumulation: the exact kernels'
/// numerics up to summation order), for products whose inputs must not be rounded to f16
/// (the router's logits): matrix 0 of `w` is decoded exactly to f32 into `w32`
/// (`n_rows·n_cols` floats), then `y[t] = W · x[t]` for `nt` rows.
///
/// # Safety
/// `x` (`nt × n_cols`), `y` (`nt × n_rows`) and `w32` live and large enough.
pub unsafe fn dense_sgemm(
    be: &CudaBackend,
    w: &GpuWeight,
    x: u64,
    nt: usize,
    y: u64,
    w32: u64,
) -> Result<()> {
    be.dq_f32_raw(w, w32)?;
    be.gemm_f32_raw(
        w.n_rows, nt, w.n_cols, w32, w.n_cols, x, w.n_cols, y, w.n_rows,
    )
}
