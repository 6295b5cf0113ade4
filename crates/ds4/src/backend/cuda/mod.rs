//! CUDA backend (issue 5): runtime probe, kernel build/cache, weight upload and the quantized
//! matrix kernels, checked against the CPU reference on random data.
//!
//! Pieces:
//! * [`probe`]: can CUDA run here, and if not, why (never panics; cudarc itself panics on a
//!   missing library, so libraries are probed before any other call).
//! * [`cache`] + [`compile`]: `kernels/*.cu` are embedded with `include_str!`, compiled by
//!   NVRTC to a cubin for the device's architecture on first use and cached on disk under a
//!   key hashing source, architecture, NVRTC version and options.
//! * [`CudaBackend`]: one device, one stream, the kernel module and a cuBLAS handle; weight
//!   upload ([`CudaBackend::upload_weight`], from mmap slices, with progress) and the launches:
//!   `matvec`, `moe_matvec` (all selected experts in one launch), `matmul` (prefill on CUDA
//!   cores, exact f32 activations), `matmul_gemm` (dequantize to f16 + cuBLAS), dequantize.
//! * [`check`]: self-test and benchmarks used by `ds4 cuda selftest|bench` and the tests.
//!
//! How the GPU forward pass (a later step) will use this: at load, every tensor of
//! `model::weights` is uploaded once with `upload_weight` (routed experts as one
//! `n_experts = 256` stack each, so `moe_matvec` indexes them by id); activations, KV cache
//! and scratch are `CudaSlice<f32>` buffers allocated once per session; a decode step queues
//! only launches on the backend's stream (router top-k writes the expert ids on the device, so
//! `moe_matvec` reads them without a host round trip), which makes the step capturable as a
//! CUDA graph (the stream is a created stream for that reason); only the sampled token comes
//! back. Prefill uses `matmul_gemm` for large batches and `matmul` for small ones. The
//! remaining ops (norms, RoPE, HC Sinkhorn, attention, compressor/indexer, sampling) become
//! further kernels in `kernels/` with launch functions here, in the same style.
//!
//! Determinism: every kernel reduces in a fixed order (warp shuffles, no atomics), so the same
//! inputs give bit-identical outputs from run to run; the self-test checks it.

pub mod attn;
pub mod cache;
pub mod check;
pub mod compile;
mod device;
pub mod parity;
pub mod prefill;
pub mod probe;
pub mod session;

pub use device::{
    repack_q8_0, ActQuant, CudaBackend, CudaError, GemmScratch, GpuWeight, Result, SUPPORTED_TYPES,
};
pub use probe::{probe, CudaAvailability, DeviceInfo};
pub use session::{GpuModel, GpuSession, Narrowed, NARROW_CAP};

/// Re-export of the cudarc buffer types used in the launch API, so callers need not depend
/// on cudarc directly.
pub use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};
