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
//! Environment switches (all on by default; `=0` turns a path off, for comparisons and
//! bisecting — none is needed in normal use): `DS4_CUDA_GRAPH` (decode graph replay),
//! `DS4_CUDA_PDL` (programmatic dependent launch inside decode graphs), `DS4_CUDA_INT8` (int8
//! activations in production decode), `DS4_CUDA_HC1` (multi-block HC pre with fused
//! quantization), `DS4_CUDA_MV8W` (16-byte-load Q8_0 int8 matvecs), `DS4_CUDA_GEMM`
//! (tensor-core products in production prefill), `DS4_CUDA_PF_MM` (the fused grouped expert
//! kernel; off = per-expert dequantize + cuBLAS), `DS4_CUDA_ROUTER_SGEMM` (router product as
//! an f32 cuBLAS GEMM), `DS4_CUDA_ATT_TC` (tensor-core attention in production prefill);
//! `DS4_CUDA_ATT_SPLIT=N` overrides the decode attention split. `DS4_CUDA_CACHE=DIR` moves
//! the kernel cache (empty: no cache) and `DS4_CUDA_PTXAS_VERBOSE` prints register use.
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

/// Whether the comparison switch `name` (a `DS4_CUDA_*` variable, see the module docs) leaves
/// its path on: anything but `0`, or unset.
pub(crate) fn switch_on(name: &str) -> bool {
    std::env::var(name).map_or(true, |v| v != "0")
}
