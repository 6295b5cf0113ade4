//! Quantized block formats, dequantization, quantization and dot-product kernels
//! (model.md §5), plus the QAT activation simulations (model.md §3.0).
//!
//! One file per format holds its layout, dequantizer, quantizer and scalar dot; `*_avx2.rs`
//! files hold the SIMD twins, which tests compare against the scalar code. This file is the
//! dispatch layer and the row-matrix kernels (`matvec`, `matmul`).
//!
//! Two numeric modes:
//! * **exact** (`dot_f32`, `exact = true`): f32 activations, weights dequantized bit-exactly,
//!   products accumulated in f32 (32 lanes, fixed reduction order).
//! * **quantized** (`exact = false`, ds4's CPU path): the activation vector is quantized once
//!   (Q8_0 for Q8_0 weights, Q8_K for Q2_K/Q4_K/IQ2_XXS) and integer dots are used.
//!   F32/F16/BF16/I32 weights have no integer kernel and use the exact path.
//!
//! On aarch64 there are no NEON kernels yet: everything runs the scalar twins.

// Block layouts are specified by element index (model.md §5); index loops mirror the spec.
#![allow(clippy::needless_range_loop)]

mod bench;
mod f16;
mod fdot;
mod iq2_tables;
mod iq2_xxs;
mod kfit;
mod q2_k;
mod q4_k;
mod q8_0;
mod q8_k;
mod qat;
mod types;

#[cfg(target_arch = "x86_64")]
mod fdot_avx2;
#[cfg(target_arch = "x86_64")]
mod iq2_xxs_avx2;
#[cfg(target_arch = "x86_64")]
mod q2_k_avx2;
#[cfg(target_arch = "x86_64")]
mod q4_k_avx2;
#[cfg(target_arch = "x86_64")]
mod q8_0_avx2;

pub use bench::{bench_kernels, BenchConfig, KernelBench};
pub use q8_0::{BlockQ8_0Act, QK8_0};
pub use q8_k::{BlockQ8K, QK_K};
pub use qat::{
    fp4sim_inplace, fp8_e4m3_round, fp8sim_inplace, hadamard_inplace, indexer_qat_inplace,
};
pub use types::GgmlType;

use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::OnceLock;

/// Errors of the quantization entry points.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QuantError {
    /// The requested target format has no quantizer in this engine (IQ2_XXS needs an
    /// importance-matrix search that is out of scope; model files ship pre-quantized).
    #[error("quantization to {0} is not supported")]
    Unsupported(GgmlType),
}

/// Instruction set used by a kernel. `Scalar` is the reference twin of every SIMD kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable Rust (the reference implementation).
    Scalar,
    /// x86_64 AVX2 + FMA + F16C.
    Avx2,
}

impl Isa {
    /// Best instruction set of this CPU, detected once and cached.
    pub fn detect() -> Isa {
        static DETECTED: OnceLock<Isa> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            if Isa::Avx2.available() {
                Isa::Avx2
            } else {
                Isa::Scalar
            }
        })
    }

    /// Whether this CPU can run kernels of this instruction set.
    pub fn available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 => false,
        }
    }

    /// `self` if this CPU supports it, otherwise `Scalar` (so callers can never reach a
    /// SIMD kernel the CPU lacks).
    fn usable(self) -> Isa {
        if self == Isa::Scalar || self == Isa::detect() || self.available() {
            self
        } else {
            Isa::Scalar
        }
    }
}

fn row_bytes(ty: GgmlType, n: usize) -> usize {
    assert!(
        n.is_multiple_of(ty.block_elems()),
        "{ty}: {n} elements is not a whole number of {}-element blocks",
        ty.block_elems()
    );
    n / ty.block_elems() * ty.block_bytes()
}

/// Dequantizes one row: `src` holds `dst.len()` elements of type `ty` (whole blocks).
/// Bit-exact against GGML/gguf-py for F32, F16, BF16, Q8_0, Q2_K, Q4_K, IQ2_XXS; Q8_K and
/// I32 are decoded too (`d·q`, and `i32 as f32`).
///
/// # Panics
/// If `dst.len()` is not a whole number of blocks or `src.len()` does not match it.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    dequantize_row_with(Isa::detect(), ty, src, dst)
}

