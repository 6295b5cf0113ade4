//! Synthetic models (ds4::synth): every profile loads through the model contract, the full
//! Flash layouts match model.md §2.3 transcribed independently below, values are valid and
//! calibrated, and generation is deterministic.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ds4::gguf::{GgufFile, GgufWriter, Value};
use ds4::model::{Config, Model};
use ds4::quant::{dequantize_row, GgmlType};
use ds4::synth::{
    build_in_memory, config_for, metadata_for, write_file, writer, Init, Profile, Summary,
    SynthOptions, SPECIAL_TOKENS, SYNTHETIC_KEY,
};
use half::f16;

fn opts(profile: Profile, seed: u64, layers: Option<usize>) -> SynthOptions {
    SynthOptions {
        profile,
        seed,
        layers,
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

// ---------------------------------------------------------------------------------------
// Independent checks of stored bytes (model.md §5 offsets, not the generator's tables).
// ---------------------------------------------------------------------------------------

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Offsets of the f16 scales in one block, per model.md §5.
fn scale_offsets(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::Q8_0 => &[0],
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q4_K => &[0, 2],
        GgmlType::IQ2_XXS => &[0],
        _ => &[],
    }
}

/// Every float / scale in the file is finite, every `tid2eid` row is distinct expert ids.
fn check_values(g: &GgufFile, cfg: &Config) {
    for t in g.tensors() {
        let data = g.tensor_data(t);
        match t.ty {
            GgmlType::F32 => {
                for b in data.chunks_exact(4) {
                    let x = f32::from_le_bytes(b.try_into().unwrap());
                    assert!(x.is_finite(), "{}: non-finite F32", t.name);
                }
            }
            GgmlType::F16 => {
                for b in data.chunks_exact(2) {
                    assert!(f16_at(b, 0).is_finite(), "{}: non-finite F16", t.name);
                }
            }
            GgmlType::I32 => {
                let k = t.dims[0] as usize;
                assert_eq!(k, cfg.n_expert_used, "{}", t.name);
                for row in data.chunks_exact(4 * k) {
                    let ids: Vec<i32> = row
                        .chunks_exact(4)
                        .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
                        .collect();
                    for (a, &e) in ids.iter().enumerate() {
                        assert!(
                            (0..cfg.n_expert as i32).contains(&e),
                            "{}: expert id {e} out of range",
                            t.name
                        );
                        assert!(!ids[..a].contains(&e), "{}: row {ids:?}", t.name);
                    }
                }
            }
            ty => {
                let bb = ty.block_bytes();
                assert_eq!(data.len() % bb, 0, "{}", t.name);
                for block in data.chunks_exact(bb) {
                    for &at in scale_offsets(ty) {
                        let s = f16_at(block, at);
                        assert!(s.is_finite() && s > 0.0, "{}: block scale {s}", t.name);
                    }
                }
            }
        }
    }
}

/// Mean and std of the dequantized values of (up to `max_elems` of) a tensor.
fn moments(g: &GgufFile, name: &str, max_elems: usize) -> (f64, f64) {
    let (t, data) = g.tensor(name).unwrap();
    let row = t.dims[0] as usize;
    let rows = (t.n_elements() as usize / row).min(max_elems.div_ceil(row));
    let row_bytes = t.ty.row_bytes(row as u64).unwrap() as usize;
    let mut buf = vec![0f32; row];
    let (mut s, mut s2, mut n) = (0f64, 0f64, 0f64);
    for r in 0..rows {
        dequantize_row(t.ty, &data[r * row_bytes..(r + 1) * row_bytes], &mut buf);
        for &x in &buf {
            s += x as f64;
            s2 += x as f64 * x as f64;
            n += 1.0;
        }
    }
    let mean = s / n;
    (mean, (s2 / n - mean * mean).max(0.0).sqrt())
}

/// Realized mean/std of every float or block-quantized tensor against what the plan asked.
fn check_moments(g: &GgufFile, o: &SynthOptions, max_elems: usize) {
    let (_, filler) = writer(o).unwrap();
    let mut checked = BTreeMap::new();
    for t in filler.tensors() {
        let (want_mean, want_std) = match t.init {
            Init::Normal { mean, std } => (mean as f64, std as f64),
            Init::Uniform { lo, hi } => ((lo + hi) as f64 / 2.0, (hi - lo) as f64 / 12f64.sqrt()),
            Init::ExpertIds { .. } => continue,
        };
        let n = t.spec.dims.iter().product::<u64>() as usize;
        if n < 1000 {
            continue; // too few values for a meaningful estimate
        }
        let (mean, std) = moments(g, &t.spec.name, max_elems);
        assert!(
            (std / want_std - 1.0).abs() < 0.15,
            "{} ({}): std {std} vs target {want_std}",
            t.spec.name,
            t.spec.ty
        );
        assert!(
            (mean - want_mean).abs() < 0.1 * want_std,
            "{} ({}): mean {mean} vs target {want_mean} (std {want_std})",
            t.spec.name,
            t.spec.ty
        );
        *checked.entry(t.spec.ty.name()).or_insert(0) += 1;
    }
    // The quantized formats the profile uses were all measured.
    for ty in ["Q8_0", "F16"] {
        assert!(
            checked.contains_key(ty),
            "no {ty} tensor checked: {checked:?}"
        );
    }
    let experts = o.profile.experts();
    let want: &[&str] = match experts {
        ds4::model::ExpertQuant::Q2 => &["IQ2_XXS", "Q2_K"],
        ds4::model::ExpertQuant::Q4 => &["Q4_K"],
    };
    for ty in want {
        assert!(
            checked.contains_key(ty),
            "no {ty} tensor checked: {checked:?}"
        );
    }
}

fn load(o: &SynthOptions) -> (Arc<GgufFile>, Model) {
    let g = build_in_memory(o).unwrap_or_else(|e| panic!("{o:?}: {e}"));
    let m = Model::from_gguf(g.clone()).unwrap_or_else(|e| panic!("{o:?}: {e}"));
    (g, m)
}

// ---------------------------------------------------------------------------------------

#[test]
fn profiles_parse_by_name() {
    for (s, p) in [
        ("tiny", Profile::Tiny),
        ("demo", Profile::Demo),
        ("flash-q2", Profile::FlashQ2),
        ("flash-q4", Profile::FlashQ4),
    ] {
        assert_eq!(s.parse::<Profile>().unwrap(), p);
        assert_eq!(p.to_string(), s);
    }
    let e = "flash".parse::<Profile>().unwrap_err();
    assert!(e.contains("tiny") && e.contains("flash-q4"), "{e}");
}

#[test]
fn bad_layer_counts_are_refused() {
    for (p, n) in [
        (Profile::Tiny, 0),
        (Profile::FlashQ2, 44),
        (Profile::FlashQ4, 0),
        (Profile::Demo, 65),
    ] {
        let e = writer(&opts(p, 0, Some(n))).unwrap_err();
        assert!(e.contains("layers"), "{e}");
        assert!(build_in_memory(&opts(p, 0, Some(n))).is_err());
    }
}

#[test]
fn tiny_loads_and_matches_the_reference_fixture_layout() {
    let o = opts(Profile::Tiny, 1, None);
    let (g, m) = load(&o);
    assert_eq!(m.cfg, config_for(&o).unwrap());
    assert!(g.file_size() < 10 << 20, "tiny is {} bytes", g.file_size());
    check_values(&g, &m.cfg);
    check_moments(&g, &o, usize::MAX);

    // The fixture generator's tiny-q2 has the same shape and quant mix: same tensor
    // directory, same deepseek4.* values, same 320-token vocabulary and merges.
    let fx = GgufFile::open(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fixtures/tiny-q2/model.gguf"),
    )
    .unwrap();
    let dir = |g: &GgufFile| -> BTreeMap<String, (Vec<u64>, GgmlType)> {
        g.tensors()
            .iter()
            .map(|t| (t.name.clone(), (t.dims.clone(), t.ty)))
            .collect()
    };
    assert_eq!(dir(&g), dir(&fx));
    let mut n_keys = 0;
    for (k, v) in fx.metadata() {
        if !k.starts_with("deepseek4.") {
            continue;
        }
        let mine = g.get(k).unwrap_or_else(|| panic!("missing {k}"));
        let nums = |v: &Value| -> Vec<f64> {
            match v.as_array() {
                Some(a) => a.iter().map(|x| x.as_f64().unwrap()).collect(),
                None => vec![v
                    .as_f64()
                    .or_else(|| v.as_bool().map(|b| b as u8 as f64))
                    .unwrap()],
            }
        };
        assert_eq!(nums(mine), nums(v), "{k}");
        n_keys += 1;
    }
    assert!(n_keys >= 36, "{n_keys}");
    for key in ["tokenizer.ggml.tokens", "tokenizer.ggml.merges"] {
        assert_eq!(
            g.get_string_array(key).unwrap(),
            fx.get_string_array(key).unwrap(),
            "{key}"
        );
    }
    for key in [
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
    ] {
        assert_eq!(g.get(key), fx.get(key), "{key}");
    }
    let tokens = g
        .get_string_array("tokenizer.ggml.tokens")
        .unwrap()
        .unwrap();
    for s in SPECIAL_TOKENS {
        assert!(tokens.contains(&s), "{s} missing");
    }
    assert_eq!(
        g.get("tokenizer.ggml.token_type")
            .and_then(Value::as_array)
            .map(<[Value]>::len),
        Some(320)
    );
}

#[test]
fn demo_loads_with_the_real_tokenizer_and_stays_small() {
    let o = opts(Profile::Demo, 7, None);
    let (g, m) = load(&o);
    assert_eq!(m.cfg, config_for(&o).unwrap());
    let c = &m.cfg;
    assert_eq!((c.n_layer, c.n_vocab, c.n_embd), (8, 129_280, 256));
    assert_eq!(c.compress_ratios, [0, 0, 4, 128, 4, 128, 4, 128]);
    assert!(m.weights.layers[2].indexer.is_some());
    assert!(m.weights.layers[7].attn_compressor.is_some());
    assert_eq!(
        m.expert_types(),
        (GgmlType::IQ2_XXS, GgmlType::Q2_K),
        "demo uses the q2 mix"
    );
    assert!(
        g.file_size() < 200_000_000,
        "demo is {} bytes",
        g.file_size()
    );
    assert_eq!(g.get(SYNTHETIC_KEY), Some(&Value::Bool(true)));
    assert!(g
        .get_str("general.name")
        .unwrap()
        .contains("random weights"));
    check_values(&g, c);
    check_moments(&g, &o, usize::MAX);

    // Tokenizer entries equal the shipped file's, read from disk here.
    let real = GgufFile::open(repo_root().join("data/ds4-tokenizer.gguf")).unwrap();
    let mut n = 0;
    for (k, v) in real.metadata() {
        if k.starts_with("tokenizer.") {
            assert_eq!(g.get(k), Some(v), "{k}");
            n += 1;
        }
    }
    assert!(n >= 5);
    assert_eq!(
        g.get_string_array("tokenizer.ggml.tokens")
            .unwrap()
            .unwrap()
            .len(),
        129_280
    );
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let build = |seed| {
        let (w, f) = writer(&opts(Profile::Tiny, seed, None)).unwrap();
        w.to_bytes(|i, s, b| f.fill(i, s, b)).unwrap()
    };
    let a = build(42);
    assert_eq!(a, build(42), "same seed must give identical bytes");
    let b = build(43);
    assert_eq!(a.len(), b.len());
    // Every tensor differs, not just the file as a whole.
    let ga = GgufFile::from_bytes(a).unwrap();
    let gb = GgufFile::from_bytes(b).unwrap();
    for t in ga.tensors() {
        let (_, db) = gb.tensor(&t.name).unwrap();
        assert_ne!(ga.tensor_data(t), db, "{} is seed-independent", t.name);
    }
    assert_eq!(
        ga.get("ds4.synthetic.seed"),
        Some(&Value::U64(42)),
        "the seed is recorded"
    );
}

#[test]
fn bytes_do_not_depend_on_the_thread_count() {
    let build = |threads| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let (w, f) = writer(&opts(Profile::Tiny, 5, Some(4))).unwrap();
            w.to_bytes(|i, s, b| f.fill(i, s, b)).unwrap()
        })
    };
    assert_eq!(build(1), build(3));
}

