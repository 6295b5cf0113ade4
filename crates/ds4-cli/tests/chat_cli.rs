//! `ds4 render` / `ds4 parse` end to end: the built binary on a few recorded official cases
//! (data shared with the ds4 crate's chat tests).

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

const RENDER_CASES: &str = include_str!("../../ds4/tests/data/chat/cases.jsonl");
const PARSE_CASES: &str = include_str!("../../ds4/tests/data/chat/parse_cases.jsonl");

fn case(jsonl: &str, name: &str) -> Value {
    jsonl
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no case {name}"))
}

fn ds4(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ds4"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn render_prints_the_exact_prompt() {
    for name in [
        "single_turn_chat",
        "tool_call_and_result_thinking",
        "official_test_3",
        "context_with_tools",
    ] {
        let c = case(RENDER_CASES, name);
        let out = ds4(&["render"], c["encoder_call"].to_string().as_bytes());
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            c["rendered"].as_str().unwrap(),
            "{name}"
        );
    }
}

#[test]
fn render_rejects_what_the_encoder_rejects() {
    for input in [
        "not json",
        r#"{"messages":[{"role":"user","content":null}],"kwargs":{"thinking_mode":"chat"}}"#,
    ] {
        let out = ds4(&["render"], input.as_bytes());
        assert_eq!(out.status.code(), Some(1), "{input}");
        assert!(out.stdout.is_empty());
        assert_eq!(String::from_utf8(out.stderr).unwrap().lines().count(), 1);
    }
}

#[test]
fn parse_prints_the_official_result_or_fails() {
    for name in [
        "p_tool_several_params",
        "p_thinking_multiline",
        "p_string_value_escapes",
    ] {
        let c = case(PARSE_CASES, name);
        let mode = c["thinking_mode"].as_str().unwrap();
        let out = ds4(
            &["parse", "--mode", mode],
            c["text"].as_str().unwrap().as_bytes(),
        );
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(got, c["result"], "{name}");
    }
    for name in ["p_err_bad_invoke_name", "p_err_missing_think_end"] {
        let c = case(PARSE_CASES, name);
        let out = ds4(
            &["parse", "--mode", c["thinking_mode"].as_str().unwrap()],
            c["text"].as_str().unwrap().as_bytes(),
        );
        assert_eq!(out.status.code(), Some(1), "{name}");
        assert!(out.stdout.is_empty());
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        let want = format!(
            "ds4 parse: {}: {}\n",
            c["error"]["type"].as_str().unwrap(),
            serde_json::to_string(&c["error"]["message"]).unwrap()
        );
        assert_eq!(stderr, want);
    }
}
