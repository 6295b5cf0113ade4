//! CUDA backend tests. Without a GPU (CI) the GPU tests print why they skip and pass; the
//! probe test runs everywhere and checks that a missing CUDA is reported, not a panic.

use ds4::backend::cuda::check::{backend_for_tests, selftest};
use ds4::backend::cuda::{probe, CudaAvailability};

#[test]
fn probe_never_panics_and_explains() {
    match probe(0) {
        CudaAvailability::Available(d) => {
            assert!(d.sm_count > 0 && d.total_mem > 0, "{d}");
            eprintln!("CUDA device: {d}");
        }
        CudaAvailability::Unavailable(why) => {
            assert!(!why.is_empty());
            eprintln!("CUDA unavailable: {why}");
        }
    }
}

#[test]
fn gpu_kernels_match_cpu_reference() {
    let Some(be) = backend_for_tests().expect("CUDA present but the backend failed to start")
    else {
        return;
    };
    let rows = selftest(&be, 42, true).expect("selftest ran");
    let failed: Vec<String> = rows.iter().filter(|r| !r.pass).map(|r| r.csv()).collect();
    assert!(failed.is_empty(), "failed checks:\n{}", failed.join("\n"));
}