/// [`dequantize_row`] with an explicit instruction set (falls back to scalar if
/// unavailable). The SIMD decoders are bit-identical to the scalar ones (NaN included).
///
/// # Panics
/// As [`dequantize_row`].
pub fn dequantize_row_with(isa: Isa, ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    let nb = row_bytes(ty, dst.len());
    assert_eq!(
        src.len(),
        nb,
        "{ty}: {} bytes for {} elements (expected {nb})",
        src.len(),
        dst.len()
    );
    match (isa.usable(), ty) {
        // SAFETY (all four): CPU features checked by `usable`; lengths checked above.
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, GgmlType::Q8_0) => unsafe { q8_0_avx2::dequantize(src, dst) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, GgmlType::Q2_K) => unsafe { q2_k_avx2::dequantize(src, dst) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, GgmlType::Q4_K) => unsafe { q4_k_avx2::dequantize(src, dst) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, GgmlType::IQ2_XXS) => unsafe { iq2_xxs_avx2::dequantize(src, dst) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, GgmlType::F16) => unsafe { fdot_avx2::dequantize_f16(src, dst) },
        (_, GgmlType::F32) => f16::dequantize_f32(src, dst),
        (_, GgmlType::F16) => f16::dequantize_f16(src, dst),
        (_, GgmlType::BF16) => f16::dequantize_bf16(src, dst),
        (_, GgmlType::I32) => f16::dequantize_i32(src, dst),
        (_, GgmlType::Q8_0) => q8_0::dequantize(src, dst),
        (_, GgmlType::Q2_K) => q2_k::dequantize(src, dst),
        (_, GgmlType::Q4_K) => q4_k::dequantize(src, dst),
        (_, GgmlType::Q8_K) => q8_k::dequantize(src, dst),
        (_, GgmlType::IQ2_XXS) => iq2_xxs::dequantize(src, dst),
    }
}

/// Whether [`quantize_row`] supports `ty`.
pub fn can_quantize(ty: GgmlType) -> bool {
    ty != GgmlType::IQ2_XXS
}

/// Quantizes (encodes) one row of `src.len()` elements into `dst` (whole blocks).
/// * Q8_0: the GGML reference rule (bit-exact against gguf-py).
/// * Q2_K / Q4_K: per-sub-block least-squares fit of scale and min (not bit-compatible
///   with any particular GGML quantizer; quality-tested).
/// * F32 / F16 / BF16: encodes (round to nearest even); I32: rounds; Q8_K: ds4's
///   activation rule, serialized.
///
/// # Errors
/// [`QuantError::Unsupported`] for IQ2_XXS.
///
/// # Panics
/// If `src.len()` is not a whole number of blocks or `dst.len()` does not match it.
pub fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<(), QuantError> {
    if !can_quantize(ty) {
        return Err(QuantError::Unsupported(ty));
    }
    let nb = row_bytes(ty, src.len());
    assert_eq!(
        dst.len(),
        nb,
        "{ty}: {} bytes for {} elements (expected {nb})",
        dst.len(),
        src.len()
    );
    match ty {
        GgmlType::F32 => f16::quantize_f32(src, dst),
        GgmlType::F16 => f16::quantize_f16(src, dst),
        GgmlType::BF16 => f16::quantize_bf16(src, dst),
        GgmlType::I32 => f16::quantize_i32(src, dst),
        GgmlType::Q8_0 => q8_0::quantize(src, dst),
        GgmlType::Q2_K => q2_k::quantize(src, dst),
        GgmlType::Q4_K => q4_k::quantize(src, dst),
        GgmlType::Q8_K => q8_k::quantize(src, dst),
        GgmlType::IQ2_XXS => unreachable!("rejected above"),
    }
    Ok(())
}

/// ds4's Q8_0 activation quantizer (model.md §5): per 32 elements `d = amax/127` (f32),
/// `q = clamp(round_half_even(x·(1/d)), -128, 127)`. Bit-exact against
/// `ops/act_quant.safetensors`.
///
/// # Panics
/// If `x.len()` is not a multiple of 32 or `out.len() != x.len() / 32`.
pub fn quantize_act_q8_0_into(x: &[f32], out: &mut [BlockQ8_0Act]) {
    assert!(
        x.len().is_multiple_of(QK8_0) && out.len() == x.len() / QK8_0,
        "q8_0 activation: bad lengths"
    );
    quantize_q8_0_with(Isa::detect(), x, out);
}

/// Allocating form of [`quantize_act_q8_0_into`].
pub fn quantize_act_q8_0(x: &[f32]) -> Vec<BlockQ8_0Act> {
    let mut v = vec![BlockQ8_0Act::default(); x.len() / QK8_0];
    quantize_act_q8_0_into(x, &mut v);
    v
}

/// ds4's Q8_K activation quantizer (model.md §5): per 256 elements `iscale = -127/max`
/// (evaluated as `(1/max)·(-127)`, as the fixture does) with `max` the signed element of
/// largest |x| (first on ties), `q = clamp(rne(iscale·x))`,
/// `d = 1/iscale`, `bsums` = sums of 16. Bit-exact against `ops/act_quant.safetensors`.
///
/// # Panics
/// If `x.len()` is not a multiple of 256 or `out.len() != x.len() / 256`.
pub fn quantize_act_q8_k_into(x: &[f32], out: &mut [BlockQ8K]) {
    assert!(
        x.len().is_multiple_of(QK_K) && out.len() == x.len() / QK_K,
        "q8_K activation: bad lengths"
    );
    quantize_q8_k_with(Isa::detect(), x, out);
}

