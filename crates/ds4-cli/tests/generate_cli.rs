//! End-to-end checks of `ds4` generation, dumps and the model benchmark on synthetic models.

use std::process::Command;

fn ds4(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ds4"))
        .args(args)
        .output()
        .expect("run ds4");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn one_shot_generation_is_reproducible_with_a_seed() {
    let args = [
        "--synthetic",
        "tiny",
        "-p",
        "hello there",
        "-n",
        "12",
        "--seed",
        "7",
        "--nothink",
    ];
    let (ok, out1, err) = ds4(&args);
    assert!(ok, "{err}");
    assert!(
        err.contains("SYNTHETIC"),
        "startup must say the model is synthetic: {err}"
    );
    assert!(
        err.contains("quant mix") && err.contains("backend: cpu"),
        "{err}"
    );
    assert!(err.contains("generation:"), "{err}");
    let (ok, out2, _) = ds4(&args);
    assert!(ok);
    assert_eq!(out1, out2, "same seed, same text");
    let (ok, out3, _) = ds4(&[
        "--synthetic",
        "tiny",
        "-p",
        "hello there",
        "-n",
        "12",
        "--seed",
        "8",
        "--nothink",
    ]);
    assert!(ok);
    assert_ne!(out1, out3, "another seed draws other tokens");
}

#[test]
fn dump_tokens_recognises_rendered_specials() {
    let (ok, out, err) = ds4(&[
        "--synthetic",
        "tiny",
        "--dump-tokens",
        "-p",
        "<｜User｜>hi<｜Assistant｜></think>",
    ]);
    assert!(ok, "{err}");
    let first = out.lines().next().unwrap();
    let ids: Vec<u32> = serde_json::from_str(first).unwrap();
    assert!(ids.len() >= 4, "{out}");
    assert!(
        out.contains("<｜User｜>") && out.contains("</think>"),
        "{out}"
    );
}

#[test]
fn dump_logprobs_writes_greedy_steps() {
    let path = std::env::temp_dir().join(format!("ds4-logprobs-{}.json", std::process::id()));
    let p = path.to_str().unwrap();
    let (ok, _, err) = ds4(&[
        "--synthetic",
        "tiny",
        "-p",
        "hi",
        "-n",
        "5",
        "--nothink",
        "--dump-logprobs",
        p,
    ]);
    assert!(ok, "{err}");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let steps = doc["steps"].as_array().unwrap();
    assert!(!steps.is_empty() && steps.len() <= 5);
    for s in steps {
        let top = s["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 20);
        // Greedy: the selected token is the most likely one.
        assert_eq!(s["selected"]["id"], top[0]["token"]["id"]);
        let lp: Vec<f64> = top.iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
        assert!(lp.windows(2).all(|w| w[0] >= w[1]) && lp[0] <= 0.0);
    }
    std::fs::remove_file(&path).ok();
}

#[test]
fn bench_prints_one_csv_row_per_frontier() {
    let (ok, out, err) = ds4(&[
        "bench",
        "--synthetic",
        "tiny",
        "--ctx-start",
        "64",
        "--ctx-max",
        "192",
        "--step-incr",
        "64",
        "--gen-tokens",
        "4",
    ]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        "ctx_tokens,prefill_tokens,prefill_tps,gen_tokens,gen_tps,kvcache_bytes"
    );
    let frontiers: Vec<u64> = lines[1..]
        .iter()
        .map(|l| l.split(',').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(frontiers, vec![64, 128, 192]);
    let kv: Vec<u64> = lines[1..]
        .iter()
        .map(|l| l.rsplit(',').next().unwrap().parse().unwrap())
        .collect();
    assert!(
        kv.windows(2).all(|w| w[0] < w[1]),
        "KV state grows with the context: {kv:?}"
    );
}

#[test]
fn clear_errors_for_missing_model_and_overflow() {
    let (ok, _, err) = ds4(&["-m", "/nonexistent/model.gguf", "-p", "hi"]);
    assert!(!ok);
    assert!(
        err.contains("not found") && err.contains("--synthetic demo"),
        "{err}"
    );
    let long = "word ".repeat(400);
    let (ok, _, err) = ds4(&["--synthetic", "tiny", "--ctx", "64", "-p", &long]);
    assert!(!ok);
    assert!(err.contains("context"), "{err}");
}

#[test]
fn interactive_chat_keeps_context_and_handles_commands() {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_ds4"))
        .args(["--synthetic", "tiny", "-n", "4", "--seed", "3"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hi\n/nothink\nhello again\n/bogus\n/ctx 100\n/quit\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("generation:").count(), 2, "{err}");
    assert!(err.contains("mode NoThink"), "{err}");
    assert!(err.contains("unknown command /bogus"), "{err}");
    assert!(
        err.contains("new session with a context of 100 tokens"),
        "{err}"
    );
}
