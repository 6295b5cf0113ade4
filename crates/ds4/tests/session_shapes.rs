//! The engine on a model of another shape than the fixtures (3 HC streams, head dim 96 with
//! 32 RoPE dims, window 7, schedule 0/4/128/4/0, one hash layer, Q8_0 experts): full
//! prefill, chunked prefill, decode and snapshot/restore agree bit for bit in every mode.
//! Set `DS4_SYNTH_OUT=path.gguf` to keep the model (e.g. for a cross-check with
//! np_forward.py).

mod golden_support;

use std::sync::Arc;

use ds4::gguf::GgufFile;
use ds4::model::{EngineOptions, Model, Session};
use golden_support::fixture_dir;
use golden_support::synth::odd_model_bytes;

#[test]
fn another_shape_is_consistent_across_prefill_chunking_decode_and_snapshots() {
    let template = GgufFile::open(fixture_dir("tiny-f32").join("model.gguf")).unwrap();
    let bytes = odd_model_bytes(&template, 5);
    if let Ok(path) = std::env::var("DS4_SYNTH_OUT") {
        std::fs::write(path, &bytes).unwrap();
    }
    let model = Arc::new(Model::from_gguf(Arc::new(GgufFile::from_bytes(bytes).unwrap())).unwrap());
    assert_eq!(
        (model.cfg.hc, model.cfg.head_dim, model.cfg.n_rot),
        (3, 96, 32)
    );
    let vocab = model.cfg.n_vocab;
    let tokens: Vec<u32> = (0..300u32)
        .map(|i| (i * 7919 + 13) % vocab as u32)
        .collect();
    for opts in [
        EngineOptions::exact(false),
        EngineOptions::exact(true),
        EngineOptions::production(),
    ] {
        let new = || Session::new(model.clone(), opts.clone()).unwrap();
        let full = new().prefill_logits(&tokens).unwrap();
        assert!(full.iter().all(|v| v.is_finite()), "{opts:?}");

        let mut s = new();
        let mut chunked = Vec::new();
        let mut at = 0;
        for n in [1, 6, 7, 1, 113, 2, 128, 42].iter().cycle() {
            let n = (*n).min(tokens.len() - at);
            if n == 0 {
                break;
            }
            chunked.extend(s.prefill_logits(&tokens[at..at + n]).unwrap());
            at += n;
        }
        assert_eq!(chunked, full, "chunked, {opts:?}");

        let mut s = new();
        s.prefill(&tokens[..250]).unwrap();
        let snap = s.snapshot();
        for (i, &t) in tokens[250..].iter().enumerate() {
            s.decode(t).unwrap();
            assert_eq!(
                s.logits(),
                &full[(250 + i) * vocab..(251 + i) * vocab],
                "decode {i}"
            );
        }
        let mut r = Session::restore(model.clone(), opts.clone(), &snap).unwrap();
        let rest = r.prefill_logits(&tokens[250..]).unwrap();
        assert_eq!(rest, full[250 * vocab..], "restored, {opts:?}");
    }
}
