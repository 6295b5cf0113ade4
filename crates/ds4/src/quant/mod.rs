//! Quantized block formats, dequantization, quantization and dot-product kernels
//! (model.md §5). One file per format; scalar references beside SIMD twins.

mod types;
pub use types::GgmlType;
