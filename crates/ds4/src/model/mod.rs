//! The DeepSeek V4 Flash model: config, weights, forward pass, sessions (model.md §1-§4).

mod attention;
pub(crate) mod cache;
pub mod config;
mod forward;
pub(crate) mod hc;
mod linear;
mod moe;
pub(crate) mod ops;
mod options;
pub(crate) mod params;
pub mod rope;
mod session;
mod snapshot;
pub mod weights;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::gguf::{GgufFile, TensorInfo};
use crate::quant::GgmlType;
pub use config::Config;
pub use options::{BackendChoice, EngineOptions, DEFAULT_PREFILL_CHUNK, MAX_CTX};
use params::Params;
pub use session::{Session, SessionError};
pub use weights::{ExpertQuant, Weights};

/// A loaded model: the mapped file, its hyperparameters and bound weights.
pub struct Model {
    pub file: Arc<GgufFile>,
    pub cfg: Config,
    pub weights: Weights,
    /// Small tensors decoded to f32 and RoPE tables, for the forward pass.
    pub(crate) params: Params,
    /// The weights on the GPU, once a CUDA session asked for them.
    pub(crate) gpu: crate::backend::GpuSlot,
}

impl Model {
    /// Opens (memory-maps) and validates a model file.
    pub fn open(path: impl AsRef<Path>) -> Result<Model, String> {
        let path = path.as_ref();
        let file = GgufFile::open(path).map_err(|e| e.to_string())?;
        Model::from_gguf(Arc::new(file)).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Validates and binds an already parsed file (e.g. a model generated in memory).
    pub fn from_gguf(file: Arc<GgufFile>) -> Result<Model, String> {
        let cfg = Config::from_gguf(&file).map_err(|e| format!("invalid model metadata:\n{e}"))?;
        let weights = Weights::bind(&cfg, &file)?;
        let params = Params::load(&cfg, &file, &weights)?;
        Ok(Model {
            file,
            cfg,
            weights,
            params,
            gpu: Default::default(),
        })
    }

    /// Uploads the weights to the GPU now (they are otherwise uploaded by the first CUDA
    /// session), reporting `progress(done, total)` in bytes. Returns why not, if it cannot.
    pub fn upload_cuda(
        &self,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Arc<crate::backend::cuda::GpuModel>, String> {
        self.gpu.get_or_upload(self, progress)
    }

    /// The bytes of a bound tensor.
    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        self.file.tensor_data(t)
    }

    /// Bytes per tensor type over the whole file, e.g. for the startup "quant mix" line.
    pub fn quant_mix(&self) -> BTreeMap<&'static str, (usize, u64)> {
        let mut m = BTreeMap::new();
        for t in self.file.tensors() {
            let e = m.entry(t.ty.name()).or_insert((0usize, 0u64));
            e.0 += 1;
            e.1 += t.n_bytes;
        }
        m
    }

    /// Routed-expert type of the first layer (the published files use one type throughout).
    pub fn expert_types(&self) -> (GgmlType, GgmlType) {
        let l = &self.weights.layers[0];
        (l.ffn_gate_exps.ty, l.ffn_down_exps.ty)
    }
}
