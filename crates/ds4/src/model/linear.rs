//! Weight matrices as views into the mapped file, multiplied through the quant kernels.

use super::Model;
use crate::gguf::TensorInfo;
use crate::quant::{self, GgmlType};

/// A row-major `rows × cols` weight matrix of any supported type (GGUF `[cols, rows, ...]`,
/// model.md §0: row `o` produces output `o`).
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub ty: GgmlType,
    pub data: &'a [u8],
    pub rows: usize,
    pub cols: usize,
}

impl<'a> Mat<'a> {
    /// The whole tensor; higher GGUF axes (e.g. the expert axis) are folded into rows.
    pub fn new(model: &'a Model, t: &TensorInfo) -> Mat<'a> {
        let cols = t.dims.first().copied().unwrap_or(1) as usize;
        let rows = t.dims.iter().skip(1).product::<u64>() as usize;
        Mat {
            ty: t.ty,
            data: model.data(t),
            rows,
            cols,
        }
    }

    fn row_bytes(&self) -> usize {
        self.cols / self.ty.block_elems() * self.ty.block_bytes()
    }

    /// Rows `r0..r1` as a matrix of their own.
    pub fn slice_rows(&self, r0: usize, r1: usize) -> Mat<'a> {
        let rb = self.row_bytes();
        Mat {
            data: &self.data[r0 * rb..r1 * rb],
            rows: r1 - r0,
            ..*self
        }
    }

    /// Expert `e` of a `[cols, rows_per_expert, n_expert]` tensor (model.md §6.19).
    pub fn expert(&self, e: usize, rows_per_expert: usize) -> Mat<'a> {
        self.slice_rows(e * rows_per_expert, (e + 1) * rows_per_expert)
    }

    /// `ys[t] = W·xs[t]` for `n` tokens (`xs` is `n × cols`, `ys` is `n × rows`). One token
    /// uses the matrix-vector kernel, more the batched one (same results per token).
    /// `exact = false` quantizes the activations the ds4 way.
    pub fn apply(&self, xs: &[f32], n: usize, ys: &mut [f32], exact: bool) {
        let (xs, ys) = (&xs[..n * self.cols], &mut ys[..n * self.rows]);
        match n {
            0 => {}
            1 => quant::matvec(self.ty, self.data, self.rows, self.cols, xs, ys, exact),
            _ => quant::matmul(self.ty, self.data, self.rows, self.cols, xs, n, ys, exact),
        }
    }

    /// Dequantizes row `r` into `out` (`cols` values).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let rb = self.row_bytes();
        quant::dequantize_row(self.ty, &self.data[r * rb..(r + 1) * rb], out);
    }
}
