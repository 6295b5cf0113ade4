//! Compute backends other than the CPU reference (which lives in [`crate::quant`] and
//! [`crate::model`]).
//!
//! * [`cuda`]: NVIDIA GPUs through the CUDA driver API, NVRTC and cuBLAS, all loaded at run
//!   time, so this module compiles (and its probe answers "unavailable, because …") on machines
//!   without CUDA.

pub mod cuda;
