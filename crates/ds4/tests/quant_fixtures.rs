//! Bit-exactness of the quant module against the reference fixtures
//! (`tests/data/quant`: gguf-py; `tests/data/ops`: ds4ref's float32 rules).

use ds4::quant::{
    dequantize_row, fp4sim_inplace, fp8sim_inplace, hadamard_inplace, indexer_qat_inplace,
    quantize_act_q8_0, quantize_act_q8_k, quantize_row, GgmlType,
};
use safetensors::SafeTensors;
use std::path::PathBuf;

fn load(rel: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn raw<'a>(st: &'a SafeTensors<'a>, name: &str) -> &'a [u8] {
    st.tensor(name)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .data()
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn u32s(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Bitwise equality, except that NaN only has to be NaN.
fn assert_bits(what: &str, got: &[f32], want_bits: &[u32]) {
    assert_eq!(got.len(), want_bits.len(), "{what}: length");
    let mut bad = 0;
    for (i, (g, &w)) in got.iter().zip(want_bits).enumerate() {
        let wf = f32::from_bits(w);
        let ok = if wf.is_nan() {
            g.is_nan()
        } else {
            g.to_bits() == w
        };
        if !ok {
            if bad < 5 {
                eprintln!(
                    "{what}[{i}]: got {g:e} ({:#010x}), want {wf:e} ({w:#010x})",
                    g.to_bits()
                );
            }
            bad += 1;
        }
    }
    assert_eq!(bad, 0, "{what}: {bad} mismatches");
}

/// Each block format's fixture row (64 blocks back to back) dequantizes bit-exactly, both
/// as one row and block by block.
#[test]
fn dequant_block_formats_bit_exact() {
    for (file, ty) in [
        ("quant/q8_0.safetensors", GgmlType::Q8_0),
        ("quant/q2_k.safetensors", GgmlType::Q2_K),
        ("quant/q4_k.safetensors", GgmlType::Q4_K),
        ("quant/iq2_xxs.safetensors", GgmlType::IQ2_XXS),
    ] {
        let bytes = load(file);
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let blocks = raw(&st, "blocks");
        let want = u32s(raw(&st, "dequant"));
        let mut got = vec![0f32; want.len()];
        dequantize_row(ty, blocks, &mut got);
        assert_bits(file, &got, &want);
        let be = ty.block_elems();
        for (i, b) in blocks.chunks_exact(ty.block_bytes()).enumerate() {
            let mut one = vec![0f32; be];
            dequantize_row(ty, b, &mut one);
            assert_bits(file, &one, &want[i * be..(i + 1) * be]);
        }
    }
}

/// All 65536 F16 patterns widen exactly; NaN patterns give NaN.
#[test]
fn dequant_f16_all_patterns_bit_exact() {
    let bytes = load("quant/f16.safetensors");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let want = u32s(raw(&st, "dequant_bits"));
    let src: Vec<u8> = (0..=u16::MAX).flat_map(|p| p.to_le_bytes()).collect();
    let mut got = vec![0f32; 65536];
    dequantize_row(GgmlType::F16, &src, &mut got);
    assert_bits("f16", &got, &want);
}

/// BF16 patterns (every exponent, edge mantissas, random) widen exactly.
#[test]
fn dequant_bf16_bit_exact() {
    let bytes = load("quant/bf16.safetensors");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let pats = raw(&st, "patterns");
    let want = u32s(raw(&st, "dequant_bits"));
    let mut got = vec![0f32; want.len()];
    dequantize_row(GgmlType::BF16, pats, &mut got);
    assert_bits("bf16", &got, &want);
}

/// The Q8_0 weight quantizer reproduces gguf-py's blocks byte for byte (ties, zero block,
/// f16-subnormal scales, heavy tails), and those blocks dequantize to the fixture.
#[test]
fn quantize_q8_0_matches_gguf_py() {
    let bytes = load("quant/q8_0_quantize.safetensors");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let input = f32s(raw(&st, "input"));
    let want = raw(&st, "blocks");
    let deq = u32s(raw(&st, "dequant"));
    let mut got = vec![0u8; want.len()];
    quantize_row(GgmlType::Q8_0, &input, &mut got).unwrap();
    for (i, (g, w)) in got.chunks(34).zip(want.chunks(34)).enumerate() {
        assert_eq!(g, w, "block {i}");
    }
    let mut out = vec![0f32; input.len()];
    dequantize_row(GgmlType::Q8_0, &got, &mut out);
    assert_bits("q8_0 round trip", &out, &deq);
}

/// ds4's Q8_0 and Q8_K activation quantizers match `ops/act_quant.safetensors` exactly
/// (scales, codes, bsums), including zero blocks and a negative maximum.
#[test]
fn activation_quantizers_bit_exact() {
    let bytes = load("ops/act_quant.safetensors");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let x = f32s(raw(&st, "q8_0_in"));
    let q = raw(&st, "q8_0_q");
    let d = u32s(raw(&st, "q8_0_d"));
    let blocks = quantize_act_q8_0(&x);
    assert_eq!(blocks.len(), d.len());
    for (i, b) in blocks.iter().enumerate() {
        assert_eq!(b.d.to_bits(), d[i], "q8_0 d[{i}]");
        let want: Vec<i8> = q[32 * i..32 * i + 32].iter().map(|&v| v as i8).collect();
        assert_eq!(&b.qs[..], &want[..], "q8_0 q block {i}");
    }
    let x = f32s(raw(&st, "q8_k_in"));
    let q = raw(&st, "q8_k_q");
    let d = u32s(raw(&st, "q8_k_d"));
    let bs: Vec<i16> = raw(&st, "q8_k_bsums")
        .chunks_exact(2)
        .map(|c| i16::from_le_bytes([c[0], c[1]]))
        .collect();
    let blocks = quantize_act_q8_k(&x);
    assert_eq!(blocks.len(), d.len());
    for (i, b) in blocks.iter().enumerate() {
        assert_eq!(b.d.to_bits(), d[i], "q8_k d[{i}]");
        let want: Vec<i8> = q[256 * i..256 * i + 256].iter().map(|&v| v as i8).collect();
        assert_eq!(&b.qs[..], &want[..], "q8_k q row {i}");
        assert_eq!(&b.bsums[..], &bs[16 * i..16 * i + 16], "q8_k bsums row {i}");
    }
}

fn qat_case(name_in: &str, name_out: &str, width: usize, f: fn(&mut [f32])) {
    let bytes = load("ops/qat.safetensors");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let x = f32s(raw(&st, name_in));
    let want = u32s(raw(&st, name_out));
    let mut got = x.clone();
    for row in got.chunks_exact_mut(width) {
        f(row);
    }
    assert_bits(name_out, &got, &want);
}

/// FP8 KV simulation: every E4M3 midpoint (ties to even), the amax floor, zeros,
/// amax = 448·2^k exactly, subnormal E4M3 codes.
#[test]
fn qat_fp8sim_bit_exact() {
    qat_case("fp8_in", "fp8_out", 448, fp8sim_inplace);
}

/// FP4 simulation: every E2M1 tie at three scales, f32 subnormal below the floor.
#[test]
fn qat_fp4sim_bit_exact() {
    qat_case("fp4_in", "fp4_out", 128, fp4sim_inplace);
}

/// Hadamard butterfly order and f32(1/sqrt(128)) scaling, then the full indexer QAT.
#[test]
fn qat_hadamard_and_indexer_bit_exact() {
    qat_case("idx_in", "idx_hadamard", 128, hadamard_inplace);
    qat_case("idx_in", "idx_out", 128, indexer_qat_inplace);
    // Order-independent sanity check against the float64 transform.
    let bytes = load("ops/qat.safetensors");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut x = f32s(raw(&st, "idx_in"));
    let h64: Vec<f64> = raw(&st, "idx_hadamard_f64")
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    for row in x.chunks_exact_mut(128) {
        hadamard_inplace(row);
    }
    for (g, w) in x.iter().zip(&h64) {
        assert!(
            (*g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
            "{g} vs {w}"
        );
    }
}