/// Allocating form of [`quantize_act_q8_k_into`].
pub fn quantize_act_q8_k(x: &[f32]) -> Vec<BlockQ8K> {
    let mut v = vec![BlockQ8K::default(); x.len() / QK_K];
    quantize_act_q8_k_into(x, &mut v);
    v
}

/// Elements handed to the f32 accumulator per piece in the exact path (a multiple of 32
/// and of every block size, see `fdot`).
const CHUNK: usize = 256;

fn feed(isa: Isa, acc: &mut fdot::Acc, w: &[f32], x: &[f32]) {
    match isa {
        // SAFETY: `isa` came through `Isa::usable`, so the CPU has AVX2+FMA.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { fdot_avx2::feed(acc, w, x) },
        _ => fdot::feed_scalar(acc, w, x),
    }
}

/// Exact dot: `Σ dequant(row)_i · x_i` accumulated in f32 (no activation quantization).
/// Equals dequantize-then-dot up to f32 summation order.
///
/// # Panics
/// If `x.len()` is not a whole number of blocks or `row.len()` does not match it.
pub fn dot_f32(ty: GgmlType, row: &[u8], x: &[f32]) -> f32 {
    dot_f32_with(Isa::detect(), ty, row, x)
}

/// [`dot_f32`] with an explicit instruction set (falls back to scalar if unavailable).
pub fn dot_f32_with(isa: Isa, ty: GgmlType, row: &[u8], x: &[f32]) -> f32 {
    let isa = isa.usable();
    let nb = row_bytes(ty, x.len());
    assert_eq!(
        row.len(),
        nb,
        "{ty}: {} bytes for {} elements (expected {nb})",
        row.len(),
        x.len()
    );
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 && ty == GgmlType::F16 {
        // The whole row in one pass (F16C widening is exact): the same per-lane FMAs and
        // scalar tail as feeding it chunk by chunk.
        let mut acc = [fdot::Acc::new(); 1];
        // SAFETY: AVX2+FMA+F16C checked by `usable`; row has 2·x.len() bytes.
        unsafe { fdot_avx2::feed_f16_multi::<1>(&mut acc, row, x.len(), [x.as_ptr()]) };
        return acc[0].finish();
    }
    let chunk_bytes = CHUNK / ty.block_elems() * ty.block_bytes();
    let mut acc = fdot::Acc::new();
    let mut buf = [0f32; CHUNK];
    for (xc, rc) in x.chunks(CHUNK).zip(row.chunks(chunk_bytes)) {
        let w = &mut buf[..xc.len()];
        dequantize_row_with(isa, ty, rc, w);
        feed(isa, &mut acc, w, xc);
    }
    acc.finish()
}

/// Q8_0 weights × Q8_0 activations (`xq` from [`quantize_act_q8_0`]):
/// `Σ_b f16(d_w)·d_x·Σ q_w·q_x`.
///
/// # Panics
/// If `row.len() != 34 · xq.len()`.
pub fn dot_q8_0(row: &[u8], xq: &[BlockQ8_0Act]) -> f32 {
    dot_q8_0_with(Isa::detect(), row, xq)
}

/// [`dot_q8_0`] with an explicit instruction set (falls back to scalar if unavailable).
pub fn dot_q8_0_with(isa: Isa, row: &[u8], xq: &[BlockQ8_0Act]) -> f32 {
    assert_eq!(
        row.len(),
        xq.len() * q8_0::BLOCK_BYTES,
        "Q8_0 dot: row/activation length mismatch"
    );
    match isa.usable() {
        // SAFETY: CPU features checked by `usable`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { q8_0_avx2::dot_q8_0(row, xq) },
        _ => q8_0::dot_q8_0_scalar(row, xq),
    }
}

/// Q2_K / Q4_K / IQ2_XXS weights × Q8_K activations (`xq` from [`quantize_act_q8_k`]),
/// with the formulas of model.md §5.
///
/// # Panics
/// If `ty` is not one of those three formats or `row.len() != ty.block_bytes() · xq.len()`.
pub fn dot_q8_k(ty: GgmlType, row: &[u8], xq: &[BlockQ8K]) -> f32 {
    dot_q8_k_with(Isa::detect(), ty, row, xq)
}

/// [`dot_q8_k`] with an explicit instruction set (falls back to scalar if unavailable).
pub fn dot_q8_k_with(isa: Isa, ty: GgmlType, row: &[u8], xq: &[BlockQ8K]) -> f32 {
    dot_q8_k_inner(isa, ty, row, xq, false)
}

/// Whether no q8 value of `xq` is -128 (true for everything [`quantize_act_q8_k`] makes:
/// the largest |x| maps to exactly ∓127). Lets kernels use the cheaper sign trick.
fn q8k_no_m128(xq: &[BlockQ8K]) -> bool {
    xq.iter().all(|b| b.qs.iter().all(|&q| q != -128))
}

