//! Finding out, without panicking, whether the CUDA backend can run here.
//!
//! cudarc loads libcuda/libnvrtc/libcublas lazily and *panics* when one is missing, so every
//! library is probed with its `is_culib_present()` before any other cudarc call, and the whole
//! probe runs under `catch_unwind` as a second line of defence (e.g. a driver too old to export
//! a symbol the bindings expect).

use cudarc::driver::sys::CUdevice_attribute as Attr;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// What the device reports about itself (read once at probe / backend creation).
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceInfo {
    /// CUDA ordinal.
    pub ordinal: usize,
    /// Marketing name, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// Total device memory in bytes.
    pub total_mem: u64,
    /// Free device memory in bytes at probe time.
    pub free_mem: u64,
    /// Streaming multiprocessors.
    pub sm_count: u32,
    /// Compute capability (major, minor).
    pub compute_capability: (u32, u32),
    /// L2 cache bytes (benchmarks size their working sets past it).
    pub l2_bytes: u64,
    /// Driver API version, e.g. 13000 for CUDA 13.0.
    pub driver_version: u32,
    /// NVRTC version (major, minor).
    pub nvrtc_version: (u32, u32),
}

impl DeviceInfo {
    /// Peak memory bandwidth in GB/s used for "fraction of peak" figures: the datasheet number
    /// for the cards this project targets (read off the name, since the driver's clock
    /// attributes under-report HBM3), else `None`.
    pub fn peak_bandwidth_gbs(&self) -> Option<f64> {
        let n = self.name.to_ascii_uppercase();
        if n.contains("H200") {
            Some(4800.0)
        } else if n.contains("H100") && (n.contains("PCIE") || n.contains("NVL")) {
            Some(if n.contains("NVL") { 3900.0 } else { 2000.0 })
        } else if n.contains("H100") {
            Some(3350.0)
        } else if n.contains("A100") {
            Some(if n.contains("80GB") { 2039.0 } else { 1555.0 })
        } else {
            None
        }
    }

    /// NVRTC target for this device, e.g. `sm_86`. Hopper (cc 9.0) gets `sm_90a`, whose
    /// architecture-specific instructions (wgmma) the prefill's `pf_mxw_<t>` needs; such an
    /// image runs on cc 9.0 only, which is the device it is built for.
    pub fn arch(&self) -> String {
        let (major, minor) = self.compute_capability;
        let suffix = if (major, minor) == (9, 0) { "a" } else { "" };
        format!("sm_{major}{minor}{suffix}")
    }
}

impl fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (cc {}.{}, {} SMs, {:.1} GiB, {:.1} GiB free, L2 {} MiB, driver {}.{}, nvrtc {}.{})",
            self.name,
            self.compute_capability.0,
            self.compute_capability.1,
            self.sm_count,
            self.total_mem as f64 / (1u64 << 30) as f64,
            self.free_mem as f64 / (1u64 << 30) as f64,
            self.l2_bytes >> 20,
            self.driver_version / 1000,
            self.driver_version % 1000 / 10,
            self.nvrtc_version.0,
            self.nvrtc_version.1
        )
    }
}

/// Whether the CUDA backend is usable, and if not, why (a sentence meant for the user).
#[derive(Clone, Debug, PartialEq)]
pub enum CudaAvailability {
    /// Device 0 and every library the backend needs were found.
    Available(DeviceInfo),
    /// Not usable; the reason says what is missing.
    Unavailable(String),
}

impl CudaAvailability {
    /// The device, if available.
    pub fn device(&self) -> Option<&DeviceInfo> {
        match self {
            CudaAvailability::Available(d) => Some(d),
            CudaAvailability::Unavailable(_) => None,
        }
    }
}

/// Environment variable that disables the CUDA backend (any non-empty value but "0").
pub const DISABLE_ENV: &str = "DS4_NO_CUDA";

/// Probes device `ordinal`: driver library, a device, NVRTC and cuBLAS. Never panics.
pub fn probe(ordinal: usize) -> CudaAvailability {
    if let Ok(v) = std::env::var(DISABLE_ENV) {
        if !v.is_empty() && v != "0" {
            return CudaAvailability::Unavailable(format!("disabled by {DISABLE_ENV}={v}"));
        }
    }
    match catch_unwind(AssertUnwindSafe(|| probe_inner(ordinal))) {
        Ok(Ok(info)) => CudaAvailability::Available(info),
        Ok(Err(why)) => CudaAvailability::Unavailable(why),
        Err(p) => CudaAvailability::Unavailable(format!(
            "the CUDA libraries failed while probing ({})",
            panic_text(&p)
        )),
    }
}

