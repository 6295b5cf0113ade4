//! Golden tests against the reference fixtures (reference README §1): exact mode, three runs
//! per fixture (full prefill, the fixture's chunk schedule, decode), each in a fresh session.

mod golden_support;

use ds4::model::{EngineOptions, Session};
use golden_support::{Compare, Fixture};

/// The three runs of README §1 with the given options; returns (prefill, chunked, decode).
fn run_fixture(f: &Fixture, opts: &EngineOptions) -> (Compare, Compare, Compare) {
    let new = || Session::new(f.model.clone(), opts.clone()).unwrap();

    let mut s = new();
    let full = s.prefill_logits(&f.prompt).unwrap();
    let prefill = Compare::new(&full, &f.prefill_logits, f.vocab);

    let mut s = new();
    let mut got = Vec::new();
    let mut at = 0;
    for &n in &f.chunks {
        got.extend(s.prefill_logits(&f.prompt[at..at + n]).unwrap());
        at += n;
    }
    assert_eq!(at, f.prompt.len());
    let chunked = Compare::new(&got, &f.chunked_logits, f.vocab);

    let mut s = new();
    s.prefill(&f.prompt).unwrap();
    let mut got = Vec::new();
    for &t in &f.decode_ids {
        s.decode(t).unwrap();
        got.extend_from_slice(s.logits());
    }
    let decode = Compare::new(&got, &f.decode_logits, f.vocab);
    (prefill, chunked, decode)
}

fn exact_fixture(name: &str) {
    let f = Fixture::load(name);
    assert!(!f.qat_sim);
    let (p, c, d) = run_fixture(&f, &EngineOptions::exact(false));
    println!("{name} exact prefill: {}", p.summary());
    println!("{name} exact chunked: {}", c.summary());
    println!("{name} exact decode:  {}", d.summary());
    p.assert_exact(&format!("{name} prefill"));
    c.assert_exact(&format!("{name} chunked"));
    d.assert_exact(&format!("{name} decode"));
}

#[test]
fn golden_tiny_f32_exact() {
    exact_fixture("tiny-f32");
}

#[test]
fn golden_tiny_q2_exact() {
    exact_fixture("tiny-q2");
}

#[test]
fn golden_tiny_q4_exact() {
    exact_fixture("tiny-q4");
}

/// README §1, QAT on: rows of the three runs pooled; top-1 agreement ≥ 0.98 and median of
/// the per-row max abs error ≤ 0.01.
#[test]
fn golden_tiny_q2_qat() {
    let f = Fixture::load("tiny-q2-qat");
    assert!(f.qat_sim);
    let (p, c, d) = run_fixture(&f, &EngineOptions::exact(true));
    println!("tiny-q2-qat prefill: {}", p.summary());
    println!("tiny-q2-qat chunked: {}", c.summary());
    println!("tiny-q2-qat decode:  {}", d.summary());
    let mut pooled = p;
    pooled.merge(&c);
    pooled.merge(&d);
    println!("tiny-q2-qat pooled:  {}", pooled.summary());
    assert!(pooled.top1_rate() >= 0.98, "{}", pooled.summary());
    assert!(pooled.median_abs() <= 0.01, "{}", pooled.summary());
}