/// [`dot_q8_k_with`]; `no_m128` promises that no q8 value is -128 (see [`q8k_no_m128`]).
/// The result is the same either way (exact integer sums).
fn dot_q8_k_inner(isa: Isa, ty: GgmlType, row: &[u8], xq: &[BlockQ8K], no_m128: bool) -> f32 {
    assert_eq!(
        row.len(),
        xq.len() * ty.block_bytes(),
        "{ty} dot: row/activation length mismatch"
    );
    let isa = isa.usable();
    match (isa, ty) {
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, GgmlType::IQ2_XXS) if no_m128 => unsafe { iq2_xxs_avx2::dot_no_m128(row, xq) },
        // SAFETY (all three): CPU features checked by `usable`.
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, GgmlType::Q2_K) => unsafe { q2_k_avx2::dot(row, xq) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, GgmlType::Q4_K) => unsafe { q4_k_avx2::dot(row, xq) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, GgmlType::IQ2_XXS) => unsafe { iq2_xxs_avx2::dot(row, xq) },
        (_, GgmlType::Q2_K) => q2_k::dot_scalar(row, xq),
        (_, GgmlType::Q4_K) => q4_k::dot_scalar(row, xq),
        (_, GgmlType::IQ2_XXS) => iq2_xxs::dot_scalar(row, xq),
        _ => panic!("dot_q8_k: {ty} has no Q8_K dot kernel"),
    }
}

/// Quantizes `x` (whole 32-blocks) the ds4 Q8_0 way into i16 values and f32 block scales
/// (the layout of the AVX2 kernel): the same arithmetic as [`quantize_act_q8_0_into`].
#[inline(always)]
fn quantize_q8_0_wide_generic(x: &[f32], q: &mut [i16], d: &mut [f32]) {
    for ((xc, qc), dv) in x
        .chunks_exact(QK8_0)
        .zip(q.chunks_exact_mut(QK8_0))
        .zip(d.iter_mut())
    {
        let b = q8_0::quantize_act_block(xc);
        *dv = b.d;
        for (o, &v) in qc.iter_mut().zip(&b.qs) {
            *o = v as i16;
        }
    }
}

#[inline(always)]
fn quantize_q8_0_generic(x: &[f32], out: &mut [BlockQ8_0Act]) {
    for (o, c) in out.iter_mut().zip(x.chunks_exact(QK8_0)) {
        *o = q8_0::quantize_act_block(c);
    }
}

#[inline(always)]
fn quantize_q8_k_generic(x: &[f32], out: &mut [BlockQ8K]) {
    for (o, c) in out.iter_mut().zip(x.chunks_exact(QK_K)) {
        q8_k::quantize_block(c, o);
    }
}