pub(crate) fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".to_string()
    }
}

/// Which of the run-time libraries are loadable (each probe only dlopens).
pub(crate) fn missing_libraries() -> Vec<&'static str> {
    let mut missing = Vec::new();
    // SAFETY: these only try `dlopen` on candidate names; no symbol is called.
    unsafe {
        if !cudarc::driver::sys::is_culib_present() {
            missing.push("libcuda (the NVIDIA driver)");
        }
        if !cudarc::nvrtc::sys::is_culib_present() {
            missing.push("libnvrtc (CUDA run-time compiler)");
        }
        if !cudarc::cublas::sys::is_culib_present() {
            missing.push("libcublas");
        }
    }
    missing
}

fn probe_inner(ordinal: usize) -> Result<DeviceInfo, String> {
    let missing = missing_libraries();
    if !missing.is_empty() {
        return Err(format!("not found: {}", missing.join(", ")));
    }
    use cudarc::driver::result as dr;
    dr::init().map_err(|e| format!("cuInit failed: {e} (no usable NVIDIA driver/GPU?)"))?;
    let count = dr::device::get_count().map_err(|e| format!("cuDeviceGetCount failed: {e}"))?;
    if count <= 0 {
        return Err("the driver reports no CUDA device".into());
    }
    if ordinal >= count as usize {
        return Err(format!(
            "CUDA device {ordinal} requested but only {count} present"
        ));
    }
    let dev = dr::device::get(ordinal as i32).map_err(|e| format!("cuDeviceGet: {e}"))?;
    let attr = |a: Attr| -> Result<i32, String> {
        // SAFETY: `dev` is a valid device handle from cuDeviceGet.
        unsafe { dr::device::get_attribute(dev, a) }.map_err(|e| format!("{a:?}: {e}"))
    };
    let major = attr(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    let minor = attr(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    if major < 7 {
        return Err(format!(
            "compute capability {major}.{minor} is too old (the kernels need 7.0+)"
        ));
    }
    let sm_count = attr(Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
    let l2 = attr(Attr::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?;
    let name = dr::device::get_name(dev).map_err(|e| format!("cuDeviceGetName: {e}"))?;
    // SAFETY: valid device handle.
    let total_mem = unsafe { dr::device::total_mem(dev) }.map_err(|e| format!("{e}"))?;
    let driver_version = driver_version()?;
    let nvrtc_version = nvrtc_version()?;
    if (driver_version / 1000) < nvrtc_version.0 {
        return Err(format!(
            "the driver supports CUDA {}.{} but NVRTC is {}.{}: its binaries would not load",
            driver_version / 1000,
            driver_version % 1000 / 10,
            nvrtc_version.0,
            nvrtc_version.1
        ));
    }
    // Free memory needs a context; the primary context is shared with the backend later.
    let ctx = cudarc::driver::CudaContext::new(ordinal).map_err(|e| format!("context: {e}"))?;
    let (free_mem, _) = ctx
        .mem_get_info()
        .map_err(|e| format!("cuMemGetInfo: {e}"))?;
    Ok(DeviceInfo {
        ordinal,
        name,
        total_mem: total_mem as u64,
        free_mem: free_mem as u64,
        sm_count: sm_count as u32,
        compute_capability: (major as u32, minor as u32),
        l2_bytes: l2 as u64,
        driver_version,
        nvrtc_version,
    })
}

fn driver_version() -> Result<u32, String> {
    let mut v = 0i32;
    // SAFETY: plain out-parameter call into the loaded driver.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) }
        .result()
        .map_err(|e| format!("cuDriverGetVersion: {e}"))?;
    Ok(v as u32)
}

pub(crate) fn nvrtc_version() -> Result<(u32, u32), String> {
    let (mut a, mut b) = (0i32, 0i32);
    // SAFETY: plain out-parameter call into the loaded NVRTC.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut a, &mut b) }
        .result()
        .map_err(|e| format!("nvrtcVersion: {e:?}"))?;
    Ok((a as u32, b as u32))
}
