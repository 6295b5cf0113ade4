//! Session behaviour: chunking independence, snapshot/restore, context limits, bad input,
//! cancellation, and production numerics against exact mode.

mod golden_support;

use ds4::model::{EngineOptions, Session, SessionError, MAX_CTX};
use golden_support::{Compare, Fixture};

/// Small deterministic generator for chunk schedules and corruptions.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn random_schedule(rng: &mut Lcg, total: usize) -> Vec<usize> {
    let mut v = Vec::new();
    let mut left = total;
    while left > 0 {
        let n = match rng.below(4) {
            0 => 1,
            1 => 1 + rng.below(8),
            2 => 1 + rng.below(40),
            _ => 1 + rng.below(150),
        }
        .min(left);
        v.push(n);
        left -= n;
    }
    v
}

fn chunked_logits(f: &Fixture, opts: &EngineOptions, schedule: &[usize]) -> Vec<f32> {
    let mut s = Session::new(f.model.clone(), opts.clone()).unwrap();
    let mut out = Vec::new();
    let mut at = 0;
    for &n in schedule {
        out.extend(s.prefill_logits(&f.prompt[at..at + n]).unwrap());
        at += n;
    }
    out
}

/// Any chunk schedule gives the same logits as one prefill, in both numeric modes (the
/// engine is built so that they are bit-identical).
#[test]
fn chunking_does_not_change_results() {
    let f = Fixture::load("tiny-q2");
    let mut rng = Lcg(7);
    for opts in [EngineOptions::exact(false), EngineOptions::production()] {
        let whole = chunked_logits(&f, &opts, &[f.prompt.len()]);
        for _ in 0..3 {
            let schedule = random_schedule(&mut rng, f.prompt.len());
            let got = chunked_logits(&f, &opts, &schedule);
            let c = Compare::new(&got, &whole, f.vocab);
            println!(
                "exact={} schedule {schedule:?}: {}",
                opts.exact,
                c.summary()
            );
            assert_eq!(got, whole, "exact={} schedule {schedule:?}", opts.exact);
        }
    }
}

/// A small internal prefill chunk gives the same result as a large one.
#[test]
fn internal_prefill_chunk_does_not_change_results() {
    let f = Fixture::load("tiny-f32");
    let mut a = Session::new(f.model.clone(), EngineOptions::exact(false)).unwrap();
    let opts = EngineOptions {
        prefill_chunk: 37,
        ..EngineOptions::exact(false)
    };
    let mut b = Session::new(f.model.clone(), opts).unwrap();
    a.prefill(&f.prompt).unwrap();
    b.prefill(&f.prompt).unwrap();
    assert_eq!(a.logits(), b.logits());
    assert_eq!(a.pos(), f.prompt.len());
    assert_eq!(b.tokens(), &f.prompt[..]);
}

fn continue_run(s: &mut Session, rest: &[u32], decode: &[u32]) -> Vec<f32> {
    let mut out = s.prefill_logits(rest).unwrap();
    for &t in decode {
        s.decode(t).unwrap();
        out.extend_from_slice(s.logits());
    }
    out
}

/// snapshot → restore → continue equals the uninterrupted run, for cuts inside compressor
/// windows and right after a ratio-128 row closes; in exact+QAT and production modes.
#[test]
fn snapshot_restore_continue_equals_uninterrupted() {
    let f = Fixture::load("tiny-q2");
    for opts in [EngineOptions::exact(true), EngineOptions::production()] {
        let mut base = Session::new(f.model.clone(), opts.clone()).unwrap();
        let want = continue_run(&mut base, &f.prompt, &f.decode_ids);
        for cut in [0, 1, 5, 128, 203] {
            let mut s = Session::new(f.model.clone(), opts.clone()).unwrap();
            s.prefill(&f.prompt[..cut]).unwrap();
            let snap = s.snapshot();
            drop(s);
            let mut r = Session::restore(f.model.clone(), opts.clone(), &snap).unwrap();
            assert_eq!(r.pos(), cut);
            assert_eq!(r.snapshot(), snap, "re-snapshot of a restored session");
            let mut got = vec![0f32; 0];
            if cut > 0 {
                got.extend_from_slice(&want[(cut - 1) * f.vocab..cut * f.vocab]);
                assert_eq!(r.logits(), &got[..], "restored logits at cut {cut}");
                got.clear();
            }
            got.extend(continue_run(&mut r, &f.prompt[cut..], &f.decode_ids));
            assert_eq!(
                got,
                want[cut * f.vocab..],
                "cut {cut}, exact={}",
                opts.exact
            );
        }
    }
}