/// The activation quantizers compiled for AVX2 (the same Rust code, so the same results:
/// the compiler only gets `roundss` for `round_ties_even` instead of a libm call; no
/// floating-point contraction is ever applied by rustc).
#[cfg(target_arch = "x86_64")]
mod quantize_avx2 {
    use super::*;
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q8_0_wide(x: &[f32], q: &mut [i16], d: &mut [f32]) {
        quantize_q8_0_wide_generic(x, q, d)
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q8_0(x: &[f32], out: &mut [BlockQ8_0Act]) {
        quantize_q8_0_generic(x, out)
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q8_k(x: &[f32], out: &mut [BlockQ8K]) {
        quantize_q8_k_generic(x, out)
    }
}

fn quantize_q8_0_with(isa: Isa, x: &[f32], out: &mut [BlockQ8_0Act]) {
    match isa.usable() {
        // SAFETY: CPU features checked by `usable`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { quantize_avx2::q8_0(x, out) },
        _ => quantize_q8_0_generic(x, out),
    }
}

fn quantize_q8_0_wide_with(isa: Isa, x: &[f32], q: &mut [i16], d: &mut [f32]) {
    match isa.usable() {
        // SAFETY: CPU features checked by `usable`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { quantize_avx2::q8_0_wide(x, q, d) },
        _ => quantize_q8_0_wide_generic(x, q, d),
    }
}

fn quantize_q8_k_with(isa: Isa, x: &[f32], out: &mut [BlockQ8K]) {
    match isa.usable() {
        // SAFETY: CPU features checked by `usable`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { quantize_avx2::q8_k(x, out) },
        _ => quantize_q8_k_generic(x, out),
    }
}

/// Activation buffers kept per thread between calls: a fresh multi-megabyte allocation
/// per product would be page-faulted in (and zeroed by the kernel) every time.
#[derive(Default)]
struct ActBufs {
    q8_0: Vec<BlockQ8_0Act>,
    q16: Vec<i16>,
    d: Vec<f32>,
    q8k: Vec<BlockQ8K>,
}

thread_local! {
    static ACT_BUFS: RefCell<ActBufs> = RefCell::new(ActBufs::default());
}

fn take_buf<T: Clone>(
    len: usize,
    fill: T,
    pick: impl FnOnce(&mut ActBufs) -> &mut Vec<T>,
) -> Vec<T> {
    let mut v = ACT_BUFS
        .try_with(|b| std::mem::take(pick(&mut b.borrow_mut())))
        .unwrap_or_default();
    v.clear();
    v.resize(len, fill);
    v
}

fn keep_buf<T>(v: Vec<T>, pick: impl FnOnce(&mut ActBufs) -> &mut Vec<T>) {
    let _ = ACT_BUFS.try_with(|b| {
        let mut b = b.borrow_mut();
        let slot = pick(&mut b);
        if v.capacity() > slot.capacity() {
            *slot = v;
        }
    });
}

/// Activations of `n_tok` tokens (token-major) in the form a weight type's kernels read.
enum Act {
    /// Exact path: the f32 activations themselves.
    F32,
    /// Q8_0 blocks (scalar kernels).
    Q8_0(Vec<BlockQ8_0Act>),
    /// Q8_0 activations for the AVX2 kernel: values widened to i16 (`n_tok × n_cols`) and
    /// block scales (`n_tok × n_cols/32`).
    Q8_0W { q16: Vec<i16>, d: Vec<f32> },
    /// Q8_K blocks, and whether no q8 value is -128.
    Q8K(Vec<BlockQ8K>, bool),
}

impl Drop for Act {
    fn drop(&mut self) {
        match self {
            Act::F32 => {}
            Act::Q8_0(v) => keep_buf(std::mem::take(v), |b| &mut b.q8_0),
            Act::Q8_0W { q16, d } => {
                keep_buf(std::mem::take(q16), |b| &mut b.q16);
                keep_buf(std::mem::take(d), |b| &mut b.d);
            }
            Act::Q8K(v, _) => keep_buf(std::mem::take(v), |b| &mut b.q8k),
        }
    }
}

/// Runs `f(token_input, token_output)` over tokens, in parallel when the batch is large.
fn per_token<A: Sync, B: Send>(
    xs: &[A],
    n_in: usize,
    out: &mut [B],
    n_out: usize,
    f: impl Fn(&[A], &mut [B]) + Sync,
) {
    let n_tok = out.len() / n_out.max(1);
    if n_tok > 1 && xs.len() >= 1 << 15 {
        xs.par_chunks(n_in)
            .zip(out.par_chunks_mut(n_out))
            .for_each(|(x, o)| f(x, o));
    } else {
        xs.chunks(n_in)
            .zip(out.chunks_mut(n_out))
            .for_each(|(x, o)| f(x, o));
    }
}

/// Tokens per register tile of the quantized `matmul` kernels.
const TOK: usize = 4;
/// Tokens per register tile of the f32 `matmul` path (4 accumulator registers each).
const TOK_F32: usize = 3;

/// Calls `$body` with a `const $t: usize` equal to `$nt` (1..=4).
macro_rules! with_const_nt {
    ($nt:expr, $t:ident, $body:expr) => {
        match $nt {
            1 => {
                const $t: usize = 1;
                $body
            }
            2 => {
                const $t: usize = 2;
                $body
            }
            3 => {
                const $t: usize = 3;
                $body
            }
            _ => {
                const $t: usize = 4;
                $body
            }
        }
    };
}

impl Act {
    fn new(isa: Isa, ty: GgmlType, xs: &[f32], n_cols: usize, exact: bool) -> Act {
        if exact {
            return Act::F32;
        }
        match ty {
            GgmlType::Q8_0 if isa == Isa::Avx2 => {
                let mut q16 = take_buf(xs.len(), 0i16, |b| &mut b.q16);
                let mut d = take_buf(xs.len() / QK8_0, 0f32, |b| &mut b.d);
                let bpt = n_cols / QK8_0;
                let mut pairs: Vec<(&mut [i16], &mut [f32])> =
                    q16.chunks_mut(n_cols).zip(d.chunks_mut(bpt)).collect();
                per_token(xs, n_cols, &mut pairs, 1, |x, p| {
                    let (q, d) = &mut p[0];
                    quantize_q8_0_wide_with(isa, x, q, d)
                });
                drop(pairs);
                Act::Q8_0W { q16, d }
            }
            GgmlType::Q8_0 => {
                let mut v = take_buf(xs.len() / QK8_0, BlockQ8_0Act::default(), |b| &mut b.q8_0);
                per_token(xs, n_cols, &mut v, n_cols / QK8_0, |x, o| {
                    quantize_q8_0_with(isa, x, o)
                });
                Act::Q8_0(v)
            }
            GgmlType::Q2_K | GgmlType::Q4_K | GgmlType::IQ2_XXS => {
                let mut v = take_buf(xs.len() / QK_K, BlockQ8K::default(), |b| &mut b.q8k);
                per_token(xs, n_cols, &mut v, n_cols / QK_K, |x, o| {
                    quantize_q8_k_with(isa, x, o)
                });
                let no_m128 = q8k_no_m128(&v);
                Act::Q8K(v, no_m128)
            }
            _ => Act::F32,
        }
    }

    /// Quantized dots of the consecutive rows in `rows` (`rb` bytes each) with tokens
    /// `t0..t0+nt` (1 ≤ nt ≤ [`TOK`]) into `out[r·nt + j]`; `false` in f32 mode. Each
    /// value equals the single-token kernel's bit for bit.
    #[allow(clippy::too_many_arguments)]
    fn dot_rows(
        &self,
        isa: Isa,
        ty: GgmlType,
        rows: &[u8],
        rb: usize,
        t0: usize,
        nt: usize,
        bpt: usize,
        out: &mut [f32],
    ) -> bool {
        assert!((1..=TOK).contains(&nt));
        assert_eq!(rb, bpt * ty.block_bytes(), "{ty}: row length");
        assert!(rows.len().is_multiple_of(rb) && out.len() >= rows.len() / rb * nt);
        match self {
            Act::F32 => return false,
            Act::Q8_0(v) => {
                for (r, row) in rows.chunks_exact(rb).enumerate() {
                    for j in 0..nt {
                        let t = t0 + j;
                        out[r * nt + j] = dot_q8_0_with(isa, row, &v[t * bpt..(t + 1) * bpt]);
                    }
                }
            }
            #[cfg(target_arch = "x86_64")]
            Act::Q8_0W { q16, d } => {
                let n_cols = bpt * QK8_0;
                assert!((t0 + nt) * n_cols <= q16.len() && (t0 + nt) * bpt <= d.len());
                let (qp, dp) = (q16.as_ptr(), d.as_ptr());
                // SAFETY: built only when AVX2 is usable; token ranges, row length and
                // output length checked above.
                unsafe {
                    with_const_nt!(nt, T, {
                        q8_0_avx2::dot_i16_multi::<T>(
                            rows,
                            rb,
                            std::array::from_fn(|j| qp.add((t0 + j) * n_cols)),
                            std::array::from_fn(|j| dp.add((t0 + j) * bpt)),
                            out,
                        )
                    })
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            Act::Q8_0W { .. } => unreachable!("AVX2 layout on a non-x86 target"),
            Act::Q8K(v, nm) => {
                assert!((t0 + nt) * bpt <= v.len());
                #[cfg(target_arch = "x86_64")]
                if isa.usable() == Isa::Avx2 {
                    let xp = |j: usize| v[(t0 + j) * bpt..].as_ptr();
                    // SAFETY: AVX2 usable; token ranges, row and output lengths checked.
                    unsafe {
                        match ty {
                            GgmlType::IQ2_XXS if *nm => {
                                with_const_nt!(nt, T, {
                                    iq2_xxs_avx2::dot_no_m128_multi::<T>(
                                        rows,
                                        rb,
                                        std::array::from_fn(xp),
                                        out,
                                    )
                                });
                                return true;
                            }
                            GgmlType::Q2_K => {
                                with_const_nt!(nt, T, {
                                    q2_k_avx2::dot_multi::<T>(
                                        rows,
                                        rb,
                                        std::array::from_fn(xp),
                                        out,
                                    )
                                });
                                return true;
                            }
                            GgmlType::Q4_K => {
                                with_const_nt!(nt, T, {
                                    q4_k_avx2::dot_multi::<T>(
                                        rows,
                                        rb,
                                        std::array::from_fn(xp),
                                        out,
                                    )
                                });
                                return true;
                            }
                            _ => {}
                        }
                    }
                }
                for (r, row) in rows.chunks_exact(rb).enumerate() {
                    for j in 0..nt {
                        let t = t0 + j;
                        out[r * nt + j] =
                            dot_q8_k_inner(isa, ty, row, &v[t * bpt..(t + 1) * bpt], *nm);
                    }
                }
            }
        }
        true
    }
}

/// Multiply-adds below which a parallel task is not worth rayon's per-task cost and the
/// wake-up of idle workers (a small product runs on the calling thread).
const MIN_TASK_MACS: usize = 1 << 16;

/// Rows per parallel task of a product with `n_tok` tokens: at least [`MIN_TASK_MACS`]
/// multiply-adds, at most `cap_rows` (a cache budget), and otherwise about `per_thread`
/// tasks per thread (enough for work stealing to even out a loaded machine).
fn task_rows(
    n_rows: usize,
    n_cols: usize,
    n_tok: usize,
    cap_rows: usize,
    per_thread: usize,
) -> usize {
    let min_rows = MIN_TASK_MACS.div_ceil((n_cols * n_tok).max(1));
    let even = n_rows.div_ceil(rayon::current_num_threads() * per_thread);
    even.min(cap_rows).max(min_rows).max(1)
}

fn check_mat(ty: GgmlType, w: &[u8], n_rows: usize, n_cols: usize) -> usize {
    let rb = row_bytes(ty, n_cols);
    assert_eq!(
        w.len(),
        rb * n_rows,
        "{ty}: weight bytes {} != {n_rows} rows × {rb}",
        w.len()
    );
    rb
}

/// Runs `f(r0, r1)` over row ranges of `tile` rows, in parallel when there are several.
fn for_row_tiles(n_rows: usize, tile: usize, f: impl Fn(usize, usize) + Sync) {
    let n_tiles = n_rows.div_ceil(tile);
    if n_tiles <= 1 {
        f(0, n_rows);
    } else {
        (0..n_tiles)
            .into_par_iter()
            .for_each(|i| f(i * tile, ((i + 1) * tile).min(n_rows)));
    }
}

/// Matrix-vector product `y[o] = row_o(w) · x` over a row-major `n_rows × n_cols` weight
/// matrix of type `ty`, parallel over rows (rayon; small products run on the calling
/// thread).
///
/// `exact = true` uses [`dot_f32`]; `exact = false` quantizes `x` once (Q8_0 for Q8_0
/// weights, Q8_K for Q2_K/Q4_K/IQ2_XXS) and uses the integer dots; float weight types
/// always use the f32 path.
///
/// # Panics
/// If the lengths of `w`, `x`, `y` disagree with `n_rows`, `n_cols` and the block size.
pub fn matvec(
    ty: GgmlType,
    w: &[u8],
    n_rows: usize,
    n_cols: usize,
    x: &[f32],
    y: &mut [f32],
    exact: bool,
) {
    let rb = check_mat(ty, w, n_rows, n_cols);
    assert_eq!(
        x.len(),
        n_cols,
        "matvec: x has {} elements, expected {n_cols}",
        x.len()
    );
    assert_eq!(
        y.len(),
        n_rows,
        "matvec: y has {} elements, expected {n_rows}",
        y.len()
    );
    if n_rows == 0 {
        return;
    }
    let isa = Isa::detect();
    let act = Act::new(isa, ty, x, n_cols, exact);
    let bpt = n_cols / ty.block_elems();
    let rows = |ys: &mut [f32], r0: usize| {
        let r1 = r0 + ys.len();
        if !act.dot_rows(isa, ty, &w[r0 * rb..r1 * rb], rb, 0, 1, bpt, ys) {
            for (yo, row) in ys.iter_mut().zip(w[r0 * rb..r1 * rb].chunks_exact(rb)) {
                *yo = dot_f32_with(isa, ty, row, x);
            }
        }
    };
    let chunk = task_rows(n_rows, n_cols, 1, usize::MAX, 32);
    if chunk >= n_rows {
        rows(y, 0);
    } else {
        y.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(ci, ys)| rows(ys, ci * chunk));
    }
}

/// `ys` shared by the tasks of `matmul`, which write disjoint elements.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: used only for writes to disjoint indices inside one live `&mut [f32]`.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}
impl OutPtr {
    /// # Safety
    /// `i` in bounds of the slice this came from, and no other task writes it.
    unsafe fn write(self, i: usize, v: f32) {
        unsafe { self.0.add(i).write(v) }
    }
}

/// Batched product for prefill: `ys[t][o] = row_o(w) · xs[t]` with `xs` `n_tok × n_cols`
/// and `ys` `n_tok × n_rows`, both row-major. Parallel over tiles of weight rows (sized to
/// stay in L2); inside a tile, register tiles of a few tokens reuse each decoded weight
/// block for all of them. Results equal [`matvec`] per token exactly, in both modes (the
/// same per-token operations in the same order). Writes straight into `ys` (no scratch
/// beyond the quantized activations, which are reused between calls).
///
/// # Panics
/// If the lengths of `w`, `xs`, `ys` disagree with the dimensions and the block size.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    ty: GgmlType,
    w: &[u8],
    n_rows: usize,
    n_cols: usize,
    xs: &[f32],
    n_tok: usize,
    ys: &mut [f32],
    exact: bool,
) {
    let rb = check_mat(ty, w, n_rows, n_cols);
    assert_eq!(
        xs.len(),
        n_tok * n_cols,
        "matmul: xs has {} elements, expected {n_tok}×{n_cols}",
        xs.len()
    );
    assert_eq!(
        ys.len(),
        n_tok * n_rows,
        "matmul: ys has {} elements, expected {n_tok}×{n_rows}",
        ys.len()
    );
    if n_tok == 0 || n_rows == 0 {
        return;
    }
    let isa = Isa::detect();
    let act = Act::new(isa, ty, xs, n_cols, exact);
    let bpt = n_cols / ty.block_elems();
    let out = OutPtr(ys.as_mut_ptr());
    if let Act::F32 = act {
        // f32 rows of a tile: ≤ 64 KiB.
        let cap = (16 * 1024 / n_cols.max(1)).max(1);
        let tile = task_rows(n_rows, n_cols, n_tok, cap, 4);
        for_row_tiles(n_rows, tile, |r0, r1| {
            matmul_f32_tile(isa, ty, w, rb, n_rows, n_cols, xs, n_tok, r0, r1, out)
        });
        return;
    }
    // Weight rows of a tile: ≤ 64 KiB (re-read from L2 once per token tile).
    let cap = (64 * 1024 / rb.max(1)).max(1);
    let tile = task_rows(n_rows, n_cols, n_tok, cap, 4);
    for_row_tiles(n_rows, tile, |r0, r1| {
        // Rows per kernel call: one call covers a batch of rows (short rows would
        // otherwise pay the call overhead per row); results land in `tmp`, row-major.
        const BATCH: usize = 32;
        let mut tmp = [0f32; BATCH * TOK];
        let mut t0 = 0;
        while t0 < n_tok {
            let nt = TOK.min(n_tok - t0);
            let mut b0 = r0;
            while b0 < r1 {
                let b1 = (b0 + BATCH).min(r1);
                act.dot_rows(isa, ty, &w[b0 * rb..b1 * rb], rb, t0, nt, bpt, &mut tmp);
                for (r, o) in (b0..b1).enumerate() {
                    for (j, &v) in tmp[r * nt..(r + 1) * nt].iter().enumerate() {
                        // SAFETY: (t0+j, o) is inside ys and only this task owns row o.
                        unsafe { out.write((t0 + j) * n_rows + o, v) };
                    }
                }
                b0 = b1;
            }
            t0 += nt;
        }
    });
}

/// The f32 path of `matmul` for rows `r0..r1`: rows are dequantized once (F16 rows are
/// widened on the fly) and fed, a few tokens at a time, into per-token 32-lane
/// accumulators, exactly as [`dot_f32`] feeds one token.
#[allow(clippy::too_many_arguments)]
fn matmul_f32_tile(
    isa: Isa,
    ty: GgmlType,
    w: &[u8],
    rb: usize,
    n_rows: usize,
    n_cols: usize,
    xs: &[f32],
    n_tok: usize,
    r0: usize,
    r1: usize,
    out: OutPtr,
) {
    let isa = isa.usable();
    let direct_f16 = isa == Isa::Avx2 && ty == GgmlType::F16;
    let mut buf = Vec::new();
    if !direct_f16 {
        buf.resize((r1 - r0) * n_cols, 0f32);
        for (i, o) in (r0..r1).enumerate() {
            dequantize_row_with(
                isa,
                ty,
                &w[o * rb..(o + 1) * rb],
                &mut buf[i * n_cols..(i + 1) * n_cols],
            );
        }
    }
    let mut t0 = 0;
    while t0 < n_tok {
        let nt = TOK_F32.min(n_tok - t0);
        for (i, o) in (r0..r1).enumerate() {
            let mut accs = [fdot::Acc::new(); TOK_F32];
            let xp = |j: usize| xs[(t0 + j) * n_cols..(t0 + j + 1) * n_cols].as_ptr();
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX2+FMA+F16C usable; each xp(j) has n_cols values; the F16 row
                // has 2·n_cols bytes.
                Isa::Avx2 => unsafe {
                    let wrow = &buf[..];
                    match (direct_f16, nt) {
                        (true, 1) => fdot_avx2::feed_f16_multi::<1>(
                            &mut accs,
                            &w[o * rb..(o + 1) * rb],
                            n_cols,
                            [xp(0)],
                        ),
                        (true, 2) => fdot_avx2::feed_f16_multi::<2>(
                            &mut accs,
                            &w[o * rb..(o + 1) * rb],
                            n_cols,
                            [xp(0), xp(1)],
                        ),
                        (true, _) => fdot_avx2::feed_f16_multi::<3>(
                            &mut accs,
                            &w[o * rb..(o + 1) * rb],
                            n_cols,
                            [xp(0), xp(1), xp(2)],
                        ),
                        (false, 1) => fdot_avx2::feed_multi::<1>(
                            &mut accs,
                            &wrow[i * n_cols..(i + 1) * n_cols],
                            [xp(0)],
                        ),
                        (false, 2) => fdot_avx2::feed_multi::<2>(
                            &mut accs,
                            &wrow[i * n_cols..(i + 1) * n_cols],
                            [xp(0), xp(1)],
                        ),
                        (false, _) => fdot_avx2::feed_multi::<3>(
                            &mut accs,
                            &wrow[i * n_cols..(i + 1) * n_cols],
                            [xp(0), xp(1), xp(2)],
                        ),
                    }
                },
                _ => {
                    let wrow = &buf[i * n_cols..(i + 1) * n_cols];
                    for (j, acc) in accs[..nt].iter_mut().enumerate() {
                        let x = &xs[(t0 + j) * n_cols..(t0 + j + 1) * n_cols];
                        for (wc, xc) in wrow.chunks(CHUNK).zip(x.chunks(CHUNK)) {
                            feed(isa, acc, wc, xc);
                        }
                    }
                }
            }
            for (j, acc) in accs[..nt].iter().enumerate() {
                // SAFETY: (t0+j, o) is inside ys and only this task owns row o.
                unsafe { out.write((t0 + j) * n_rows + o, acc.finish()) };
            }
        }
        t0 += nt;
    }
}
