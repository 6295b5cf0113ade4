//! Compute backends other than the CPU reference (which lives in [`crate::quant`] and
//! [`crate::model`]).
//!
//! * [`cuda`]: NVIDIA GPUs through the CUDA driver API, NVRTC and cuBLAS, all loaded at run
//!   time, so this module compiles (and its probe answers "unavailable, because …") on machines
//!   without CUDA.

pub mod cuda;

use std::sync::{Arc, Mutex};

/// A model's weights on the GPU, uploaded on first use and shared by its sessions; a failed
/// upload is remembered (with its reason) so that automatic backend choice does not retry
/// it for every session.
#[derive(Default)]
pub struct GpuSlot(Mutex<Option<Result<Arc<cuda::GpuModel>, String>>>);

impl GpuSlot {
    /// The uploaded model, uploading it now (with `progress(done, total)` in bytes) if this
    /// is the first call.
    pub fn get_or_upload(
        &self,
        model: &crate::model::Model,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Arc<cuda::GpuModel>, String> {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                cuda::GpuModel::new(model, progress)
            }));
            *g = Some(match r {
                Ok(Ok(m)) => Ok(Arc::new(m)),
                Ok(Err(e)) => Err(e.to_string()),
                Err(p) => Err(format!(
                    "CUDA library failure during upload ({})",
                    cuda::probe::panic_text(&p)
                )),
            });
        }
        g.as_ref().expect("just set").clone()
    }
}
