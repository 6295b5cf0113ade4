//! Whole-model tests with one body for both backends: the golden fixtures (README §1 exact
//! criteria) and snapshot round trips through `Session`, run on the CPU always and on the
//! GPU when one is usable (skipped, with the reason, otherwise). Also: an explicit CUDA
//! request without a GPU is an error, never a panic, and `Auto` falls back to the CPU.

mod golden_support;

use ds4::backend::cuda::{probe, CudaAvailability};
use ds4::model::{BackendChoice, EngineOptions, Session, SessionError};
use golden_support::{Compare, Fixture};

fn gpu_present() -> bool {
    match probe(0) {
        CudaAvailability::Available(_) => true,
        CudaAvailability::Unavailable(why) => {
            eprintln!("skipping the CUDA variant: {why}");
            false
        }
    }
}

/// Golden fixture `name` on `backend`: full prefill, the chunk schedule and decode, each
/// within README §1's exact criteria.
fn golden_body(name: &str, backend: BackendChoice) {
    let f = Fixture::load(name);
    let opts = EngineOptions::exact(f.qat_sim).with_backend(backend);
    let new = || Session::new(f.model.clone(), opts.clone()).unwrap();
    let mut s = new();
    assert_eq!(s.backend(), backend);
    let full = s.prefill_logits(&f.prompt).unwrap();
    Compare::new(&full, &f.prefill_logits, f.vocab).assert_exact(&format!("{name} prefill"));
    let mut s = new();
    let mut got = Vec::new();
    let mut at = 0;
    for &n in &f.chunks {
        got.extend(s.prefill_logits(&f.prompt[at..at + n]).unwrap());
        at += n;
    }
    Compare::new(&got, &f.chunked_logits, f.vocab).assert_exact(&format!("{name} chunked"));
    // Decode, with a snapshot/restore round trip halfway through.
    let mut s = new();
    s.prefill(&f.prompt).unwrap();
    let mut got = Vec::new();
    let half = f.decode_ids.len() / 2;
    for (i, &t) in f.decode_ids.iter().enumerate() {
        if i == half {
            let bytes = s.snapshot();
            s = Session::restore(f.model.clone(), opts.clone(), &bytes).unwrap();
            assert_eq!(s.backend(), backend);
        }
        s.decode(t).unwrap();
        got.extend_from_slice(s.logits());
    }
    Compare::new(&got, &f.decode_logits, f.vocab).assert_exact(&format!("{name} decode"));
}

fn both(name: &str) {
    golden_body(name, BackendChoice::Cpu);
    if gpu_present() {
        golden_body(name, BackendChoice::Cuda);
    }
}

#[test]
fn golden_tiny_f32_both_backends() {
    both("tiny-f32");
}

#[test]
fn golden_tiny_q2_both_backends() {
    both("tiny-q2");
}

#[test]
fn golden_tiny_q4_both_backends() {
    both("tiny-q4");
}

/// A snapshot written on one backend restores on the other and continues identically (exact
/// mode), when a GPU is present.
#[test]
fn snapshot_crosses_backends() {
    if !gpu_present() {
        return;
    }
    let f = Fixture::load("tiny-q2");
    let cpu = EngineOptions::exact(false).with_backend(BackendChoice::Cpu);
    let gpu = EngineOptions::exact(false).with_backend(BackendChoice::Cuda);
    for (from, to) in [(&cpu, &gpu), (&gpu, &cpu)] {
        let mut a = Session::new(f.model.clone(), from.clone()).unwrap();
        a.prefill(&f.prompt).unwrap();
        let mut b = Session::restore(f.model.clone(), to.clone(), &a.snapshot()).unwrap();
        let mut got = Vec::new();
        for &t in &f.decode_ids {
            b.decode(t).unwrap();
            got.extend_from_slice(b.logits());
        }
        Compare::new(&got, &f.decode_logits, f.vocab).assert_exact("restored decode");
    }
}

/// Without a GPU: explicit CUDA is a clean error and Auto runs on the CPU.
#[test]
fn no_gpu_is_an_error_or_a_fallback() {
    if matches!(probe(0), CudaAvailability::Available(_)) {
        return;
    }
    let f = Fixture::load("tiny-f32");
    let opts = EngineOptions::exact(false).with_backend(BackendChoice::Cuda);
    match Session::new(f.model.clone(), opts) {
        Err(SessionError::Backend(why)) => assert!(!why.is_empty()),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("CUDA session without a GPU"),
    }
    let s = Session::new(
        f.model.clone(),
        EngineOptions::exact(false).with_backend(BackendChoice::Auto),
    )
    .unwrap();
    assert_eq!(s.backend(), BackendChoice::Cpu);
}