/// Corrupt or foreign snapshots give errors, never panics.
#[test]
fn corrupt_snapshots_are_refused_without_panicking() {
    let f = Fixture::load("tiny-f32");
    let opts = EngineOptions::exact(false);
    let mut s = Session::new(f.model.clone(), opts.clone()).unwrap();
    s.prefill(&f.prompt[..41]).unwrap();
    let snap = s.snapshot();
    // Every truncation.
    for n in (0..snap.len())
        .step_by(97)
        .chain(snap.len() - 9..snap.len())
    {
        assert!(
            matches!(
                Session::restore(f.model.clone(), opts.clone(), &snap[..n]),
                Err(SessionError::Snapshot(_))
            ),
            "truncated to {n}"
        );
    }
    // Trailing garbage, wrong mode, wrong model, small context.
    let mut long = snap.clone();
    long.push(0);
    assert!(Session::restore(f.model.clone(), opts.clone(), &long).is_err());
    assert!(Session::restore(f.model.clone(), EngineOptions::production(), &snap).is_err());
    let q2 = Fixture::load("tiny-q2");
    assert!(Session::restore(q2.model.clone(), opts.clone(), &snap).is_err());
    let small = opts.clone().with_ctx(40);
    assert!(matches!(
        Session::restore(f.model.clone(), small, &snap),
        Err(SessionError::ContextFull { .. })
    ));
    // Random byte corruption in the header and counts: error or a session, never a panic.
    let mut rng = Lcg(99);
    for _ in 0..300 {
        let mut b = snap.clone();
        for _ in 0..1 + rng.below(3) {
            let i = rng.below(200.min(b.len()));
            b[i] = rng.next() as u8;
        }
        if let Ok(mut r) = Session::restore(f.model.clone(), opts.clone(), &b) {
            r.decode(1).unwrap();
        }
    }
    // Huge counts must not allocate or panic.
    let mut b = snap.clone();
    let tok_count_at = 8 + 4 + 4 * (8 + 6) + 2;
    b[tok_count_at..tok_count_at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(Session::restore(f.model.clone(), opts.clone().with_ctx(MAX_CTX), &b).is_err());
}

/// A request beyond the configured context is refused whole (no truncation, no state change).
#[test]
fn prompt_longer_than_ctx_is_refused() {
    let f = Fixture::load("tiny-f32");
    let opts = EngineOptions::exact(false).with_ctx(100);
    let mut s = Session::new(f.model.clone(), opts).unwrap();
    let e = s.prefill(&f.prompt[..101]).unwrap_err();
    assert_eq!(
        e,
        SessionError::ContextFull {
            pos: 0,
            n: 101,
            ctx: 100
        }
    );
    assert_eq!(s.pos(), 0);
    s.prefill(&f.prompt[..99]).unwrap();
    assert!(s.prefill(&f.prompt[..2]).is_err());
    assert_eq!(s.pos(), 99);
    s.decode(5).unwrap();
    assert!(matches!(s.decode(5), Err(SessionError::ContextFull { .. })));
    assert_eq!(s.pos(), 100);
}

#[test]
fn bad_tokens_and_options_are_errors() {
    let f = Fixture::load("tiny-f32");
    let mut s = Session::new(f.model.clone(), EngineOptions::exact(false)).unwrap();
    let e = s.prefill(&[1, 2, 320, 3]).unwrap_err();
    assert!(
        matches!(
            e,
            SessionError::BadToken {
                token: 320,
                index: 2,
                ..
            }
        ),
        "{e}"
    );
    assert!(s.decode(u32::MAX).is_err());
    assert_eq!(s.pos(), 0);
    assert!(s.logits().is_empty());
    for ctx in [0, MAX_CTX + 1] {
        let o = EngineOptions::exact(false).with_ctx(ctx);
        assert!(matches!(
            Session::new(f.model.clone(), o),
            Err(SessionError::Options(_))
        ));
    }
    let o = EngineOptions {
        prefill_chunk: 0,
        ..EngineOptions::production()
    };
    assert!(Session::new(f.model.clone(), o).is_err());
}

/// `--ctx 1048576` allocates only what is used: compressed rows grow on demand.
#[test]
fn large_context_allocates_on_demand() {
    let f = Fixture::load("tiny-f32");
    let opts = EngineOptions::exact(false).with_ctx(MAX_CTX);
    let mut s = Session::new(f.model.clone(), opts).unwrap();
    let empty = s.state_bytes();
    assert!(empty < 1 << 20, "empty session holds {empty} bytes");
    s.prefill(&f.prompt).unwrap();
    assert!(
        s.state_bytes() < 2 << 20,
        "{} bytes after 364 tokens",
        s.state_bytes()
    );
}

/// The progress callback sees every chunk; returning false cancels after the current chunk,
/// keeping the finished work, and the session continues exactly.
#[test]
fn prefill_progress_and_cancellation() {
    let f = Fixture::load("tiny-f32");
    let opts = EngineOptions {
        prefill_chunk: 100,
        ..EngineOptions::exact(false)
    };
    let mut seen = Vec::new();
    let mut s = Session::new(f.model.clone(), opts.clone()).unwrap();
    s.prefill_with(&f.prompt, &mut |done, total| {
        seen.push((done, total));
        true
    })
    .unwrap();
    assert_eq!(seen, [(100, 364), (200, 364), (300, 364), (364, 364)]);
    let want = s.logits().to_vec();

    let mut c = Session::new(f.model.clone(), opts).unwrap();
    let e = c
        .prefill_with(&f.prompt, &mut |done, _| done < 200)
        .unwrap_err();
    assert_eq!(
        e,
        SessionError::Cancelled {
            done: 200,
            total: 364
        }
    );
    assert_eq!(c.pos(), 200);
    c.prefill(&f.prompt[200..]).unwrap();
    assert_eq!(c.logits(), &want[..]);
}

/// Production numerics (Q8_0/Q8_K activations, F16-rounded stored rows) with QAT off,
/// against the golden prefill logits. README §4 / meta.json measured ds4's numerics on these
/// fixtures (a ~1e-3 relative rounding flips router/indexer decisions on random models):
/// tiny-q2 median row max-abs 0.129-0.138, top-1 0.915-0.923, top-5 sets 0.65; tiny-q4
/// 0.126, 0.912-0.920, 0.67-0.70; tiny-f32 (F16 rows only) 0.001, 0.997, 0.99. The bounds
/// below leave room around those figures but fail a broken path (which lands near top-1
/// 1/320 and medians of several units).
#[test]
fn production_numerics_match_ds4_statistics() {
    // (fixture, min top-1, max median, min top-5 agreement)
    for (name, top1, median, top5) in [
        ("tiny-q2", 0.85, 0.25, 0.5),
        ("tiny-q4", 0.85, 0.25, 0.5),
        ("tiny-f32", 0.98, 0.02, 0.9),
    ] {
        let f = Fixture::load(name);
        let opts = EngineOptions {
            qat_sim: false,
            ..EngineOptions::production()
        };
        let mut s = Session::new(f.model.clone(), opts).unwrap();
        let got = s.prefill_logits(&f.prompt).unwrap();
        assert!(got.iter().all(|v| v.is_finite()));
        let c = Compare::new(&got, &f.prefill_logits, f.vocab);
        let top5_rate = 1.0 - c.top5_mismatch.len() as f64 / c.rows as f64;
        println!("{name} production (QAT off) vs golden: {}", c.summary());
        assert!(c.top1_rate() >= top1, "{name}: {}", c.summary());
        assert!(c.median_abs() <= median, "{name}: {}", c.summary());
        assert!(top5_rate >= top5, "{name}: top-5 agreement {top5_rate}");
    }
}

/// Production mode with QAT on (the default) against exact mode with QAT on: same
/// statistical closeness (measured here: top-1 0.82-0.96, median 0.05-0.23).
#[test]
fn production_with_qat_stays_close_to_exact_with_qat() {
    for name in ["tiny-q2", "tiny-f32"] {
        let f = Fixture::load(name);
        let run = |opts: EngineOptions| {
            let mut s = Session::new(f.model.clone(), opts).unwrap();
            continue_run(&mut s, &f.prompt, &f.decode_ids)
        };
        let c = Compare::new(
            &run(EngineOptions::production()),
            &run(EngineOptions::exact(true)),
            f.vocab,
        );
        println!("{name} production vs exact (QAT on): {}", c.summary());
        assert!(c.top1_rate() >= 0.75, "{name}: {}", c.summary());
        assert!(c.median_abs() <= 0.35, "{name}: {}", c.summary());
    }
}
