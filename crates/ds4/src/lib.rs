//! ds4: a native inference engine for DeepSeek V4 Flash.
//!
//! Layout (one module per concern, see `../../shared/spec/model.md` for the model):
//! * [`gguf`]: zero-copy GGUF v3 reader over memmap2, and a writer.
//! * [`quant`]: block formats (Q8_0, Q2_K, Q4_K, IQ2_XXS, Q8_K, F16, BF16), dequantization,
//!   quantization and dot-product kernels (scalar reference + SIMD twins).
//! * [`tokenizer`]: byte-level BPE with the DeepSeek V4 pre-tokenizer.
//! * [`chat`]: DeepSeek V4 chat rendering and DSML output parsing.
//! * [`model`]: config from GGUF metadata, weight binding, forward pass, sessions.
//! * [`backend`]: GPU backends (CUDA), loaded at run time; absent GPUs mean a clean fallback.
//!
//! The library has no HTTP or async code; `ds4` (CLI) and `ds4-server` are thin layers.

pub mod backend;
pub mod chat;
pub mod gguf;
pub mod model;
pub mod quant;
pub mod sample;
pub mod synth;
pub mod tokenizer;
