//! Parity of the tokenizer with HF's (the reference fixtures) on every case, in every mode.

mod tokenizer_common;

use ds4::tokenizer::{EncodeMode, Tokenizer, STRUCTURAL_SPECIALS};
use tokenizer_common::*;

/// Encode every row's `text` and compare with `field` (falling back to `fallback` when the
/// field is absent); report the matched count and the first mismatches.
fn check(
    tok: &Tokenizer,
    file: &str,
    mode: EncodeMode,
    field: &str,
    fallback: Option<&str>,
) -> (usize, usize) {
    let rows = read_jsonl(file);
    let mut matched = 0;
    let mut total = 0;
    let mut report = Vec::new();
    for row in &rows {
        let want = match row.get(field).or_else(|| fallback.and_then(|f| row.get(f))) {
            Some(v) => ids_of(v),
            None => continue,
        };
        total += 1;
        let text = row["text"].as_str().expect("text");
        let got = tok.encode(text, mode);
        if got == want {
            matched += 1;
        } else if report.len() < 5 {
            report.push(format!(
                "{} {:?}\n  want {:?}\n  got  {:?}",
                row["id"], text, want, got
            ));
        }
    }
    println!("{file} {mode:?} [{field}]: {matched}/{total}");
    assert!(
        matched == total && total > 0,
        "{file} {mode:?} [{field}]: {matched}/{total} match\n{}",
        report.join("\n")
    );
    (matched, total)
}

#[test]
fn cases_hf() {
    assert_eq!(
        check(tokenizer(), "cases.jsonl", EncodeMode::Hf, "ids", None),
        (2089, 2089)
    );
}

#[test]
fn cases_plain() {
    check(
        tokenizer(),
        "cases.jsonl",
        EncodeMode::Plain,
        "ids_plain",
        Some("ids"),
    );
}

#[test]
fn cases_render_equals_plain_or_hf_without_specials() {
    // Render differs from plain only where a structural special string occurs.
    let tok = tokenizer();
    for row in read_jsonl("cases.jsonl") {
        let text = row["text"].as_str().unwrap();
        if !STRUCTURAL_SPECIALS.iter().any(|s| text.contains(s)) {
            assert_eq!(
                tok.encode(text, EncodeMode::Render),
                tok.encode(text, EncodeMode::Plain)
            );
        }
    }
}

#[test]
fn render_cases_render() {
    check(
        tokenizer(),
        "render_cases.jsonl",
        EncodeMode::Render,
        "ids",
        None,
    );
}

#[test]
fn render_cases_hf() {
    check(
        tokenizer(),
        "render_cases.jsonl",
        EncodeMode::Hf,
        "ids_hf",
        Some("ids"),
    );
}

#[test]
fn chat_prompts_render() {
    check(
        tokenizer(),
        "chat_prompts.jsonl",
        EncodeMode::Render,
        "ids",
        None,
    );
    // The five ds4 test-vector prompts match the official API's prompt_tokens.
    for row in read_jsonl("chat_prompts.jsonl") {
        if let Some(n) = row.get("official_api_prompt_tokens").and_then(|v| v.as_u64()) {
            let ids = tokenizer().encode(row["text"].as_str().unwrap(), EncodeMode::Render);
            assert_eq!(ids.len() as u64, n, "{}", row["name"]);
        }
    }
}

#[test]
fn untyped_rule_finds_the_same_added_tokens() {
    let (a, b) = (tokenizer(), tokenizer_untyped());
    assert_eq!(a.added_token_count(), 1283);
    assert_eq!(b.added_token_count(), 1283);
    for id in 0..a.vocab_size() as u32 {
        assert_eq!(a.is_added_token(id), b.is_added_token(id), "id {id}");
    }
    // And it reproduces HF on the cases that contain added strings.
    check(b, "cases.jsonl", EncodeMode::Hf, "ids", None);
    check(b, "render_cases.jsonl", EncodeMode::Hf, "ids_hf", Some("ids"));
}

#[test]
fn special_ids() {
    let s = tokenizer().specials();
    assert_eq!(
        s.as_array(),
        [0, 1, 128803, 128804, 128821, 128822, 128825],
        "protocol.md §1.5"
    );
    assert_eq!(tokenizer().vocab_size(), 129280);
}

#[test]
fn decode_roundtrip_all_cases() {
    let tok = tokenizer();
    for row in read_jsonl("cases.jsonl") {
        let text = row["text"].as_str().unwrap();
        for field in ["ids", "ids_plain"] {
            if let Some(v) = row.get(field) {
                assert_eq!(tok.decode(&ids_of(v)), text.as_bytes(), "{}", row["id"]);
            }
        }
    }
    for file in ["render_cases.jsonl", "chat_prompts.jsonl"] {
        for row in read_jsonl(file) {
            let text = row["text"].as_str().unwrap();
            assert_eq!(tok.decode(&ids_of(&row["ids"])), text.as_bytes());
        }
    }
}

#[test]
fn stream_decoder_matches_decode() {
    let tok = tokenizer();
    for row in read_jsonl("cases.jsonl") {
        let text = row["text"].as_str().unwrap();
        let ids = ids_of(&row["ids"]);
        let mut d = tok.stream_decoder();
        let mut got = String::new();
        for &id in &ids {
            let piece = d.push(tok, id);
            // Nothing but whole characters comes out, and never U+FFFD for valid text.
            assert!(!piece.contains('\u{FFFD}') || text.contains('\u{FFFD}'));
            got.push_str(&piece);
            assert!(d.pending_len() < 4);
        }
        got.push_str(&d.flush());
        assert_eq!(got, text, "{}", row["id"]);
    }
}

#[test]
fn stream_decoder_handles_bad_ids_and_broken_utf8() {
    let tok = tokenizer();
    let mut d = tok.stream_decoder();
    // Out-of-range ids contribute nothing.
    assert_eq!(d.push(tok, u32::MAX), "");
    assert_eq!(d.push(tok, 129280), "");
    // A lone continuation byte token, then a lead byte that never completes.
    let byte_id = |b: u8| {
        (0..tok.vocab_size() as u32)
            .find(|&id| tok.token_bytes(id) == Some(&[b][..]))
            .expect("single-byte token")
    };
    let (cont, lead) = (byte_id(0x80), byte_id(0xE2));
    assert_eq!(d.push(tok, cont), "\u{FFFD}");
    assert_eq!(d.push(tok, lead), "");
    assert_eq!(d.push(tok, tok.token_to_id("a").unwrap()), "\u{FFFD}a");
    assert_eq!(d.push(tok, lead), "");
    assert_eq!(d.flush(), "\u{FFFD}");
}

#[test]
fn public_v4_test_vector() {
    let text = "<｜User｜>你好<｜Assistant｜><think>推理</think>答案<｜end▁of▁sentence｜>";
    assert_eq!(
        tokenizer().encode(text, EncodeMode::Render),
        [128803, 30594, 128804, 128821, 36101, 128822, 7624, 1]
    );
}
