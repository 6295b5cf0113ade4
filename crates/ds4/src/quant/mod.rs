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
    let nb = row_bytes(ty, dst.len());
    assert_eq!(
        src.len(),
        nb,
        "{ty}: {} bytes for {} elements (expected {nb})",
        src.len(),
        dst.len()
    );
    match ty {
        GgmlType::F32 => f16::dequantize_f32(src, dst),
        GgmlType::F16 => f16::dequantize_f16(src, dst),
        GgmlType::BF16 => f16::dequantize_bf16(src, dst),
        GgmlType::I32 => f16::dequantize_i32(src, dst),
        GgmlType::Q8_0 => q8_0::dequantize(src, dst),
        GgmlType::Q2_K => q2_k::dequantize(src, dst),
        GgmlType::Q4_K => q4_k::dequantize(src, dst),
        GgmlType::Q8_K => q8_k::dequantize(src, dst),
        GgmlType::IQ2_XXS => iq2_xxs::dequantize(src, dst),
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
    for (o, c) in out.iter_mut().zip(x.chunks_exact(QK8_0)) {
        *o = q8_0::quantize_act_block(c);
    }
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
    for (o, c) in out.iter_mut().zip(x.chunks_exact(QK_K)) {
        q8_k::quantize_block(c, o);
    }
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
    let chunk_bytes = CHUNK / ty.block_elems() * ty.block_bytes();
    let mut acc = fdot::Acc::new();
    let mut buf = [0f32; CHUNK];
    for (xc, rc) in x.chunks(CHUNK).zip(row.chunks(chunk_bytes)) {
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx2 && ty == GgmlType::F16 && xc.len() == CHUNK {
            // SAFETY: AVX2+FMA+F16C checked by `usable`; rc has 2·CHUNK bytes.
            unsafe { fdot_avx2::feed_f16(&mut acc, rc, xc) };
            continue;
        }
        let w = &mut buf[..xc.len()];
        dequantize_row(ty, rc, w);
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
    assert_eq!(
        row.len(),
        xq.len() * ty.block_bytes(),
        "{ty} dot: row/activation length mismatch"
    );
    let isa = isa.usable();
    match (isa, ty) {
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

/// A quantized activation vector (or several, token-major) in the form a weight type needs.
enum Act {
    /// Exact path: the f32 activations themselves.
    F32,
    Q8_0(Vec<BlockQ8_0Act>),
    Q8K(Vec<BlockQ8K>),
}

impl Act {
    fn new(ty: GgmlType, xs: &[f32], exact: bool) -> Act {
        match ty {
            _ if exact => Act::F32,
            GgmlType::Q8_0 => Act::Q8_0(quantize_act_q8_0(xs)),
            GgmlType::Q2_K | GgmlType::Q4_K | GgmlType::IQ2_XXS => Act::Q8K(quantize_act_q8_k(xs)),
            _ => Act::F32,
        }
    }

    /// Quantized dot of `row` with token `t` (blocks per token `bpt`); `None` in f32 mode.
    fn dot(&self, isa: Isa, ty: GgmlType, row: &[u8], t: usize, bpt: usize) -> Option<f32> {
        match self {
            Act::F32 => None,
            Act::Q8_0(v) => Some(dot_q8_0_with(isa, row, &v[t * bpt..(t + 1) * bpt])),
            Act::Q8K(v) => Some(dot_q8_k_with(isa, ty, row, &v[t * bpt..(t + 1) * bpt])),
        }
    }
}

/// Rows per parallel task of `matvec`.
const MATVEC_ROWS: usize = 16;
/// Rows per parallel task of `matmul`: each tile's rows are dequantized once and stay in
/// L1/L2 while every token is dotted against them.
const MATMUL_ROWS: usize = 8;

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

/// Matrix-vector product `y[o] = row_o(w) · x` over a row-major `n_rows × n_cols` weight
/// matrix of type `ty`, parallel over rows (rayon).
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
    let isa = Isa::detect();
    let act = Act::new(ty, x, exact);
    let bpt = n_cols / ty.block_elems();
    y.par_chunks_mut(MATVEC_ROWS)
        .enumerate()
        .for_each(|(ci, ys)| {
            for (i, yo) in ys.iter_mut().enumerate() {
                let o = ci * MATVEC_ROWS + i;
                let row = &w[o * rb..(o + 1) * rb];
                *yo = act
                    .dot(isa, ty, row, 0, bpt)
                    .unwrap_or_else(|| dot_f32_with(isa, ty, row, x));
            }
        });
}

/// Batched product for prefill: `ys[t][o] = row_o(w) · xs[t]` with `xs` `n_tok × n_cols`
/// and `ys` `n_tok × n_rows`, both row-major. Parallel over tiles of weight rows; each row
/// is read (and in f32 mode dequantized) once and dotted against all tokens. Results equal
/// [`matvec`] per token exactly, in both modes (same kernels, same accumulation order).
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
    let act = Act::new(ty, xs, exact);
    let bpt = n_cols / ty.block_elems();
    // Row-major by weight row (n_rows × n_tok) so each tile writes a contiguous slice;
    // transposed into `ys` afterwards (cheap next to the dots).
    let mut yt = vec![0f32; n_rows * n_tok];
    yt.par_chunks_mut(MATMUL_ROWS * n_tok)
        .enumerate()
        .for_each(|(ci, out)| {
            let mut rowbuf = Vec::new();
            for (i, orow) in out.chunks_exact_mut(n_tok).enumerate() {
                let o = ci * MATMUL_ROWS + i;
                let row = &w[o * rb..(o + 1) * rb];
                if let Act::F32 = act {
                    rowbuf.resize(n_cols, 0.0);
                    dequantize_row(ty, row, &mut rowbuf);
                    for (t, yo) in orow.iter_mut().enumerate() {
                        let x = &xs[t * n_cols..(t + 1) * n_cols];
                        let mut acc = fdot::Acc::new();
                        for (wc, xc) in rowbuf.chunks(CHUNK).zip(x.chunks(CHUNK)) {
                            feed(isa, &mut acc, wc, xc);
                        }
                        *yo = acc.finish();
                    }
                } else {
                    for (t, yo) in orow.iter_mut().enumerate() {
                        *yo = act.dot(isa, ty, row, t, bpt).unwrap_or(0.0);
                    }
                }
            }
        });
    ys.par_chunks_mut(n_rows).enumerate().for_each(|(t, yrow)| {
        for (o, v) in yrow.iter_mut().enumerate() {
            *v = yt[o * n_tok + t];
        }
    });
}
