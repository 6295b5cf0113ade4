//! `ds4 logits` on the tiny-f32 fixture: prompt + decode ids with `--decode-last 20` must
//! match `concat(prefill_logits, decode_logits)` row for row (reference README §1), for
//! several `--chunk` values; bad input exits with an error.

use std::path::{Path, PathBuf};
use std::process::Command;

use safetensors::SafeTensors;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ds4/tests/data/fixtures/tiny-f32")
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ds4-logits-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn le_words<T>(st: &SafeTensors, name: &str, f: impl Fn([u8; 4]) -> T) -> Vec<T> {
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Parses a v1.0 `<f4` C-order 2-D npy file.
fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..8], b"\x93NUMPY\x01\x00");
    let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
    assert_eq!((10 + hlen) % 64, 0, "header alignment");
    let header = std::str::from_utf8(&b[10..10 + hlen]).unwrap();
    assert!(header.contains("'descr': '<f4'") && header.contains("'fortran_order': False"));
    assert!(header.ends_with('\n'));
    let shape = &header[header.find("'shape': (").unwrap() + 10..];
    let shape: Vec<usize> = shape[..shape.find(')').unwrap()]
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let data = b[10 + hlen..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (shape, data)
}

fn ds4(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ds4"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn logits_match_the_golden_fixture() {
    let dir = fixture();
    let bytes = std::fs::read(dir.join("expected.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut ids = le_words(&st, "prompt_ids", i32::from_le_bytes);
    ids.extend(le_words(&st, "decode_ids", i32::from_le_bytes));
    let mut want = le_words(&st, "prefill_logits", f32::from_le_bytes);
    want.extend(le_words(&st, "decode_logits", f32::from_le_bytes));
    let vocab = 320;
    let ids_path = tmp("ids.json");
    std::fs::write(&ids_path, serde_json::to_string(&ids).unwrap()).unwrap();
    let model = dir.join("model.gguf");
    for chunk in [None, Some("61"), Some("1000")] {
        let out = tmp("out.npy");
        let mut args = vec![
            "logits",
            "-m",
            model.to_str().unwrap(),
            "--tokens",
            ids_path.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--decode-last",
            "20",
            "--exact",
            "--no-qat-sim",
            "--threads",
            "2",
        ];
        if let Some(c) = chunk {
            args.extend(["--chunk", c]);
        }
        let o = ds4(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let (shape, got) = read_npy(&out);
        assert_eq!(shape, [ids.len(), vocab]);
        let mut worst = 0f32;
        for (r, (g, w)) in got.chunks(vocab).zip(want.chunks(vocab)).enumerate() {
            let err = g
                .iter()
                .zip(w)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(err <= 1e-3, "chunk {chunk:?} row {r}: max abs {err}");
            worst = worst.max(err);
        }
        println!("ds4 logits --chunk {chunk:?}: max abs {worst:.3e}");
    }
}

#[test]
fn bad_input_is_an_error() {
    let model = fixture().join("model.gguf");
    let out = tmp("bad.npy");
    let run = |ids: &str, extra: &[&str]| {
        let p = tmp("bad.json");
        std::fs::write(&p, ids).unwrap();
        let mut args = vec![
            "logits",
            "-m",
            model.to_str().unwrap(),
            "--tokens",
            p.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = ds4(&args);
        assert!(!o.status.success(), "{ids} {extra:?} should fail");
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    assert!(run("[1, 2, 999]", &[]).contains("out of range"));
    assert!(run("[1, -2]", &[]).contains("JSON array"));
    assert!(run("{}", &[]).contains("JSON array"));
    assert!(run("[1, 2]", &["--decode-last", "3"]).contains("decode-last"));
    assert!(run("[1, 2, 3]", &["--ctx", "2"]).contains("context"));
    assert!(run("[1]", &["--chunk", "0"]).contains("chunk"));
}