#[test]
fn write_file_streams_the_same_image() {
    let o = opts(Profile::Tiny, 9, None);
    let dir = std::env::temp_dir().join(format!("ds4-synth-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiny.gguf");
    let mut calls = Vec::new();
    let summary = write_file(&o, &path, |done, total| calls.push((done, total))).unwrap();
    let on_disk = std::fs::read(&path).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let (w, f) = writer(&o).unwrap();
    assert_eq!(on_disk, w.to_bytes(|i, s, b| f.fill(i, s, b)).unwrap());
    assert_eq!(summary, Summary::of(&w));
    assert_eq!(summary.file_bytes, on_disk.len() as u64);
    assert_eq!(calls.len(), summary.n_tensors);
    assert!(calls.windows(2).all(|p| p[0].0 < p[1].0));
    assert_eq!(
        calls.last().copied(),
        Some((summary.tensor_bytes, summary.tensor_bytes))
    );
    let line = summary.to_string();
    assert!(
        line.contains("IQ2_XXS") && line.contains("tensors"),
        "{line}"
    );
}

#[test]
fn shallow_models_keep_their_first_layers() {
    for n in [1, 2, 3] {
        let o = opts(Profile::Tiny, 0, Some(n));
        let (_, m) = load(&o);
        assert_eq!(m.cfg.n_layer, n);
        assert_eq!(m.cfg.n_hash_layers, n.min(3));
        assert!(m.cfg.compress_ratios.len() >= 6);
    }
    // Deeper than the default: the Flash schedule continues.
    let (_, m) = load(&opts(Profile::Tiny, 0, Some(9)));
    assert_eq!(m.cfg.compress_ratios[6..9], [4, 128, 4]);
}

// ---------------------------------------------------------------------------------------
// Flash: full-size directories (no data) and cut models (data, in memory).
// ---------------------------------------------------------------------------------------

/// model.md §2.3 transcribed by hand with Flash's numbers (GGUF `ne` order).
fn flash_table(q4: bool) -> BTreeMap<String, (Vec<u64>, GgmlType)> {
    use GgmlType::*;
    let (gate_up, down) = if q4 { (Q4_K, Q4_K) } else { (IQ2_XXS, Q2_K) };
    let mut t = BTreeMap::new();
    let mut add = |name: String, dims: &[u64], ty| {
        assert!(t.insert(name, (dims.to_vec(), ty)).is_none());
    };
    add("token_embd.weight".into(), &[4096, 129280], F16);
    add("output_hc_fn.weight".into(), &[16384, 4], F16);
    add("output_hc_base.weight".into(), &[4], F32);
    add("output_hc_scale.weight".into(), &[1], F32);
    add("output_norm.weight".into(), &[4096], F32);
    add("output.weight".into(), &[4096, 129280], Q8_0);
    for il in 0..43u64 {
        let ratio = match il {
            0 | 1 => 0,
            _ if il % 2 == 0 => 4,
            _ => 128,
        };
        let mut l = |s: &str, dims: &[u64], ty| add(format!("blk.{il}.{s}"), dims, ty);
        l("hc_attn_fn.weight", &[16384, 24], F16);
        l("hc_attn_scale.weight", &[3], F32);
        l("hc_attn_base.weight", &[24], F32);
        l("attn_norm.weight", &[4096], F32);
        l("attn_q_a.weight", &[4096, 1024], Q8_0);
        l("attn_q_a_norm.weight", &[1024], F32);
        l("attn_q_b.weight", &[1024, 32768], Q8_0);
        l("attn_kv.weight", &[4096, 512], Q8_0);
        l("attn_kv_a_norm.weight", &[512], F32);
        l("attn_sinks.weight", &[64], F32);
        l("attn_output_a.weight", &[4096, 8192], Q8_0);
        l("attn_output_b.weight", &[8192, 4096], Q8_0);
        if ratio != 0 {
            let w = if ratio == 4 { 1024 } else { 512 };
            l("attn_compressor_ape.weight", &[w, ratio], F16);
            l("attn_compressor_kv.weight", &[4096, w], F16);
            l("attn_compressor_gate.weight", &[4096, w], F16);
            l("attn_compressor_norm.weight", &[512], F32);
        }
        if ratio == 4 {
            l("indexer.attn_q_b.weight", &[1024, 8192], F16);
            l("indexer.proj.weight", &[4096, 64], F16);
            l("indexer_compressor_ape.weight", &[256, 4], F16);
            l("indexer_compressor_kv.weight", &[4096, 256], F16);
            l("indexer_compressor_gate.weight", &[4096, 256], F16);
            l("indexer_compressor_norm.weight", &[128], F32);
        }
        l("hc_ffn_fn.weight", &[16384, 24], F16);
        l("hc_ffn_scale.weight", &[3], F32);
        l("hc_ffn_base.weight", &[24], F32);
        l("ffn_norm.weight", &[4096], F32);
        l("ffn_gate_inp.weight", &[4096, 256], F16);
        if il < 3 {
            l("ffn_gate_tid2eid.weight", &[6, 129280], I32);
        } else {
            l("exp_probs_b.bias", &[256], F32);
        }
        l("ffn_gate_exps.weight", &[4096, 2048, 256], gate_up);
        l("ffn_up_exps.weight", &[4096, 2048, 256], gate_up);
        l("ffn_down_exps.weight", &[2048, 4096, 256], down);
        l("ffn_gate_shexp.weight", &[4096, 2048], Q8_0);
        l("ffn_up_shexp.weight", &[4096, 2048], Q8_0);
        l("ffn_down_shexp.weight", &[2048, 4096], Q8_0);
    }
    t
}

fn check_full_flash(profile: Profile, q4: bool, gib_range: std::ops::Range<f64>) {
    let o = opts(profile, 0, None);
    let (w, _) = writer(&o).unwrap();
    let want = flash_table(q4);
    let have: BTreeMap<String, (Vec<u64>, GgmlType)> = w
        .tensors()
        .iter()
        .map(|t| (t.name.clone(), (t.dims.clone(), t.ty)))
        .collect();
    assert_eq!(w.tensors().len(), have.len(), "duplicate names");
    for (name, spec) in &want {
        assert_eq!(have.get(name), Some(spec), "{name}");
    }
    for name in have.keys() {
        assert!(want.contains_key(name), "unexpected tensor {name}");
    }
    // Tensor count: 6 globals + per layer 24 (+4 compressor, +6 indexer).
    assert_eq!(have.len(), 6 + 43 * 24 + 41 * 4 + 21 * 6);

    let s = Summary::of(&w);
    assert!(
        gib_range.contains(&gib(s.file_bytes)),
        "{profile}: {:.2} GiB not in {gib_range:?}",
        gib(s.file_bytes)
    );
    // model.md §4.2: routed experts ≈ 77.9 GB (q2) / 155.8 GB (q4), the rest ≈ 8.8 GB.
    let experts: u64 = w
        .tensors()
        .iter()
        .filter(|t| t.name.ends_with("_exps.weight"))
        .map(|t| t.n_bytes().unwrap())
        .sum();
    let want_experts = if q4 { 155.8e9 } else { 77.9e9 };
    assert!(
        (experts as f64 / want_experts - 1.0).abs() < 0.005,
        "experts {experts}"
    );
    let rest = (s.tensor_bytes - experts) as f64;
    assert!((rest / 8.8e9 - 1.0).abs() < 0.02, "non-expert bytes {rest}");

    // The metadata parses to exactly the Flash profile.
    let mut mw = GgufWriter::new();
    for (k, v) in metadata_for(&o).unwrap() {
        mw.add_metadata(k, v).unwrap();
    }
    let g = GgufFile::from_bytes(mw.to_bytes(|_, _, _| Ok(())).unwrap()).unwrap();
    let c = Config::from_gguf(&g).unwrap();
    assert_eq!(c.flash_mismatches(), Vec::<String>::new());
    assert_eq!(c, config_for(&o).unwrap());
    assert_eq!(c.context_length, 1 << 20);
}

#[test]
fn full_flash_q2_directory_matches_the_spec() {
    check_full_flash(Profile::FlashQ2, false, 80.0..81.5);
}

#[test]
fn full_flash_q4_directory_matches_the_spec() {
    check_full_flash(Profile::FlashQ4, true, 152.5..154.0);
}

/// Generates cut Flash models in memory (about 10 GB each, one at a time) and loads them.
#[test]
fn cut_flash_models_load_with_valid_calibrated_weights() {
    for (profile, layers, types) in [
        (Profile::FlashQ2, 4, (GgmlType::IQ2_XXS, GgmlType::Q2_K)),
        (Profile::FlashQ4, 2, (GgmlType::Q4_K, GgmlType::Q4_K)),
    ] {
        let o = opts(profile, 3, Some(layers));
        let t0 = std::time::Instant::now();
        let (g, m) = load(&o);
        eprintln!(
            "{profile} --layers {layers}: {:.2} GiB in {:.1} s",
            gib(g.file_size()),
            t0.elapsed().as_secs_f64()
        );
        assert_eq!(m.cfg.n_layer, layers);
        assert_eq!(m.expert_types(), types);
        assert_eq!(
            (m.cfg.n_embd, m.cfg.n_vocab, m.cfg.n_expert),
            (4096, 129_280, 256)
        );
        // Cut only in depth: the only differences from Flash are block_count and, below 3
        // layers, the hash layer count (which cannot exceed the depth).
        let mism = m.cfg.flash_mismatches();
        let expected = if layers < 3 { 2 } else { 1 };
        assert_eq!(mism.len(), expected, "{mism:?}");
        assert!(mism[0].starts_with("block_count"), "{mism:?}");
        assert!(
            mism[1..].iter().all(|m| m.starts_with("hash_layer_count")),
            "{mism:?}"
        );
        assert_eq!(m.cfg.compress_ratios.len(), 43);
        check_values(&g, &m.cfg);
        // Q4_K at fan-in 4096 needs subnormal f16 scales: the realized std must still hold.
        check_moments(&g, &o, 1 << 20);
    }
}
