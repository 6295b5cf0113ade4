//! `DS4_NO_CUDA` disables the CUDA backend with a reason. A separate test binary (own
//! process) because it changes the environment, which other tests' probes would see.

use ds4::backend::cuda::{probe, CudaAvailability};

#[test]
fn disabled_by_env_is_reported() {
    // The variable is read at probe time; this test sets it only for its own probe call.
    std::env::set_var("DS4_NO_CUDA", "1");
    let r = probe(0);
    std::env::remove_var("DS4_NO_CUDA");
    match r {
        CudaAvailability::Unavailable(why) => assert!(why.contains("DS4_NO_CUDA"), "{why}"),
        CudaAvailability::Available(_) => panic!("DS4_NO_CUDA=1 must disable the backend"),
    }
}
